"""Load test of `vaekit serve`: throughput and p50/p95/p99 latency on localhost, batched against unbatched, or this
version of the server against an older one.

Starts the real server twice as a subprocess on a free loopback port (the same VAE, the same thread count): by
default once with batching (a short window, up to --max-batch requests in one forward pass) and once without (one
request per forward pass); with --baseline-src, this tree's server and the server of another source tree (e.g. an
older commit: `git archive COMMIT src | tar -x -C /tmp/before`), both batched. A bounded number of concurrent
clients (httpx, asyncio) send the same mix of requests to each, rounds alternating between the two servers so a
shared machine's changing load affects both alike, and the script prints requests/s and latency percentiles for
each client count, and the ratios.

    .venv/bin/python benchmarks/bench_server.py                          # bundled VAE (else a small random one)
    .venv/bin/python benchmarks/bench_server.py --op decode --size 256 --clients 16 --requests 128
    .venv/bin/python benchmarks/bench_server.py --clients 16,64 --baseline-src /tmp/before/src   # before / after
    .venv/bin/python benchmarks/bench_server.py --library ~/models/VAE --vae sdxl_vae --size 512

Only loopback addresses are ever contacted; clients, requests and time are capped.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

MAX_CLIENTS = 64
MAX_REQUESTS = 2000
MAX_SECONDS = 600.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_library(folder: Path) -> str:
    """The bundled VAE when it is installed (the server offers it by name), else a library holding a small random
    sd1-architecture VAE."""
    from vaekit import weights

    if weights.DEFAULT_VAE_PATH.is_file():  # the server offers it beside the (empty) library: a link would be a twin
        return weights.DEFAULT_VAE_PATH.stem
    from vaekit.families import preset
    from vaekit.models import build
    from vaekit.vae import VAE, VAEOrigin, save_vae

    cfg = dataclasses.replace(preset("sd1"), base_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1)
    torch.manual_seed(0)
    save_vae(VAE(build(cfg), cfg, VAEOrigin(name="bench-sd1")), folder / "bench-sd1.safetensors")
    return "bench-sd1"


def payloads(op: str, size: int, count: int) -> list[bytes]:
    """``count`` distinct request bodies: PNG photos for encode/roundtrip, raw float32 latents for decode."""
    from vaekit.ops.images import builtin_image_paths

    photos = [Image.open(p).convert("RGB") for p in builtin_image_paths()]
    bodies = []
    for i in range(count):
        if op == "decode":
            z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(i))
            bodies.append(z.numpy().astype("<f4").tobytes())
            continue
        im = photos[i % len(photos)]
        side = min(im.size)
        left = (i * 37) % max(1, im.width - side + 1)
        crop = im.crop((left, 0, left + side, side)).resize((size, size), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        crop.save(buf, format="PNG")
        bodies.append(buf.getvalue())
    return bodies


@dataclasses.dataclass
class Result:
    """One run's figures."""

    label: str
    requests: int
    failures: int
    seconds: float
    latencies: list[float]
    batches: int
    largest_batch: int

    @property
    def throughput(self) -> float:
        """Successful requests per second."""
        return (self.requests - self.failures) / self.seconds

    def percentiles(self) -> tuple[float, float, float]:
        """p50, p95 and p99 latency in seconds (nan without a success)."""
        if not self.latencies:
            return (float("nan"),) * 3
        p50, p95, p99 = np.percentile(self.latencies, [50, 95, 99])
        return float(p50), float(p95), float(p99)

    def row(self) -> str:
        """One line of the report."""
        p50, p95, p99 = self.percentiles()
        mean_batch = (self.requests - self.failures) / max(1, self.batches)
        return (
            f"{self.label:<10} {self.throughput:8.2f} req/s   p50 {p50 * 1000:8.1f} ms   p95 {p95 * 1000:8.1f} ms   "
            f"p99 {p99 * 1000:8.1f} ms   mean batch {mean_batch:4.1f} (max {self.largest_batch})   "
            f"failures {self.failures}"
        )


async def load(
    url: str, op: str, size: int, bodies: list[bytes], clients: int, requests: int
) -> tuple[int, list[float], float]:
    """``clients`` concurrent clients send ``requests`` requests in all; returns (failures, latencies, seconds)."""
    params = {"format": "raw"} if op != "roundtrip" else {"format": "png"}
    headers = {"Content-Type": "image/png"}
    if op == "decode":
        headers = {"Content-Type": "application/octet-stream", "X-Latent-Shape": f"1,4,{size // 8},{size // 8}"}
    latencies: list[float] = []
    failures = 0
    next_index = 0

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal next_index, failures
        while next_index < requests:
            body = bodies[next_index % len(bodies)]
            next_index += 1
            t0 = time.perf_counter()
            r = await c.post(f"/{op}", params=params, content=body, headers=headers)
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                failures += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=MAX_SECONDS, limits=limits) as c:
        await c.post(f"/{op}", params=params, content=bodies[0], headers=headers)  # warm-up: load the model
        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client(c) for _ in range(clients))), MAX_SECONDS)
        return failures, latencies, time.perf_counter() - start


