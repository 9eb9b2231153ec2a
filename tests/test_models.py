"""Every preset builds, runs forward and backward, and matches diffusers on the same random weights."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import KL_PRESETS, TINY_PRESETS, diffusers_twin, small_config
from vaekit.families import PRESETS, preset
from vaekit.formats.convert import diffusers_to_ldm
from vaekit.models import build, config_from_dict


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_forward_and_backward(name: str) -> None:
    cfg = small_config(name)
    torch.manual_seed(0)
    model = build(cfg)
    x = torch.rand(2, 3, 32, 48, requires_grad=True)
    if cfg.kind == "kl":
        mean, logvar = model.encode(x)
        assert mean.shape == logvar.shape == (2, cfg.latent_channels, 4, 6)
        out = model.decode(mean)
    else:
        z = model.encode(x)
        assert z.shape == (2, cfg.latent_channels, 4, 6)
        out = model.decode(z)
    assert out.shape == x.shape
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_preset_factors_and_channels() -> None:
    assert (preset("sd1").scaling_factor, preset("sd1").latent_channels) == (0.18215, 4)
    assert preset("sdxl").scaling_factor == 0.13025
    sd3, flux = preset("sd3"), preset("flux")
    assert (sd3.latent_channels, sd3.scaling_factor, sd3.shift_factor) == (16, 1.5305, 0.0609)
    assert not sd3.use_quant_conv and not flux.use_quant_conv
    assert (flux.latent_channels, flux.scaling_factor, flux.shift_factor) == (16, 0.3611, 0.1159)
    assert preset("taef1").latent_channels == 16 and preset("taesdxl").family == "sdxl"
    assert config_from_dict(preset("sd3").to_dict()) == preset("sd3")
    with pytest.raises(KeyError, match="unknown preset"):
        preset("sd9")


def test_full_width_sd1_parameter_count() -> None:
    model = build(preset("sd1"), device="meta")
    # The published SD VAE (sd-vae-ft-mse) has 83,653,863 parameters.
    assert sum(p.numel() for p in model.parameters()) == 83_653_863


def _check_parity(cfg, size=(32, 48), seed=0) -> None:
    twin = diffusers_twin(cfg, seed=seed)
    model = build(cfg, device="meta")
    model.load_state_dict(diffusers_to_ldm(twin.state_dict(), cfg.kind), strict=True, assign=True)
    model.eval()
    torch.manual_seed(1)
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        if cfg.kind == "kl":
            post = twin.encode(x * 2 - 1).latent_dist
            mean, logvar = model.encode(x)
            torch.testing.assert_close(mean, post.mean, atol=1e-4, rtol=0)
            torch.testing.assert_close(logvar, post.logvar, atol=1e-4, rtol=0)
            z = torch.randn_like(mean)
            torch.testing.assert_close(model.decode(z), twin.decode(z).sample * 0.5 + 0.5, atol=1e-4, rtol=0)
        else:
            torch.testing.assert_close(model.encode(x), twin.encode(x * 2 - 1).latents, atol=1e-4, rtol=0)
            z = torch.randn(2, cfg.latent_channels, size[0] // 8, size[1] // 8)
            torch.testing.assert_close(model.decode(z), twin.decode(z).sample * 0.5 + 0.5, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", KL_PRESETS + TINY_PRESETS)
def test_parity_with_diffusers_small_width(name: str) -> None:
    _check_parity(small_config(name))


def test_parity_with_diffusers_real_sd1_width() -> None:
    _check_parity(preset("sd1"), size=(32, 32))


def test_parity_with_diffusers_real_taesd_width() -> None:
    _check_parity(preset("taesd"), size=(32, 32))
