"""Fast latent -> RGB previews without the decoder: a per-family linear map plus bias, published or fitted.

The map takes *scaled* latents (what diffusion models produce) cell by cell to RGB in [-1, 1]; the preview is
``(latents . weights + bias + 1) / 2`` at the latent's resolution (one pixel per latent cell). Web UIs show
sampling progress this way. ``fit_preview_map`` finds the least-squares map for any VAE against its own decoder,
and ``store_preview_map`` writes it into the VAE file's safetensors metadata under ``vaekit.preview``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from vaekit import families
from vaekit.errors import BadInputError, LoadError
from vaekit.formats.io import PICKLE_SUFFIXES, TensorFile, find_diffusers_weights, write_safetensors

if TYPE_CHECKING:
    from vaekit.vae import VAE

PathLike = str | os.PathLike[str]
PREVIEW_METADATA_KEY = "vaekit.preview"


def published_factors(family: str) -> tuple[list[list[float]], list[float]] | None:
    """The published latent -> RGB factors of a family (rows: latent channels; columns R, G, B), if any."""
    fam = families.FAMILIES.get(family)
    if fam is None or fam.preview is None:
        return None
    weights, bias = fam.preview
    return [list(row) for row in weights], list(bias)


@dataclass(frozen=True)
class PreviewMap:
    """A linear latent -> RGB map: ``weights`` (C, 3) and ``bias`` (3,), scaled latents to RGB in [-1, 1]."""

    weights: torch.Tensor
    bias: torch.Tensor
    family: str
    source: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        """Latent channels the map takes."""
        return int(self.weights.shape[0])

    def to_json(self) -> str:
        """The map as the JSON stored in a VAE file's metadata."""
        data = {
            "version": 1,
            "family": self.family,
            "space": "scaled latents -> RGB in [-1, 1]",
            "weights": [[round(float(v), 6) for v in row] for row in self.weights],
            "bias": [round(float(v), 6) for v in self.bias],
            **self.info,
        }
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str) -> PreviewMap:
        """Parse metadata written by :meth:`to_json`; a one-line error when it is malformed."""
        try:
            data = json.loads(text)
            weights = torch.tensor(data["weights"], dtype=torch.float32)
            bias = torch.tensor(data["bias"], dtype=torch.float32)
            family = str(data.get("family", "custom"))
        except (ValueError, KeyError, TypeError) as e:
            raise LoadError(f"{source}: invalid {PREVIEW_METADATA_KEY} metadata ({e})") from None
        if weights.ndim != 2 or weights.shape[1] != 3 or bias.shape != (3,) or not torch.isfinite(weights).all():
            raise LoadError(f"{source}: invalid {PREVIEW_METADATA_KEY} metadata (weights must be C x 3, bias 3)")
        info = {k: v for k, v in data.items() if k not in ("weights", "bias", "family", "space", "version")}
        return cls(weights, bias, family, source, info)


def family_preview_map(family: str) -> PreviewMap:
    """The published map of a latent family (see :data:`vaekit.families.FAMILIES`)."""
    factors = published_factors(family)
    if factors is None:
        raise BadInputError(
            f"no published latent RGB factors for family {family!r}; fit a map with `vaekit fit-preview VAE "
            "--images DIR`"
        )
    weights, bias = factors
    source = families.FAMILIES[family].preview_source
    return PreviewMap(torch.tensor(weights), torch.tensor(bias), family, f"published {family} factors ({source})")


def _metadata_file(path: Path) -> Path:
    """The safetensors file of a VAE whose metadata holds its preview map (a diffusers folder's weight file)."""
    if path.is_dir():
        _, weights = find_diffusers_weights(path)
        path = weights
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise BadInputError(f"{path}: a pickle file has no metadata; convert the VAE to .safetensors first")
    return path


def read_preview_map(path: PathLike) -> PreviewMap | None:
    """The fitted map stored in a VAE file's metadata, or None when it has none."""
    file = _metadata_file(Path(path))
    tf = TensorFile(file)
    text = tf.metadata.get(PREVIEW_METADATA_KEY)
    return None if text is None else PreviewMap.from_json(text, str(file))


