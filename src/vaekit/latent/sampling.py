"""Draw latents from the prior N(0, I) in the VAE's scaled latent space and decode them."""

from __future__ import annotations

import torch

from vaekit.errors import BadInputError
from vaekit.vae import VAE


def sample_latents(
    vae: VAE, n: int = 4, height: int = 256, width: int = 256, temperature: float = 1.0, seed: int = 0
) -> torch.Tensor:
    """``n`` latents for images of ``height`` x ``width`` pixels, drawn from N(0, temperature^2 I), seeded.

    The draw uses a CPU generator, so a seed gives the same latents on every device.
    """
    if n < 1:
        raise BadInputError(f"number of samples must be at least 1, got {n}")
    if temperature < 0:
        raise BadInputError(f"temperature must be >= 0, got {temperature}")
    if height < vae.downscale or width < vae.downscale or height % vae.downscale or width % vae.downscale:
        raise BadInputError(
            f"sample size {width}x{height} must be positive multiples of {vae.downscale} (the VAE's downscale)"
        )
    gen = torch.Generator().manual_seed(seed)
    shape = (n, vae.latent_channels, height // vae.downscale, width // vae.downscale)
    return torch.randn(shape, generator=gen) * temperature


def sample(
    vae: VAE, n: int = 4, height: int = 256, width: int = 256, temperature: float = 1.0, seed: int = 0
) -> torch.Tensor:
    """Decode ``n`` prior samples (see :func:`sample_latents`); returns images (n, 3, height, width) in [0, 1]."""
    return vae.decode(sample_latents(vae, n, height, width, temperature, seed))
