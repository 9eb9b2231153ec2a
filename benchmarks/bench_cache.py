"""Latent-cache throughput: local engine with 1 and 2 workers, and the Ray engine on real 1- and 2-node clusters.

    .venv/bin/python benchmarks/bench_cache.py                  # bundled VAE and sd1 at 256 px
    .venv/bin/python benchmarks/bench_cache.py --models sd1 --images 8
    .venv/bin/python benchmarks/bench_cache.py --models bundled --no-local --images 48   # the cluster part only

For each model it prints, in images/s:
- decode: reading + decoding + resizing + cropping one image (one process): must be far above the encoder;
- encoder: the bare encoder on prepared pixels, one thread, in this process (the reference);
- local 1 / local 2: ``build_cache`` with 1 and 2 worker processes (one torch thread each);
- ray N node(s): ``build_cache(engine="ray")`` on a Ray cluster of N nodes started with ``ray.cluster_utils.Cluster``
  (separate raylets, 1 CPU and a 150 MB object store each, one encoder actor per node), this process the driver;
  per node, whole run and steady; the driver's CPU time and its share of all CPU time spent on the run (driver +
  actors), and the bytes the driver received per image (the actors' records; must stay under 1 KB);
and the ratios: local 1 / encoder (how busy the encoder is kept), local 2 / local 1 (scaling; efficiency is that
ratio over 2), ray 2 nodes / 1 node per node. Then, for the scaling model of docs/cache.md: the driver's planning
cost per new image (stat + SHA-256 of the file) and the manifest's commit rate (256-row shards and 1-row shards,
``synchronous=FULL``, in the temporary folder's file system). Throughput counts the whole encoding phase,
worker start-up included. The machine may be shared: run it twice and compare, and read ``load`` (the 1-minute
load average before each model).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vaekit.cache import CacheReport, EncodeSettings, Preprocess, build_cache
from vaekit.cache.encoding import Prepared, Task, deterministic, encode_group, prepare
from vaekit.cache.manifest import ImageRow, Manifest
from vaekit.families import preset
from vaekit.formats.io import file_sha256
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


def cpu_seconds() -> float:
    """User + system CPU time of this process (every thread), in seconds."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cache_run(
    vae: VAE, folder: Path, params: Preprocess, settings: EncodeSettings, shard_size: int = 64, **kwargs: object
) -> tuple[float, float, CacheReport, float, float]:
    """A full ``build_cache`` run into a fresh folder: images/s over the whole encoding phase (start-up of workers
    or actors included), steady images/s (from the first finished image to the last), the report, this process's
    CPU seconds over the run, and its CPU seconds per image in the steady phase.
    """
    out = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    stamps: list[tuple[float, int, float]] = []

    def progress(done: int, total: int) -> None:
        stamps.append((time.perf_counter(), done, cpu_seconds()))

    try:
        cpu = cpu_seconds()
        report = build_cache(folder, out, vae, params, settings, shard_size=shard_size, progress=progress, **kwargs)  # type: ignore[arg-type]
        cpu = cpu_seconds() - cpu
        assert not report.failed, report.failed
        first = next(s for s in stamps if s[1] > 0)
        last = stamps[-1]
        steady = (last[1] - first[1]) / (last[0] - first[0]) if last[0] > first[0] else float("nan")
        steady_cpu = (last[2] - first[2]) / (last[1] - first[1]) if last[1] > first[1] else float("nan")
        return report.images_per_second, steady, report, cpu, steady_cpu
    finally:
        shutil.rmtree(out, ignore_errors=True)


def cache_rate(
    vae: VAE, folder: Path, params: Preprocess, settings: EncodeSettings, **kwargs: object
) -> tuple[float, float]:
    """Images/s of a full ``build_cache`` run: whole encoding phase and steady (see :func:`cache_run`)."""
    rate, steady, _, _, _ = cache_run(vae, folder, params, settings, **kwargs)
    return rate, steady


def ray_cluster_runs(
    vae: VAE, folder: Path, params: Preprocess, settings: EncodeSettings, n: int, node_counts: list[int]
) -> None:
    """The Ray engine on clusters of 1, 2... nodes (separate raylets, 1 CPU each): per-node rate, driver costs."""
    import ray
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "object_store_memory": 150 * 2**20}
    src = str(Path(__file__).resolve().parents[1] / "src")  # the workers import this tree's vaekit
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
    base: float | None = None
    for nodes in node_counts:
        cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
        try:
            for _ in range(nodes - 1):
                cluster.add_node(**node)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
            # --shard-size 256; on a short run the engine cuts chunks (shards) to give each actor 4 of them.
            runs = cache_run(vae, folder, params, settings, shard_size=256, engine="ray", workers=nodes)
            rate, steady, report, driver, steady_cpu = runs
        finally:
            ray.shutdown()
            cluster.shutdown()
        per_node = steady / nodes
        base = per_node if base is None else base
        share = driver / (driver + report.worker_cpu_seconds)
        print(
            f"{f'ray {nodes} node(s)':>16}: {rate:8.3f} images/s   steady {steady:8.3f}   per node {rate / nodes:7.3f}"
            f" (steady {per_node:.3f}, {per_node / base:.2f}x of 1 node)   nodes used {report.nodes}, load "
            f"{os.getloadavg()[0]:.1f}"
        )
        print(
            f"{'':>16}  driver: {report.received_bytes / n:6.0f} bytes received per image (goal < 1024), "
            f"CPU {1000 * driver / n:.1f} ms per image over the run (steady {1000 * steady_cpu:.1f}), {share:.1%} of "
            f"the run's CPU (actors {report.worker_cpu_seconds:.1f} s, driver {driver:.2f} s)"
        )


