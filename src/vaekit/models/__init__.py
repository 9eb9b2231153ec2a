"""Architectures and configs: the KL autoencoder and the tiny autoencoder."""

from __future__ import annotations

import torch
from torch import nn

from vaekit.models.autoencoder_kl import AutoencoderKL
from vaekit.models.config import PRESETS, KLConfig, TinyConfig, VAEConfig, preset
from vaekit.models.tiny import TinyAutoencoder

__all__ = ["AutoencoderKL", "KLConfig", "PRESETS", "TinyAutoencoder", "TinyConfig", "VAEConfig", "build", "preset"]


def build(cfg: VAEConfig, device: torch.device | str | None = None) -> nn.Module:
    """Instantiate the module for ``cfg``; on ``device="meta"`` nothing is allocated (weights assigned later)."""
    cls = TinyAutoencoder if cfg.kind == "tiny" else AutoencoderKL
    with torch.device(device or "cpu"):
        return cls(cfg)  # type: ignore[arg-type]
