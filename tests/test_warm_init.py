"""vaekit.train.warm_init: the box-codec start of the tiny autoencoder preset (the bundled VAE's recipe)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vaekit.models import build
from vaekit.models.config import TinyConfig
from vaekit.train.warm_init import box_codec_init


def _model(channels: int = 16, width: int = 16):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return box_codec_init(build(TinyConfig(family="custom", latent_channels=channels, width=width)))


def test_latent_rgb_channels_are_the_cell_means_at_step_zero() -> None:
    model = _model()
    x = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        z = model.encode(x)
    assert z.shape == (1, 16, 4, 6)
    torch.testing.assert_close(z[:, :3], F.avg_pool2d(x, 8) * 2 - 1, atol=1e-5, rtol=0)


def test_box_codec_reconstructs_smooth_images_before_training() -> None:
    model = _model()
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    smooth = torch.stack([0.2 + 0.6 * xx, 0.3 + 0.4 * yy, 0.5 + 0.2 * (xx - yy)])[None]
    with torch.no_grad():
        y = model.decode(model.encode(smooth))
    interior = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    mse = F.mse_loss(y[interior], smooth[interior])
    assert 10 * torch.log10(1 / mse) > 30  # a random init gives ~10 dB
    noise = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert F.mse_loss(model.decode(model.encode(noise)), noise) > 5 * mse  # detail is left to training


def test_box_codec_needs_three_latent_channels() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        _model(channels=2)
