"""Tiled decode: exactness, speed and peak memory of vaekit's exact and fast tiling against untiled and diffusers.

    .venv/bin/python benchmarks/bench_tiling.py                     # sd1 width, 1024 px, then 4096 px in 3 GB
    .venv/bin/python benchmarks/bench_tiling.py --quick             # narrow model, 512 px, big case 1024 px
    .venv/bin/python benchmarks/bench_tiling.py --base-channels 32 --size 1024 --big-size 2048 --budget-gb 0.5

Part 1 (one process): the same random sd1 weights in vaekit and diffusers ``AutoencoderKL``; a latent from the
photo; untiled decode; vaekit exact and fast tiled decode with room for everything (2x2 tiles of size/2; fast then
runs the exact engine); fast and exact under each ``--fast-budgets`` budget (too small for every activation in RAM:
fast estimates the statistics of the stages above its cut, exact spills to files); with ``--estimate-all``, fast
with every stage above latent resolution estimated; diffusers ``enable_tiling()`` with its default tile sizes.
PSNR is on the [-1, 1] output scale (data range 2) against the same library's untiled decode.

Part 2 (one fresh subprocess per case): a big decode under ``--budget-gb``. Peak memory is the child's
resident high-water mark (``VmHWM``; ``ru_maxrss`` where /proc is missing) minus that of a child that only built
the model and the latent (the baseline), so weights and the interpreter are not counted; the output image is (it
is part of the op).

diffusers is a test-only dependency of vaekit; this script needs it installed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

GB = 1 << 30


def _models(base: int, seed: int, diffusers: bool) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """vaekit's AutoencoderKL and (optionally) a diffusers AutoencoderKL with the very same random weights."""
    from vaekit.families import preset
    from vaekit.formats.convert import diffusers_to_ldm, ldm_to_diffusers
    from vaekit.formats.export import diffusers_config
    from vaekit.models import build

    cfg = preset("sd1", base_channels=base, norm_groups=32 if base >= 32 else 8)
    torch.manual_seed(seed)
    model = build(cfg).eval().requires_grad_(False)
    with torch.no_grad():  # GroupNorm starts as identity; perturb it so the statistics matter
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.add_(torch.randn_like(m.weight) * 0.1)
                m.bias.add_(torch.randn_like(m.bias) * 0.1)
    if not diffusers:
        return model, None
    from diffusers import AutoencoderKL as DiffusersKL

    kwargs = diffusers_config(cfg)
    kwargs.pop("_class_name")
    ref = DiffusersKL(**kwargs).eval().requires_grad_(False)
    ref.load_state_dict(ldm_to_diffusers(model.state_dict(), "kl"))
    assert diffusers_to_ldm(ref.state_dict(), "kl").keys() == model.state_dict().keys()
    return model, ref


