"""Walk between two latents: spherical (slerp) or straight-line (lerp) interpolation, decoded frame by frame."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from vaekit.errors import BadInputError
from vaekit.vae import VAE

Method = Literal["slerp", "lerp"]
METHODS = ("slerp", "lerp")


def lerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Straight line from ``a`` (t=0) to ``b`` (t=1)."""
    return a + (b - a) * t


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-7) -> torch.Tensor:
    """Great-circle interpolation of each sample's whole latent, treated as one vector (t=0 gives ``a``).

    Between two Gaussian latents a straight line passes near the origin, where the norm (and so the decoded
    contrast) drops by up to 1/sqrt(2); the arc keeps the norm between the two endpoints' norms.
    Nearly parallel vectors fall back to :func:`lerp`.
    """
    a64, b64 = a.double().flatten(1), b.double().flatten(1)
    na, nb = a64.norm(dim=1, keepdim=True), b64.norm(dim=1, keepdim=True)
    cos = ((a64 / na.clamp_min(eps)) * (b64 / nb.clamp_min(eps))).sum(1, keepdim=True).clamp(-1, 1)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    parallel = sin.abs() < 1e-4
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    wa = torch.where(parallel, torch.full_like(sin, 1 - t), torch.sin((1 - t) * theta) / safe)
    wb = torch.where(parallel, torch.full_like(sin, t), torch.sin(t * theta) / safe)
    return (wa * a64 + wb * b64).view(a.shape).to(a.dtype)


def interpolate_latents(a: torch.Tensor, b: torch.Tensor, steps: int, method: Method = "slerp") -> torch.Tensor:
    """``steps`` latents from ``a`` to ``b`` inclusive; (C, h, w) or (1, C, h, w) inputs -> (steps, C, h, w)."""
    if method not in METHODS:
        raise BadInputError(f"unknown interpolation {method!r}: use slerp or lerp")
    if steps < 2:
        raise BadInputError(f"steps must be at least 2 (the two endpoints), got {steps}")
    a = a if a.ndim == 4 else a.unsqueeze(0)
    b = b if b.ndim == 4 else b.unsqueeze(0)
    if a.shape != b.shape:
        raise BadInputError(f"latents differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    fn = slerp if method == "slerp" else lerp
    frames = [fn(a, b, i / (steps - 1)) for i in range(steps)]
    # The endpoints are the inputs themselves, bit for bit.
    frames[0], frames[-1] = a, b
    return torch.cat(frames)


def match_size(a: torch.Tensor, b: torch.Tensor, resize: bool) -> torch.Tensor:
    """Return image ``b`` (3, H, W) at ``a``'s size: resized (antialiased bilinear) if ``resize``, else refused."""
    if a.shape[-2:] == b.shape[-2:]:
        return b
    if not resize:
        raise BadInputError(
            f"the images differ in size ({a.shape[-1]}x{a.shape[-2]} vs {b.shape[-1]}x{b.shape[-2]}); "
            "pass --resize (resize=True) to resize the second to the first's size"
        )
    out = F.interpolate(b.unsqueeze(0), size=tuple(a.shape[-2:]), mode="bilinear", antialias=True, align_corners=False)
    return out[0].clamp(0, 1)


def interpolate(
    vae: VAE,
    image_a: torch.Tensor,
    image_b: torch.Tensor,
    steps: int = 8,
    method: Method = "slerp",
    resize: bool = False,
    batch_size: int = 4,
) -> torch.Tensor:
    """Encode two images (3, H, W) in [0, 1], interpolate their latents and decode: frames (steps, 3, H, W).

    The first and last frames are exactly the plain round trips of the two images.
    """
    image_b = match_size(image_a, image_b, resize)
    latents = vae.encode(torch.stack([image_a, image_b]))
    path = interpolate_latents(latents[0], latents[1], steps, method)
    size = (image_a.shape[-1], image_a.shape[-2])
    step = max(1, batch_size)
    chunks = [vae.decode(path[i : i + step], image_size=size) for i in range(0, steps, step)]
    return torch.cat(chunks)
