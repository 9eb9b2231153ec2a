"""TAEF2 (tiny autoencoder for FLUX.2): real published weights, detection, layouts, shapes."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from vaekit.errors import LoadError
from vaekit.models.config import TinyConfig
from vaekit.models.taef2 import (
    DIFFUSERS_KEYS,
    MARKER_KEYS,
    PRESETS,
    TAEF2VAE,
    TAEF2Config,
    config_from_diffusers,
    config_from_shapes,
    diffusers_config,
    from_diffusers,
    normaliser_spec,
    part_state_dict,
    to_diffusers,
)
from vaekit.models.tiny import TinyAutoencoder

WEIGHTS = Path(__file__).resolve().parents[1] / ".." / "shared" / "weights"
ENCODER, DECODER = WEIGHTS / "taef2_encoder.pth", WEIGHTS / "taef2_decoder.pth"
needs_weights = pytest.mark.skipif(
    not (ENCODER.is_file() and DECODER.is_file()),
    reason=f"the real TAEF2 weights are not in {WEIGHTS} (../shared/weights beside the project)",
)
SMALL = TAEF2Config(width=8)


def shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def random_sd(cfg: TAEF2Config, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return TAEF2VAE(cfg).state_dict()


@pytest.fixture(scope="module")
def real() -> dict[str, dict[str, torch.Tensor]]:
    return {
        "encoder": torch.load(ENCODER, map_location="cpu", weights_only=True),
        "decoder": torch.load(DECODER, map_location="cpu", weights_only=True),
    }


@needs_weights
def test_real_files_are_recognised_and_load_strictly(real: dict[str, dict[str, torch.Tensor]]) -> None:
    both = {**part_state_dict(real["encoder"], "encoder"), **part_state_dict(real["decoder"], "decoder")}
    assert config_from_shapes(shapes(both)) == PRESETS["taef2"]
    model = TAEF2VAE(PRESETS["taef2"])
    result = model.load_state_dict(both, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for part, other in (("encoder", "decoder"), ("decoder", "encoder")):
        cfg = config_from_shapes(shapes(real[part]))  # the bare file, as published
        assert cfg == dataclasses.replace(PRESETS["taef2"], **{f"has_{other}": False})
        half = TAEF2VAE(cfg)
        half.load_state_dict(part_state_dict(real[part], part), strict=True)
        assert not hasattr(half, other)
    with pytest.raises(LoadError, match="no decoder"):
        TAEF2VAE(config_from_shapes(shapes(real["encoder"]))).decode(torch.zeros(1, 32, 2, 2))  # type: ignore[arg-type]
    # The plain tiny autoencoder cannot hold TAEF2: the pool branches are 12 unexpected keys per part.
    plain = TinyAutoencoder(TinyConfig(family="custom", latent_channels=32))
    result = plain.load_state_dict(both, strict=False)
    assert not result.missing_keys and len(result.unexpected_keys) == 24
    assert all(".pool." in k for k in result.unexpected_keys)


# Reference quality (README of ../shared/weights, the authors' taesd.py at 5cccb12): dB on [0, 1], crops to 8.
REFERENCE_DB = {"astronaut": 31.19, "chelsea": 32.79, "coffee": 29.62}


@needs_weights
@pytest.mark.parametrize("photo", sorted(REFERENCE_DB))
def test_real_round_trip_matches_the_reference_quality(real: dict[str, dict[str, torch.Tensor]], photo: str) -> None:
    import skimage.data

    model = TAEF2VAE(PRESETS["taef2"]).eval()
    model.load_state_dict(
        {**part_state_dict(real["encoder"], "encoder"), **part_state_dict(real["decoder"], "decoder")}
    )
    image = getattr(skimage.data, photo)()
    h, w = image.shape[0] // 8 * 8, image.shape[1] // 8 * 8
    x = torch.from_numpy(image[:h, :w]).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        z = model.encode(x)
        y = model.decode(z).clamp(0, 1)
    assert z.shape == (1, 32, h // 8, w // 8)
    psnr = 10 * math.log10(1 / ((y - x) ** 2).mean().item())
    assert abs(psnr - REFERENCE_DB[photo]) <= 0.1, f"{photo}: {psnr:.2f} dB, reference {REFERENCE_DB[photo]}"
    # TAEF2 speaks FLUX.2's BatchNorm-normalised space: latents of a photo are about zero-mean, unit-scale.
    assert abs(z.mean().item()) < 0.2 and 0.6 < z.std().item() < 1.1


def test_small_random_files_are_recognised_in_every_form() -> None:
    cfg = dataclasses.replace(SMALL, latent_channels=16, encoder_blocks=(1, 2, 2), decoder_blocks=(2, 2, 1))
    sd = random_sd(cfg)
    assert config_from_shapes(shapes(sd)) == cfg
    for part, other in (("encoder", "decoder"), ("decoder", "encoder")):
        # A part file tells nothing about the other part: its fields keep their defaults.
        want = dataclasses.replace(
            cfg, **{f"has_{other}": False, f"{other}_blocks": getattr(TAEF2Config, f"{other}_blocks")}
        )
        bare = {k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith(part + ".")}
        assert config_from_shapes(shapes(bare)) == want
        prefixed = {k: v for k, v in sd.items() if k.startswith(part + ".")}
        assert config_from_shapes(shapes(prefixed)) == want
        TAEF2VAE(want).load_state_dict(prefixed, strict=True)
    assert cfg.downscale == 4 and not cfg.gaussian
    assert all(k in shapes(random_sd(SMALL)) for k in MARKER_KEYS)


@pytest.mark.parametrize("cfg", [TinyConfig(width=8), TinyConfig(width=8, latent_channels=16), TinyConfig()])
def test_plain_taesd_files_are_not_taef2(cfg: TinyConfig) -> None:
    torch.manual_seed(0)
    sd = TinyAutoencoder(cfg).state_dict()
    assert config_from_shapes(shapes(sd)) is None
    for part in ("encoder", "decoder"):
        assert config_from_shapes({k.split(".", 1)[1]: v for k, v in shapes(sd).items() if k.startswith(part)}) is None
    # ... and TAEF2 files are not plain TAESD: the tiny autoencoder refuses their pool keys when loading strictly.
    with pytest.raises(RuntimeError, match="pool"):
        TinyAutoencoder(TinyConfig(width=8, latent_channels=32)).load_state_dict(random_sd(SMALL), strict=True)


def test_other_files_are_not_taef2() -> None:
    assert config_from_shapes({}) is None
    assert (
        config_from_shapes({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_in.weight": (512, 32, 3, 3)})
        is None
    )
    assert config_from_shapes({"vae_scale": (), "decoder.3.pool.0.weight": (32, 8, 1, 1)}) is None


def test_incomplete_or_inconsistent_taef2_files_are_refused() -> None:
    sd = shapes(random_sd(SMALL))
    missing = {k: v for k, v in sd.items() if k != "decoder.4.pool.3.weight"}
    with pytest.raises(LoadError, match="TAEF2 decoder: missing decoder|missing 4.pool.3.weight"):
        config_from_shapes(missing)
    wrong = {**sd, "decoder.1.weight": (8, 16, 3, 3), "decoder.1.bias": (8,)}
    with pytest.raises(LoadError, match="latent channels"):
        config_from_shapes(wrong)
    misplaced = {**sd, "encoder.3.pool.0.weight": (32, 8, 1, 1)}
    with pytest.raises(LoadError, match="disagree|last level"):
        config_from_shapes(misplaced)


def test_meta_device_build_allocates_nothing() -> None:
    with torch.device("meta"):
        model = TAEF2VAE(PRESETS["taef2"])
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 2_677_027  # the two published files together
    params = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert params["encoder.11.pool.0.weight"] == (256, 64, 1, 1) and params["decoder.5.pool.1.bias"] == (256,)


def test_non_square_shapes_and_pool_branch() -> None:
    torch.manual_seed(0)
    model = TAEF2VAE(SMALL).eval()
    with torch.no_grad():
        z = model.encode(torch.rand(2, 3, 64, 96))
        y = model.decode(z)
    assert z.shape == (2, 32, 8, 12) and y.shape == (2, 3, 64, 96)
    # The pool branch's GroupNorm is global: changing one corner of the image moves latents far away from it.
    x = torch.rand(1, 3, 192, 192).repeat(2, 1, 1, 1)
    x[1, :, :8, :8] = 1 - x[1, :, :8, :8]
    with torch.no_grad():
        z = model.encode(x)[..., -4:, -4:]
        for block in model.modules():
            if hasattr(block, "pool"):
                block.pool = None
        z_local = model.encode(x)[..., -4:, -4:]
    assert (z[0] - z[1]).abs().max() > 0 and torch.equal(z_local[0], z_local[1])


def test_diffusers_names_round_trip_bit_exact() -> None:
    sd = random_sd(SMALL)
    theirs = to_diffusers(sd)
    assert "decoder.layers.2.pool.0.weight" in theirs and "encoder.layers.11.pool.1.bias" in theirs
    assert "decoder.layers.0.weight" in theirs and "decoder.1.weight" in sd
    back = from_diffusers(theirs)
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    assert DIFFUSERS_KEYS[1] == ("decoder.{d}.", "decoder.layers.{d}.")
    with pytest.raises(LoadError):
        from_diffusers({"decoder.conv_in.weight": torch.zeros(1)})
    with pytest.raises(LoadError, match="no class for TAEF2"):
        diffusers_config(SMALL)
    with pytest.raises(LoadError, match="no class for TAEF2"):
        config_from_diffusers({"_class_name": "AutoencoderTiny"})


def test_normaliser_is_a_2x2_patchify() -> None:
    assert normaliser_spec(PRESETS["taef2"]) == {"kind": "patchify", "patch": 2}
    assert PRESETS["taef2"].to_dict()["encoder_blocks"] == [1, 3, 3, 3]
    assert PRESETS["taef2"].family == "flux2" and PRESETS["taef2"].kind == "taef2" and PRESETS["taef2"].downscale == 8


@needs_weights
def test_flux2_preview_factors_preview_taef2_latents() -> None:
    """The registry's FLUX.2 preview factors (fitted with TAEF2) give a recognisable preview of a held-out photo."""
    import torch.nn.functional as F
    from skimage import data

    import vaekit
    from vaekit import latent

    vae = vaekit.load_vae([WEIGHTS / "taef2_encoder.pth", WEIGHTS / "taef2_decoder.pth"])
    x = torch.tensor(data.astronaut()[:256, :256]).permute(2, 0, 1)[None].float() / 255
    latents = vae.encode(x)
    assert latents.shape == (1, 128, 16, 16)
    preview = latent.latent_to_rgb(latents, latent.preview_map_for(vae))
    target = F.avg_pool2d(vae.decode(latents), 16)
    mse = float(((preview - target) ** 2).mean())
    assert 10 * math.log10(1 / mse) > 18
