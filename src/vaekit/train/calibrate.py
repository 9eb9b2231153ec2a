"""Latent scaling: estimate scale (1/std) and shift (mean) of a VAE's latents over images, and store them.

This is how the SD authors chose 0.18215: the factor that gives the latents of their data unit variance.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vaekit.errors import BadInputError
from vaekit.formats.detect import METADATA_CONFIG_KEY
from vaekit.formats.io import TensorFile, write_safetensors
from vaekit.models.config import VAEConfig
from vaekit.ops.images import pad_to_multiple

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class Calibration:
    """Estimated factors: ``latent = (z - shift) * scale`` has zero mean and unit variance over the data."""

    scale: float
    shift: float
    mean: float
    std: float
    images: int
    elements: int

    def to_dict(self) -> dict[str, float | int]:
        """Plain dict for JSON output."""
        return dataclasses.asdict(self)


class LatentStats:
    """Running mean/variance of latent elements in float64 (numerically safe over millions of values)."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.total_sq = 0.0

    def add(self, z: torch.Tensor) -> None:
        """Accumulate every element of ``z``."""
        z = z.detach().double()
        self.count += z.numel()
        self.total += float(z.sum())
        self.total_sq += float(z.pow(2).sum())

    def factors(self, images: int = 0) -> Calibration:
        """(1/std, mean) of what was added."""
        if self.count < 2:
            raise BadInputError("too few latent values to estimate a scale")
        mean = self.total / self.count
        var = max(self.total_sq / self.count - mean * mean, 0.0)
        if var <= 0:
            raise BadInputError("the latents are constant: no scale can be estimated")
        std = var**0.5
        return Calibration(1.0 / std, mean, mean, std, images, self.count)


def factors_from_latents(latents: Iterable[torch.Tensor]) -> Calibration:
    """Scale and shift from raw (unscaled) latent tensors."""
    stats = LatentStats()
    n = 0
    for z in latents:
        stats.add(z)
        n += z.shape[0] if z.ndim == 4 else 1
    return stats.factors(n)


@torch.no_grad()
def _posterior_means(model: nn.Module, cfg: VAEConfig, images: Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
    for img in images:
        x = img.float()[None] / 255 if img.dtype == torch.uint8 else img.float()[None]
        x, _ = pad_to_multiple(x, cfg.downscale)
        mean, _ = model.encode(x.to(next(model.parameters()).device))
        yield mean.float().cpu()


def estimate_factors_model(model: nn.Module, cfg: VAEConfig, images: list[torch.Tensor]) -> tuple[float, float]:
    """(scale, shift) of a KL model's posterior means over images ((3, H, W) uint8 or [0, 1] float)."""
    result = factors_from_latents(_posterior_means(model, cfg, images))
    return result.scale, result.shift


def calibrate(vae: object, images: list[torch.Tensor]) -> Calibration:
    """Estimate factors of a loaded :class:`vaekit.VAE` (KL kind) over images in [0, 1] (3, H, W)."""
    from vaekit.vae import VAE

    assert isinstance(vae, VAE)
    if not vae.gaussian or vae.normaliser.kind != "scalar":
        raise BadInputError(
            f"{vae.origin.name}: only a full VAE with a scalar latent scale/shift can be calibrated "
            f"(this one normalises with {vae.normaliser.describe()})"
        )
    stats = LatentStats()
    for img in images:
        x, _ = pad_to_multiple(img.float()[None], vae.raw_downscale)
        mean, _ = vae.encode_posterior(x)
        stats.add(mean)
    return stats.factors(len(images))


def write_factors(path: PathLike, config: VAEConfig, scale: float, shift: float) -> Path:
    """Rewrite a safetensors VAE file with the factors in its vaekit config metadata (atomically)."""
    path = Path(path)
    if not path.is_file() or path.suffix.lower() not in (".safetensors", ".sft"):
        raise BadInputError(f"{path}: --write needs a single .safetensors file")
    tf = TensorFile(path)
    tensors = tf.load()
    new_cfg = dataclasses.replace(config, scaling_factor=float(scale), shift_factor=float(shift))
    meta = dict(tf.metadata)
    meta[METADATA_CONFIG_KEY] = json.dumps(new_cfg.to_dict(), sort_keys=True)
    write_safetensors(tensors, path, meta)
    return path
