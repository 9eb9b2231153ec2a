"""Input validation for images and latents: the one place that says what a valid input is.

Every function raises :class:`~vaekit.errors.BadInputError` with one line that says what is wrong and how to fix it;
the codec (:mod:`vaekit.ops.codec`), the :class:`~vaekit.VAE` object, the server and the latent tools all call these.
"""

from __future__ import annotations

import torch

from vaekit.errors import BadInputError

# Images may overshoot [0, 1] slightly after resampling; anything further out is not a [0, 1] image.
RANGE_TOLERANCE = 0.02


def items(data: object, what: str) -> tuple[list[torch.Tensor], bool]:
    """Split a batch tensor (N, C, H, W) / (C, H, W) or a list of (C, H, W) into items; returns (items, was_tensor)."""
    if isinstance(data, torch.Tensor):
        if data.ndim == 3:
            data = data.unsqueeze(0)
        if data.ndim != 4:
            raise BadInputError(f"{what} must be (N, C, H, W) or (C, H, W), got shape {tuple(data.shape)}")
        if data.shape[0] == 0:
            raise BadInputError(f"empty {what} batch of shape {tuple(data.shape)}")
        return list(data.unbind(0)), True
    if isinstance(data, list | tuple):
        if not data:
            raise BadInputError(f"empty list of {what}")
        out = []
        for i, item in enumerate(data):
            if not isinstance(item, torch.Tensor):
                raise BadInputError(f"{what} item {i} is a {type(item).__name__}, not a torch.Tensor")
            if item.ndim == 4 and item.shape[0] == 1:
                item = item[0]
            if item.ndim != 3:
                raise BadInputError(f"{what} item {i} must be (C, H, W), got shape {tuple(item.shape)}")
            out.append(item)
        return out, False
    raise BadInputError(f"{what} must be a torch.Tensor or a list of tensors, got {type(data).__name__}")


def image(img: torch.Tensor, in_channels: int, i: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One image (C, H, W) in [0, 1] -> (colour channels, alpha or None); RGBA is accepted for RGB models."""
    c, h, w = img.shape
    if h == 0 or w == 0:
        raise BadInputError(f"image {i} has zero size ({w}x{h})")
    if not img.is_floating_point():
        raise BadInputError(f"image {i} is {img.dtype}; images must be float in [0, 1] (divide 8-bit data by 255)")
    alpha = None
    if c == in_channels + 1:
        img, alpha = img[:-1], img[-1:]
    elif c != in_channels:
        raise BadInputError(f"image {i} has {c} channels; this VAE takes {in_channels} (or RGBA)")
    lo, hi = torch.aminmax(img.detach())
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        raise BadInputError(f"image {i} contains NaN or infinite values")
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise BadInputError(
            f"image {i} has values in [{lo.item():.3g}, {hi.item():.3g}]; images must be in [0, 1] "
            "(divide 8-bit data by 255; map [-1, 1] data with (x + 1) / 2)"
        )
    return img, alpha


def image_batch(images: object, in_channels: int) -> torch.Tensor:
    """A batch (N, C, H, W) or one image (C, H, W) of equal-size images, each checked -> a 4-D float tensor."""
    batch, _ = items(images, "images")
    return torch.stack([image(img, in_channels, i)[0] for i, img in enumerate(batch)])


def latent(z: torch.Tensor, channels: int, family: str, i: int = 0) -> None:
    """One normalised latent (C, h, w) for a VAE of ``family`` taking ``channels`` channels."""
    c, h, w = z.shape
    if c != channels:
        raise BadInputError(
            f"latents have {c} channels but this {family} VAE takes {channels}: they were made by a VAE of "
            "another family"
        )
    if h == 0 or w == 0:
        raise BadInputError(f"latent {i} has zero size ({w}x{h})")
    if not z.is_floating_point():
        raise BadInputError(f"latent {i} is {z.dtype}; latents must be floating point")
    if not bool(torch.isfinite(z).all()):
        raise BadInputError(f"latent {i} contains NaN or infinite values")