def _latent(model: torch.nn.Module, size: int) -> torch.Tensor:
    """The posterior mean of the astronaut photo at ``size`` px (encoded at <= 512 px, then upsampled)."""
    import torch.nn.functional as F
    from PIL import Image

    from vaekit.ops.images import builtin_image_paths

    enc = min(size, 512)
    with Image.open(builtin_image_paths()[0]) as im:
        im = im.convert("RGB").resize((enc, enc), Image.Resampling.BICUBIC)
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    x = data.reshape(enc, enc, 3).permute(2, 0, 1).unsqueeze(0).float() / 127.5 - 1
    with torch.inference_mode():
        z = model.encode(x)[0]
    return F.interpolate(z, size=(size // 8, size // 8), mode="bicubic") if enc != size else z


def _psnr(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    d = ref.double() - out.double()
    mse = float(d.square().mean())
    return (float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()), float(d.abs().max())


def _timed(fn):  # noqa: ANN001, ANN202
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def part1(args: argparse.Namespace, dtype: torch.dtype) -> None:
    """Untiled vs exact vs fast at ``args.size``, and diffusers' own tiling beside them."""
    from vaekit.ops import tiling
    from vaekit.ops.tiling import tiled_decode

    model, ref_model = _models(args.base_channels, args.seed, not args.skip_diffusers)
    z = _latent(model, args.size)
    model = model.to(dtype)
    zc = z.to(dtype)
    tile = args.size // 2
    rows: list[tuple[str, float, str]] = []
    n_stages = len(tiling.eng.decoder_stages(model))

    phases: dict[str, float] = {}
    bases: list[tuple[int, float]] = []
    run_stages, single_pass = tiling.eng.run_stages, tiling._single_pass

    def timed_stages(*a: object, **k: object) -> object:  # exact parts pass attn_chunk; the statistics pass not
        start = time.perf_counter()
        try:
            return run_stages(*a, **k)
        finally:
            key = "exact part" if "attn_chunk" in k else "statistics pass"
            phases[key] = phases.get(key, 0.0) + time.perf_counter() - start

    def timed_pass(*a: object, **k: object) -> object:
        start = time.perf_counter()
        try:
            return single_pass(*a, **k)
        finally:
            phases["tile pass"] = phases.get("tile pass", 0.0) + time.perf_counter() - start

    def run(label: str, mode: str, budget_gb: float, tile_px: int | None) -> None:
        phases.clear()
        tiling.eng.run_stages, tiling._single_pass = timed_stages, timed_pass
        try:
            (out, rep), t = _timed(lambda: tiled_decode(model, zc, mode, int(budget_gb * GB), tile_px))
        finally:
            tiling.eng.run_stages, tiling._single_pass = run_stages, single_pass
        p, mx = _psnr(untiled, out)
        plan = rep.plan
        how = f"{rep.tiles} tiles of {rep.tile_size} px"
        if mode == "fast":
            a, b = plan.estimated
            how += (
                ", all stages exact"
                if a == b
                else f", stages {a}-{b - 1} of {n_stages} estimated at {plan.stats_scale:g}x ({plan.stats_store})"
            )
        split = ", ".join(f"{k} {v:.2f} s" for k, v in phases.items() if mode == "fast" and len(phases) > 1)
        rows.append(
            (f"{label}, {budget_gb:g} GB ({how})", t, f"{p:.1f} dB, max abs {mx:.2e}" + (f"; {split}" if split else ""))
        )

    with torch.inference_mode():
        model.decode(zc[..., :8, :8])  # warm-up
        for rep_i in range(args.repeat):
            untiled, t_un = _timed(lambda: model.decode(zc))
            bases.append((len(rows), t_un))  # rows from here on compare with this run's untiled time
            rows.append((f"vaekit untiled{f' (run {rep_i + 1})' if args.repeat > 1 else ''}", t_un, ""))
            if not args.fast_only:
                run("vaekit exact", "exact", 64, tile)
                run("vaekit fast", "fast", 64, tile)  # room for everything: fast runs the exact engine
            for b in args.fast_budgets:  # the budget forces a cut: the stages above it get estimated statistics
                run("vaekit fast", "fast", b, None)
                if not args.fast_only:
                    run("vaekit exact", "exact", b, None)
            if args.estimate_all:  # every stage above latent resolution estimated, whatever the budget
                widest = tiling._tile_parts
                tiling._tile_parts = lambda *a, _w=widest: _w(*a)[-1:]
                run("vaekit fast, all high-res stages estimated", "fast", 64, tile)
                tiling._tile_parts = widest
    if ref_model is not None:
        ref_model = ref_model.to(dtype)
        with torch.no_grad():
            d_un, t_dun = _timed(lambda: ref_model.decode(zc).sample)
            ref_model.enable_tiling()
            d_tl, t_dtl = _timed(lambda: ref_model.decode(zc).sample)
        p, mx = _psnr(d_un, d_tl)
        rows.append(("diffusers untiled", t_dun, ""))
        rows.append(("diffusers enable_tiling() (defaults)", t_dtl, f"{p:.1f} dB, max abs {mx:.2e}"))
    print(f"\n## decode {args.size} px, base_channels {args.base_channels}, {_name(dtype)}")
    print(f"{'case':84s} {'time s':>8s} {'x untiled':>10s}  PSNR vs own untiled")
    for i, (name, t, q) in enumerate(rows):
        base = t_dun if name.startswith("diffusers") else [b for j, b in bases if j <= i][-1]
        print(f"{name:84s} {t:8.2f} {t / base:10.2f}  {q}")


def _child(args: argparse.Namespace, dtype: torch.dtype) -> None:
    """One big case in this (fresh) process; prints JSON with time and the resident high-water mark."""
    from vaekit.ops.tiling import tiled_decode

    model, _ = _models(args.base_channels, args.seed, False)
    model = model.to(dtype)
    torch.manual_seed(args.seed)
    z = torch.randn(1, 4, args.big_size // 8, args.big_size // 8, dtype=dtype)
    result: dict[str, object] = {"case": args.case}
    if args.case != "baseline":
        with torch.inference_mode():
            (out, rep), t = _timed(lambda: tiled_decode(model, z, args.case, int(args.budget_gb * GB)))
        result |= {
            "time_s": t,
            "tiles": rep.tiles,
            "tile_px": rep.tile_size,
            "store": rep.plan.store,
            "estimated_peak": rep.plan.estimated_peak,
            "output_bytes": out.numel() * out.element_size(),
            "finite": bool(torch.isfinite(out).all()),
        }
    result["maxrss"] = _high_water()
    print(json.dumps(result))


def _high_water() -> int:
    """This process's peak resident bytes. ``VmHWM`` belongs to the process's own memory map; Linux's ``ru_maxrss``
    also keeps the parent's resident size at the fork, which after part 1 (GBs in the parent) hid every case."""
    from vaekit.ops.device import proc_bytes

    peak = proc_bytes("/proc/self/status", "VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def part2(args: argparse.Namespace) -> None:
    """The big decode under the budget, each case in a fresh process; each row prints as soon as its case ends."""
    budget = int(args.budget_gb * GB)
    base = None
    for case in ("baseline", *args.cases):
        cmd = [sys.executable, __file__, "--child", case, *sys.argv[1:]]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode:
            print(f"{case}: failed\n{res.stderr[-2000:]}")
            return
        r = json.loads(res.stdout.strip().splitlines()[-1])
        if case == "baseline":
            base = r["maxrss"]
            print(f"\n## decode {args.big_size} px under max_memory {args.budget_gb} GB ({args.precision})")
            head = f"{'mode':6s} {'time s':>8s} {'peak GB':>8s} {'output GB':>9s} {'est. GB':>8s} {'tiles':>6s}"
            print(head + " store  check", flush=True)
            continue
        peak = r["maxrss"] - base
        ok = peak <= budget + r["output_bytes"]
        print(
            f"{case:6s} {r['time_s']:8.1f} {peak / GB:8.2f} {r['output_bytes'] / GB:9.2f} "
            f"{r['estimated_peak'] / GB:8.2f} {r['tiles']:6d} {r['store']:6s} "
            f"{'PASS' if ok else 'FAIL'} (peak <= budget + output){'' if r['finite'] else ' NON-FINITE'}",
            flush=True,
        )


def _name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def main(argv: list[str] | None = None) -> None:
    """Parse the flags and run the parts asked for."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024, help="part 1 image side (px)")
    ap.add_argument("--big-size", type=int, default=4096, help="part 2 image side (px)")
    ap.add_argument("--budget-gb", type=float, default=3.0, help="part 2 max_memory")
    ap.add_argument("--base-channels", type=int, default=128, help="model width (sd1: 128)")
    ap.add_argument("--precision", default="auto", choices=["fp32", "bf16", "auto"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--fast-budgets",
        type=lambda v: [float(x) for x in v.split(",") if x],
        default=[1.5, 1.0],
        help="part 1: budgets (GB, comma-separated) too small for everything exact in RAM: fast and exact at each",
    )
    ap.add_argument(
        "--estimate-all",
        action="store_true",
        help="part 1: also fast mode with every stage above latent resolution estimated (vaekit's earlier fast mode)",
    )
    ap.add_argument("--quick", action="store_true", help="base_channels 32, 512 px, big case 1024 px in 0.25 GB")
    ap.add_argument("--skip-diffusers", action="store_true")
    ap.add_argument("--fast-only", action="store_true", help="part 1: untiled and fast under --fast-budgets only")
    ap.add_argument("--repeat", type=int, default=1, help="part 1: run the cases this many times, one process")
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--skip-small", action="store_true")
    ap.add_argument(
        "--cases",
        type=lambda v: [c for c in v.split(",") if c],
        default=["fast", "exact"],
        help="part 2: which modes to run (comma-separated; each in its own process)",
    )
    ap.add_argument("--child", dest="case", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.base_channels, args.size, args.big_size, args.budget_gb = 32, 512, 1024, 0.25
        args.fast_budgets = [0.05]
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.precision)
    if dtype is None:  # auto: what the codec pipeline would pick on this device
        from vaekit.ops.precision import resolve_dtype

        dtype = resolve_dtype("auto", torch.device("cpu"))
    if args.case:
        _child(args, dtype)
        return
    print(f"torch {torch.__version__}, {args.threads} threads, precision {args.precision} -> {_name(dtype)}")
    if not args.skip_small:
        part1(args, dtype)
    if not args.skip_big:
        part2(args)


if __name__ == "__main__":
    main()
