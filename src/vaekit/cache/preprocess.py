"""Preprocessing for latent caching: aspect-ratio buckets, resize to cover, center or seeded random crop.

Every choice that changes the pixels the encoder sees is a field of :class:`Preprocess`; its fingerprint is stored
in the manifest, so a cache is never silently extended with latents made another way. The random crop of each image
is drawn from a generator seeded by (``seed``, the image's content hash): the same image always gets the same crop,
whatever the engine, the worker count or the order in which images are processed.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vaekit.errors import BadInputError
from vaekit.ops.images import read_image

CROPS = ("center", "random")
# How images are resized to cover their bucket; part of the fingerprint so a change of method refuses old caches.
RESAMPLE = "bicubic-antialias"
BUCKET_STEP = 64


@dataclass(frozen=True)
class Preprocess:
    """How images become encoder inputs: target resolution, crop, buckets (``(width, height)``), seed, flip."""

    resolution: int = 512
    crop: str = "center"
    buckets: tuple[tuple[int, int], ...] | None = None
    seed: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise BadInputError(f"unknown crop {self.crop!r}; use one of {', '.join(CROPS)}")
        if self.resolution <= 0:
            raise BadInputError(f"--resolution must be positive, got {self.resolution}")
        if self.buckets is not None and not self.buckets:
            raise BadInputError("the bucket list is empty")

    def check_multiple(self, multiple: int) -> None:
        """Refuse target sizes the VAE cannot encode without padding (sides must be multiples of ``multiple``)."""
        sizes = self.buckets or ((self.resolution, self.resolution),)
        bad = [f"{w}x{h}" for w, h in sizes if w % multiple or h % multiple or w <= 0 or h <= 0]
        if bad:
            what = "--resolution" if self.buckets is None else "buckets"
            raise BadInputError(f"{what} {', '.join(bad)}: sides must be positive multiples of {multiple} for this VAE")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description, as stored in the manifest."""
        return {
            "resolution": self.resolution,
            "crop": self.crop,
            "buckets": [list(b) for b in self.buckets] if self.buckets else None,
            # The seed only matters for random crops; a center-cropped cache does not depend on it.
            "seed": self.seed if self.crop == "random" else None,
            "flip": self.flip,
            "resample": RESAMPLE,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        """Inverse of :meth:`to_dict`."""
        buckets = data.get("buckets")
        return cls(
            resolution=int(data["resolution"]),
            crop=str(data["crop"]),
            buckets=tuple((int(w), int(h)) for w, h in buckets) if buckets else None,
            seed=int(data.get("seed") or 0),
            flip=bool(data.get("flip", False)),
        )

    def fingerprint(self) -> str:
        """Short hash of :meth:`to_dict`: equal fingerprints mean equal encoder inputs."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Geometry:
    """Where an encoder input came from: original size, the size it was resized to, and the crop box in it.

    ``crop_box`` is (left, top, right, bottom) in the resized image; SDXL's ``crop_coords_top_left`` is
    (top, left) and its ``target_size`` is (target_h, target_w).
    """

    original_w: int
    original_h: int
    resized_w: int
    resized_h: int
    crop_box: tuple[int, int, int, int]

    @property
    def target_size(self) -> tuple[int, int]:
        """(width, height) of the encoder input."""
        left, top, right, bottom = self.crop_box
        return right - left, bottom - top


def auto_buckets(resolution: int, step: int = BUCKET_STEP) -> tuple[tuple[int, int], ...]:
    """Aspect-ratio buckets as SD trainers make them: sides multiples of ``step``, area at most resolution²,
    sides between resolution/2 and 2·resolution (both orientations, sorted by aspect ratio).
    """
    if resolution % step:
        raise BadInputError(f"--resolution {resolution} must be a multiple of {step} to make buckets")
    area = resolution * resolution
    lo, hi = max(step, resolution // 2), resolution * 2
    found: set[tuple[int, int]] = set()
    for w in range(lo, hi + 1, step):
        h = min(hi, (area // w) // step * step)
        if h >= lo:
            found.add((w, h))
            found.add((h, w))
    return tuple(sorted(found, key=lambda b: (b[0] / b[1], b[0])))


def parse_buckets(text: str | None, resolution: int) -> tuple[tuple[int, int], ...] | None:
    """``None``/``"none"`` -> no buckets (square crops); ``"auto"`` -> :func:`auto_buckets`; ``"512x512,640x384"``
    -> that list of (width, height).
    """
    if text is None or text.strip().lower() in ("", "none", "off"):
        return None
    if text.strip().lower() == "auto":
        return auto_buckets(resolution)
    out: list[tuple[int, int]] = []
    for part in text.replace(" ", "").split(","):
        try:
            w, h = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise BadInputError(f"--buckets: {part!r} is not WIDTHxHEIGHT (e.g. 512x512,640x384, or auto)") from None
        out.append((w, h))
    return tuple(dict.fromkeys(out))


def choose_bucket(width: int, height: int, params: Preprocess) -> tuple[int, int]:
    """The (width, height) an image of this size is cropped to: the bucket closest in log aspect ratio."""
    if params.buckets is None:
        return params.resolution, params.resolution
    ratio = math.log(width / height)
    return min(params.buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def crop_seed(seed: int, content_sha256: str) -> int:
    """The per-image crop seed: a function of the run's seed and the image content only."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{content_sha256}".encode()).digest()[:8], "big")


def plan_geometry(width: int, height: int, params: Preprocess, content_sha256: str) -> Geometry:
    """Resize-to-cover size and crop box for an image of ``width`` x ``height``."""
    bw, bh = choose_bucket(width, height, params)
    scale = max(bw / width, bh / height)
    rw, rh = max(bw, round(width * scale)), max(bh, round(height * scale))
    if params.crop == "center":
        left, top = (rw - bw) // 2, (rh - bh) // 2
    else:
        rng = random.Random(crop_seed(params.seed, content_sha256))
        left, top = rng.randint(0, rw - bw), rng.randint(0, rh - bh)
    return Geometry(width, height, rw, rh, (left, top, left + bw, top + bh))


def apply_geometry(rgb: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Resize (3, H, W) in [0, 1] to the planned size (bicubic, antialiased) and crop; float32, contiguous."""
    x = rgb.float()
    if (geometry.resized_w, geometry.resized_h) != (x.shape[2], x.shape[1]):
        size = (geometry.resized_h, geometry.resized_w)
        x = F.interpolate(x[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1)
    left, top, right, bottom = geometry.crop_box
    return x[:, top:bottom, left:right].contiguous()


def load_prepared(path: str, params: Preprocess, content_sha256: str) -> tuple[torch.Tensor, Geometry]:
    """Read an image file and turn it into the encoder input; unreadable images raise :class:`BadInputError`."""
    loaded = read_image(path)
    width, height = loaded.size
    geometry = plan_geometry(width, height, params, content_sha256)
    return apply_geometry(loaded.rgb, geometry), geometry
