"""Architectures: one module per architecture, each taking and returning images in [0, 1].

``ARCHITECTURES`` maps a config's ``kind`` to its (config class, module class); :func:`build` instantiates any
config. ``FOREIGN`` holds the architecture modules that carry their own recognition and diffusers tables (the
contract: ``config_from_shapes``, ``MARKER_KEYS``, ``to_diffusers``/``from_diffusers``, ``diffusers_config``/
``config_from_diffusers``, ``normaliser_spec``, ``PRESETS``); the KL and tiny autoencoders are recognised by
:mod:`vaekit.formats.detect` with the tables of :mod:`vaekit.formats.keymaps`.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

import torch
from torch import nn

from vaekit.models import dcae, qwenimage, taef2, taesana
from vaekit.models.config import KLConfig, TinyConfig, VAEConfig
from vaekit.models.kl import AutoencoderKL
from vaekit.models.tiny import TinyAutoencoder

__all__ = ["ARCHITECTURES", "AutoencoderKL", "KLConfig", "TinyAutoencoder", "TinyConfig", "VAEConfig", "build"]

# kind -> architecture module with the full contract (see the module docstring)
FOREIGN: dict[str, ModuleType] = {"taef2": taef2, "qwenimage": qwenimage, "dcae": dcae, "taesana": taesana}

# kind -> (config class, module class)
ARCHITECTURES: dict[str, tuple[type, type[nn.Module]]] = {
    "kl": (KLConfig, AutoencoderKL),
    "tiny": (TinyConfig, TinyAutoencoder),
    "taef2": (taef2.TAEF2Config, taef2.TAEF2VAE),
    "qwenimage": (qwenimage.QwenImageConfig, qwenimage.QwenImageVAE),
    "dcae": (dcae.DCAEConfig, dcae.DCAE),
    "taesana": (taesana.TAESanaConfig, taesana.TAESana),
}


def build(cfg: VAEConfig, device: torch.device | str | None = None) -> nn.Module:
    """Instantiate the module for ``cfg``; on ``device="meta"`` nothing is allocated (weights assigned later)."""
    _, cls = ARCHITECTURES[cfg.kind]
    with torch.device(device or "cpu"):
        return cls(cfg)


def config_from_dict(data: dict[str, Any]) -> VAEConfig:
    """Rebuild a config from its ``to_dict`` output (unknown keys from newer versions are ignored)."""
    kind = data.get("kind", "kl")
    if kind not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {kind!r}")
    cls = ARCHITECTURES[kind][0]
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
    return cls(**kwargs)
