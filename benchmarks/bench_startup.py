"""Start-up time of the ``vaekit`` command: ``--help`` and ``--version`` must answer in under 0.5 s.

    python benchmarks/bench_startup.py              # 7 runs of each, in fresh processes
    python benchmarks/bench_startup.py --runs 15

For each command line it starts a fresh ``python -m vaekit ...`` process ``--runs`` times and prints the median
and the best wall time, against the reference measured in the same run: a bare ``python -c pass`` (the
interpreter's own start-up, which no code of ours can beat) and ``python -c "import torch"`` (what start-up cost
when torch was imported at start). It also checks, in a fresh process, that ``--help`` and ``--version`` leave
torch unimported. The machine may be shared: read ``load`` (the 1-minute load average) and the best times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 0.5


def _time(argv: list[str], runs: int) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def _torch_free() -> bool:
    code = (
        "import sys; from vaekit.interfaces.cli import main; main(['--help']); main(['--version']); "
        "sys.stderr.write(str('torch' in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return done.stderr.strip() == "False"


def main() -> int:
    """Print the start-up table; exit 1 when --help or --version misses the goal."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    py = sys.executable
    cases = [
        ("python -c pass (reference)", [py, "-c", "pass"], False),
        ("python -c 'import torch' (reference)", [py, "-c", "import torch"], False),
        ("vaekit --help", [py, "-m", "vaekit", "--help"], True),
        ("vaekit --version", [py, "-m", "vaekit", "--version"], True),
        ("vaekit encode --help", [py, "-m", "vaekit", "encode", "--help"], False),
    ]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {load:.2f}, {args.runs} runs each")
    print(f"{'command':40s} {'median s':>9s} {'best s':>8s}  goal")
    ok = True
    base = None
    for label, argv, goal in cases:
        median, best = _time(argv, args.runs)
        base = base if base is not None else median
        verdict = ("ok" if median < GOAL_S else "MISSED") if goal else ""
        ok &= median < GOAL_S or not goal
        print(f"{label:40s} {median:9.3f} {best:8.3f}  {verdict} ({median / base:.1f}x bare python)")
    free = _torch_free()
    print(f"--help and --version leave torch unimported: {free}")
    return 0 if ok and free else 1


if __name__ == "__main__":
    sys.exit(main())
