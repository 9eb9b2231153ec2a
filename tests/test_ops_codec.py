"""Latent files: round trips with and without the posterior, metadata, VAE identity, refusals."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import small_config
from vaekit.errors import BadInputError
from vaekit.formats.io import file_sha256
from vaekit.formats.latent_file import load_latents, save_encoded, save_latents, vae_sha256
from vaekit.models import build
from vaekit.ops.codec import decode, encode
from vaekit.vae import VAE, VAEOrigin, load_vae


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared, loaded CPU, OpenMP barriers make tiny models many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def micro() -> VAE:
    cfg = dataclasses.replace(small_config("sdxl"), base_channels=16, norm_groups=8)
    torch.manual_seed(0)
    return VAE(build(cfg), cfg, VAEOrigin(name="micro-sdxl (random init, seed 0)"))


def test_round_trip_with_posterior_and_metadata(micro: VAE, tmp_path: Path) -> None:
    x = torch.rand(2, 3, 21, 30)
    enc = encode(micro, x)
    path = save_encoded(tmp_path / "l.safetensors", enc, micro, with_posterior=True, extra={"prompt": "a cat"})
    lf = load_latents(path)
    assert (
        torch.equal(lf.latents, enc.latents) and torch.equal(lf.mean, enc.mean) and torch.equal(lf.logvar, enc.logvar)
    )
    assert lf.family == "sdxl" and lf.kind == "kl" and lf.vae_sha256 == "random-init:micro-sdxl"
    assert lf.vae_name == "micro-sdxl (random init, seed 0)"
    assert lf.normaliser.scale == pytest.approx(0.13025) and lf.normaliser.shift == 0.0
    assert lf.image_sizes == [(30, 21), (30, 21)] and lf.paddings == [(0, 0, 2, 3)] * 2
    assert lf.image_size == (30, 21) and lf.dtype == "float32" and not lf.sampled
    assert lf.extra == {"prompt": "a cat"}
    # the file decodes back to images of the original size
    images = decode(micro, lf.latents, image_size=lf.image_sizes, padding=lf.paddings).images
    assert images.shape == (2, 3, 21, 30)
    torch.testing.assert_close(images, decode(micro, enc.latents, image_size=(30, 21)).images)


def test_round_trip_without_posterior_sampled_and_bf16(micro: VAE, tmp_path: Path) -> None:
    enc = encode(micro, torch.rand(1, 3, 16, 16), options=None)
    z = enc.latents.to(torch.bfloat16)
    save_latents(tmp_path / "s.safetensors", z, micro, image_size=(16, 16), padding=(0, 0, 0, 0), sampled=True)
    lf = load_latents(tmp_path / "s.safetensors")
    assert lf.mean is None and lf.logvar is None and lf.sampled
    assert lf.dtype == "bfloat16" and lf.latents.dtype == torch.bfloat16 and torch.equal(lf.latents, z)
    # raw file layout: only the tensors asked for
    assert set(load_file(tmp_path / "s.safetensors")) == {"latents"}


def test_vae_hash_from_file_is_cached(micro: VAE, tmp_path: Path) -> None:
    weights = micro.save(tmp_path / "v.safetensors")
    loaded = load_vae(weights, family="sdxl")
    expected = file_sha256(weights)
    assert vae_sha256(loaded) == expected
    save_latents(tmp_path / "a.safetensors", torch.zeros(1, 4, 2, 2), loaded, image_size=(16, 16), padding=(0,) * 4)
    lf = load_latents(tmp_path / "a.safetensors")
    assert lf.vae_sha256 == expected and lf.vae_short_hash == expected[:10]
    weights.write_bytes(b"changed")  # a different file at the same path must not reuse the cached hash
    assert vae_sha256(loaded) == file_sha256(weights) != expected


def test_writes_are_atomic_and_refuse_overwrite(micro: VAE, tmp_path: Path) -> None:
    dest = tmp_path / "l.safetensors"
    save_latents(dest, torch.zeros(1, 4, 2, 2), micro, image_size=(16, 16), padding=(0,) * 4)
    with pytest.raises(BadInputError, match="already exists"):
        save_latents(dest, torch.ones(1, 4, 2, 2), micro, image_size=(16, 16), padding=(0,) * 4)
    save_latents(dest, torch.ones(1, 4, 2, 2), micro, image_size=(16, 16), padding=(0,) * 4, overwrite=True)
    assert torch.equal(load_latents(dest).latents, torch.ones(1, 4, 2, 2))
    for bad in (
        {"latents": torch.zeros(1, 16, 2, 2)},  # wrong channels
        {"latents": torch.full((1, 4, 2, 2), float("nan"))},
        {"latents": torch.zeros(1, 4, 2, 2), "mean": torch.zeros(1, 4, 2, 2)},  # mean without logvar
        {"latents": torch.zeros(1, 4, 2, 2), "mean": torch.zeros(1, 4, 3, 2), "logvar": torch.zeros(1, 4, 3, 2)},
    ):
        with pytest.raises(BadInputError):
            save_latents(dest, image_size=(16, 16), padding=(0,) * 4, vae=micro, overwrite=True, **bad)  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match="image_size"):
        save_latents(dest, torch.zeros(2, 4, 2, 2), micro, image_size=[(16, 16)], padding=(0,) * 4, overwrite=True)
    with pytest.raises(BadInputError, match=".safetensors"):
        save_latents(tmp_path / "l.pt", torch.zeros(1, 4, 2, 2), micro, image_size=(16, 16), padding=(0,) * 4)
    assert torch.equal(load_latents(dest).latents, torch.ones(1, 4, 2, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.safetensors"]


def test_files_that_are_not_latent_files(micro: VAE, tmp_path: Path) -> None:
    model_file = micro.save(tmp_path / "model.safetensors")
    with pytest.raises(BadInputError, match="not a vaekit latent file.*model file"):
        load_latents(model_file)
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(BadInputError, match="not a vaekit latent file.*unreadable"):
        load_latents(tmp_path / "junk.safetensors")
    good = save_latents(
        tmp_path / "g.safetensors", torch.zeros(1, 4, 2, 2), micro, image_size=(16, 16), padding=(0,) * 4
    )
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-8])
    with pytest.raises(BadInputError, match="not a vaekit latent file"):
        load_latents(tmp_path / "cut.safetensors")
    meta = {"format": "vaekit-latents", "version": "1", "vaekit.latents": json.dumps({"family": "sdxl"})}
    save_file({"latents": torch.zeros(1, 4, 2, 2)}, str(tmp_path / "damaged.safetensors"), metadata=meta)
    with pytest.raises(BadInputError, match="damaged metadata"):
        load_latents(tmp_path / "damaged.safetensors")
    with pytest.raises(BadInputError, match="no such file"):
        load_latents(tmp_path / "missing.safetensors")


def test_check_vae_refuses_other_family(micro: VAE, tmp_path: Path) -> None:
    path = save_latents(
        tmp_path / "a.safetensors", torch.zeros(1, 4, 2, 2), micro, image_size=(16, 16), padding=(0,) * 4
    )
    lf = load_latents(path)
    lf.check_vae(micro)
    sd1 = VAE(build(small_config("sd1")), small_config("sd1"))
    with pytest.raises(BadInputError, match="sdxl family"):
        lf.check_vae(sd1)
    flux = VAE(build(small_config("taef1")), small_config("taef1"))
    with pytest.raises(BadInputError, match="channels"):
        lf.check_vae(flux)
