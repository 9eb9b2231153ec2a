"""The :class:`VAE` object: a loaded model with its config, its family's latent normaliser and device/dtype."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vaekit import families, validation
from vaekit.errors import BadInputError
from vaekit.families import PRESETS, preset, with_family
from vaekit.formats.convert import strict_load
from vaekit.formats.export import write_vae
from vaekit.formats.source import open_source
from vaekit.models import build
from vaekit.models.config import VAEConfig
from vaekit.normalisers import Normaliser
from vaekit.ops import codec
from vaekit.ops.precision import DTYPE_NAMES

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class VAEOrigin:
    """Where a loaded VAE came from (a preset or a file) and what detection said about it."""

    name: str
    path: Path | None = None
    layout: str = "preset"
    family_certain: bool = True
    family_note: str = ""
    parts: tuple[str, ...] = ("encoder", "decoder")
    sha256: str | None = None


class VAE:
    """A loaded VAE. ``encode`` takes images in [0, 1] (N, 3, H, W) and returns latents normalised the way the
    family's diffusion models consume them (:attr:`normaliser`); ``decode`` takes such latents and returns images in
    [0, 1]. ``encode_posterior`` gives the raw posterior the network computes.
    """

    def __init__(self, model: nn.Module, config: VAEConfig, origin: VAEOrigin | None = None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.config = config
        self.origin = origin or VAEOrigin(name=config.family)
        self.normaliser: Normaliser = families.normaliser_for(config, model)

    # --- description -------------------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        """Latent family (see :mod:`vaekit.families`)."""
        return self.config.family

    @property
    def gaussian(self) -> bool:
        """True when the encoder gives a Gaussian posterior (mean and log-variance); False for tiny VAEs."""
        return bool(self.config.gaussian)

    @property
    def raw_channels(self) -> int:
        """Channels of the raw latent the network computes."""
        return self.config.latent_channels

    @property
    def latent_channels(self) -> int:
        """Channels of the normalised latent (what :meth:`encode` returns and :meth:`decode` takes)."""
        return self.normaliser.channels(self.config.latent_channels)

    @property
    def raw_downscale(self) -> int:
        """Image pixels per raw latent cell along one side."""
        return self.config.downscale

    @property
    def downscale(self) -> int:
        """Image pixels per normalised latent cell along one side (16 for FLUX.2's 2x2 patches)."""
        return self.config.downscale * self.normaliser.patch

    @property
    def device(self) -> torch.device:
        """Device holding the weights."""
        return next(p for p in self.model.parameters() if not p.is_meta).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights."""
        return next(p for p in self.model.parameters() if not p.is_meta).dtype

    def __repr__(self) -> str:
        return (
            f"VAE({self.origin.name!r}, family={self.family}, kind={self.config.kind}, "
            f"latent_channels={self.latent_channels}, device={self.device}, dtype={self.dtype})"
        )

    # --- latent normalisation ----------------------------------------------------------------------------------
    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent (N, C, h, w) -> the normalised latent diffusion models use."""
        return self.normaliser.normalise(z)

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latent -> the raw latent the decoder takes."""
        return self.normaliser.denormalise(latents)

    # --- core operations ---------------------------------------------------------------------------------------
    def require(self, part: str) -> None:
        """Raise BadInputError when the loaded file holds no ``part`` ("encoder" or "decoder")."""
        if part not in self.origin.parts:
            raise BadInputError(f"{self.origin.name}: this file holds no {part}; load the {part} file too")

    @torch.inference_mode()
    def encode_posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images in [0, 1] -> (mean, logvar) of the raw posterior; logvar is None for deterministic encoders.

        Height and width must be multiples of :attr:`raw_downscale` (use :meth:`encode` for any size).
        """
        self.require("encoder")
        images = validation.image_batch(images, self.config.in_channels)
        if images.shape[2] % self.raw_downscale or images.shape[3] % self.raw_downscale:
            raise BadInputError(
                f"image size {images.shape[3]}x{images.shape[2]} is not a multiple of {self.raw_downscale}; "
                "use vae.encode, which pads"
            )
        out = self.model.encode(images.to(self.device, self.dtype))
        return out if isinstance(out, tuple) else (out, None)

    def encode(
        self,
        images: torch.Tensor | list[torch.Tensor],
        sample: bool = False,
        generator: torch.Generator | None = None,
        **option_kwargs: Any,
    ) -> torch.Tensor:
        """Images in [0, 1] of any size -> normalised latents (posterior mode; ``sample=True`` draws from it).

        Sizes that are not a multiple of :attr:`downscale` are reflect-padded (use :func:`vaekit.ops.codec.encode`
        to keep the padding for cropping later). ``option_kwargs`` are :class:`vaekit.ops.codec.CodecOptions`
        fields (``precision`` defaults to the weights' dtype, ``tiling`` to ``"auto"``).
        """
        options = codec.make_options(self._default_options(), sample=sample, **option_kwargs)
        result = codec.encode(self, images, options, generator=generator)
        if not isinstance(result.latents, torch.Tensor):
            raise BadInputError("images of different sizes: use vaekit.ops.codec.encode, which returns a list")
        return result.latents

    def decode(self, latents: torch.Tensor, **option_kwargs: Any) -> torch.Tensor:
        """Normalised latents -> images in [0, 1] (clamped), float32.

        ``option_kwargs`` are :class:`vaekit.ops.codec.CodecOptions` fields, plus ``image_size`` (width, height)
        and ``padding`` (left, top, right, bottom pixels) to crop the result.
        """
        crop = {k: option_kwargs.pop(k) for k in ("image_size", "padding") if k in option_kwargs}
        options = codec.make_options(self._default_options(), **option_kwargs)
        images = codec.decode(self, latents, options, **crop).images
        if not isinstance(images, torch.Tensor):
            raise BadInputError("a list of latents: use vaekit.ops.codec.decode, which returns a list")
        return images

    def _default_options(self) -> codec.CodecOptions:
        return codec.CodecOptions(precision=DTYPE_NAMES.get(self.dtype, "fp32"))

    # --- moving and saving -------------------------------------------------------------------------------------
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> VAE:
        """Move weights in place; returns self. Latent statistics (FLUX.2's BatchNorm) stay in float32."""
        self.model.to(device=device, dtype=dtype)
        bn = getattr(self.model, "bn", None)
        if bn is not None:
            bn.float()
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Weights in vaekit (original release) names."""
        return {k: v for k, v in self.model.state_dict().items() if not v.is_meta}

    def save(
        self, dest: PathLike, layout: str = "ldm", dtype: torch.dtype | None = None, overwrite: bool = False
    ) -> Path:
        """Write this VAE as an LDM safetensors file or a diffusers folder (see :func:`vaekit.save_vae`)."""
        return write_vae(self.state_dict(), self.config, dest, layout, dtype, overwrite)


def _resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def load_vae(
    path_or_preset: PathLike | list[PathLike] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    family: str | None = None,
    seed: int = 0,
) -> VAE:
    """Load a VAE from a file, a diffusers folder, a list of TAESD part files, or a preset name.

    A preset name (``sd1``, ``sdxl``, ``sd3``, ``flux``, ``taesd`` ...) gives a freshly initialised model with
    that architecture (seeded); files are detected by content and loaded strictly. ``family`` overrides an
    ambiguous family (SD1 vs SDXL, SD3 vs FLUX share architectures). ``dtype`` defaults to float32.
    With no argument, the bundled default VAE trained by vaekit is loaded.
    """
    if path_or_preset is None:
        from vaekit.weights import default_vae_path

        path_or_preset = default_vae_path()
    dev = _resolve_device(device)
    if isinstance(path_or_preset, str) and path_or_preset in PRESETS and not Path(path_or_preset).exists():
        cfg = preset(path_or_preset)
        if family:
            cfg = with_family(cfg, family)
        torch.manual_seed(seed)
        model = build(cfg)
        vae = VAE(model, cfg, VAEOrigin(name=f"{path_or_preset} (random init, seed {seed})"))
        return vae.to(dev, dtype or torch.float32)
    src = open_source(path_or_preset, family=family)  # type: ignore[arg-type]
    det = src.detection
    partial = len(det.parts) != 2
    # A partial file (a lone TAESD decoder) leaves the other half randomly initialised but unusable: VAE refuses
    # to run it. Whole models are built on the meta device and take the file's tensors without a useless init.
    model = build(det.config, device=None if partial else "meta")
    skip = ("decoder." if "decoder" not in det.parts else "encoder.") if partial else None
    strict_load(model, src.state_dict(), str(src.path), skip_prefix=skip)
    origin = VAEOrigin(
        name=src.path.name,
        path=src.path,
        layout=det.layout,
        family_certain=det.family_certain,
        family_note=det.family_note,
        parts=det.parts,
        sha256=src.sha256,
    )
    return VAE(model, det.config, origin).to(dev, dtype or torch.float32)


def save_vae(
    vae: VAE, dest: PathLike, layout: str = "ldm", dtype: torch.dtype | None = None, overwrite: bool = False
) -> Path:
    """Write ``vae`` as a single LDM-layout safetensors file (``layout="ldm"``) or a diffusers folder."""
    return vae.save(dest, layout, dtype, overwrite)
