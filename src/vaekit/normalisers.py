"""Latent normalisers: the map between a VAE's raw latent and the latent its diffusion model consumes.

Four kinds cover every family vaekit knows:

- :class:`ScalarAffine` ``(z - shift) * scale`` (SD1/SD2, SDXL, SD3, FLUX.1, DC-AE, HunyuanImage; the tiny VAEs,
  which already speak the normalised space, use scale 1 and shift 0);
- :class:`PerChannel` ``(z - mean[c]) / std[c]`` (Qwen-Image / Wan 2.1);
- :class:`PatchBatchNorm` FLUX.2: a 2x2 patchify of the raw (N, C, h, w) latent to (N, 4C, h/2, w/2), channel
  ``c * 4 + dy * 2 + dx`` as in diffusers' ``Flux2Pipeline._patchify_latents``, then
  ``(p - running_mean) / sqrt(running_var + eps)`` with the BatchNorm statistics stored in the VAE file;
- :class:`Patchify` the 2x2 patchify alone (TAEF2, whose 32 channels are FLUX.2's normalised latent unpatched).

Each one is a small frozen object with ``normalise``/``denormalise`` and a JSON ``spec`` that latent files store, so
a latent file can be read back (and its latents turned raw) without the VAE that made it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from vaekit.errors import BadInputError


@dataclass(frozen=True)
class ScalarAffine:
    """``latent = (z - shift) * scale``: one scale and one shift for every channel."""

    scale: float = 1.0
    shift: float = 0.0
    kind = "scalar"
    patch = 1

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent -> normalised latent."""
        return (z - self.shift) * self.scale

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latent -> raw latent."""
        return latents / self.scale + self.shift

    def channels(self, raw_channels: int) -> int:
        """Channels of the normalised latent for a raw latent with ``raw_channels``."""
        return raw_channels

    def spec(self) -> dict[str, Any]:
        """JSON-friendly description (what latent files store)."""
        return {"kind": self.kind, "scale": float(self.scale), "shift": float(self.shift)}

    def describe(self) -> str:
        """One short line for people."""
        return f"(z - {self.shift:g}) * {self.scale:g}"


@dataclass(frozen=True)
class PerChannel:
    """``latent[c] = (z[c] - mean[c]) / std[c]``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    kind = "per_channel"
    patch = 1

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not all(s > 0 for s in self.std):
            raise BadInputError("per-channel normaliser: mean and std must have one positive std per channel")

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if z.shape[-3] != len(self.mean):
            raise BadInputError(f"latents have {z.shape[-3]} channels, the normaliser {len(self.mean)}")
        shape = (len(self.mean), 1, 1)
        mean = torch.tensor(self.mean, dtype=z.dtype, device=z.device).reshape(shape)
        std = torch.tensor(self.std, dtype=z.dtype, device=z.device).reshape(shape)
        return mean, std

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent -> normalised latent."""
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latent -> raw latent."""
        mean, std = self._stats(latents)
        return latents * std + mean

    def channels(self, raw_channels: int) -> int:
        """Channels of the normalised latent."""
        return raw_channels

    def spec(self) -> dict[str, Any]:
        """JSON-friendly description."""
        return {"kind": self.kind, "mean": list(self.mean), "std": list(self.std)}

    def describe(self) -> str:
        """One short line for people."""
        return f"per-channel (z - mean) / std over {len(self.mean)} channels"


