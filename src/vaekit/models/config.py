"""Frozen architecture configs of the KL and tiny autoencoders (the presets live in :mod:`vaekit.families`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

Kind = str  # the architecture: "kl", "tiny", ... (one module in vaekit.models each)


@dataclass(frozen=True)
class KLConfig:
    """The KL autoencoder of latent diffusion (SD1/SD2, SDXL, SD3, FLUX.1 and FLUX.2 share this architecture)."""

    family: str = "sd1"
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    norm_eps: float = 1e-6
    use_quant_conv: bool = True
    mid_attention: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    kind: Kind = "kl"
    # FLUX.2: the quant convs live inside encoder/decoder (BFL names encoder.quant_conv, decoder.post_quant_conv)
    nested_quant: bool = False
    # FLUX.2: a BatchNorm over 2x2-patched latents holds the latent statistics (``bn.*``; not run by the model)
    patch_batchnorm: bool = False
    batchnorm_eps: float = 1e-4

    @property
    def gaussian(self) -> bool:
        """The encoder outputs a diagonal Gaussian posterior (mean and log-variance)."""
        return True

    @property
    def block_channels(self) -> tuple[int, ...]:
        """Output channels of each resolution level."""
        return tuple(self.base_channels * m for m in self.channel_mult)

    @property
    def downscale(self) -> int:
        """Pixels per latent cell along one side (8 for every SD VAE)."""
        return 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class TinyConfig:
    """The tiny autoencoder (TAESD family): a distilled, deterministic encoder and decoder."""

    family: str = "sd1"
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    width: int = 64
    encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    # TAESD reads and writes latents already in the diffusion model's scaled space.
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    kind: Kind = "tiny"

    @property
    def downscale(self) -> int:
        """Pixels per latent cell along one side."""
        return 2 ** (len(self.encoder_blocks) - 1)

    @property
    def gaussian(self) -> bool:
        """The tiny encoder is deterministic: one latent, no posterior."""
        return False

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


VAEConfig = KLConfig | TinyConfig
