"""Shared fixtures: tiny random models built from the real presets at small widths."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest
import torch

os.environ.setdefault("VAEKIT_HOME", "")  # never read the developer's own VAE library during tests
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from vaekit.families import preset  # noqa: E402
from vaekit.models.config import VAEConfig  # noqa: E402

KL_PRESETS = ("sd1", "sdxl", "sd3", "flux", "flux2")
TINY_PRESETS = ("taesd", "taesdxl", "taesd3", "taef1")


def small_config(name: str, **overrides: Any) -> VAEConfig:
    """The named preset at a small width (fast on CPU) with the real depth, 32 norm groups, factors and downscale 8."""
    cfg = preset(name)
    if cfg.kind == "kl":
        return dataclasses.replace(cfg, base_channels=32, channel_mult=(1, 2, 2, 2), **overrides)
    if cfg.kind in ("tiny", "taef2"):
        return dataclasses.replace(cfg, width=16, **overrides)
    return dataclasses.replace(cfg, **SMALL_WIDTHS[cfg.kind], **overrides)


# Small widths of the architectures with their own module (the real depth, level structure and latent channels).
SMALL_WIDTHS: dict[str, dict[str, Any]] = {
    "qwenimage": {"base_dim": 8},
    "dcae": {
        "encoder_widths": (8, 16, 16, 32, 32, 32),
        "encoder_depths": (1, 2, 1, 2, 1, 1),
        "decoder_widths": (8, 16, 32, 32, 32, 32),
        "decoder_depths": (2, 1, 1, 1, 2, 1),
        "head_dim": 8,
    },
    "taesana": {"stem_widths": (8, 16), "width": 16, "decoder_widths": (32, 16, 16, 8, 8, 8)},
    "hunyuanimage": {"block_channels": (32, 32, 32, 64, 64, 128), "num_res_blocks": 1},
}


def diffusers_twin(cfg: VAEConfig, seed: int = 0) -> torch.nn.Module:
    """The diffusers class of the same architecture (AutoencoderKL, AutoencoderKLFlux2, AutoencoderTiny), randomly
    initialised (seeded); norms are perturbed and FLUX.2's BatchNorm gets random statistics."""
    import diffusers

    from vaekit.formats.export import diffusers_config

    kwargs = diffusers_config(cfg)
    cls = getattr(diffusers, kwargs.pop("_class_name"))
    torch.manual_seed(seed)
    model = cls(**kwargs).eval()
    # GroupNorm starts as the identity (weight 1, bias 0); perturb it so the parity test checks those weights too.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.add_(torch.randn_like(m.weight) * 0.1)
                m.bias.add_(torch.randn_like(m.bias) * 0.1)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.5)
                m.running_var.copy_(torch.rand_like(m.running_var) * 2 + 0.1)
                m.num_batches_tracked.fill_(1234)
    return model


@pytest.fixture
def small_vae():
    """A small random sd1-architecture VAE (vaekit.VAE), seeded."""
    from vaekit.models import build
    from vaekit.vae import VAE, VAEOrigin

    cfg = small_config("sd1")
    torch.manual_seed(0)
    return VAE(build(cfg), cfg, VAEOrigin(name="small-sd1"))


@pytest.fixture
def small_tiny_vae():
    """A small random TAESD-architecture VAE, seeded."""
    from vaekit.models import build
    from vaekit.vae import VAE, VAEOrigin

    cfg = small_config("taesd")
    torch.manual_seed(0)
    return VAE(build(cfg), cfg, VAEOrigin(name="small-taesd"))
