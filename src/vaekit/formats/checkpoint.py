"""Surgery on full checkpoints: find the baked VAE and replace it, keeping everything else bit-exact.

Checkpoints are large (2 to 24 GB), so a safetensors checkpoint is rewritten by streaming: the header is rebuilt,
every tensor that is not part of the VAE is copied byte for byte from the original file, and only the new VAE
tensors are serialised. Memory stays at the size of the VAE whatever the size of the checkpoint.

The safetensors layout (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header length
N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` padded with
spaces, then the data buffer, with offsets relative to its start.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from vaekit import families
from vaekit.errors import BadInputError, LoadError
from vaekit.formats import keymaps
from vaekit.formats.convert import ldm_to_diffusers
from vaekit.formats.detect import Detection, detect
from vaekit.formats.io import TensorFile, atomic_path

ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_ST_SIZES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}
_COPY_CHUNK = 16 << 20


@dataclass
class _Tensor:
    """One output tensor: bytes copied from a range of the source file, or a tensor to serialise."""

    name: str
    dtype: str
    shape: list[int]
    nbytes: int
    span: tuple[int, int] | None = None  # absolute byte range in the source file
    tensor: torch.Tensor | None = None


@dataclass
class BakeReport:
    """What :func:`bake_vae` did."""

    dest: Path
    prefix: str
    layout: str
    dtype: str
    replaced: int  # VAE tensors removed from the checkpoint
    written: int  # VAE tensors written
    kept: int  # other tensors copied bit-exact
    notes: list[str] = field(default_factory=list)


def read_header(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    """(tensor entries, metadata, start of the data buffer) of a safetensors file, validated."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoadError(f"{path}: truncated safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise LoadError(f"{path}: truncated safetensors file (header runs past the end)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LoadError(f"{path}: invalid safetensors header ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + n
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end or start + end > size:
            raise LoadError(f"{path}: tensor {name} lies outside the file; is it truncated?")
    return header, metadata, start


def checkpoint_vae(f: TensorFile) -> Detection | None:
    """The baked VAE's detection, or None when the checkpoint holds no VAE."""
    try:
        det = detect(f.shapes, f.metadata, dtypes=f.dtypes)
    except LoadError:
        return None
    return det


def _main_float_dtype(dtypes: dict[str, torch.dtype]) -> torch.dtype:
    floats = [d for d in dtypes.values() if d.is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.float32


def bake_vae(
    checkpoint: str | os.PathLike[str],
    vae_state: dict[str, torch.Tensor],
    kind: str,
    dest: str | os.PathLike[str],
) -> BakeReport:
    """Write ``checkpoint`` to ``dest`` with its VAE replaced by ``vae_state`` (vaekit/LDM names).

    Non-VAE tensors and the file's metadata are kept bit-exact; the new VAE tensors go under the checkpoint's own
    prefix, in its own layout (LDM or diffusers names) and its VAE's dtype. ``dest`` may be ``checkpoint`` itself:
    the write goes to a temporary file renamed over it only when complete.
    """
    checkpoint, dest = Path(checkpoint), Path(dest)
    f = TensorFile(checkpoint)
    det = checkpoint_vae(f)
    notes: list[str] = []
    if det is not None and det.container == "bare":
        raise BadInputError(f"{checkpoint}: a bare VAE file, not a checkpoint; nothing to bake into")
    if det is None:
        if not families.is_diffusion_checkpoint(f.keys()):
            raise BadInputError(f"{checkpoint}: neither a VAE nor a diffusion model found in it; is this a checkpoint?")
        prefix, layout, dtype = keymaps.CHECKPOINT_PREFIXES[0], "ldm", _main_float_dtype(f.dtypes)
        old_keys: set[str] = set()
        notes.append(f"the checkpoint had no VAE; added one under {prefix}")
    else:
        prefix, layout = det.prefix, det.layout
        old_keys = set(det.key_map.values())
        dtype = _main_float_dtype({k: f.dtypes[k] for k in old_keys})
    if layout not in ("ldm", "diffusers"):
        raise BadInputError(f"{checkpoint}: its VAE has the {layout} layout; only KL VAEs can be baked")
    if kind != "kl":
        raise BadInputError(f"a {kind} VAE cannot be baked into a checkpoint; bake a full KL VAE")
    if dtype not in ST_DTYPES:
        raise BadInputError(f"{checkpoint}: its VAE is stored as {dtype}, which vaekit cannot write")
    named = ldm_to_diffusers(vae_state, "kl") if layout == "diffusers" else dict(vae_state)
    new = {prefix + k: v.detach().to("cpu", dtype).contiguous() for k, v in named.items()}
    clash = sorted(set(new) & (set(f.keys()) - old_keys))
    if clash:
        raise BadInputError(f"{checkpoint}: new VAE key {clash[0]} collides with a non-VAE tensor; not baking")

    entries: list[_Tensor] = []
    if f.format == "safetensors":
        header, metadata, start = read_header(checkpoint)
        for name, info in header.items():
            if name in old_keys:
                continue
            begin, end = info["data_offsets"]
            entries.append(
                _Tensor(name, info["dtype"], list(info["shape"]), end - begin, span=(start + begin, start + end))
            )
    else:
        metadata = {}
        tensors = f.load()
        entries += [_tensor_entry(k, v) for k, v in tensors.items() if k not in old_keys]
        notes.append("the .ckpt's non-tensor entries (e.g. global_step) are not carried into the safetensors output")
    kept = len(entries)
    entries += [_tensor_entry(k, v) for k, v in new.items()]
    with atomic_path(dest) as tmp:
        with tmp.open("wb") as out, checkpoint.open("rb") as src:
            write_stream(out, entries, metadata, src)
    dtype_name = str(dtype).removeprefix("torch.")
    return BakeReport(dest, prefix, layout, dtype_name, len(old_keys), len(new), kept, notes)


def _tensor_entry(name: str, t: torch.Tensor) -> _Tensor:
    t = t.detach().cpu().contiguous()
    if t.dtype not in ST_DTYPES:
        raise BadInputError(f"tensor {name} has dtype {t.dtype}, which safetensors cannot hold")
    return _Tensor(name, ST_DTYPES[t.dtype], list(t.shape), t.numel() * t.element_size(), tensor=t)


def _itemsize(dtype: str) -> int:
    return _ST_SIZES.get(dtype, 1)


def write_stream(out: BinaryIO, entries: list[_Tensor], metadata: dict[str, str], src: BinaryIO | None) -> None:
    """Write a safetensors file: header, then each tensor's bytes (copied from ``src`` or serialised).

    Tensors are laid out by decreasing item size, as safetensors' own writer does, so every tensor stays aligned.
    """
    entries = sorted(entries, key=lambda e: (-_itemsize(e.dtype), e.name))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": e.shape, "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    out.write(struct.pack("<Q", len(raw)))
    out.write(raw)
    for e in entries:
        if e.span is not None:
            assert src is not None
            copy_range(src, out, *e.span)
        else:
            assert e.tensor is not None
            out.write(e.tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    out.flush()
    os.fsync(out.fileno())


def copy_range(src: BinaryIO, out: BinaryIO, begin: int, end: int) -> None:
    """Copy bytes [begin, end) of ``src`` to ``out`` in chunks."""
    src.seek(begin)
    left = end - begin
    while left:
        block = src.read(min(left, _COPY_CHUNK))
        if not block:
            raise LoadError(f"{getattr(src, 'name', 'source')}: ended early; is the file truncated?")
        out.write(block)
        left -= len(block)
