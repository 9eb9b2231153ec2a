"""Encode/decode speed of vaekit against diffusers' AutoencoderKL, same random sd1 weights, one process.

    .venv/bin/python benchmarks/bench_codec.py --size 512 --repeats 3 --threads 2
    .venv/bin/python benchmarks/bench_codec.py --size 512 --repeats 3 --threads 2 --peak-only   # vs the machine's peak

Prints the environment, a table of median times (after warm-up), the ratios the project targets, and the PSNR of
``auto`` precision against vaekit's fp32 output. Runs are interleaved (diffusers, vaekit, diffusers, ...) so load
from other processes hits both alike; ``--ablate`` adds vaekit without channels-last / without the fast blocks.
``--peak``/``--peak-only`` add the fraction of the machine's own convolution peak (docs/performance.md).
diffusers is a test-only dependency of vaekit; this script needs it installed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def _env(threads: int) -> str:
    from vaekit.ops.precision import cpu_flags, cpu_has_bf16_units, resolve_dtype

    flags = sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    import diffusers

    return "\n".join(
        [
            f"python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}",
            f"cpu: {cpu}; {os.cpu_count()} logical cores; torch threads {threads}; load average {load}",
            f"torch cpu capability: {torch.backends.cpu.get_cpu_capability()}; flags: {' '.join(flags)}",
            f"bf16 units (AMX / AVX512-BF16): {cpu_has_bf16_units()}; auto precision -> "
            f"{str(resolve_dtype('auto', 'cpu')).removeprefix('torch.')}",
        ]
    )


def _models(preset_name: str, seed: int) -> tuple[torch.nn.Module, object]:
    """A random diffusers AutoencoderKL and the vaekit VAE holding the very same weights."""
    from diffusers import AutoencoderKL as DiffusersKL

    from vaekit.families import preset
    from vaekit.formats.convert import diffusers_to_ldm
    from vaekit.formats.export import diffusers_config
    from vaekit.models import build
    from vaekit.vae import VAE, VAEOrigin

    cfg = preset(preset_name)
    kwargs = diffusers_config(cfg)
    kwargs.pop("_class_name")
    torch.manual_seed(seed)
    ref = DiffusersKL(**kwargs).eval().requires_grad_(False)
    with torch.no_grad():  # GroupNorm starts as identity; perturb so the weights are not trivially structured
        for m in ref.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.add_(torch.randn_like(m.weight) * 0.1)
                m.bias.add_(torch.randn_like(m.bias) * 0.1)
    model = build(cfg, device="meta")
    model.load_state_dict(diffusers_to_ldm(ref.state_dict(), "kl"), assign=True)
    return ref, VAE(model, cfg, VAEOrigin(name=f"{preset_name} (diffusers random init, seed {seed})"))


def _photo(size: int) -> torch.Tensor:
    """A real photograph (scikit-image's astronaut) resized to size x size, (1, 3, H, W) in [0, 1]."""
    from PIL import Image

    from vaekit.ops.images import builtin_image_paths

    with Image.open(builtin_image_paths()[0]) as im:
        im = im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return data.reshape(size, size, 3).permute(2, 0, 1).unsqueeze(0).float() / 255


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.float() - b.float()) ** 2).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def _time_interleaved(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, list[float]]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per variant first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--preset", default="sd1", help="architecture (default sd1, the real SD1 width)")
    parser.add_argument("--ops", default="decode,encode,auto", help="comma list of decode, encode, auto")
    parser.add_argument("--ablate", action="store_true", help="also time vaekit without channels-last / fast blocks")
    parser.add_argument("--peak", action="store_true", help="also print the fraction of the machine's conv peak")
    parser.add_argument("--peak-only", action="store_true", help="only the fraction-of-peak report (no diffusers)")
    args = parser.parse_args(argv)

    from vaekit.ops.codec import CodecOptions, decode, encode

    torch.set_num_threads(args.threads)
    print(_env(args.threads))
    ref, vae = _models(args.preset, seed=0)
    image = _photo(args.size)
    fp32 = CodecOptions(precision="fp32", tiling="off")
    auto = CodecOptions(precision="auto", tiling="off")
    latents = encode(vae, image, fp32).latents
    raw = vae.denormalise(latents)
    if args.peak_only:
        peak_report(vae, image, latents, args.threads, args.repeats)
        return
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    rows: list[tuple[str, float, float, str, str]] = []

    def ref_decode() -> torch.Tensor:
        with torch.no_grad():  # as diffusers pipelines run it
            return ref.decode(raw).sample

    def ref_encode() -> torch.Tensor:
        with torch.no_grad():
            return ref.encode(image * 2 - 1).latent_dist.mode()

    variants: dict[str, Callable[[], object]] = {}
    if "decode" in ops or "auto" in ops:
        variants["diffusers decode fp32"] = ref_decode
    if "decode" in ops:
        variants["vaekit decode fp32"] = lambda: decode(vae, latents, fp32)
        if args.ablate:
            variants["vaekit decode fp32, no channels-last"] = lambda: decode(
                vae, latents, CodecOptions(tiling="off", channels_last=False)
            )
            variants["vaekit decode fp32, no fast blocks"] = lambda: decode(
                vae, latents, CodecOptions(tiling="off", fast=False)
            )
    if "auto" in ops:
        variants["vaekit decode auto"] = lambda: decode(vae, latents, auto)
    if "encode" in ops:
        variants["diffusers encode fp32"] = ref_encode
        variants["vaekit encode fp32"] = lambda: encode(vae, image, fp32)
        if args.ablate:
            variants["vaekit encode fp32, no channels-last"] = lambda: encode(
                vae, image, CodecOptions(tiling="off", channels_last=False)
            )
    print(f"\n{args.preset} {args.size}px: warm-up {args.warmup}, {args.repeats} timed runs each, interleaved")
    times = _time_interleaved(variants, args.warmup, args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{'variant':<42} {'median s':>9} {'min s':>8} {'max s':>8}")
    for name, ts in times.items():
        print(f"{name:<42} {med[name]:>9.3f} {min(ts):>8.3f} {max(ts):>8.3f}")

    # quality: agreement with diffusers and auto precision against vaekit fp32
    ours = decode(vae, latents, fp32).images
    theirs = ((ref_decode() + 1) / 2).clamp(0, 1)
    print(f"\nvaekit fp32 vs diffusers fp32 decode: PSNR {_psnr(ours, theirs):.1f} dB")
    print("\ntargets")
    if "decode" in ops:
        r = med["vaekit decode fp32"] / med["diffusers decode fp32"]
        rows.append(("decode fp32: vaekit / diffusers time", r, 0.8, "<=", "PASS" if r <= 0.8 else "FAIL"))
    if "encode" in ops:
        r = med["vaekit encode fp32"] / med["diffusers encode fp32"]
        rows.append(("encode fp32: vaekit / diffusers time", r, 0.8, "<=", "PASS" if r <= 0.8 else "FAIL"))
    if "auto" in ops:
        res = decode(vae, latents, auto)
        speed = med["diffusers decode fp32"] / med["vaekit decode auto"]
        dtype = str(res.dtype).removeprefix("torch.")
        rows.append((f"decode auto ({dtype}): diffusers fp32 / vaekit time", speed, 4.0, ">=", _ok(speed >= 4.0)))
        p = _psnr(res.images, ours)
        rows.append((f"decode auto ({dtype}): PSNR vs vaekit fp32, dB", p, 40.0, ">=", _ok(p >= 40.0)))
    for name, value, target, op, verdict in rows:
        print(f"{name:<52} {value:>8.3f}  (target {op} {target})  {verdict}")
    if args.peak:
        peak_report(vae, image, latents, args.threads, args.repeats)


# --- fraction of the machine's peak ---------------------------------------------------------------------------
_CONV_OPS = ("conv2d", "convolution", "_convolution", "mkldnn_convolution", "cudnn_convolution")


def _conv_calls(model: torch.nn.Module, op: str, x: torch.Tensor) -> list[tuple[object, ...]]:
    """Every convolution ``model.<op>(x)`` runs (after vaekit's rewrites): input/weight shapes and parameters."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls: list[tuple[object, ...]] = []

    class ConvLog(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            name = func.overloadpacket.__name__
            if name in _CONV_OPS:
                a = list(args) + [None] * 9
                if name == "conv2d":  # (input, weight, bias, stride, padding, dilation, groups)
                    stride, padding, dilation, groups = a[3] or (1, 1), a[4] or (0, 0), a[5] or (1, 1), a[6] or 1
                else:  # convolution: (..., stride, padding, dilation, transposed, output_padding, groups)
                    stride, padding, dilation, groups = a[3], a[4], a[5], a[8] or 1
                pair = lambda v: tuple(v) if len(v) == 2 else (v[0], v[0])  # noqa: E731
                calls.append(
                    (
                        tuple(a[0].shape),
                        tuple(a[1].shape),
                        a[2] is not None,
                        pair(stride),
                        pair(padding),
                        pair(dilation),
                        int(groups),
                    )
                )
            return func(*args, **(kwargs or {}))

    with torch.inference_mode(), ConvLog():
        getattr(model, op)(x)
    return calls


def _conv_flops(call: tuple[object, ...]) -> float:
    (n, _, h, w), (cout, cin_g, kh, kw), _, stride, padding, dilation, _ = call  # type: ignore[misc]
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return 2.0 * n * cout * ho * wo * cin_g * kh * kw


def _conv_alone(call: tuple[object, ...], dtype: torch.dtype, repeats: int = 2) -> float:
    """Best seconds of one convolution of this shape run alone (channels-last, ``dtype``, current threads)."""
    import torch.nn.functional as F

    xs, ws, has_bias, stride, padding, dilation, groups = call
    x = torch.randn(xs, dtype=dtype).to(memory_format=torch.channels_last)  # type: ignore[arg-type]
    w = torch.randn(ws, dtype=dtype).to(memory_format=torch.channels_last)  # type: ignore[arg-type]
    b = torch.randn(ws[0], dtype=dtype) if has_bias else None  # type: ignore[index]
    best = float("inf")
    with torch.inference_mode():
        F.conv2d(x, w, b, stride, padding, dilation, groups)  # type: ignore[arg-type]
        for _ in range(repeats):
            start = time.perf_counter()
            F.conv2d(x, w, b, stride, padding, dilation, groups)  # type: ignore[arg-type]
            best = min(best, time.perf_counter() - start)
    return best


def _categories(prof: object) -> dict[str, float]:
    """Self CPU time (s) of a profile, summed into conv / GroupNorm+SiLU / attention / layout / elementwise / other."""
    cats = {
        "convolution": 0.0,
        "GroupNorm+SiLU": 0.0,
        "attention": 0.0,
        "layout copies": 0.0,
        "elementwise": 0.0,
        "other": 0.0,
    }
    rules = (
        ("convolution", ("conv",)),
        ("GroupNorm+SiLU", ("group_norm", "silu")),
        ("attention", ("attention", "bmm", "softmax", "baddbmm", "_flash")),
        ("layout copies", ("copy_", "contiguous", "clone", "_to_copy", "to", "empty_strided", "cat", "pad")),
        ("elementwise", ("add", "mul", "clamp", "isfinite", "div", "sub", "all", "any", "exp", "fill_")),
    )
    for evt in prof.key_averages():  # type: ignore[attr-defined]
        name = evt.key.removeprefix("aten::")
        t = evt.self_cpu_time_total / 1e6
        for cat, words in rules:
            if any(name == w or name.startswith(w) or w in name for w in words if len(w) > 2) or name in words:
                cats[cat] += t
                break
        else:
            cats["other"] += t
    return cats


def peak_report(vae: object, image: torch.Tensor, latents: torch.Tensor, threads: int, repeats: int) -> None:
    """Measured conv peak per precision, real FLOPs of encode/decode, achieved fraction, and where the rest goes."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    from vaekit.ops import precision as prec
    from vaekit.ops.codec import CodecOptions, decode, encode

    cpu = torch.device("cpu")
    auto_dtype = prec.resolve_dtype("auto", "cpu")
    print(
        f"\nfraction of peak ({threads} threads; auto -> {str(auto_dtype).removeprefix('torch.')}); peak = the best "
        "rate of the op's own conv shapes run alone, channels-last, same dtype and threads"
    )
    raw = vae.denormalise(latents)  # type: ignore[attr-defined]
    times: dict[tuple[str, str], float] = {}
    hdr = (
        f"{'op':<14} {'GFLOP':>7} {'conv share':>10} {'time s':>7} {'GFLOP/s':>8} {'peak GFLOP/s':>12} "
        f"{'of peak':>8} {'conv-alone floor s':>18} {'of floor':>8}"
    )
    print(hdr)
    profiles: dict[str, dict[str, float]] = {}
    shape_rows: dict[str, list[tuple[tuple[object, ...], int, float, float]]] = {}
    for precision in ("fp32", "auto"):
        dtype = prec.resolve_dtype(precision, "cpu")
        model = prec.execution_model(vae.model, dtype, cpu, True, fast=True)  # type: ignore[attr-defined]
        opts = CodecOptions(precision=precision, tiling="off")
        for op, arg in (("decode", raw), ("encode", image * 2 - 1)):
            x = arg.to(dtype=dtype, memory_format=torch.channels_last)
            calls = _conv_calls(model, op, x)
            with torch.inference_mode(), FlopCounterMode(display=False) as counter:
                getattr(model, op)(x)
            flops = float(counter.get_total_flops())
            conv_flops = sum(_conv_flops(c) for c in calls)
            alone: dict[tuple[object, ...], float] = {}
            for c in calls:
                if c not in alone:
                    alone[c] = _conv_alone(c, dtype)
            floor = sum(alone[c] for c in calls)
            peak = max(_conv_flops(c) / alone[c] for c in calls if _conv_flops(c) >= 0.02 * conv_flops)
            shape_rows[f"{op} {precision}"] = [
                (c, calls.count(c), calls.count(c) * _conv_flops(c) / conv_flops, _conv_flops(c) / alone[c])
                for c in alone
            ]

            def run(op: str = op, opts: CodecOptions = opts) -> object:
                return decode(vae, latents, opts) if op == "decode" else encode(vae, image, opts)

            run()
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                samples.append(time.perf_counter() - start)
            t = min(samples)
            times[(precision, op)] = t
            rate = flops / t
            print(
                f"{op + ' ' + precision:<14} {flops / 1e9:>7.1f} {conv_flops / flops:>10.1%} {t:>7.3f} "
                f"{rate / 1e9:>8.1f} {peak / 1e9:>12.1f} {rate / peak:>8.1%} {floor:>18.3f} {floor / t:>8.1%}"
            )
            with profile(activities=[ProfilerActivity.CPU]) as p:
                run()
            profiles[f"{op} {precision}"] = _categories(p)
    print("\nwhere the time goes (self CPU time of one profiled run, share of the total)")
    names = list(next(iter(profiles.values())))
    print(f"{'op':<14} " + " ".join(f"{n:>15}" for n in names))
    for key, cats in profiles.items():
        total = sum(cats.values()) or 1.0
        print(f"{key:<14} " + " ".join(f"{cats[n] / total:>15.1%}" for n in names))
    print("\nconvolution shapes run alone (input NCHW shape -> weight shape): calls, share of the conv FLOPs, GFLOP/s")
    for key, shape_list in shape_rows.items():
        print(f"{key}:")
        for c, n, share, rate in sorted(shape_list, key=lambda r: -r[2]):
            if share >= 0.01:
                print(f"  {str(c[0]):<22} -> {str(c[1]):<20} x{n:<3} {share:>6.1%} {rate / 1e9:>8.1f}")
    for op in ("decode", "encode"):
        ratio = times[("auto", op)] / times[("fp32", op)]
        verdict = "SLOWER than fp32" if ratio > 1.0 else "not slower than fp32"
        print(f"{op}: auto / fp32 time {ratio:.2f} -> auto is {verdict}")


def _ok(cond: bool) -> str:
    return "PASS" if cond else "FAIL"


if __name__ == "__main__":
    main()