def planning_cost(paths: list[Path]) -> float:
    """Seconds per new image the driver spends planning: ``stat`` and SHA-256 of the whole file (cold runs read
    every image once here, on the driver)."""
    t = time.perf_counter()
    for p in paths:
        p.stat()
        file_sha256(p)
    return (time.perf_counter() - t) / len(paths)


def commit_rates(rows_per_shard: int, shards: int, per_transaction: int = 1) -> tuple[float, float]:
    """Shards/s and rows/s of ``Manifest.commit_shards`` (``per_transaction`` shards per SQLite transaction,
    ``synchronous=FULL``) into a manifest growing to ``shards * rows_per_shard`` rows; only the commits are timed."""
    total = 0.0
    with tempfile.TemporaryDirectory(prefix="bench-manifest-") as tmp:
        manifest = Manifest(Path(tmp))
        try:
            batch: list[tuple[str, int, int, list[ImageRow]]] = []
            for s in range(shards):
                rows = [
                    ImageRow(
                        f"/data/{s:06d}/{i:06d}.jpg",
                        f"{s:06d}{i:058d}",
                        123456,
                        1700000000000000000,
                        "ok",
                        "a" * 64,
                        "fp32",
                        "fp32",
                        "b" * 64,
                        shard=f"run-{s:06d}.safetensors",
                        idx=i,
                        original_w=640,
                        original_h=480,
                        resized_w=683,
                        resized_h=512,
                        crop_left=85,
                        crop_top=0,
                        crop_right=597,
                        crop_bottom=512,
                    )  # fmt: skip
                    for i in range(rows_per_shard)
                ]
                batch.append((f"run-{s:06d}.safetensors", rows_per_shard, 1 << 20, rows))
                if len(batch) == per_transaction or s == shards - 1:
                    t = time.perf_counter()
                    manifest.commit_shards(batch)
                    total += time.perf_counter() - t
                    batch = []
        finally:
            manifest.close()
    return shards / total, shards * rows_per_shard / total


def main() -> int:
    """Run the benchmark and print a table of rates and ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bundled,sd1", help="comma list of: bundled, sd1")
    parser.add_argument("--images", type=int, default=16, help="images per run (sd1 uses half, at least 4)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--nodes", default="1,2", help="Ray cluster sizes to run (nodes of 1 CPU each)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray engine")
    parser.add_argument("--no-local", action="store_true", help="skip the bare encoder and the local engine")
    args = parser.parse_args()
    params = Preprocess(resolution=args.resolution)
    settings = EncodeSettings(threads=1)
    try:
        import ray  # noqa: F401
    except ImportError:
        args.no_ray = True
        print("ray not installed: the Ray engine is skipped (pip install 'vaekit[ray]')")
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {args.resolution} px, one thread per encoder")
    for name in args.models.split(","):
        vae, what = bundled_or_standin() if name == "bundled" else sd1()
        n = args.images if name == "bundled" else max(4, args.images // 2)
        with tempfile.TemporaryDirectory(prefix="bench-images-") as tmp:
            folder = Path(tmp)
            paths = make_images(folder, n)
            print(f"\n== {what}: {n} images, load {os.getloadavg()[0]:.1f}")
            if not args.no_local:
                rates = {"decode": decode_rate(paths, params), "encoder": encoder_rate(vae, paths, params, settings)}
                steady: dict[str, float] = {}
                rates["local 1"], steady["local 1"] = cache_rate(vae, folder, params, settings, workers=1)
                rates["local 2"], steady["local 2"] = cache_rate(vae, folder, params, settings, workers=2)
                for key, value in rates.items():
                    extra = f"   steady {steady[key]:8.3f} images/s" if key in steady else ""
                    print(f"{key:>16}: {value:8.3f} images/s{extra}")
                print(f"{'decode/encoder':>16}: {rates['decode'] / rates['encoder']:8.1f}x  (decode headroom)")
                print(f"{'local1/encoder':>16}: {rates['local 1'] / rates['encoder']:8.2f}   (encoder kept busy)")
                scaling = rates["local 2"] / rates["local 1"]
                print(f"{'local2/local1':>16}: {scaling:8.2f}x  (scaling efficiency {scaling / 2:.0%}; goal >= 1.6x)")
            if not args.no_ray:
                ray_cluster_runs(vae, folder, params, settings, n, [int(x) for x in args.nodes.split(",")])
            mean_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
            print(f"{'driver planning':>16}: {1000 * planning_cost(paths):8.3f} ms per new image "
                  f"(stat + SHA-256 of a {mean_kb:.0f} KiB JPEG, warm page cache)")  # fmt: skip
    # The Ray engine commits the shards whose records arrived together in one transaction: 1 when the driver keeps
    # up, more when it falls behind.
    for rows, per in ((256, 1), (256, 4), (1, 1)):
        shards_s, rows_s = commit_rates(rows, 200 if rows == 256 else 500, per)
        what = f"commit {per}x{rows} rows"
        print(f"{what:>16}: {shards_s:8.1f} shards/s = {rows_s:9.0f} manifest rows/s ({per} shard(s) per transaction)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