def patchify(z: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, 4C, h/2, w/2), channel ``c * 4 + dy * 2 + dx`` (FLUX.2's order)."""
    n, c, h, w = z.shape
    if h % 2 or w % 2:
        raise BadInputError(f"a {w}x{h} raw latent cannot be cut into 2x2 patches (sides must be even)")
    return z.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(n, c * 4, h // 2, w // 2)


def unpatchify(p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`patchify`: (N, 4C, h, w) -> (N, C, 2h, 2w)."""
    n, c4, h, w = p.shape
    if c4 % 4:
        raise BadInputError(f"patchified latents need a multiple of 4 channels, got {c4}")
    return p.reshape(n, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c4 // 4, h * 2, w * 2)


@dataclass(frozen=True)
class PatchBatchNorm:
    """FLUX.2: 2x2 patchify, then ``(p - running_mean) / sqrt(running_var + eps)`` per patched channel."""

    running_mean: tuple[float, ...]
    running_var: tuple[float, ...]
    eps: float = 1e-4
    kind = "patch_batchnorm"
    patch = 2

    def __post_init__(self) -> None:
        if len(self.running_mean) != len(self.running_var) or len(self.running_mean) % 4:
            raise BadInputError("patch BatchNorm normaliser: mean and var must have the same multiple of 4 entries")
        if not all(v + self.eps > 0 for v in self.running_var):
            raise BadInputError("patch BatchNorm normaliser: running_var + eps must be positive")

    @classmethod
    def from_module(cls, bn: torch.nn.Module) -> PatchBatchNorm:
        """Read the statistics of a ``BatchNorm2d`` (the ``bn`` of a FLUX.2 VAE)."""
        mean = bn.running_mean.detach().double().cpu().tolist()  # type: ignore[union-attr]
        var = bn.running_var.detach().double().cpu().tolist()  # type: ignore[union-attr]
        return cls(tuple(mean), tuple(var), float(bn.eps))  # type: ignore[arg-type]

    def _stats(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if p.shape[-3] != len(self.running_mean):
            raise BadInputError(f"latents have {p.shape[-3]} channels, the normaliser {len(self.running_mean)}")
        mean = torch.tensor(self.running_mean, dtype=torch.float64).reshape(-1, 1, 1)
        std = torch.sqrt(torch.tensor(self.running_var, dtype=torch.float64).reshape(-1, 1, 1) + self.eps)
        return mean.to(p.device, p.dtype), std.to(p.device, p.dtype)

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent (N, C, h, w) -> normalised patched latent (N, 4C, h/2, w/2)."""
        p = patchify(z)
        mean, std = self._stats(p)
        return (p - mean) / std

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised patched latent (N, 4C, h, w) -> raw latent (N, C, 2h, 2w)."""
        mean, std = self._stats(latents)
        return unpatchify(latents * std + mean)

    def channels(self, raw_channels: int) -> int:
        """Channels of the normalised latent (4x the raw ones)."""
        return raw_channels * 4

    def spec(self) -> dict[str, Any]:
        """JSON-friendly description, statistics included."""
        return {
            "kind": self.kind,
            "running_mean": list(self.running_mean),
            "running_var": list(self.running_var),
            "eps": self.eps,
        }

    def describe(self) -> str:
        """One short line for people."""
        return f"2x2 patchify to {len(self.running_mean)} channels, then BatchNorm (eps {self.eps:g})"


@dataclass(frozen=True)
class Patchify:
    """A 2x2 patchify only: TAEF2's raw latent is FLUX.2's normalised latent before its patches are formed."""

    kind = "patchify"
    patch = 2

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent (N, C, h, w) -> patched latent (N, 4C, h/2, w/2)."""
        return patchify(z)

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        """Patched latent -> raw latent."""
        return unpatchify(latents)

    def channels(self, raw_channels: int) -> int:
        """Channels of the patched latent (4x the raw ones)."""
        return raw_channels * 4

    def spec(self) -> dict[str, Any]:
        """JSON-friendly description."""
        return {"kind": self.kind, "patch": 2}

    def describe(self) -> str:
        """One short line for people."""
        return "2x2 patchify (the latent is already normalised)"


Normaliser = ScalarAffine | PerChannel | PatchBatchNorm | Patchify


def from_spec(spec: dict[str, Any]) -> Normaliser:
    """Rebuild a normaliser from :meth:`spec` output; a clear error for anything else."""
    try:
        kind = spec["kind"]
        if kind == "scalar":
            scale, shift = float(spec["scale"]), float(spec.get("shift", 0.0))
            if not (math.isfinite(scale) and math.isfinite(shift)) or scale == 0:
                raise ValueError("scale must be finite and non-zero")
            return ScalarAffine(scale, shift)
        if kind == "per_channel":
            return PerChannel(tuple(float(v) for v in spec["mean"]), tuple(float(v) for v in spec["std"]))
        if kind == "patchify":
            if int(spec.get("patch", 2)) != 2:
                raise ValueError("only 2x2 patches are known")
            return Patchify()
        if kind == "patch_batchnorm":
            return PatchBatchNorm(
                tuple(float(v) for v in spec["running_mean"]),
                tuple(float(v) for v in spec["running_var"]),
                float(spec.get("eps", 1e-4)),
            )
    except (KeyError, TypeError, ValueError) as e:
        raise BadInputError(f"invalid latent normaliser description ({e})") from None
    raise BadInputError(f"unknown latent normaliser kind {spec.get('kind')!r}")
