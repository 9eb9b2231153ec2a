"""The GPU check: correctness and speed of vaekit on CUDA against its CPU result and against diffusers.

    benchmarks/device_check.sh            # installs the project, then runs this
    python benchmarks/device_check.py --quick

Part 1 (always, seconds): a CPU sanity check on a small random sd1 VAE (vaekit fp32 against diffusers on the same
weights, exact tiling against untiled, the NaN guard recovering an fp16 overflow).
Part 2 (only where ``torch.cuda.is_available()``): on the GPU, with the real-width presets and random weights
shared with diffusers: fp32 against the CPU result, bf16/fp16 PSNR, exact tiling, the fp16 overflow guard, then
decode speed against diffusers (SD1 512 px, SDXL 1024 px, FLUX.2 1024 px; bf16, channels-last; eager, then
torch.compile while the time budget lasts) and the peak memory of a 4096 px decode. Goals are printed beside
every figure. Without CUDA it prints one line saying the cuda part is skipped and exits 0.

Exit status: 0 when every correctness check passed (speed goals are reported, never fatal), 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

START = time.monotonic()
FAILED: list[str] = []
# The GPU part runs on this device; VAEKIT_DEVICE_CHECK_DEVICE=cpu dry-runs its code paths without a GPU (with --quick).
DEVICE = os.environ.get("VAEKIT_DEVICE_CHECK_DEVICE", "cuda")
SMALL = False  # --quick: small widths in the GPU part too


def _elapsed() -> float:
    return time.monotonic() - START


def _line(name: str, value: str, goal: str, ok: bool | None) -> None:
    verdict = "" if ok is None else ("PASS" if ok else "FAIL")
    if ok is False:
        FAILED.append(name)
    print(f"  {name:<52} {value:>16}   goal {goal:<22} {verdict}", flush=True)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.float().cpu() - b.float().cpu()) ** 2).item()
    return float("inf") if mse == 0 else float(10 * torch.log10(torch.tensor(1.0 / mse)))


def _pair(name: str, small: bool, seed: int = 0) -> tuple[torch.nn.Module, object]:
    """A random diffusers VAE of preset ``name`` and the vaekit VAE holding the very same weights (CPU, fp32)."""
    import diffusers

    from vaekit.families import preset
    from vaekit.formats.convert import diffusers_to_ldm
    from vaekit.formats.export import diffusers_config
    from vaekit.models import build
    from vaekit.vae import VAE, VAEOrigin

    cfg = preset(name)
    if small:
        cfg = dataclasses.replace(cfg, base_channels=32, channel_mult=(1, 2, 2, 2))
    kwargs = diffusers_config(cfg)
    cls = getattr(diffusers, kwargs.pop("_class_name"))
    torch.manual_seed(seed)
    ref = cls(**kwargs).eval().requires_grad_(False)
    with torch.no_grad():  # norms start as identities: perturb them so the comparison covers their weights
        for m in ref.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.add_(torch.randn_like(m.weight) * 0.1)
                m.bias.add_(torch.randn_like(m.bias) * 0.1)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.5)
                m.running_var.copy_(torch.rand_like(m.running_var) * 2 + 0.1)
    model = build(cfg, device="meta")
    model.load_state_dict(diffusers_to_ldm(ref.state_dict(), cfg.kind), assign=True)
    return ref, VAE(model, cfg, VAEOrigin(name=f"{name} (random, seed {seed})"))


def _photo(size: int) -> torch.Tensor:
    """scikit-image's astronaut (bundled with vaekit) at size x size, (1, 3, H, W) in [0, 1]."""
    from PIL import Image

    from vaekit.ops.images import builtin_image_paths

    with Image.open(builtin_image_paths()[0]) as im:
        im = im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return data.reshape(size, size, 3).permute(2, 0, 1).unsqueeze(0).float() / 255


