"""Precision policy and the NaN guard: auto dtype, reduced-precision paths, recovery in fp32, device helpers."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

from tests.conftest import small_config
from vaekit.errors import BadInputError, VaekitError
from vaekit.models import build
from vaekit.ops import precision as prec
from vaekit.ops.codec import CodecOptions, decode, encode
from vaekit.ops.device import choose_device, default_budget, free_memory
from vaekit.vae import VAE, VAEOrigin


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared, loaded CPU, OpenMP barriers make tiny models many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _micro(name: str = "sd1") -> VAE:
    cfg = small_config(name)
    if cfg.kind == "kl":
        cfg = dataclasses.replace(cfg, base_channels=16, norm_groups=8)
    torch.manual_seed(0)
    return VAE(build(cfg), cfg, VAEOrigin(name=f"micro-{name}"))


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / torch.mean((a - b) ** 2)))


def test_auto_picks_bf16_only_with_native_units(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prec, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    assert prec.resolve_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(prec, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert prec.resolve_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(prec, "cpu_flags", lambda: frozenset({"avx512f", "avx2"}))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert prec.resolve_dtype("auto", "cpu") == torch.float32
    assert prec.resolve_dtype("fp16", "cpu") == torch.float16
    assert prec.resolve_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    assert prec.resolve_dtype("auto", "mps") == torch.float32
    with pytest.raises(BadInputError, match="unknown precision"):
        prec.resolve_dtype("int8", "cpu")


@pytest.mark.parametrize(("precision", "min_psnr"), [("bf16", 30.0), ("fp16", 45.0)])
def test_reduced_precision_is_close_to_fp32(precision: str, min_psnr: float) -> None:
    vae = _micro()
    x = torch.rand(2, 3, 24, 32)
    ref = encode(vae, x)
    low = encode(vae, x, CodecOptions(precision=precision))
    assert low.dtype == prec.DTYPES[precision] and ref.dtype == torch.float32 and not low.notes
    assert low.latents.dtype == torch.float32
    err = (low.latents - ref.latents).abs().max() / ref.latents.abs().max()
    assert 0 < float(err) < (0.05 if precision == "bf16" else 0.005)
    img_ref = decode(vae, ref.latents).images
    img_low = decode(vae, ref.latents, CodecOptions(precision=precision)).images
    assert not torch.equal(img_low, img_ref) and _psnr(img_low, img_ref) > min_psnr


def _nan_hook(item: int, only_reduced: bool = True):  # noqa: ANN202
    def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if only_reduced and out.dtype == torch.float32:
            return out
        out = out.clone()
        if out.shape[0] > item:
            out[item] = float("nan")
        return out

    return hook


@pytest.mark.parametrize("name", ["sd1", "taesd"])
def test_nan_in_one_item_is_recomputed_in_fp32(name: str) -> None:
    vae = _micro(name)
    x = torch.rand(3, 3, 16, 24)
    ref_enc = encode(vae, x)
    ref_dec = decode(vae, ref_enc.latents)
    handles = [
        vae.model.encoder[-1].register_forward_hook(_nan_hook(1))
        if name == "taesd"
        else vae.model.encoder.conv_out.register_forward_hook(_nan_hook(1)),
        vae.model.decoder[-1].register_forward_hook(_nan_hook(2))
        if name == "taesd"
        else vae.model.decoder.conv_out.register_forward_hook(_nan_hook(2)),
    ]
    try:
        enc = encode(vae, x, CodecOptions(precision="bf16"))
        dec = decode(vae, ref_enc.latents, CodecOptions(precision="bf16"))
    finally:
        for h in handles:
            h.remove()
    assert enc.notes == ["item 1: encode recomputed in fp32 after NaN/inf in bf16"]
    assert dec.notes == ["item 2: decode recomputed in fp32 after NaN/inf in bf16"]
    assert bool(torch.isfinite(enc.latents).all()) and bool(torch.isfinite(dec.images).all())
    # the failing item is exactly the fp32 result; the others stay bf16 (close, not equal)
    torch.testing.assert_close(enc.latents[1], ref_enc.latents[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dec.images[2], ref_dec.images[2], rtol=1e-4, atol=1e-5)
    assert not torch.equal(dec.images[0], ref_dec.images[0]) and _psnr(dec.images[0], ref_dec.images[0]) > 25


def test_nan_even_in_fp32_is_a_clear_failure() -> None:
    vae = _micro()
    handle = vae.model.decoder.conv_out.register_forward_hook(_nan_hook(0, only_reduced=False))
    try:
        with pytest.raises(VaekitError, match="item 0 gives NaN/inf even in fp32"):
            decode(vae, torch.randn(1, 4, 2, 2), CodecOptions(precision="bf16"))
        with pytest.raises(VaekitError, match="even in fp32"):
            decode(vae, torch.randn(1, 4, 2, 2))
    finally:
        handle.remove()


def test_run_guarded_redoes_only_failing_items() -> None:
    calls: list[tuple[torch.dtype, int]] = []

    def fn(dtype: torch.dtype, x: torch.Tensor) -> torch.Tensor:
        calls.append((dtype, x.shape[0]))
        y = x.to(dtype) * 2
        if dtype != torch.float32:
            y[x[:, 0] < 0] = float("inf")
        return y

    x = torch.tensor([[1.0], [-1.0], [2.0], [-3.0]])
    out, notes = prec.run_guarded(fn, x, torch.float16, "decode", item_ids=[10, 11, 12, 13])
    assert calls == [(torch.float16, 4), (torch.float32, 2)]
    assert torch.equal(out, x * 2) and out.dtype == torch.float32
    assert notes == [
        "item 11: decode recomputed in fp32 after NaN/inf in fp16",
        "item 13: decode recomputed in fp32 after NaN/inf in fp16",
    ]


def test_execution_copy_is_cached_and_follows_weight_updates() -> None:
    vae = _micro()
    cpu = torch.device("cpu")
    assert prec.execution_model(vae.model, torch.float32, cpu, channels_last=False) is vae.model
    a = prec.execution_model(vae.model, torch.bfloat16, cpu, channels_last=True)
    assert a is not vae.model and a is prec.execution_model(vae.model, torch.bfloat16, cpu, channels_last=True)
    assert next(a.parameters()).dtype == torch.bfloat16 and vae.dtype == torch.float32
    assert a.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        vae.model.decoder.conv_out.bias.add_(1.0)  # an optimiser step: in place, version bumped
    b = prec.execution_model(vae.model, torch.bfloat16, cpu, channels_last=True)
    assert b is not a
    torch.testing.assert_close(b.decoder.conv_out.bias.float(), vae.model.decoder.conv_out.bias, atol=1e-2, rtol=0)
    prec.clear_execution_cache(vae.model)
    assert prec.execution_model(vae.model, torch.bfloat16, cpu, channels_last=True) is not b


def test_device_choice_and_budget() -> None:
    assert choose_device("cpu") == torch.device("cpu")
    assert choose_device(None).type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(BadInputError, match="no CUDA GPU"):
            choose_device("cuda")
    with pytest.raises(BadInputError, match="unknown device"):
        choose_device("tpu9")
    free = free_memory("cpu")
    assert free > 0 and 0 < default_budget("cpu") < free


def test_peak_memory_on_cpu_sees_a_large_temporary() -> None:
    # In a fresh process: after hundreds of tests the allocator may hold freed pages it hands back without the
    # resident size growing, which is right for the meter but would make this check depend on the test order.
    code = """
import torch
from vaekit.ops.device import PeakMemory
with PeakMemory("cpu") as small:
    torch.ones(1000).sum()
with PeakMemory("cpu", interval=0.0005) as big:
    t = torch.ones(64 * 1024 * 1024)  # 256 MiB, touched
    t.add_(1)
    del t
print(small.peak, big.peak)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    small, big = (int(v) for v in out.split())
    assert big > 200 * 1024 * 1024 > small
