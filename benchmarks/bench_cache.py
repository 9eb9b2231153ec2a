"""Latent-cache throughput: local engine with 1 and 2 workers, and the Ray engine, against the bare encoder.

    .venv/bin/python benchmarks/bench_cache.py                  # bundled VAE and sd1 at 256 px
    .venv/bin/python benchmarks/bench_cache.py --models sd1 --images 8

For each model it prints, in images/s:
- decode: reading + decoding + resizing + cropping one image (one process): must be far above the encoder;
- encoder: the bare encoder on prepared pixels, one thread, in this process (the reference);
- local 1 / local 2: ``build_cache`` with 1 and 2 worker processes (one torch thread each);
- ray: ``build_cache(engine="ray")`` on a local Ray instance with as many CPUs as workers;
and the ratios: local 1 / encoder (how busy the encoder is kept), local 2 / local 1 (scaling; efficiency is that
ratio over 2), ray / local 2. Throughput counts the whole encoding phase, worker start-up included. The machine
may be shared: run it twice and compare, and read ``load`` (the 1-minute load average before each model).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vaekit.cache import EncodeSettings, Preprocess, build_cache
from vaekit.cache.encoding import Prepared, Task, deterministic, encode_group, prepare
from vaekit.families import preset
from vaekit.models import build
from vaekit.ops.images import builtin_image_paths
from vaekit.vae import VAE, VAEOrigin, load_vae


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` JPEGs (quality 90, 384-640 px sides) cut at random from scikit-image's photographs."""
    rng = np.random.default_rng(seed)
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in builtin_image_paths()]
    paths = []
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = int(rng.integers(h // 2, h + 1)), int(rng.integers(w // 2, w + 1))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = Image.fromarray(photo[top : top + ch, left : left + cw])
        side = int(rng.integers(384, 641))
        crop = crop.resize((side, max(64, side * ch // cw)), Image.Resampling.BICUBIC)
        path = folder / f"img{i:04d}.jpg"
        crop.save(path, quality=90)
        paths.append(path)
    return paths


def bundled_or_standin() -> tuple[VAE, str]:
    """The bundled VAE when installed, else a random stand-in of a similar size (said so in the output)."""
    try:
        return load_vae(device="cpu"), "bundled vaekit-small"
    except Exception as e:  # noqa: BLE001 - report why and go on with the stand-in
        cfg = dataclasses.replace(preset("sd1"), base_channels=64)
        torch.manual_seed(0)
        note = f"stand-in: sd1 architecture at base_channels=64, random (bundled VAE unavailable: {e})"
        return VAE(build(cfg), cfg, VAEOrigin(name="standin-64")), note


def sd1() -> tuple[VAE, str]:
    """The SD1 architecture at full width (random weights: speed does not depend on them)."""
    return load_vae("sd1", device="cpu"), "sd1 architecture (random init)"


def decode_rate(paths: list[Path], params: Preprocess) -> float:
    """Images/s of read + decode + resize + crop in this process."""
    t = time.perf_counter()
    for i, p in enumerate(paths):
        prepare(Task(i, str(p), f"{i:064x}"), params)
    return len(paths) / (time.perf_counter() - t)


def encoder_rate(vae: VAE, paths: list[Path], params: Preprocess, settings: EncodeSettings) -> float:
    """Images/s of the bare encoder (prepared pixels, one thread, the cache's group size), after one warm-up."""
    items = [prepare(Task(i, str(p), f"{i:064x}"), params) for i, p in enumerate(paths)]
    prepared = [x for x in items if isinstance(x, Prepared)]
    with deterministic(vae.device, settings.threads):
        encode_group(vae, prepared[:1], settings)  # warm-up: oneDNN primitives, the execution copy
        t = time.perf_counter()
        for x in prepared:
            encode_group(vae, [x], settings)
        return len(prepared) / (time.perf_counter() - t)


def cache_rate(
    vae: VAE, folder: Path, params: Preprocess, settings: EncodeSettings, **kwargs: object
) -> tuple[float, float]:
    """Images/s of a full ``build_cache`` run into a fresh folder: over the whole encoding phase (start-up of
    workers or actors included), and steady (from the first finished image to the last).
    """
    out = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    stamps: list[tuple[float, int]] = []

    def progress(done: int, total: int) -> None:
        stamps.append((time.perf_counter(), done))

    try:
        report = build_cache(folder, out, vae, params, settings, shard_size=64, progress=progress, **kwargs)  # type: ignore[arg-type]
        assert not report.failed, report.failed
        first = next((t, d) for t, d in stamps if d > 0)
        last = stamps[-1]
        steady = (last[1] - first[1]) / (last[0] - first[0]) if last[0] > first[0] else float("nan")
        return report.images_per_second, steady
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> int:
    """Run the benchmark and print a table of rates and ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bundled,sd1", help="comma list of: bundled, sd1")
    parser.add_argument("--images", type=int, default=16, help="images per run (sd1 uses half, at least 4)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray engine")
    args = parser.parse_args()
    params = Preprocess(resolution=args.resolution)
    settings = EncodeSettings(threads=1)
    try:
        import ray
    except ImportError:
        ray = None
        print("ray not installed: the Ray engine is skipped (pip install 'vaekit[ray]')")
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {args.resolution} px, one thread per encoder")
    for name in args.models.split(","):
        vae, what = bundled_or_standin() if name == "bundled" else sd1()
        n = args.images if name == "bundled" else max(4, args.images // 2)
        with tempfile.TemporaryDirectory(prefix="bench-images-") as tmp:
            folder = Path(tmp)
            paths = make_images(folder, n)
            print(f"\n== {what}: {n} images, load {os.getloadavg()[0]:.1f}")
            rates = {"decode": decode_rate(paths, params), "encoder": encoder_rate(vae, paths, params, settings)}
            steady: dict[str, float] = {}
            rates["local 1"], steady["local 1"] = cache_rate(vae, folder, params, settings, workers=1)
            rates["local 2"], steady["local 2"] = cache_rate(vae, folder, params, settings, workers=2)
            if ray is not None and not args.no_ray:
                ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
                try:
                    key = "ray (2 actors)"
                    rates[key], steady[key] = cache_rate(vae, folder, params, settings, engine="ray", workers=2)
                finally:
                    ray.shutdown()
            for key, value in rates.items():
                extra = f"   steady {steady[key]:8.3f} images/s" if key in steady else ""
                print(f"{key:>16}: {value:8.3f} images/s{extra}")
            print(f"{'decode/encoder':>16}: {rates['decode'] / rates['encoder']:8.1f}x  (decode headroom)")
            print(f"{'local1/encoder':>16}: {rates['local 1'] / rates['encoder']:8.2f}   (encoder kept busy)")
            scaling = rates["local 2"] / rates["local 1"]
            print(f"{'local2/local1':>16}: {scaling:8.2f}x  (scaling efficiency {scaling / 2:.0%}; goal >= 1.6x)")
            if "ray (2 actors)" in rates:
                ray_ratio, ray_steady = (
                    rates["ray (2 actors)"] / rates["local 2"],
                    steady["ray (2 actors)"] / steady["local 2"],
                )
                print(f"{'ray/local2':>16}: {ray_ratio:8.2f}   (steady {ray_steady:.2f}; goal >= 0.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
