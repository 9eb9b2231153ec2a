"""The latent cache: incremental reruns, crash safety, provenance, failures, the dataset reader, the CLI."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from subprocess import PIPE
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

import vaekit.cache as vc
from vaekit.cache import EncodeSettings, Preprocess, build_cache
from vaekit.cache import shards as shards_mod
from vaekit.cache.manifest import MANIFEST_NAME
from vaekit.cache.preprocess import auto_buckets, choose_bucket, parse_buckets, plan_geometry
from vaekit.errors import BadInputError, VaekitError
from vaekit.families import preset
from vaekit.models import build
from vaekit.vae import VAE, VAEOrigin, save_vae

RES = 32
SIZES = [(40, 32), (32, 48), (36, 36), (64, 32), (32, 32), (48, 40)]


def make_vae(seed: int = 0) -> VAE:
    """A small random sd1-architecture VAE (the shape of tests/conftest.py's small_config('sd1'))."""
    cfg = dataclasses.replace(preset("sd1"), base_channels=32, channel_mult=(1, 2, 2, 2), norm_groups=8)
    torch.manual_seed(seed)
    return VAE(build(cfg), cfg, VAEOrigin(name=f"small-sd1-{seed}"))


@pytest.fixture(scope="module")
def vae() -> VAE:
    return make_vae()


def write_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A random RGB PNG of ``size`` (width, height)."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i, size in enumerate(SIZES):
        write_image(folder / f"img{i}.png", size, seed=i)
    return folder


def run(images: Path | list[Any], cache: Path, vae: VAE, **kwargs: Any) -> vc.CacheReport:
    params = kwargs.pop("params", Preprocess(resolution=RES))
    settings = kwargs.pop("settings", EncodeSettings())
    kwargs.setdefault("workers", 0)
    kwargs.setdefault("shard_size", 4)
    return build_cache(images, cache, vae, params, settings, **kwargs)


def query(cache: Path, sql: str) -> list[sqlite3.Row]:
    con = sqlite3.connect(f"file:{cache / MANIFEST_NAME}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def assert_complete(cache: Path, folder: Path) -> None:
    """Every image of ``folder`` cached exactly once, each in its own slot of a shard that exists; no stray files."""
    rows = query(cache, "SELECT * FROM images WHERE status = 'ok' ORDER BY path")
    assert [r["path"] for r in rows] == sorted(str(p.resolve()) for p in folder.glob("*.png"))
    slots = [(r["shard"], r["idx"]) for r in rows]
    assert len(set(slots)) == len(slots)
    counts = {r["name"]: r["count"] for r in query(cache, "SELECT name, count FROM shards")}
    assert set(counts) == {p.name for p in (cache / "shards").iterdir()}
    for shard, idx in slots:
        assert 0 <= idx < counts[shard]
        with safe_open(str(cache / "shards" / shard), "pt") as f:
            assert f"{idx}/mean" in f.keys() and f"{idx}/logvar" in f.keys()


def snapshot(cache: Path) -> dict[str, dict[str, torch.Tensor]]:
    ds = vc.open(cache)
    return {ds[i]["path"]: {k: v for k, v in ds[i].items() if isinstance(v, torch.Tensor)} for i in range(len(ds))}


def assert_same(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> None:
    assert a.keys() == b.keys()
    for path in a:
        assert a[path].keys() == b[path].keys()
        for key in a[path]:
            assert torch.equal(a[path][key], b[path][key]), (path, key)


# --- incremental reruns ----------------------------------------------------------------------------------------
def test_second_run_encodes_nothing(images: Path, tmp_path: Path, vae: VAE) -> None:
    cache = tmp_path / "cache"
    first = run(images, cache, vae)
    assert (first.encoded, first.skipped, first.failed, first.shards_written) == (6, 0, [], 2)
    assert_complete(cache, images)
    files = sorted((cache / "shards").iterdir())
    before = snapshot(cache)
    second = run(images, cache, vae)
    assert (second.encoded, second.skipped, second.shards_written) == (0, 6, 0)
    assert sorted((cache / "shards").iterdir()) == files
    assert_same(before, snapshot(cache))


def test_modifying_one_image_reencodes_exactly_it(images: Path, tmp_path: Path, vae: VAE) -> None:
    cache = tmp_path / "cache"
    run(images, cache, vae)
    before = snapshot(cache)
    changed = write_image(images / "img2.png", (36, 36), seed=99)
    report = run(images, cache, vae)
    assert (report.encoded, report.skipped) == (1, 5)
    after = snapshot(cache)
    key = str(changed.resolve())
    assert not torch.equal(before[key]["mean"], after[key]["mean"])
    assert_same({k: v for k, v in before.items() if k != key}, {k: v for k, v in after.items() if k != key})
    row = query(cache, f"SELECT content_sha256 FROM images WHERE path = '{key}'")[0]
    assert row["content_sha256"] == vc.build.file_sha256(changed)
    assert_complete(cache, images)


def test_same_content_elsewhere_is_reused_not_encoded(images: Path, tmp_path: Path, vae: VAE) -> None:
    cache = tmp_path / "cache"
    run(images, cache, vae)
    (images / "copy.png").write_bytes((images / "img0.png").read_bytes())
    report = run(images, cache, vae)
    assert (report.encoded, report.reused, report.skipped) == (0, 1, 6)
    snap = snapshot(cache)
    assert torch.equal(
        snap[str((images / "copy.png").resolve())]["mean"], snap[str((images / "img0.png").resolve())]["mean"]
    )


def test_prune_removes_what_is_gone(images: Path, tmp_path: Path, vae: VAE) -> None:
    cache = tmp_path / "cache"
    run(images, cache, vae, shard_size=1)
    gone = images / "img3.png"
    shard = query(cache, f"SELECT shard FROM images WHERE path = '{gone.resolve()}'")[0]["shard"]
    gone.unlink()
    kept = run(images, cache, vae, shard_size=1)
    assert (kept.stale, kept.pruned, len(vc.open(cache))) == (1, 0, 6)
    pruned = run(images, cache, vae, shard_size=1, prune=True)
    assert (pruned.pruned, pruned.encoded, len(vc.open(cache))) == (1, 0, 5)
    assert not (cache / "shards" / shard).exists()  # its only image is gone: the shard file goes too
    assert_complete(cache, images)


# --- provenance and refusal ------------------------------------------------------------------------------------
def test_manifest_rows_carry_provenance(images: Path, tmp_path: Path, vae: VAE) -> None:
    cache = tmp_path / "cache"
    params = Preprocess(resolution=RES, crop="random", seed=7)
    run(images, cache, vae, params=params)
    settings = json.loads(query(cache, "SELECT value FROM meta WHERE key = 'settings'")[0]["value"])
    assert settings["vae_sha256"] == vc.build.weights_sha256(vae)
    assert settings["preprocess"]["crop"] == "random" and settings["preprocess"]["seed"] == 7
    for row in query(cache, "SELECT * FROM images"):
        path = Path(row["path"])
        assert row["content_sha256"] == vc.build.file_sha256(path)
        assert row["vae_sha256"] == settings["vae_sha256"]
        assert (row["precision"], row["store_dtype"], row["preprocess"]) == ("fp32", "fp32", params.fingerprint())
        w, h = Image.open(path).size
        assert (row["original_w"], row["original_h"]) == (w, h)
        geo = plan_geometry(w, h, params, row["content_sha256"])
        assert (row["crop_left"], row["crop_top"], row["crop_right"], row["crop_bottom"]) == geo.crop_box
        assert (row["crop_right"] - row["crop_left"], row["crop_bottom"] - row["crop_top"]) == (RES, RES)


def test_other_vae_or_preprocessing_refused_without_rebuild(images: Path, tmp_path: Path, vae: VAE) -> None:
    cache = tmp_path / "cache"
    run(images, cache, vae)
    old_files = set((cache / "shards").iterdir())
    with pytest.raises(BadInputError, match="another VAE.*--rebuild"):
        run(images, cache, make_vae(seed=1))
    with pytest.raises(BadInputError, match="other preprocessing.*--rebuild"):
        run(images, cache, vae, params=Preprocess(resolution=40))
    with pytest.raises(BadInputError, match="stored dtype"):
        run(images, cache, vae, settings=EncodeSettings(store_dtype="fp16"))
    assert set((cache / "shards").iterdir()) == old_files  # refusals touch nothing
    report = run(images, cache, make_vae(seed=1), rebuild=True)
    assert report.encoded == 6
    assert not old_files & set((cache / "shards").iterdir())
    assert_complete(cache, images)


# --- failures and crash safety ---------------------------------------------------------------------------------
def test_corrupt_images_recorded_as_failed_and_skipped(images: Path, tmp_path: Path, vae: VAE) -> None:
    (images / "garbage.png").write_bytes(b"this is not an image")
    jpeg = images / "truncated.jpg"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:100])
    cache = tmp_path / "cache"
    report = run(images, cache, vae)
    assert report.encoded == 6
    reasons = dict(report.failed)
    assert set(reasons) == {str((images / "garbage.png").resolve()), str(jpeg.resolve())}
    assert all("not a readable image" in r or "cannot be read" in r for r in reasons.values())
    failed = query(cache, "SELECT path, error, shard FROM images WHERE status = 'failed'")
    assert {r["path"] for r in failed} == set(reasons) and all(r["error"] and r["shard"] is None for r in failed)
    assert len(vc.open(cache)) == 6
    again = run(images, cache, vae)
    assert (again.encoded, again.failed, again.failed_unchanged) == (0, [], 2)
    retried = run(images, cache, vae, retry_failed=True)
    assert (retried.encoded, len(retried.failed)) == (0, 2)


def test_full_disk_leaves_manifest_consistent(
    images: Path, tmp_path: Path, vae: VAE, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    real_save = shards_mod._save
    calls = []

    def save_then_fill_disk(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
        calls.append(path)
        if len(calls) > 1:
            path.write_bytes(b"partial")  # a half-written temporary file, as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, path, metadata)

    monkeypatch.setattr(shards_mod, "_save", save_then_fill_disk)
    with pytest.raises(VaekitError, match="no space left on the device.*consistent.*4 images"):
        run(images, cache, vae, shard_size=4)
    rows = query(cache, "SELECT * FROM images")
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert [p.name for p in (cache / "shards").iterdir()] == [rows[0]["shard"]]  # no temporary file left
    monkeypatch.setattr(shards_mod, "_save", real_save)
    report = run(images, cache, vae, shard_size=4)
    assert (report.encoded, report.skipped) == (2, 4)
    assert_complete(cache, images)


def test_leftovers_of_a_crash_are_cleaned_and_lost_shards_reencoded(images: Path, tmp_path: Path, vae: VAE) -> None:
    cache = tmp_path / "cache"
    run(images, cache, vae, shard_size=2)
    lost = query(cache, "SELECT name FROM shards ORDER BY name")[0]["name"]
    (cache / "shards" / lost).unlink()  # a shard whose file vanished: its images must come back
    (cache / "shards" / "0123456789ab-000000.safetensors").write_bytes(b"renamed but never committed")
    (cache / "shards" / ".x.safetensors.1234.tmp").write_bytes(b"half written")
    report = run(images, cache, vae, shard_size=2)
    assert (report.recovered, report.encoded, report.skipped) == (3, 2, 4)
    assert_complete(cache, images)


def test_a_second_writer_is_refused(images: Path, tmp_path: Path, vae: VAE) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    code = "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.lockf(f, fcntl.LOCK_EX); print(1, flush=True)"
    holder = subprocess.Popen([sys.executable, "-c", code + "; time.sleep(60)", str(cache / ".lock")], stdout=PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"1"
        with pytest.raises(BadInputError, match="another vaekit cache run"):
            run(images, cache, vae)
    finally:
        holder.kill()
        holder.wait()
    assert run(images, cache, vae).encoded == 6  # the lock goes with its process


def test_killed_run_completes_on_rerun(tmp_path: Path, vae: VAE, capsys: pytest.CaptureFixture) -> None:
    """SIGKILL the CLI after its first shard is committed; the rerun completes the cache with no duplicate."""
    folder = tmp_path / "many"
    folder.mkdir()
    n = 24
    for i in range(n):
        write_image(folder / f"{i:03d}.png", (48, 48), seed=100 + i)
    vae_file = save_vae(vae, tmp_path / "small.safetensors")
    cache = tmp_path / "cache"
    args = [sys.executable, "-m", "vaekit", "cache", str(folder), "-o", str(cache), "--vae", str(vae_file)]
    args += ["--resolution", "48", "--shard-size", "2", "--workers", "1"]
    env = {**os.environ, "VAEKIT_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    committed = 0
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (cache / MANIFEST_NAME).exists():
                try:
                    committed = query(cache, "SELECT COUNT(*) AS n FROM images")[0]["n"]
                except sqlite3.OperationalError:  # schema not created yet
                    committed = 0
                if committed:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    at_kill = query(cache, "SELECT COUNT(*) AS n FROM images")[0]["n"]
    assert 0 < at_kill < n
    from vaekit.interfaces.cli.core import main

    capsys.readouterr()
    assert main([*args[3:], "--json"], env) == 0  # the rerun: the same command, in this process
    report = json.loads(capsys.readouterr().out)
    assert report["encoded"] == n - at_kill and report["skipped"] == at_kill
    assert report["images_in_cache"] == n
    assert_complete(cache, folder)


# --- engines, determinism --------------------------------------------------------------------------------------
def test_worker_count_does_not_change_a_bit(images: Path, tmp_path: Path, vae: VAE) -> None:
    params = Preprocess(resolution=RES, crop="random", seed=3, flip=True)
    run(images, tmp_path / "a", vae, params=params, workers=0)
    run(images, tmp_path / "b", vae, params=params, workers=2)
    a, b = snapshot(tmp_path / "a"), snapshot(tmp_path / "b")
    assert_same(a, b)
    assert all("mean_flip" in item for item in a.values())


def test_cached_latents_match_a_direct_encode(images: Path, tmp_path: Path, vae: VAE) -> None:
    """The oracle: the foundation's direct model encode of the same resized, cropped pixels."""
    cache = tmp_path / "cache"
    params = Preprocess(resolution=RES, flip=True)
    run(images, cache, vae, params=params)
    ds = vc.open(cache)
    for i in range(len(ds)):
        item = ds[i]
        img = torch.from_numpy(np.asarray(Image.open(item["path"]).convert("RGB"), np.float32) / 255).permute(2, 0, 1)
        h, w = img.shape[1:]
        scale = max(RES / w, RES / h)
        size = (max(RES, round(h * scale)), max(RES, round(w * scale)))
        if size != (h, w):
            img = F.interpolate(img[None], size=size, mode="bicubic", antialias=True)[0].clamp(0, 1)
        top, left = (size[0] - RES) // 2, (size[1] - RES) // 2
        x = img[:, top : top + RES, left : left + RES]
        assert item["crop_top_left"].tolist() == [top, left]
        assert item["original_size"].tolist() == [h, w] and item["target_size"].tolist() == [RES, RES]
        mean, logvar = one_thread(vae.encode_posterior, x[None])
        torch.testing.assert_close(item["mean"], mean[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(item["logvar"], logvar[0].clamp(-30, 20), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(item["latents"], vae.normalise(mean[0]), atol=1e-5, rtol=1e-4)
        flipped, _ = one_thread(vae.encode_posterior, x.flip(-1)[None])
        torch.testing.assert_close(item["mean_flip"], flipped[0], atol=1e-5, rtol=1e-4)


def one_thread(fn: Any, *args: Any) -> Any:
    """Run ``fn`` with one torch thread (two threads on a loaded 2-core machine spin on each other)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(saved)


# --- reading back ----------------------------------------------------------------------------------------------
def test_dataset_returns_what_was_written(images: Path, tmp_path: Path, vae: VAE) -> None:
    cache = tmp_path / "cache"
    run(images, cache, vae, shard_size=4)
    ds = vc.open(cache)
    assert len(ds) == 6 and isinstance(ds, torch.utils.data.Dataset)
    rows = {r["path"]: r for r in query(cache, "SELECT * FROM images")}
    for i in range(len(ds)):
        item = ds[i]
        row = rows[item["path"]]
        with safe_open(str(cache / "shards" / row["shard"]), "pt") as f:
            assert torch.equal(item["mean"], f.get_tensor(f"{row['idx']}/mean"))
            assert torch.equal(item["logvar"], f.get_tensor(f"{row['idx']}/logvar"))
        assert item["mean"].shape == (4, RES // 8, RES // 8)
        assert item["crop_box"].tolist() == [row["crop_left"], row["crop_top"], row["crop_right"], row["crop_bottom"]]
        assert ds.index_of(item["path"]) == i
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    s1, s2 = ds.sample(ds[0], g1), ds.sample(ds[0], g2)
    assert torch.equal(s1, s2) and not torch.equal(s1, ds[0]["latents"])
    with pytest.raises(IndexError):
        ds[6]
    # Streaming: every item once, shard by shard; shuffled order changes with the epoch and is reproducible.
    stream = ds.stream()
    assert [x["path"] for x in stream] == [ds[i]["path"] for i in sorted(range(6), key=lambda i: ds.rows[i].shard)]
    shuffled = ds.stream(shuffle=True, seed=1)
    order = [x["path"] for x in shuffled]
    assert sorted(order) == sorted(rows) and order == [x["path"] for x in ds.stream(shuffle=True, seed=1)]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["latents"].shape == (3, 4, RES // 8, RES // 8) and batch["original_size"].shape == (3, 2)


def test_hf_datasets_export(images: Path, tmp_path: Path, vae: VAE) -> None:
    datasets = pytest.importorskip("datasets")
    cache = tmp_path / "cache"
    run(images, cache, vae)
    ds = vc.open(cache)
    hf = ds.to_hf_dataset(cache_dir=tmp_path / "hf")
    assert isinstance(hf, datasets.Dataset) and len(hf) == len(ds)
    np.testing.assert_array_equal(np.asarray(hf[2]["mean"], np.float32), ds[2]["mean"].numpy())
    assert hf[2]["path"] == ds[2]["path"] and hf[2]["original_size"] == ds[2]["original_size"].tolist()


# --- preprocessing ---------------------------------------------------------------------------------------------
def test_buckets(tmp_path: Path, vae: VAE) -> None:
    buckets = auto_buckets(512)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    assert parse_buckets("64x32, 32x64", 64) == ((64, 32), (32, 64)) and parse_buckets(None, 64) is None
    with pytest.raises(BadInputError, match="WIDTHxHEIGHT"):
        parse_buckets("64by32", 64)
    params = Preprocess(resolution=48, buckets=((64, 32), (32, 64), (48, 48)))
    assert choose_bucket(200, 90, params) == (64, 32) and choose_bucket(90, 200, params) == (32, 64)
    assert choose_bucket(100, 110, params) == (48, 48)
    folder = tmp_path / "imgs"
    folder.mkdir()
    write_image(folder / "wide.png", (120, 60), 1)
    write_image(folder / "tall.png", (50, 100), 2)
    run(folder, tmp_path / "cache", vae, params=params)
    shapes = {Path(x["path"]).name: tuple(x["mean"].shape) for x in vc.open(tmp_path / "cache")}
    assert shapes == {"wide.png": (4, 4, 8), "tall.png": (4, 8, 4)}
    with pytest.raises(BadInputError, match="multiples of 8"):
        run(folder, tmp_path / "c2", vae, params=Preprocess(resolution=36))


def test_random_crop_is_seeded_per_image(images: Path) -> None:
    p = Preprocess(resolution=RES, crop="random", seed=1)
    boxes = [plan_geometry(64, 32, p, f"{i:064x}").crop_box for i in range(8)]
    assert boxes == [plan_geometry(64, 32, p, f"{i:064x}").crop_box for i in range(8)]
    assert len(set(boxes)) > 1  # different images get different crops
    other = [
        plan_geometry(64, 32, Preprocess(resolution=RES, crop="random", seed=2), f"{i:064x}").crop_box for i in range(8)
    ]
    assert other != boxes
    assert Preprocess(resolution=RES, seed=1).fingerprint() == Preprocess(resolution=RES, seed=2).fingerprint()
    assert p.fingerprint() != Preprocess(resolution=RES, crop="random", seed=2).fingerprint()


# --- command line ----------------------------------------------------------------------------------------------
def test_cli_cache_report_and_bad_flags(images: Path, tmp_path: Path, vae: VAE, capsys: pytest.CaptureFixture) -> None:
    from vaekit.interfaces.cli.core import main

    vae_file = save_vae(vae, tmp_path / "small.safetensors")
    (images / "list.txt").write_text("img0.png\nimg1.png\nmissing.png\n")
    base = ["cache", str(images / "list.txt"), "-o", str(tmp_path / "cache"), "--vae", str(vae_file)]
    env = {**os.environ, "VAEKIT_HOME": str(tmp_path / "home")}
    assert main([*base, "--resolution", "32", "--workers", "0", "--json"], env) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["encoded"], report["images_in_cache"]) == (2, 2)
    assert [f["path"] for f in report["failed"]] == [str((images / "missing.png").resolve())]
    assert main([*base, "--resolution", "32", "--workers", "0"], env) == 0
    captured = capsys.readouterr()
    assert "images/s" in captured.out and "already cached" in captured.out and "missing.png" in captured.err
    assert main([*base, "--resolution", "64", "--workers", "0"], env) == 2
    assert "--rebuild" in capsys.readouterr().err
    assert main([*base, "--crop", "diagonal"], env) == 2
    assert "unknown crop" in capsys.readouterr().err
    assert main([*base, "--engine", "spark"], env) == 2
    assert "unknown engine" in capsys.readouterr().err


def test_tiny_vae_stores_its_deterministic_latents(images: Path, tmp_path: Path, small_tiny_vae: VAE) -> None:
    cache = tmp_path / "cache"
    run(images, cache, small_tiny_vae)
    ds = vc.open(cache)
    item = ds[4]  # img4 is exactly 32x32: no resize, no crop
    assert "logvar" not in item and torch.equal(ds.sample(item), item["latents"])
    x = torch.from_numpy(np.asarray(Image.open(item["path"]), np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(item["latents"], one_thread(small_tiny_vae.encode, x[None])[0], atol=1e-5, rtol=1e-4)
