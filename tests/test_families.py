"""One test over every registered family and preset: encode/decode at odd sizes, tiling exact and fast, the
normaliser round trip, and the registry's own consistency (like timm's test over every registered model)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.conftest import small_config
from vaekit import families
from vaekit.errors import BadInputError
from vaekit.families import FAMILIES, PRESETS
from vaekit.models import build
from vaekit.ops import tiling
from vaekit.vae import VAE, VAEOrigin


def _small_vae(name: str) -> VAE:
    cfg = small_config(name)
    if cfg.kind == "kl":
        cfg = dataclasses.replace(cfg, base_channels=16, norm_groups=8)
    torch.manual_seed(0)
    model = build(cfg)
    bn = getattr(model, "bn", None)
    if bn is not None:  # random latent statistics, so the normaliser is not the identity
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return VAE(model, cfg, VAEOrigin(name=f"small-{name}"))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_encodes_decodes_and_tiles(name: str) -> None:
    vae = _small_vae(name)
    fam = FAMILIES[vae.family]
    assert vae.downscale == fam.latent_downscale
    assert vae.latent_channels == vae.normaliser.channels(vae.raw_channels)
    torch.manual_seed(1)
    x = torch.rand(1, 3, 2 * vae.downscale + 5, 3 * vae.downscale - 3)
    latents = vae.encode(x, tiling="off")
    assert latents.shape == (1, vae.latent_channels, 3, 3)
    raw = vae.denormalise(latents)
    torch.testing.assert_close(vae.normalise(raw), latents, atol=1e-5, rtol=1e-5)
    out = vae.decode(latents, tiling="off", image_size=(x.shape[3], x.shape[2]))
    assert out.shape == x.shape and bool(out.isfinite().all())
    # tiling: exact equals untiled where the architecture allows it (else a clear refusal); fast stays close
    tile = 2 * vae.raw_downscale
    size = (x.shape[3], x.shape[2])
    if tiling.auto_mode(vae.config) == "exact":
        exact = vae.decode(latents, tiling="exact", tile_size=tile, image_size=size)
        torch.testing.assert_close(exact, out, atol=2e-4, rtol=0)
        exact_latents = vae.encode(x, tiling="exact", tile_size=tile)
        torch.testing.assert_close(exact_latents, latents, atol=2e-4, rtol=0)
    else:
        with pytest.raises(BadInputError, match="exact tiling of a .* is not possible"):
            vae.decode(latents, tiling="exact", tile_size=tile)
    fast = vae.decode(latents, tiling="fast", tile_size=tile, image_size=size)
    assert fast.shape == out.shape and float((fast - out).abs().mean()) < 0.05
    fast_latents = vae.encode(x, tiling="fast", tile_size=tile)
    assert fast_latents.shape == latents.shape and bool(fast_latents.isfinite().all())


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "custom"])
def test_registry_entry_is_consistent(name: str) -> None:
    fam = families.get(name)
    assert fam.full_preset is not None and PRESETS[fam.full_preset].family == name
    for preset_name, cfg in fam.presets.items():
        assert cfg.family == name, preset_name
        if cfg.kind == "kl":
            assert cfg.latent_channels == fam.raw_channels and cfg.downscale == fam.downscale
            assert fam in families.candidates(cfg)
            if fam.normaliser == "scalar":
                assert (cfg.scaling_factor, cfg.shift_factor) == (fam.scale, fam.shift)
    if fam.preview is not None:
        weights, bias = fam.preview
        assert len(weights) == fam.latent_channels and all(len(r) == 3 for r in weights) and len(bias) == 3


def test_unknown_family_is_one_clear_error() -> None:
    with pytest.raises(Exception, match="unknown family 'sd9'; known: sd1, sdxl"):
        families.get("sd9")


@pytest.mark.parametrize("name", ["flux2", "qwenimage", "dcae", "hunyuanimage"])
def test_every_full_vae_writes_both_layouts_and_reads_them_back(name: str, tmp_path) -> None:
    import vaekit

    vae = _small_vae(name)
    original = vaekit.save_vae(vae, tmp_path / f"{name}.safetensors")
    info = vaekit.inspect(original)
    assert (info.family, info.family_certain, info.kind) == (name, True, vae.config.kind)
    assert info.latent_channels == vae.latent_channels and info.downscale == vae.downscale
    folder = vaekit.save_vae(vae, tmp_path / f"{name}_diffusers", layout="diffusers")
    for path in (original, folder):
        back = vaekit.load_vae(path)
        assert back.family == name and back.config == vae.config
        for key, value in vae.state_dict().items():
            assert torch.equal(back.state_dict()[key], value), (path, key)
    x = torch.rand(1, 3, vae.downscale, 2 * vae.downscale)
    torch.testing.assert_close(vaekit.load_vae(folder).encode(x), vae.encode(x), atol=1e-5, rtol=0)
