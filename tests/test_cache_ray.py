"""The Ray engine gives the same latents as the local engine, bit for bit (needs the ``ray`` extra)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vaekit.cache as vc
from vaekit.cache import EncodeSettings, Preprocess, build_cache
from vaekit.cache.build import collect_images
from vaekit.cache.encoding import Encoded, Failed, Task
from vaekit.families import preset
from vaekit.models import build
from vaekit.vae import VAE, VAEOrigin

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

RES = 32


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    """One local Ray instance with 2 CPUs for the whole module (starting Ray takes seconds)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


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


def test_ray_and_local_engines_give_identical_latents(
    ray_instance: None, vae: VAE, images: Path, tmp_path: Path
) -> None:
    """Groups of 2 (the last of each bucket padded), random crops, buckets, flips: all identical."""
    params = Preprocess(resolution=RES, crop="random", seed=5, flip=True, buckets=((32, 32), (48, 24), (24, 48)))
    settings = EncodeSettings(batch_size=2)
    local = build_cache(images, tmp_path / "local", vae, params, settings, workers=0, shard_size=3)
    remote = build_cache(images, tmp_path / "ray", vae, params, settings, engine="ray", shard_size=3)
    assert (local.encoded, remote.encoded) == (7, 7)
    assert [p for p, _ in local.failed] == [p for p, _ in remote.failed] == [str((images / "broken.png").resolve())]
    a, b = snapshot(tmp_path / "local"), snapshot(tmp_path / "ray")
    assert_same(a, b)
    assert {tuple(x["mean"].shape) for x in a.values()} == {(4, 4, 4), (4, 3, 6), (4, 6, 3)}
    for path in a:  # the recorded geometry is the same too
        assert torch.equal(a[path]["crop_box"], b[path]["crop_box"])
    again = build_cache(images, tmp_path / "ray", vae, params, settings, engine="ray", shard_size=3)
    assert (again.encoded, again.skipped, again.failed_unchanged) == (0, 7, 1)


def test_ray_separate_decode_stage_gives_identical_latents(
    ray_instance: None, vae: VAE, images: Path, tmp_path: Path
) -> None:
    """The GPU-cluster layout (decode tasks feeding encoder actors), run on CPUs, changes no bit either."""
    from vaekit.cache.engines.local import run_local
    from vaekit.cache.engines.ray import run_ray

    params = Preprocess(resolution=RES)
    settings = EncodeSettings()
    tasks = [Task(i, str(p), f"{i:064x}") for i, p in enumerate(collect_images(images))]

    def collect(results: Iterator[list[Encoded] | Failed]) -> dict[int, Encoded | Failed]:
        out: dict[int, Encoded | Failed] = {}
        for item in results:
            for r in [item] if isinstance(item, Failed) else item:
                assert r.key not in out
                out[r.key] = r
        return out

    local = collect(run_local(vae, tasks, params, settings, workers=0))
    remote = collect(run_ray(vae, tasks, params, settings, workers=1, separate_decode=True))
    assert local.keys() == remote.keys() == set(range(len(tasks)))
    for key, r in local.items():
        other = remote[key]
        assert type(r) is type(other)
        if isinstance(r, Encoded):
            assert isinstance(other, Encoded) and r.geometry == other.geometry
            assert r.tensors.keys() == other.tensors.keys()
            assert all(torch.equal(r.tensors[k], other.tensors[k]) for k in r.tensors)
        else:
            assert isinstance(other, Failed) and r.reason == other.reason
