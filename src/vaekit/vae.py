"""The :class:`VAE` object: a loaded model with its config, latent scaling and device/dtype."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vaekit.errors import BadInputError
from vaekit.formats.convert import strict_load
from vaekit.formats.export import write_vae
from vaekit.formats.source import open_source
from vaekit.models import build
from vaekit.models.config import PRESETS, VAEConfig, preset, with_family

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
    """A loaded VAE. ``encode`` takes images in [0, 1] (N, 3, H, W) and returns latents scaled and shifted the
    way diffusion models consume them; ``decode`` takes such latents and returns images in [0, 1].
    """

    def __init__(
        self,
        model: nn.Module,
        config: VAEConfig,
        origin: VAEOrigin | None = None,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.config = config
        self.origin = origin or VAEOrigin(name=config.family)

    # --- description -------------------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        """Latent family (sd1, sdxl, sd3, flux, custom)."""
        return self.config.family

    @property
    def latent_channels(self) -> int:
        """Channels of the latent."""
        return self.config.latent_channels

    @property
    def downscale(self) -> int:
        """Pixels per latent cell along one side."""
        return self.config.downscale

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

    # --- scaling -----------------------------------------------------------------------------------------------
    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """Raw posterior latent -> the scaled latent diffusion models use: (z - shift) * scale."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> raw latent the decoder takes: latents / scale + shift."""
        return latents / self.config.scaling_factor + self.config.shift_factor

    # --- checks ------------------------------------------------------------------------------------------------
    def _require(self, part: str) -> None:
        if part not in self.origin.parts:
            raise BadInputError(f"{self.origin.name}: this file holds no {part}; load the {part} file too")

    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        """Validate an image batch (N, C, H, W) or a single image (C, H, W); returns a 4-D float tensor."""
        if not isinstance(images, torch.Tensor):
            raise BadInputError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4:
            raise BadInputError(f"images must be (N, C, H, W) or (C, H, W), got shape {tuple(images.shape)}")
        if images.shape[1] != self.config.in_channels:
            raise BadInputError(f"images have {images.shape[1]} channels, this VAE takes {self.config.in_channels}")
        if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
            raise BadInputError(f"empty image batch of shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise BadInputError(f"images must be float in [0, 1], got {images.dtype}")
        return images

    def check_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Validate a latent batch (N, C, h, w) or (C, h, w) for this VAE; returns a 4-D tensor."""
        if not isinstance(latents, torch.Tensor):
            raise BadInputError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        if latents.ndim == 3:
            latents = latents.unsqueeze(0)
        if latents.ndim != 4:
            raise BadInputError(f"latents must be (N, C, h, w) or (C, h, w), got shape {tuple(latents.shape)}")
        if latents.shape[1] != self.latent_channels:
            raise BadInputError(
                f"latents have {latents.shape[1]} channels but this {self.family} VAE takes {self.latent_channels}: "
                "they were made by a VAE of another family"
            )
        if latents.shape[0] == 0 or latents.shape[2] == 0 or latents.shape[3] == 0:
            raise BadInputError(f"empty latent batch of shape {tuple(latents.shape)}")
        if not torch.isfinite(latents).all():
            raise BadInputError("latents contain NaN or infinite values")
        return latents

    # --- core operations ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images in [0, 1] -> (mean, logvar) of the raw posterior; logvar is None for the tiny VAE.

        Height and width must be multiples of :attr:`downscale`.
        """
        self._require("encoder")
        images = self.check_images(images)
        if images.shape[2] % self.downscale or images.shape[3] % self.downscale:
            raise BadInputError(
                f"image size {images.shape[3]}x{images.shape[2]} is not a multiple of {self.downscale}; "
                "use vaekit.ops to pad"
            )
        x = images.to(self.device, self.dtype)
        if self.config.kind == "tiny":
            return self.model.encode(x), None
        mean, logvar = self.model.encode(x * 2 - 1)
        return mean, logvar

    def encode(
        self,
        images: torch.Tensor | list[torch.Tensor],
        sample: bool = False,
        generator: torch.Generator | None = None,
        **option_kwargs: Any,
    ) -> torch.Tensor:
        """Images in [0, 1] of any size -> scaled latents (posterior mode; ``sample=True`` draws from it).

        Sizes that are not a multiple of :attr:`downscale` are reflect-padded (use :func:`vaekit.ops.pipeline.encode`
        to keep the padding for cropping later). ``option_kwargs`` are :class:`vaekit.ops.pipeline.CodecOptions`
        fields (``precision`` defaults to the weights' dtype, ``tiling`` to ``"auto"``).
        """
        from vaekit.ops import pipeline

        options = pipeline.make_options(self._default_options(), sample=sample, **option_kwargs)
        result = pipeline.encode(self, images, options, generator=generator)
        if not isinstance(result.latents, torch.Tensor):
            raise BadInputError("images of different sizes: use vaekit.ops.pipeline.encode, which returns a list")
        return result.latents

    def decode(self, latents: torch.Tensor, **option_kwargs: Any) -> torch.Tensor:
        """Scaled latents -> images in [0, 1] (clamped), float32.

        ``option_kwargs`` are :class:`vaekit.ops.pipeline.CodecOptions` fields, plus ``image_size`` (width, height)
        and ``padding`` (left, top, right, bottom pixels) to crop the result.
        """
        from vaekit.ops import pipeline

        crop = {k: option_kwargs.pop(k) for k in ("image_size", "padding") if k in option_kwargs}
        options = pipeline.make_options(self._default_options(), **option_kwargs)
        images = pipeline.decode(self, latents, options, **crop).images
        if not isinstance(images, torch.Tensor):
            raise BadInputError("a list of latents: use vaekit.ops.pipeline.decode, which returns a list")
        return images

    def _default_options(self) -> Any:
        from vaekit.ops import pipeline
        from vaekit.ops.precision import DTYPE_NAMES

        return pipeline.CodecOptions(precision=DTYPE_NAMES.get(self.dtype, "fp32"))

    # --- moving and saving -------------------------------------------------------------------------------------
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> VAE:
        """Move weights in place; returns self."""
        self.model.to(device=device, dtype=dtype)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Weights in vaekit (LDM / taesd) names."""
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