def _overflow_check(vae: object, latents: torch.Tensor, device: str) -> None:
    """Scale the decoder's first conv so fp16 overflows; the guard must recompute the item in fp32."""
    from vaekit.ops.codec import CodecOptions, decode

    conv = vae.model.decoder.conv_in  # type: ignore[attr-defined]
    with torch.no_grad():
        conv.weight.mul_(1e5)
        conv.bias.mul_(1e5)
    try:
        half = decode(vae, latents, CodecOptions(precision="fp16", tiling="off", device=device))
        full = decode(vae, latents, CodecOptions(precision="fp32", tiling="off", device=device))
    finally:
        with torch.no_grad():
            conv.weight.div_(1e5)
            conv.bias.div_(1e5)
    recovered = any("recomputed in fp32" in n for n in half.notes) and bool(torch.isfinite(half.images).all())
    diff = (half.images - full.images).abs().max().item()
    _line("fp16 overflow (conv x1e5): NaN guard recovers", "yes" if recovered else "no", "yes", recovered)
    _line("  recovered item vs fp32 decode, max abs", f"{diff:.2e}", "<= 1e-4", diff <= 1e-4)


def cpu_sanity(size: int) -> None:
    """vaekit against diffusers on CPU (small random sd1), exact tiling, the fp16 overflow guard."""
    from vaekit.ops.codec import CodecOptions, decode, encode

    print(f"\n[cpu sanity] small random sd1 (width 32), {size} px image, fp32", flush=True)
    ref, vae = _pair("sd1", small=True)
    image = _photo(size)
    fp32 = CodecOptions(precision="fp32", tiling="off")
    latents = encode(vae, image, fp32).latents
    ours = decode(vae, latents, fp32).images
    with torch.no_grad():
        theirs = ((ref.decode(vae.denormalise(latents)).sample + 1) / 2).clamp(0, 1)
    diff = (ours - theirs).abs().max().item()
    _line("vaekit vs diffusers decode, max abs", f"{diff:.2e}", "<= 1e-3", diff <= 1e-3)
    exact = decode(vae, latents, CodecOptions(precision="fp32", tiling="exact", tile_size=size // 2))
    p = _psnr(exact.images, ours)
    _line("exact tiling vs untiled, PSNR dB", f"{p:.1f}", ">= 60", exact.tiled and p >= 60)
    _overflow_check(vae, latents, "cpu")


def _cuda_time(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median seconds of ``fn`` on the GPU (synchronised), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    if DEVICE == "cpu":
        return statistics.median(_wall(fn) for _ in range(repeats))
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def _wall(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _sync() -> None:
    if DEVICE != "cpu":
        torch.cuda.synchronize()


def cuda_correctness(size: int) -> None:
    """fp32 on cuda against the CPU; bf16/fp16 PSNR; exact tiling; fp16 overflow, all with the real sd1 width."""
    from vaekit.ops.codec import CodecOptions, decode, encode

    print(f"\n[cuda correctness] sd1 at full width, random weights, {size} px image", flush=True)
    _, vae = _pair("sd1", small=SMALL)
    image = _photo(size)
    latents = encode(vae, image, CodecOptions(precision="fp32", tiling="off")).latents
    cpu = decode(vae, latents, CodecOptions(precision="fp32", tiling="off")).images
    gpu = decode(vae, latents, CodecOptions(precision="fp32", tiling="off", device=DEVICE)).images
    diff = (gpu.cpu() - cpu).abs().max().item()
    _line("decode fp32 cuda vs cpu, max abs", f"{diff:.2e}", "<= 1e-3", diff <= 1e-3)
    enc_gpu = encode(vae, image, CodecOptions(precision="fp32", tiling="off", device=DEVICE)).latents
    rel = ((enc_gpu.cpu() - latents).abs().max() / latents.abs().max()).item()
    _line("encode fp32 cuda vs cpu, max rel", f"{rel:.2e}", "<= 1e-3", rel <= 1e-3)
    for precision in ("bf16", "fp16"):
        low = decode(vae, latents, CodecOptions(precision=precision, tiling="off", device=DEVICE))
        p = _psnr(low.images, cpu)
        _line(f"decode {precision} vs fp32, PSNR dB", f"{p:.1f}", ">= 40", p >= 40 and not low.notes)
    exact = decode(vae, latents, CodecOptions(precision="fp32", tiling="exact", tile_size=size // 2, device=DEVICE))
    p = _psnr(exact.images, gpu)
    _line("exact tiling vs untiled (fp32), PSNR dB", f"{p:.1f}", ">= 60", exact.tiled and p >= 60)
    _overflow_check(vae, latents, DEVICE)


def _ref_decode(fn: Callable[[torch.Tensor], object], raw: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return fn(raw).sample  # type: ignore[attr-defined]


def _vaekit_decode(vae: object, latents: torch.Tensor, opts: object) -> torch.Tensor:
    from vaekit.ops.codec import decode

    return decode(vae, latents, opts).images  # CPU latents (2 MB) copied in, as a pipeline hands them over


_PAIRS: dict[str, tuple[object, ...]] = {}


def cuda_speed(cases: list[tuple[str, int]], repeats: int, budget_s: float, compiled: bool) -> None:
    """Decode time of vaekit against diffusers on the same weights: bf16, channels-last, eager then compiled."""
    from vaekit.ops.codec import CodecOptions

    print("\n[cuda speed] decode, bf16, channels-last, median of CUDA-event times (vaekit includes its checks)")
    goal = f"FLUX.2 1024 px <= 30 ms (H100/H200); vaekit >= 1.5x diffusers; budget {budget_s:.0f} s"
    print(f"  goals: {goal}", flush=True)
    pairs = _PAIRS
    for name, size in cases:
        if name in pairs:
            continue
        ref, vae = _pair(name, small=SMALL)
        ref = ref.to(DEVICE, torch.bfloat16, memory_format=torch.channels_last)
        lat_side = size // vae.downscale
        latents = torch.randn(1, vae.latent_channels, lat_side, lat_side)
        raw = vae.denormalise(latents).to(DEVICE, torch.bfloat16, memory_format=torch.channels_last)
        pairs[name] = (ref, vae, latents, raw, size)
    for name, (ref, vae, latents, raw, size) in pairs.items():
        tag = f"{name} {size} px{' compiled' if compiled else ''}"
        if compiled and _elapsed() > budget_s - 120:
            print(f"  {tag}: skipped (time budget: {_elapsed():.0f} s of {budget_s:.0f} s used)", flush=True)
            continue
        ref_fn = torch.compile(ref.decode) if compiled else ref.decode
        opts = CodecOptions(precision="bf16", tiling="off", device=DEVICE, compile=compiled)

        warm = 3 if compiled else 2
        try:
            t_ref = _cuda_time(functools.partial(_ref_decode, ref_fn, raw), warm, repeats)
            t_ours = _cuda_time(functools.partial(_vaekit_decode, vae, latents, opts), warm, repeats)
        except Exception as exc:  # noqa: BLE001 - one line per failed measurement, the check goes on
            print(f"  {tag}: ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
            continue
        speedup = t_ref / t_ours
        _line(f"{tag}: diffusers ms", f"{t_ref * 1000:.1f}", "", None)
        _line(f"{tag}: vaekit ms", f"{t_ours * 1000:.1f}", "<= 30" if name == "flux2" and size == 1024 else "", None)
        _line(f"{tag}: speed-up over diffusers", f"{speedup:.2f}x", ">= 1.5x", None)
        print(f"    -> {'meets' if speedup >= 1.5 else 'misses'} the 1.5x goal", flush=True)
        if name == "flux2" and size == 1024:
            print(f"    -> FLUX.2 1024 px {'meets' if t_ours <= 0.030 else 'misses'} the 30 ms goal", flush=True)


def cuda_memory(side: int, tiled: bool) -> None:
    """Peak GPU memory and time of an sd1 decode to side x side pixels (auto; with ``tiled``, exact under 3 GB)."""
    from vaekit.ops.codec import CodecOptions

    print(f"\n[cuda memory] sd1 full width, decode to {side} px, bf16", flush=True)
    _, vae = _pair("sd1", small=SMALL)
    latents = torch.randn(1, vae.latent_channels, side // 8, side // 8)
    cases = [("tiling auto (default budget)", CodecOptions(precision="bf16", device=DEVICE))]
    if tiled:  # the exact engine spills its whole activations to files at this budget: minutes, even on a GPU
        exact = CodecOptions(precision="bf16", tiling="exact", max_memory=3 * 2**30, device=DEVICE)
        cases.append(("exact tiling, max_memory 3 GB", exact))
    for label, opts in cases:
        try:
            _memory_case(vae, latents, label, opts)
        except Exception as exc:  # noqa: BLE001 - one line per failed measurement, the check goes on
            _line(f"{label}: ran", f"{type(exc).__name__}", "no error", False)
            print(f"    {str(exc).splitlines()[0][:200] if str(exc) else ''}", flush=True)


def _memory_case(vae: object, latents: torch.Tensor, label: str, opts: object) -> None:
    from vaekit.ops.codec import decode

    decode(vae, latents[:, :, :8, :8], opts)  # warm the execution copy and cuDNN
    _sync()
    gpu = DEVICE != "cpu"
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if gpu else 0
    start = time.perf_counter()
    out = decode(vae, latents, opts)
    _sync()
    secs = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if gpu else float("nan")
    ok = bool(torch.isfinite(out.images).all())
    del out
    _line(f"{label}: peak GiB (above weights)", f"{peak:.2f}", "<= 3.0" if "3 GB" in label else "", None)
    _line(f"{label}: seconds, finite output", f"{secs:.2f}", "finite", ok)


def main(argv: list[str] | None = None) -> int:
    """Run the CPU sanity part, then the cuda part where a GPU exists; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes everywhere (CI, CPU-only machines)")
    parser.add_argument("--no-cuda", action="store_true", help="run the CPU part only, as if no GPU existed")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile timings")
    parser.add_argument("--tiled-4096", action="store_true", help="also exact tiling under 3 GB at 4096 px (slow)")
    parser.add_argument("--repeats", type=int, default=10, help="timed decodes per variant (median)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the whole check (compile stops)")
    args = parser.parse_args(argv)
    quick = args.quick or os.environ.get("VAEKIT_DEVICE_CHECK_QUICK") == "1"
    global SMALL
    SMALL = quick

    print(f"vaekit device check: python {platform.python_version()}, torch {torch.__version__}")
    print(f"cuda: available={torch.cuda.is_available()} build={torch.version.cuda}", flush=True)
    cpu_sanity(64 if quick else 128)
    if args.no_cuda or (DEVICE == "cuda" and not torch.cuda.is_available()):
        why = (
            "--no-cuda given"
            if args.no_cuda
            else f"no CUDA device (torch {torch.__version__}, cuda build {torch.version.cuda})"
        )
        print(f"\ncuda part SKIPPED: {why}", flush=True)
        print(f"\n{'FAILED: ' + ', '.join(FAILED) if FAILED else 'all correctness checks passed'} ({_elapsed():.1f} s)")
        return 1 if FAILED else 0
    print(f"gpu: {torch.cuda.get_device_name() if DEVICE == 'cuda' else DEVICE + ' (dry run)'}", flush=True)
    torch.backends.cudnn.benchmark = True
    cuda_correctness(128 if quick else 512)
    if quick:
        cases = [("sd1", 256)]
    else:
        cases = [("sd1", 512), ("sdxl", 1024), ("flux2", 1024)]
    repeats = 3 if quick else args.repeats
    cuda_speed(cases, repeats, args.budget, compiled=False)
    cuda_memory(512 if quick else 4096, tiled=args.tiled_4096 or quick)
    if not args.no_compile:
        cuda_speed(cases, repeats, args.budget, compiled=True)
    print(f"\n{'FAILED: ' + ', '.join(FAILED) if FAILED else 'all correctness checks passed'} ({_elapsed():.1f} s)")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
