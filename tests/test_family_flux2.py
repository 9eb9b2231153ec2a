"""FLUX.2's VAE through every layout, against diffusers' AutoencoderKLFlux2 plus Flux2Pipeline's normalisation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vaekit
from tests.conftest import diffusers_twin, small_config
from vaekit.formats.convert import diffusers_to_ldm, ldm_to_diffusers
from vaekit.normalisers import PatchBatchNorm, patchify, unpatchify

pytest.importorskip("diffusers")


# diffusers' Flux2Pipeline._patchify_latents / _unpatchify_latents (diffusers 0.42.1 pipeline_flux2.py), restated
# here because importing the pipeline needs `transformers`: (N, C, H, W) viewed as (N, C, H/2, 2, W/2, 2), permuted
# to (N, C, 2, 2, H/2, W/2), flattened to (N, 4C, H/2, W/2); the inverse undoes each step.
def _patchify_latents(z: torch.Tensor) -> torch.Tensor:
    n, c, h, w = z.shape
    return z.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(n, c * 4, h // 2, w // 2)


def _unpatchify_latents(p: torch.Tensor) -> torch.Tensor:
    n, c4, h, w = p.shape
    return p.reshape(n, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c4 // 4, h * 2, w * 2)


def _pipeline_normalise(twin: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What diffusers' Flux2Pipeline feeds its transformer: posterior mode, 2x2 patchify, BatchNorm statistics."""
    z = twin.encode(x * 2 - 1).latent_dist.mode()
    p = _patchify_latents(z)
    mean = twin.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(twin.bn.running_var.view(1, -1, 1, 1) + twin.config.batch_norm_eps)
    return (p - mean) / std