def preview_map_for(vae: VAE) -> PreviewMap:
    """The VAE's own fitted map when its file has one, else the published map of its family."""
    path = vae.origin.path
    if path is not None and len(vae.origin.parts) == 2:
        try:
            fitted = read_preview_map(path)
        except BadInputError:
            fitted = None  # pickles cannot carry one: fall back to the family's map
        if fitted is not None:
            if fitted.channels != vae.latent_channels:
                raise LoadError(
                    f"{path}: its stored preview map takes {fitted.channels} channels, the VAE has "
                    f"{vae.latent_channels}"
                )
            return fitted
    return family_preview_map(vae.family)


def latent_to_rgb(latents: torch.Tensor, pmap: PreviewMap) -> torch.Tensor:
    """Scaled latents (N, C, h, w) -> preview images (N, 3, h, w) in [0, 1], one pixel per latent cell."""
    if latents.ndim == 3:
        latents = latents.unsqueeze(0)
    if latents.ndim != 4 or latents.shape[1] != pmap.channels:
        raise BadInputError(
            f"latents of shape {tuple(latents.shape)} do not fit a {pmap.channels}-channel preview map "
            f"({pmap.family}): they were made by a VAE of another family"
        )
    w = pmap.weights.to(latents.device, torch.float32)
    b = pmap.bias.to(latents.device, torch.float32)
    rgb = torch.einsum("nchw,cr->nrhw", latents.float(), w) + b.view(1, 3, 1, 1)
    return ((rgb + 1) / 2).clamp(0, 1)


def preview_images(latents: torch.Tensor, pmap: PreviewMap, scale: int = 1) -> torch.Tensor:
    """:func:`latent_to_rgb`, enlarged ``scale`` times with bilinear filtering (``scale`` = downscale: full size)."""
    rgb = latent_to_rgb(latents, pmap)
    if scale <= 1:
        return rgb
    return F.interpolate(rgb, scale_factor=scale, mode="bilinear", align_corners=False).clamp(0, 1)


