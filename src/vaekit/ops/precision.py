"""Precision policy: fp32/bf16/fp16/auto, the execution copy of a model in that dtype, and the NaN guard.

The model the user loaded is never changed: running in another dtype (or memory format, or device) uses a
converted copy cached beside it, rebuilt when the original's weights change (an optimiser step bumps their
version counters).
"""

from __future__ import annotations

import copy
import functools
import weakref
from collections.abc import Callable

import torch
from torch import nn

from vaekit.errors import BadInputError, VaekitError
from vaekit.models.blocks import AttnBlock, ResnetBlock, Upsample
from vaekit.ops.fastpath import optimize_for_inference

FAST_BLOCKS = (AttnBlock, ResnetBlock, Upsample)

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo (empty where the file does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_bf16_units() -> bool:
    """True where the CPU computes bf16 natively (AMX tiles or AVX512-BF16), so bf16 beats fp32."""
    if cpu_flags() & {"amx_bf16", "avx512_bf16"}:
        return True
    capability = torch.backends.cpu.get_cpu_capability().upper()
    return "AMX" in capability or "BF16" in capability


def parse_precision(name: str | torch.dtype) -> str:
    """Validate a precision name (or dtype) and return its canonical name."""
    if isinstance(name, torch.dtype):
        if name not in DTYPE_NAMES:
            raise BadInputError(f"unsupported dtype {name}; use one of {', '.join(PRECISIONS)}")
        return DTYPE_NAMES[name]
    aliases = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
    canonical = aliases.get(str(name).lower(), str(name).lower())
    if canonical not in PRECISIONS:
        raise BadInputError(f"unknown precision {name!r}; use one of {', '.join(PRECISIONS)}")
    return canonical


def resolve_dtype(precision: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype to compute in: ``auto`` is the fastest safe one for ``device`` (bf16 where native, else fp32)."""
    name = parse_precision(precision)
    if name != "auto":
        return DTYPES[name]
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if dev.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16_units() else torch.float32
    return torch.float32  # MPS: bf16 support varies by OS version, fp16 overflows in SDXL: stay exact


def nonfinite_items(t: torch.Tensor) -> list[int]:
    """Indices along dim 0 of the items holding a NaN or an infinity."""
    bad = ~torch.isfinite(t).flatten(1).all(dim=1)
    return bad.nonzero().flatten().tolist() if bool(bad.any()) else []


# --- the execution copy of a model ---------------------------------------------------------------------------------
_REPLICAS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[object, ...], tuple[tuple[object, ...], nn.Module]]] = (
    weakref.WeakKeyDictionary()
)


def _signature(model: nn.Module) -> tuple[object, ...]:
    return tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))


def _matches(model: nn.Module, dtype: torch.dtype, device: torch.device, channels_last: bool) -> bool:
    for p in model.parameters():
        if p.dtype != dtype or p.device.type != device.type or (device.index is not None and p.device != device):
            return False
        if channels_last and p.ndim == 4 and p.shape[-1] > 1 and not p.is_contiguous(memory_format=torch.channels_last):
            return False
    return True


def execution_model(
    model: nn.Module, dtype: torch.dtype, device: torch.device, channels_last: bool = False, fast: bool = False
) -> nn.Module:
    """``model`` itself when it already has this dtype/device/layout, else a cached converted copy of it.

    ``fast=True`` also rewrites the copy's blocks into their inference forms (:mod:`vaekit.ops.fastpath`).
    """
    fast = fast and any(type(m) in FAST_BLOCKS for m in model.modules())
    if not fast and _matches(model, dtype, device, channels_last):
        return model
    key = (dtype, str(device), channels_last, fast)
    per_model = _REPLICAS.setdefault(model, {})
    sig = _signature(model)
    cached = per_model.get(key)
    if cached is not None and cached[0] == sig:
        return cached[1]
    per_model.pop(key, None)
    with torch.no_grad():
        replica = copy.deepcopy(model)
        if fast:
            replica = optimize_for_inference(replica)
        replica = replica.to(device=device, dtype=dtype)
        if channels_last:  # 4-D weights only (a video VAE keeps its 5-D conv weights as they are)
            for param in replica.parameters():
                if param.ndim == 4:
                    param.data = param.data.contiguous(memory_format=torch.channels_last)
    replica.eval().requires_grad_(False)
    per_model[key] = (sig, replica)
    return replica


def clear_execution_cache(model: nn.Module | None = None) -> None:
    """Free the converted copies of ``model`` (of every model when None)."""
    if model is None:
        _REPLICAS.clear()
    else:
        _REPLICAS.pop(model, None)


# --- the NaN guard -------------------------------------------------------------------------------------------------
def run_guarded(
    fn: Callable[[torch.dtype, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    dtype: torch.dtype,
    what: str,
    index_offset: int = 0,
    item_ids: list[int] | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """Run ``fn(dtype, x)``; items whose output holds NaN/inf are recomputed with ``fn(float32, x[items])``.

    Returns the float32 output and notes naming each recomputed item (``item_ids`` maps batch positions to the
    caller's item numbers). Raises :class:`VaekitError` when an item is not finite even in fp32.
    """
    out = fn(dtype, x).float()
    notes: list[str] = []
    bad = nonfinite_items(out)
    if not bad:
        return out, notes
    ids = item_ids or [index_offset + i for i in range(x.shape[0])]
    if dtype != torch.float32:
        idx = torch.tensor(bad, device=x.device)
        redo = fn(torch.float32, x.index_select(0, idx)).float()
        out[idx.to(out.device)] = redo
        for i in bad:
            notes.append(f"item {ids[i]}: {what} recomputed in fp32 after NaN/inf in {DTYPE_NAMES.get(dtype, dtype)}")
        still = [bad[j] for j in nonfinite_items(redo)]
    else:
        still = bad
    if still:
        raise VaekitError(
            f"{what} of item {ids[still[0]]} gives NaN/inf even in fp32: the VAE's weights or the input are broken"
        )
    return out, notes