def _pipeline_decode(twin: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    mean = twin.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(twin.bn.running_var.view(1, -1, 1, 1) + twin.config.batch_norm_eps)
    z = _unpatchify_latents(latents * std + mean)
    return (twin.decode(z).sample * 0.5 + 0.5).clamp(0, 1)


@pytest.fixture(scope="module")
def twin() -> torch.nn.Module:
    return diffusers_twin(small_config("flux2"), seed=3)


@pytest.fixture(scope="module")
def files(twin: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same weights as BFL's single file, a diffusers folder, a diffusers single file, fp16 and baked."""
    root = tmp_path_factory.mktemp("flux2")
    folder = root / "diffusers"
    twin.save_pretrained(folder, safe_serialization=True)
    sd = twin.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, root / "diffusers_single.safetensors")
    bfl = diffusers_to_ldm(dict(sd), "kl")
    save_file(bfl, root / "flux2-vae.safetensors")
    save_file({k: v.half() if v.is_floating_point() else v for k, v in bfl.items()}, root / "fp16.safetensors")
    transformer = {
        "model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2),
        "model.diffusion_model.double_stream_modulation_img.lin.weight": torch.zeros(4, 2),
    }
    save_file({**transformer, **{"vae." + k: v for k, v in bfl.items()}}, root / "flux2-checkpoint.safetensors")
    return {
        "bfl": root / "flux2-vae.safetensors",
        "diffusers": folder,
        "diffusers_single": root / "diffusers_single.safetensors",
        "fp16": root / "fp16.safetensors",
        "checkpoint": root / "flux2-checkpoint.safetensors",
    }


def test_bfl_names_are_vaekit_names(files: dict[str, Path]) -> None:
    keys = set(load_file(str(files["bfl"])))
    assert {"encoder.quant_conv.weight", "decoder.post_quant_conv.weight", "bn.running_mean", "bn.running_var"} <= keys
    assert "bn.num_batches_tracked" in keys and "quant_conv.weight" not in keys


@pytest.mark.parametrize("layout", ["bfl", "diffusers", "diffusers_single", "checkpoint"])
def test_parity_with_diffusers_pipeline(twin: torch.nn.Module, files: dict[str, Path], layout: str) -> None:
    vae = vaekit.load_vae(files[layout])
    assert (vae.family, vae.origin.family_certain, vae.raw_channels, vae.latent_channels) == ("flux2", True, 32, 128)
    assert vae.downscale == 16
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        ref = _pipeline_normalise(twin, x)
    latents = vae.encode(x, tiling="off")
    assert latents.shape == (2, 128, 4, 6)
    torch.testing.assert_close(latents, ref, atol=1e-4, rtol=0)
    mean, logvar = vae.encode_posterior(x)
    with torch.no_grad():
        dist = twin.encode(x * 2 - 1).latent_dist
    torch.testing.assert_close(mean, dist.mean, atol=1e-4, rtol=0)
    torch.testing.assert_close(logvar, dist.logvar, atol=1e-4, rtol=0)
    with torch.no_grad():
        ref_img = _pipeline_decode(twin, ref)
    torch.testing.assert_close(vae.decode(ref, tiling="off"), ref_img, atol=1e-4, rtol=0)


def test_fp16_copy_and_any_size(files: dict[str, Path]) -> None:
    vae = vaekit.load_vae(files["fp16"])
    assert vae.family == "flux2" and vaekit.inspect(files["fp16"]).dtype == "float16"
    x = torch.rand(1, 3, 37, 53)  # padded to 48 x 64 (multiples of 16)
    latents = vae.encode(x)
    assert latents.shape == (1, 128, 3, 4)
    assert vae.decode(latents, image_size=(53, 37)).shape == (1, 3, 37, 53)


def test_write_back_both_layouts_bit_exact(files: dict[str, Path], tmp_path: Path, twin: torch.nn.Module) -> None:
    vae = vaekit.load_vae(files["bfl"])
    ldm = vaekit.save_vae(vae, tmp_path / "out.safetensors")
    assert load_file(str(ldm)).keys() == load_file(str(files["bfl"])).keys()
    for k, v in load_file(str(files["bfl"])).items():
        assert torch.equal(load_file(str(ldm))[k], v), k
    folder = vaekit.save_vae(vae, tmp_path / "out_diffusers", layout="diffusers")
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKLFlux2" and config["latent_channels"] == 32
    from diffusers import AutoencoderKLFlux2

    back = AutoencoderKLFlux2.from_pretrained(str(folder)).eval()
    for k, v in twin.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    again = vaekit.load_vae(folder)
    for k, v in vae.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    assert ldm_to_diffusers(diffusers_to_ldm(twin.state_dict(), "kl"), "kl").keys() == twin.state_dict().keys()


def test_flux2_checkpoint_is_not_flux1(files: dict[str, Path]) -> None:
    info = vaekit.inspect(files["checkpoint"])
    assert (info.family, info.container, info.prefix, info.raw_channels) == ("flux2", "checkpoint", "vae.", 32)
    assert "BatchNorm" in info.normaliser and info.normaliser_spec["kind"] == "patch_batchnorm"
    from vaekit import families

    keys = list(load_file(str(files["checkpoint"])).keys())
    assert families.from_checkpoint_keys(keys).name == "flux2"
    flux1 = [k for k in keys if "modulation" not in k]
    assert families.from_checkpoint_keys(flux1).name == "flux"


def test_normaliser_round_trip_and_channel_order() -> None:
    z = torch.randn(2, 3, 4, 6)
    p = patchify(z)
    assert p.shape == (2, 12, 2, 3)
    # channel c * 4 + dy * 2 + dx holds z[c, 2i + dy, 2j + dx]
    assert torch.equal(p[:, 1 * 4 + 1 * 2 + 0, 1, 2], z[:, 1, 3, 4])
    assert torch.equal(unpatchify(p), z)
    norm = PatchBatchNorm(tuple(range(12)), tuple(float(i + 1) for i in range(12)), 1e-4)
    torch.testing.assert_close(norm.denormalise(norm.normalise(z)), z, atol=1e-5, rtol=0)
