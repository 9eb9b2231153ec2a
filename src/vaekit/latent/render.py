"""Pictures out of tensors: image grids, animated GIF/WebP, a heat colour map and labelled strips."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from vaekit.errors import BadInputError
from vaekit.formats.io import atomic_path
from vaekit.ops.images import to_pil

PathLike = str | os.PathLike[str]
ANIMATION_FORMATS = {".gif": "GIF", ".webp": "WEBP"}

# Control points of a black -> purple -> orange -> yellow heat map (close to matplotlib's "inferno").
_HEAT = torch.tensor(
    [
        [0.0, 0.0, 0.02],
        [0.26, 0.04, 0.41],
        [0.58, 0.15, 0.40],
        [0.87, 0.32, 0.23],
        [0.99, 0.64, 0.04],
        [0.98, 0.99, 0.64],
    ]
)


def grid(images: torch.Tensor, columns: int | None = None, pad: int = 2, fill: float = 1.0) -> torch.Tensor:
    """Tile (N, 3, H, W) images into one (3, H', W') image, ``columns`` wide (default: near square), padded."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise BadInputError(f"grid needs a non-empty (N, C, H, W) batch, got {tuple(images.shape)}")
    n, c, h, w = images.shape
    cols = max(1, min(n, columns or int(n**0.5 + 0.999)))
    rows = -(-n // cols)
    out = torch.full((c, rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad), fill, dtype=images.dtype)
    for i in range(n):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        out[:, y : y + h, x : x + w] = images[i]
    return out


def save_animation(frames: torch.Tensor, path: PathLike, fps: float = 8.0, bounce: bool = False) -> Path:
    """Write (N, 3, H, W) frames in [0, 1] as a looping animated GIF or WebP (by suffix), atomically."""
    path = Path(path)
    fmt = ANIMATION_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise BadInputError(f"{path}: animations are written as .gif or .webp")
    if fps <= 0:
        raise BadInputError(f"fps must be positive, got {fps}")
    seq = list(frames) + (list(frames)[-2:0:-1] if bounce else [])
    pil = [to_pil(f) for f in seq]
    duration = max(1, round(1000 / fps))
    with atomic_path(path) as tmp:
        kwargs = {"lossless": False, "quality": 90} if fmt == "WEBP" else {"optimize": True}
        pil[0].save(tmp, format=fmt, save_all=True, append_images=pil[1:], duration=duration, loop=0, **kwargs)
    return path


def heat_colors(values: torch.Tensor) -> torch.Tensor:
    """Map values in [0, 1] of shape (H, W) to a heat colour image (3, H, W)."""
    v = values.float().clamp(0, 1) * (len(_HEAT) - 1)
    lo = v.floor().long().clamp(max=len(_HEAT) - 2)
    frac = (v - lo).unsqueeze(-1)
    rgb = _HEAT[lo] * (1 - frac) + _HEAT[lo + 1] * frac
    return rgb.permute(2, 0, 1).contiguous()


def upscale_nearest(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Enlarge (N, C, h, w) by an integer factor with visible cells (nearest neighbour)."""
    return images if factor <= 1 else F.interpolate(images, scale_factor=factor, mode="nearest")


def label(image: torch.Tensor, text: str, height: int = 12) -> torch.Tensor:
    """Put a one-line caption in a white band above a (3, H, W) image."""
    pil = Image.new("RGB", (image.shape[2], height), "white")
    ImageDraw.Draw(pil).text((2, 0), text, fill="black")
    band = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return torch.cat([band, image.float().cpu()], dim=1)


def fit_box(image: torch.Tensor, size: int, fill: float = 1.0) -> torch.Tensor:
    """Scale a (3, H, W) image to fit a ``size`` x ``size`` square (aspect kept), centred on a ``fill`` background."""
    h, w = image.shape[-2:]
    s = size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    scaled = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    out = torch.full((3, size, size), fill)
    y, x = (size - nh) // 2, (size - nw) // 2
    out[:, y : y + nh, x : x + nw] = scaled[0].clamp(0, 1)
    return out