@dataclass
class PreviewFit:
    """A fitted map with its quality against the full decoder and its speed."""

    pmap: PreviewMap
    images: int
    cells: int
    psnr_db: float  # preview vs the decode averaged to the latent grid, each image held out of its own fit
    psnr_mean_colour_db: float  # baseline: the mean colour of the other images, ignoring the latent
    psnr_grey_db: float  # baseline: a zero map (every latent previews as mid grey)
    psnr_published_db: float | None  # the family's published factors, where there are any
    decode_seconds: float
    preview_seconds: float

    @property
    def speed_ratio(self) -> float:
        """How many times faster the preview is than the full decode of the same latents."""
        return self.decode_seconds / max(self.preview_seconds, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers for JSON output."""
        return {
            "images": self.images,
            "latent_cells": self.cells,
            "psnr_db": self.psnr_db,
            "psnr_mean_colour_db": self.psnr_mean_colour_db,
            "psnr_grey_db": self.psnr_grey_db,
            "psnr_published_db": self.psnr_published_db,
            "decode_seconds": self.decode_seconds,
            "preview_seconds": self.preview_seconds,
            "speed_ratio": self.speed_ratio,
        }


def _psnr(mse: float) -> float:
    return float("inf") if mse <= 0 else 10 * math.log10(1.0 / mse)


def _solve(xtx: torch.Tensor, xty: torch.Tensor) -> torch.Tensor:
    # A tiny ridge keeps the normal equations solvable when a channel is constant (dead) in the data.
    eye = torch.eye(xtx.shape[0], dtype=xtx.dtype)
    return torch.linalg.solve(xtx + 1e-6 * eye * xtx.diagonal().mean().clamp_min(1e-12), xty)


def _mse(x: torch.Tensor, y: torch.Tensor, coef: torch.Tensor) -> float:
    pred = ((x @ coef + 1) / 2).clamp(0, 1)
    return float(((pred - y) ** 2).mean())


def fit_preview_map(vae: VAE, images: Iterable[torch.Tensor], repeats: int = 5) -> PreviewFit:
    """Least-squares fit of the latent -> RGB map of ``vae`` on images (each (3, H, W) in [0, 1]).

    Each image is encoded and fully decoded; the decode, averaged over each latent cell's pixels, is the target.
    The PSNR reported holds each image out of the fit that scores it (leave one image out), so it measures
    how the map generalises; the stored map is then fitted on all images.
    """
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    decode_s = 0.0
    preview_s = 0.0
    d = vae.downscale
    for image in images:
        latents = vae.encode(image.unsqueeze(0) if image.ndim == 3 else image)  # reflect-padded to the multiple
        start = time.perf_counter()
        decoded = vae.decode(latents)
        decode_s += time.perf_counter() - start
        preview_s += _time_preview(latents, vae.latent_channels, repeats)
        target = F.avg_pool2d(decoded.float(), d).cpu()  # (1, 3, h, w): the decode per latent cell
        x = latents.float().cpu().permute(0, 2, 3, 1).reshape(-1, vae.latent_channels)
        xs.append(torch.cat([x, torch.ones(len(x), 1)], dim=1).double())
        ys.append(target.permute(0, 2, 3, 1).reshape(-1, 3).double())
    if len(xs) < 2:
        raise BadInputError("fitting a preview map needs at least 2 images (one is held out to score the fit)")
    grams = [x.T @ x for x in xs]
    moments = [x.T @ (2 * y - 1) for x, y in zip(xs, ys, strict=True)]
    gram_all, moment_all = sum(grams), sum(moments)
    cells = sum(len(x) for x in xs)
    se_fit = se_mean = se_grey = 0.0
    for x, y, g, m in zip(xs, ys, grams, moments, strict=True):
        coef = _solve(gram_all - g, moment_all - m)  # type: ignore[operator]
        se_fit += _mse(x, y, coef) * len(x)
        others = torch.cat([yy for yy in ys if yy is not y])
        se_mean += float(((y - others.mean(0)) ** 2).mean()) * len(x)
        se_grey += float(((y - 0.5) ** 2).mean()) * len(x)
    coef = _solve(gram_all, moment_all).float()  # type: ignore[arg-type]
    psnr = _psnr(se_fit / cells)
    published = None
    factors = published_factors(vae.family)
    if factors is not None and vae.latent_channels == len(factors[0]):
        fam = family_preview_map(vae.family)
        fam_coef = torch.cat([fam.weights, fam.bias[None]]).double()
        published = _psnr(sum(_mse(x, y, fam_coef) * len(x) for x, y in zip(xs, ys, strict=True)) / cells)
    info = {"psnr_db": round(psnr, 3), "images": len(xs), "fitted_by": "vaekit fit-preview"}
    pmap = PreviewMap(coef[:-1].contiguous(), coef[-1].contiguous(), vae.family, "fitted", info)
    return PreviewFit(
        pmap=pmap,
        images=len(xs),
        cells=cells,
        psnr_db=psnr,
        psnr_mean_colour_db=_psnr(se_mean / cells),
        psnr_grey_db=_psnr(se_grey / cells),
        psnr_published_db=published,
        decode_seconds=decode_s,
        preview_seconds=preview_s,
    )


def _time_preview(latents: torch.Tensor, channels: int, repeats: int) -> float:
    """Best-of-``repeats`` time of one preview of ``latents`` (a stand-in map of the right shape)."""
    pmap = PreviewMap(torch.zeros(channels, 3), torch.zeros(3), "custom", "timing")
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        latent_to_rgb(latents, pmap)
        if latents.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def store_preview_map(vae_path: PathLike, pmap: PreviewMap, output: PathLike | None = None) -> Path:
    """Write ``pmap`` into the metadata of the VAE file at ``vae_path`` (or of a copy at ``output``), atomically.

    Every tensor and every other metadata entry is kept as it is; only ``vaekit.preview`` is added or replaced.
    """
    src = _metadata_file(Path(vae_path))
    tf = TensorFile(src)
    if tf.format != "safetensors":
        raise BadInputError(f"{src}: only .safetensors files carry metadata; convert the VAE first")
    dest = Path(output) if output is not None else src
    if output is not None and dest.exists() and dest.resolve() != src.resolve():
        raise BadInputError(f"{dest}: already exists; choose another output path")
    metadata = {**tf.metadata, PREVIEW_METADATA_KEY: pmap.to_json()}
    write_safetensors(tf.load(), dest, metadata)
    return dest
