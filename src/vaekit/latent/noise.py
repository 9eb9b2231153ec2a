"""The forward diffusion process in latent space, as Stable Diffusion was trained with it.

Stable Diffusion's "scaled linear" schedule spaces the square roots of the betas linearly:
``betas = linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2`` and ``alphas_cumprod = cumprod(1 - betas)``.
A noisy latent at step t is ``sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise``.

Here t counts the noising steps applied: t = 0 is the clean latent (no noise, so the decode equals the plain
round trip) and t = 1000 applies all 1000 steps (abar = 0.0047: 7% signal, very nearly pure noise). Step t uses
``alphas_cumprod[t - 1]``, which is diffusers' timestep index ``t - 1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vaekit.errors import BadInputError
from vaekit.vae import VAE

NUM_STEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012


def alphas_cumprod(
    num_steps: int = NUM_STEPS, beta_start: float = BETA_START, beta_end: float = BETA_END
) -> torch.Tensor:
    """Cumulative products of (1 - beta) of the scaled-linear schedule, float64, length ``num_steps``."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def signal_level(t: int | float) -> float:
    """abar at step ``t`` in [0, 1000]: the fraction of the latent's variance left (1 at t = 0)."""
    check_timestep(t)
    step = int(t)
    return 1.0 if step == 0 else float(alphas_cumprod()[step - 1])


def check_timestep(t: int | float) -> None:
    """Refuse timesteps that are not whole numbers in [0, 1000]."""
    if isinstance(t, bool) or not isinstance(t, int | float) or t != int(t) or not 0 <= t <= NUM_STEPS:
        raise BadInputError(f"timestep t={t} is outside [0, {NUM_STEPS}] (whole steps; 0 = no noise)")


def add_noise(latents: torch.Tensor, t: int, noise: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """Noise scaled latents to step ``t``; ``noise`` defaults to a seeded N(0, I) draw of the latents' shape."""
    abar = signal_level(t)
    if noise is None:
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    noise = noise.to(latents.device, latents.dtype)
    if noise.shape != latents.shape:
        raise BadInputError(f"noise shape {tuple(noise.shape)} differs from the latents' {tuple(latents.shape)}")
    if abar == 1.0:
        return latents.clone()
    return abar**0.5 * latents + (1.0 - abar) ** 0.5 * noise


def noise_strip(vae: VAE, image: torch.Tensor, timesteps: Sequence[int], seed: int = 0) -> torch.Tensor:
    """Encode ``image`` (3, H, W), noise its latent to each of ``timesteps`` with one noise draw, and decode.

    Returns (len(timesteps), 3, H, W); the frame for t = 0 is the plain round trip.
    """
    if not timesteps:
        raise BadInputError("give at least one timestep")
    for t in timesteps:
        check_timestep(t)
    latents = vae.encode(image.unsqueeze(0))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    size = (image.shape[-1], image.shape[-2])
    frames = [vae.decode(add_noise(latents, int(t), noise), image_size=size) for t in timesteps]
    return torch.cat(frames)
