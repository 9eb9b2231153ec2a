"""Frozen architecture configs and the named presets of every supported VAE family."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["kl", "tiny"]

# Families a latent can belong to. Latents of one family are only meaningful to VAEs of the same family.
FAMILIES = ("sd1", "sdxl", "sd3", "flux", "custom")


@dataclass(frozen=True)
class KLConfig:
    """The KL autoencoder of latent diffusion (SD1/SD2, SDXL, SD3, FLUX share this architecture)."""

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

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


VAEConfig = KLConfig | TinyConfig

PRESETS: dict[str, VAEConfig] = {
    "sd1": KLConfig(family="sd1", scaling_factor=0.18215),
    "sd2": KLConfig(family="sd1", scaling_factor=0.18215),
    "sdxl": KLConfig(family="sdxl", scaling_factor=0.13025),
    "sd3": KLConfig(family="sd3", latent_channels=16, use_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609),
    "flux": KLConfig(
        family="flux", latent_channels=16, use_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159
    ),
    "taesd": TinyConfig(family="sd1"),
    "taesdxl": TinyConfig(family="sdxl"),
    "taesd3": TinyConfig(family="sd3", latent_channels=16),
    "taef1": TinyConfig(family="flux", latent_channels=16),
}

# Latent scaling of each family as diffusion models consume it: latent = (z - shift) * scale.
FAMILY_FACTORS: dict[str, tuple[float, float]] = {
    "sd1": (0.18215, 0.0),
    "sdxl": (0.13025, 0.0),
    "sd3": (1.5305, 0.0609),
    "flux": (0.3611, 0.1159),
}

FAMILY_CHANNELS: dict[str, int] = {"sd1": 4, "sdxl": 4, "sd3": 16, "flux": 16}


def preset(name: str, **overrides: Any) -> VAEConfig:
    """Return the named preset, optionally with fields replaced (e.g. ``base_channels=32`` for tests)."""
    try:
        cfg = PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def config_from_dict(data: dict[str, Any]) -> VAEConfig:
    """Rebuild a config from :meth:`to_dict` output (ignores unknown keys from newer versions)."""
    cls = TinyConfig if data.get("kind") == "tiny" else KLConfig
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
    return cls(**kwargs)


def with_family(cfg: VAEConfig, family: str) -> VAEConfig:
    """Return ``cfg`` relabelled as ``family``; KL configs also take that family's scaling/shift."""
    if family not in FAMILY_FACTORS:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILY_FACTORS)}")
    if FAMILY_CHANNELS[family] != cfg.latent_channels:
        raise ValueError(
            f"family {family} has {FAMILY_CHANNELS[family]} latent channels, this VAE has {cfg.latent_channels}"
        )
    if cfg.kind == "tiny":
        return dataclasses.replace(cfg, family=family)
    scale, shift = FAMILY_FACTORS[family]
    return dataclasses.replace(cfg, family=family, scaling_factor=scale, shift_factor=shift)