def start_server(
    args: argparse.Namespace, library: Path, vae: str, batched: bool, clients: int, src: Path | None = None
) -> tuple[subprocess.Popen, str]:
    """Start `vaekit serve` (from the source tree ``src`` when given) on a free loopback port and wait until it
    answers; returns (process, url)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "vaekit", "serve", "--library", str(library), "--vae", vae, "--port", str(port),
        "--precision", args.precision, "--max-queue", str(max(64, clients * 2)), "--log-level", "warning",
        "--max-batch", str(args.max_batch if batched else 1),
        "--batch-window-ms", str(args.window_ms if batched else 0),
    ]  # fmt: skip
    env = dict(os.environ, VAEKIT_CONFIG=str(library.parent / "config"))
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src.resolve()), *filter(None, [env.get("PYTHONPATH")])])
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().decode()[-1500:]}")  # type: ignore[union-attr]
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not start in 120 s")
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    """Stop a server started by :func:`start_server`."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def measure(args: argparse.Namespace, library: Path, vae: str, clients: int) -> list[Result]:
    """Both servers run side by side (one idle while the other is loaded); rounds alternate between them so a
    shared machine's changing load affects both alike."""
    if args.baseline_src is not None:
        labels = ("before", "after")
        servers = [
            start_server(args, library, vae, True, clients, args.baseline_src),
            start_server(args, library, vae, True, clients),
        ]
    else:
        labels = ("unbatched", "batched")
        servers = [start_server(args, library, vae, batched, clients) for batched in (False, True)]
    try:
        requests = args.requests or clients * 6
        bodies = payloads(args.op, args.size, min(requests, 32))
        results = [Result(label, 0, 0, 0.0, [], 0, 0) for label in labels]
        per_round = max(1, requests // args.rounds)
        for _ in range(args.rounds):
            for (_, url), result in zip(servers, results, strict=True):
                failures, latencies, seconds = asyncio.run(load(url, args.op, args.size, bodies, clients, per_round))
                result.requests += per_round
                result.failures += failures
                result.seconds += seconds
                result.latencies += latencies
        for (_, url), result in zip(servers, results, strict=True):
            stats = httpx.get(f"{url}/health").json()["stats"]
            result.batches = stats["batches"] - args.rounds  # less the warm-up request of each round
            result.largest_batch = stats["largest_batch"]
        return results
    finally:
        for proc, _ in servers:
            stop(proc)


def main() -> None:
    """Parse the flags, run both servers, print the report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", type=Path, help="a VAE library folder (default: a temporary one)")
    parser.add_argument("--vae", help="the VAE's name in --library")
    parser.add_argument("--op", choices=("encode", "decode", "roundtrip"), default="roundtrip")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (a multiple of 8)")
    parser.add_argument(
        "--clients",
        default="16",
        help=f"concurrent clients, or a comma-separated list such as 16,64 (at most {MAX_CLIENTS})",
    )
    parser.add_argument(
        "--requests", type=int, default=0, help=f"requests per server (at most {MAX_REQUESTS}; default 6 per client)"
    )
    parser.add_argument("--baseline-src", type=Path, help="compare against the server of this source tree (its src/)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds the requests are split into")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--window-ms", type=float, default=10.0)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the server (0: torch's default)")
    args = parser.parse_args()
    try:
        client_counts = [int(c) for c in str(args.clients).split(",") if c.strip()]
    except ValueError:
        parser.error("--clients takes a number or a comma-separated list of numbers")
    if not client_counts or not all(1 <= c <= MAX_CLIENTS for c in client_counts):
        parser.error(f"1-{MAX_CLIENTS} clients")
    if not 0 <= args.requests <= MAX_REQUESTS or args.size % 8:
        parser.error(f"1-{MAX_REQUESTS} requests, size a multiple of 8")
    if not 1 <= args.rounds <= (args.requests or 6 * min(client_counts)):
        parser.error("rounds must be between 1 and the number of requests")
    if args.baseline_src is not None and not (args.baseline_src / "vaekit").is_dir():
        parser.error(f"--baseline-src {args.baseline_src}: no vaekit package in it (give the tree's src/ folder)")
    with tempfile.TemporaryDirectory(prefix="vaekit-bench-") as tmp:
        library = args.library
        vae = args.vae
        if library is None:
            library = Path(tmp) / "library"
            library.mkdir()
            vae = make_library(library)
        elif vae is None:
            parser.error("--library needs --vae")
        print(
            f"vaekit serve load test: {args.op} {args.size}x{args.size}, {args.requests or '6 per client'} requests "
            f"per server in {args.rounds} alternating rounds, VAE {vae}, precision {args.precision}, torch threads "
            f"{args.threads or torch.get_num_threads()}"
            + (f", before = {args.baseline_src}" if args.baseline_src else "")
        )
        for clients in client_counts:
            results = measure(args, library, vae, clients)
            print(f"{clients} concurrent clients:")
            for r in results:
                print("  " + r.row())
            first, second = results
            p50 = [statistics.median(r.latencies) if r.latencies else float("nan") for r in results]
            p99 = [r.percentiles()[2] for r in results]
            print(
                f"  {second.label} / {first.label}: throughput x{second.throughput / max(first.throughput, 1e-9):.2f}, "
                f"p50 latency x{p50[1] / p50[0]:.2f}, p99 latency x{p99[1] / p99[0]:.2f}"
            )


if __name__ == "__main__":
    main()
