"""Data augmentation in latent space: perturb each image's latent (Gaussian noise, or a step towards a
neighbouring image's latent) and decode. Seeded, so a run can be repeated exactly.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from vaekit.errors import BadInputError
from vaekit.latent.interpolation import lerp
from vaekit.vae import VAE

Mode = Literal["noise", "neighbours"]
MODES = ("noise", "neighbours")
DEFAULT_STRENGTH: dict[str, float] = {"noise": 0.2, "neighbours": 0.3}
NEIGHBOURS = 3  # each image moves towards one of its this many nearest images


def _descriptor(latent: torch.Tensor) -> torch.Tensor:
    """A size-independent summary of a latent (C, h, w) for finding neighbours: its 4x4 average-pooled grid."""
    return F.adaptive_avg_pool2d(latent.float().unsqueeze(0), 4).flatten()


def nearest_neighbours(latents: list[torch.Tensor], k: int = NEIGHBOURS) -> list[list[int]]:
    """For each latent, the indices of the ``k`` closest other latents (Euclidean distance of descriptors)."""
    desc = torch.stack([_descriptor(z) for z in latents])
    dist = torch.cdist(desc, desc)
    dist.fill_diagonal_(float("inf"))
    k = min(k, len(latents) - 1)
    return dist.topk(k, largest=False).indices.tolist()


def augment(
    vae: VAE,
    images: list[torch.Tensor],
    n: int = 4,
    mode: Mode = "noise",
    strength: float | None = None,
    seed: int = 0,
) -> list[torch.Tensor]:
    """``n`` variants of each image (3, H, W) in [0, 1]; returns one (n, 3, H, W) tensor per image.

    ``noise``: the latent plus Gaussian noise of ``strength`` times the latent's own standard deviation
    (default 0.2). ``neighbours``: the latent moved a random fraction in [0, ``strength``] (default 0.3) of the
    way towards one of its nearest images' latents (resized to its grid).
    """
    if mode not in MODES:
        raise BadInputError(f"unknown augmentation {mode!r}: use noise or neighbours")
    if n < 1:
        raise BadInputError(f"--n must be at least 1, got {n}")
    if not images:
        raise BadInputError("no images to augment")
    strength = DEFAULT_STRENGTH[mode] if strength is None else strength
    if not 0 <= strength <= (10 if mode == "noise" else 1):
        raise BadInputError(f"strength {strength} is out of range for {mode} (noise: 0..10, neighbours: 0..1)")
    if mode == "neighbours" and len(images) < 2:
        raise BadInputError("neighbours augmentation needs at least 2 images")
    latents = [vae.encode(img.unsqueeze(0))[0] for img in images]
    gen = torch.Generator().manual_seed(seed)
    neighbours = nearest_neighbours(latents) if mode == "neighbours" else []
    out: list[torch.Tensor] = []
    for i, (img, z) in enumerate(zip(images, latents, strict=True)):
        z = z.float().cpu()
        if mode == "noise":
            noise = torch.randn((n, *z.shape), generator=gen)
            variants = z + noise * strength * z.std()
        else:
            picks = torch.randint(len(neighbours[i]), (n,), generator=gen).tolist()
            amounts = (torch.rand(n, generator=gen) * strength).tolist()
            steps = []
            for pick, amount in zip(picks, amounts, strict=True):
                other = latents[neighbours[i][pick]].float().cpu()
                if other.shape != z.shape:
                    other = F.interpolate(other.unsqueeze(0), size=z.shape[-2:], mode="bilinear", align_corners=False)[
                        0
                    ]
                steps.append(lerp(z, other, amount))
            variants = torch.stack(steps)
        out.append(vae.decode(variants, image_size=(img.shape[-1], img.shape[-2])))
    return out
