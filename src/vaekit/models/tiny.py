"""The tiny autoencoder (TAESD, TAESDXL, TAESD3, TAEF1). Module indices match the original files."""

from __future__ import annotations

import torch
from torch import nn

from vaekit.models.config import TinyConfig


def conv(n_in: int, n_out: int, **kwargs: object) -> nn.Conv2d:
    """3x3 conv with same padding."""
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)  # type: ignore[arg-type]


class Clamp(nn.Module):
    """Soft clamp of latents to about [-3, 3]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """Three 3x3 convs with ReLUs and a residual."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def tiny_encoder(cfg: TinyConfig) -> nn.Sequential:
    """Image in [0, 1] -> latent (already in the diffusion model's scaled space)."""
    w = cfg.width
    layers: list[nn.Module] = []
    for i, n in enumerate(cfg.encoder_blocks):
        layers.append(conv(cfg.in_channels, w) if i == 0 else conv(w, w, stride=2, bias=False))
        layers.extend(Block(w, w) for _ in range(n))
    layers.append(conv(w, cfg.latent_channels))
    return nn.Sequential(*layers)


def tiny_decoder(cfg: TinyConfig) -> nn.Sequential:
    """Latent -> image in [0, 1] (not clamped)."""
    w = cfg.width
    layers: list[nn.Module] = [Clamp(), conv(cfg.latent_channels, w), nn.ReLU()]
    for i, n in enumerate(cfg.decoder_blocks):
        layers.extend(Block(w, w) for _ in range(n))
        last = i == len(cfg.decoder_blocks) - 1
        if not last:
            layers.append(nn.Upsample(scale_factor=2))
        layers.append(conv(w, cfg.out_channels) if last else conv(w, w, bias=False))
    return nn.Sequential(*layers)


class TinyAutoencoder(nn.Module):
    """TAESD-style autoencoder: ``encoder.N`` / ``decoder.N`` as in the original taesd files."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = tiny_encoder(cfg)
        self.decoder = tiny_decoder(cfg)

    @staticmethod
    def net_input(images: torch.Tensor) -> torch.Tensor:
        """The tiny networks take images in [0, 1] as they are."""
        return images

    @staticmethod
    def net_output(y: torch.Tensor) -> torch.Tensor:
        """The tiny decoder already returns images in [0, 1]."""
        return y

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> latent (already in the family's normalised space)."""
        return self.encoder(images)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latent -> images in [0, 1] (not clamped)."""
        return self.decoder(z)
