"""The Ray engine on a real two-node Ray cluster (two raylets started by ``ray.cluster_utils.Cluster``): the same
latents as the local engine bit for bit, shards written by the workers, and no loss, duplicate or orphan when a
worker node or the driver is killed mid-run (needs the ``ray`` extra).

Each node has one CPU slot and a 100 MB object store, so the two encoder actors land one on each node. The kills
are made deterministic by ``VAEKIT_CACHE_SHARD_DELAY`` (each actor waits before writing a shard) and happen after
the first shard is committed, while the other chunks are in flight.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import vaekit
import vaekit.cache as vc
from vaekit.cache import EncodeSettings, Preprocess, build_cache
from vaekit.cache.build import collect_images
from vaekit.cache.encoding import Encoded, Failed, Task
from vaekit.cache.engines.ray import DELAY_ENV, RayStats, ShardRecord
from vaekit.cache.manifest import MANIFEST_NAME
from vaekit.families import preset
from vaekit.models import build
from vaekit.vae import VAE, VAEOrigin, save_vae

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

RES = 32
NODE = {"num_cpus": 1, "object_store_memory": 100 * 2**20}
# Node death is noticed in about a second instead of Ray's default 15-30 s.
FAST_FAILURE = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 300, "health_check_failure_threshold": 3}


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    """A head node and a worker node, each a raylet of its own with 1 CPU; this process is the driver."""
    src = str(Path(vaekit.__file__).resolve().parents[1])  # workers import vaekit from this tree
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([src, saved] if saved else [src])
    c = None
    try:
        c = cluster_utils.Cluster(
            initialize_head=True,
            head_node_args={**NODE, "include_dashboard": False, "_system_config": FAST_FAILURE},
        )
        c.add_node(**NODE)
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False, configure_logging=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        yield c
    finally:
        ray.shutdown()
        if c is not None:
            c.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


@pytest.fixture(scope="module")
def vae() -> VAE:
    cfg = dataclasses.replace(preset("sd1"), base_channels=32, channel_mult=(1, 2, 2, 2), norm_groups=8)
    torch.manual_seed(0)
    return VAE(build(cfg), cfg, VAEOrigin(name="small-sd1"))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 32), (32, 48), (36, 36), (64, 32), (32, 32), (48, 40), (70, 33)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return folder


def snapshot(cache: Path) -> dict[str, dict[str, torch.Tensor]]:
    ds = vc.open(cache)
    return {ds[i]["path"]: {k: v for k, v in ds[i].items() if isinstance(v, torch.Tensor)} for i in range(len(ds))}


def assert_same(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> None:
    assert a.keys() == b.keys() and a
    for path in a:
        assert a[path].keys() == b[path].keys()
        for key in a[path]:
            assert torch.equal(a[path][key], b[path][key]), (path, key)


def query(cache: Path, sql: str) -> list[sqlite3.Row]:
    con = sqlite3.connect(f"file:{cache / MANIFEST_NAME}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def assert_complete(cache: Path, folder: Path) -> None:
    """Every good image cached once, each in its own slot of a shard that exists; no file the manifest lacks."""
    rows = query(cache, "SELECT * FROM images WHERE status = 'ok' ORDER BY path")
    expected = sorted(str(p.resolve()) for p in folder.glob("*.png") if p.name != "broken.png")
    assert [r["path"] for r in rows] == expected
    slots = [(r["shard"], r["idx"]) for r in rows]
    assert len(set(slots)) == len(slots)
    counts = {r["name"]: r["count"] for r in query(cache, "SELECT name, count FROM shards")}
    assert set(counts) == {p.name for p in (cache / "shards").iterdir()}  # no orphan, no temporary file
    assert sum(counts.values()) == len(rows)  # no dead entries: every slot of every shard is used
    for shard, idx in slots:
        assert 0 <= idx < counts[shard]
        with safe_open(str(cache / "shards" / shard), "pt") as f:
            assert f"{idx}/mean" in f.keys() and f"{idx}/logvar" in f.keys()


def many_images(folder: Path, n: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def test_two_node_cluster_gives_the_local_engines_latents(
    cluster: object, vae: VAE, images: Path, tmp_path: Path
) -> None:
    """Groups of 2 (the last of each bucket padded), random crops, buckets, flips: identical; both nodes write
    shards, and the driver receives well under 1 KB per image (the records' pickled size)."""
    params = Preprocess(resolution=RES, crop="random", seed=5, flip=True, buckets=((32, 32), (48, 24), (24, 48)))
    settings = EncodeSettings(batch_size=2)
    local = build_cache(images, tmp_path / "local", vae, params, settings, workers=0, shard_size=3)
    # 3 actors asked of a 2-CPU cluster: the third never starts and gets no work; the run must not wait for it.
    remote = build_cache(images, tmp_path / "ray", vae, params, settings, engine="ray", workers=3, shard_size=3)
    assert (local.encoded, remote.encoded) == (7, 7)
    assert [p for p, _ in local.failed] == [p for p, _ in remote.failed] == [str((images / "broken.png").resolve())]
    assert remote.nodes == 2 and remote.workers == 3 and remote.actors_lost == 0
    assert 0 < remote.received_bytes / 8 < 1024, remote.received_bytes
    a, b = snapshot(tmp_path / "local"), snapshot(tmp_path / "ray")
    assert_same(a, b)
    assert {tuple(x["mean"].shape) for x in a.values()} == {(4, 4, 4), (4, 3, 6), (4, 6, 3)}
    for path in a:  # the recorded geometry is the same too
        assert torch.equal(a[path]["crop_box"], b[path]["crop_box"])
    assert_complete(tmp_path / "ray", images)
    again = build_cache(images, tmp_path / "ray", vae, params, settings, engine="ray", shard_size=3)
    assert (again.encoded, again.skipped, again.failed_unchanged) == (0, 7, 1)


def test_separate_decode_stage_gives_identical_latents(cluster: object, vae: VAE, images: Path, tmp_path: Path) -> None:
    """The GPU-cluster layout (decode tasks feeding the actor), run on CPUs, changes no bit either."""
    from vaekit.cache.engines.local import run_local
    from vaekit.cache.engines.ray import run_ray
    from vaekit.cache.shards import ShardReader

    params = Preprocess(resolution=RES)
    settings = EncodeSettings()
    tasks = [Task(i, str(p), f"{i:064x}") for i, p in enumerate(collect_images(images))]
    local: dict[int, Encoded | Failed] = {}
    for item in run_local(vae, tasks, params, settings, workers=0):
        for r in [item] if isinstance(item, Failed) else item:
            local[r.key] = r
    stats = RayStats()
    runs = run_ray(vae, tasks, params, settings, tmp_path, "run", 4, workers=1, separate_decode=True, stats=stats)
    records = [record for batch in runs for record in batch]
    assert all(isinstance(r, ShardRecord) for r in records)
    reader = ShardReader(tmp_path / "shards")
    seen: set[int] = set()
    for rec in records:
        for key, reason in rec.failed:
            assert isinstance(local[key], Failed) and local[key].reason == reason  # type: ignore[union-attr]
            seen.add(key)
        for i, entry in enumerate(rec.entries):
            expected = local[entry[0]]
            assert isinstance(expected, Encoded) and expected.geometry == rec.geometry(i)
            got = reader.read(str(rec.name), i)
            assert got.keys() == expected.tensors.keys()
            assert all(torch.equal(got[k], expected.tensors[k]) for k in got)
            seen.add(entry[0])
    assert seen == set(local) == set(range(len(tasks)))
    assert stats.received_bytes < 1024 * len(tasks)


def test_killing_a_worker_node_mid_run_loses_nothing(
    cluster: object, vae: VAE, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker node's raylet and actor are killed after the first commit: its chunks move to the head node's
    actor, the run completes, and neither it nor the rerun leaves a gap, a duplicate or an orphaned file."""
    folder = many_images(tmp_path / "images", 10)
    params, settings = Preprocess(resolution=RES), EncodeSettings()
    local = build_cache(folder, tmp_path / "local", vae, params, settings, workers=0)
    worker = next(iter(cluster.worker_nodes))  # type: ignore[attr-defined]
    killed: list[int] = []

    def progress(done: int, total: int) -> None:
        if done and not killed:
            cluster.remove_node(worker, allow_graceful=False)  # type: ignore[attr-defined]
            killed.append(done)

    monkeypatch.setenv(DELAY_ENV, "0.7")
    cache = tmp_path / "ray"
    try:
        report = build_cache(folder, cache, vae, params, settings, engine="ray", workers=2, shard_size=1,
                             progress=progress)  # fmt: skip
    finally:
        if killed:  # give the module its second node back
            cluster.add_node(**NODE)  # type: ignore[attr-defined]
            cluster.wait_for_nodes()  # type: ignore[attr-defined]
    assert killed and killed[0] < 10
    assert report.actors_lost == 1 and report.encoded == 10 and not report.failed
    assert_complete(cache, folder)
    monkeypatch.delenv(DELAY_ENV)
    again = build_cache(folder, cache, vae, params, settings, engine="ray", workers=2)
    assert (again.encoded, again.skipped, again.recovered) == (0, 10, 0)
    assert_complete(cache, folder)
    assert_same(snapshot(tmp_path / "local"), snapshot(cache))
    assert local.encoded == 10


def test_killing_the_driver_mid_run_resumes_from_the_manifest(
    cluster: object, vae: VAE, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``kill -9`` of the CLI (the Ray driver) after its first commit; the rerun encodes only what is missing."""
    n = 10
    folder = many_images(tmp_path / "images", n)
    vae_file = save_vae(vae, tmp_path / "small.safetensors")
    cache = tmp_path / "cache"
    args = [sys.executable, "-m", "vaekit", "cache", str(folder), "-o", str(cache), "--vae", str(vae_file)]
    args += ["--resolution", str(RES), "--shard-size", "1", "--engine", "ray", "--workers", "2"]
    args += ["--address", cluster.address]  # type: ignore[attr-defined]
    env = {**os.environ, "VAEKIT_HOME": str(tmp_path / "home"), DELAY_ENV: "0.7"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    at_kill = 0
    deadline = time.monotonic() + 300  # generous: a loaded 2-core machine takes minutes to start actors
    try:
        while time.monotonic() < deadline and proc.poll() is None and not at_kill:
            if (cache / MANIFEST_NAME).exists():
                try:
                    at_kill = query(cache, "SELECT COUNT(*) AS n FROM images")[0]["n"]
                except sqlite3.OperationalError:  # schema not created yet
                    pass
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    at_kill = query(cache, "SELECT COUNT(*) AS n FROM images")[0]["n"]
    assert 0 < at_kill < n
    from vaekit.interfaces.cli.core import main

    capsys.readouterr()
    rerun = [*args[3:], "--json"]
    assert main(rerun, {k: v for k, v in env.items() if k != DELAY_ENV}) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["encoded"] == n - at_kill and report["skipped"] == at_kill
    assert report["images_in_cache"] == n
    assert_complete(cache, folder)
    local = build_cache(folder, tmp_path / "local", vae, Preprocess(resolution=RES), workers=0)
    assert local.encoded == n
    assert_same(snapshot(tmp_path / "local"), snapshot(cache))
