"""What the worker thread runs: one group of same-key requests as one call into the operations pipeline.

Everything here runs on the scheduler's worker thread, never on the event loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from vaekit.interfaces.server.model_cache import ModelCache
from vaekit.interfaces.server.payloads import PayloadTooLargeError
from vaekit.ops import codec as pipeline
from vaekit.ops.codec import CodecOptions
from vaekit.ops.precision import resolve_dtype
from vaekit.vae import VAE

OPERATIONS = ("encode", "decode", "roundtrip")
PASSES = {"encode": 1, "decode": 1, "roundtrip": 2}  # forward passes (encoder or decoder) per item
MIN_MEASURED_PIXELS = 256 * 256  # smaller batches are dominated by fixed costs: they would inflate the rate


def padded(side: int, multiple: int) -> int:
    """``side`` rounded up to a multiple of ``multiple``: what the pipeline pads an image side to."""
    return -(-side // multiple) * multiple


@dataclass(frozen=True)
class WorkKey:
    """Requests with equal keys share a forward pass: same operation, VAE, options and input shape."""

    op: str
    vae: str
    precision: str
    tiling: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class DecodeItem:
    """One latent (C, h, w) to decode, with the crop that restores its original image size."""

    latent: torch.Tensor
    image_size: tuple[int, int] | None = None  # (width, height)
    padding: tuple[int, int, int, int] | None = None


@dataclass
class WorkResult:
    """What one request gets back: latents and/or an image (float32, CPU), plus notes from the pipeline."""

    latent: torch.Tensor | None = None  # (C, h, w), scaled
    image: torch.Tensor | None = None  # (3, H, W) in [0, 1]
    image_size: tuple[int, int] | None = None
    padding: tuple[int, int, int, int] | None = None
    vae_sha256: str = ""
    family: str = ""
    dtype: str = ""
    vae: VAE | None = None  # the model that ran (for the latent file's metadata)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # compute time of this item's share of its batch (no queueing, no model loading)


class Engine:
    """Runs groups of work on VAEs held by a :class:`ModelCache`."""

    def __init__(self, models: ModelCache, device: torch.device, max_pixels: int | None = None) -> None:
        self.models = models
        self.device = device
        self.max_pixels = max_pixels
        self.forward_calls = 0
        self.seconds_per_pixel: dict[tuple[str, str], float] = {}  # measured per (VAE, precision), per pass
        self._rate_lock = threading.Lock()

    def estimate_seconds(self, vae: str, precision: str, pixel_passes: int) -> float | None:
        """The compute time of ``pixel_passes`` (padded pixels x passes) on ``vae`` from what was measured on it;
        None before a large enough batch ran on it."""
        with self._rate_lock:
            rate = self.seconds_per_pixel.get((vae, precision))
        return None if rate is None else rate * pixel_passes

    def _pixel_passes(self, key: WorkKey, items: Sequence[object], multiple: int) -> int:
        """The work of a group in padded pixels x passes; an image over the pixel cap once padded is refused."""
        total = 0
        for item in items:
            if isinstance(item, DecodeItem):
                h, w = item.latent.shape[-2] * multiple, item.latent.shape[-1] * multiple
            else:
                h, w = padded(int(item.shape[-2]), multiple), padded(int(item.shape[-1]), multiple)  # type: ignore[attr-defined]
                if self.max_pixels is not None and h * w > self.max_pixels:
                    raise PayloadTooLargeError(
                        f"the image pads to {w}x{h} = {w * h} pixels for this VAE (sides rounded up to a multiple "
                        f"of {multiple}), over the server's cap of {self.max_pixels} pixels"
                    )
            total += h * w * PASSES.get(key.op, 1)
        return total

    def _measured(self, key: WorkKey, pixel_passes: int, seconds: float) -> None:
        if pixel_passes < MIN_MEASURED_PIXELS:
            return
        with self._rate_lock:
            old, new = self.seconds_per_pixel.get((key.vae, key.precision)), seconds / pixel_passes
            self.seconds_per_pixel[(key.vae, key.precision)] = new if old is None else 0.7 * old + 0.3 * new

    def run(self, key: WorkKey, items: Sequence[object]) -> list[WorkResult]:
        """Run one group: ``items`` are image tensors (encode, roundtrip) or :class:`DecodeItem` (decode)."""
        vae = self.vae(key.vae, key.precision)
        pixel_passes = self._pixel_passes(key, items, vae.downscale)
        started = time.perf_counter()
        results = self._run(vae, key, items)
        seconds = time.perf_counter() - started
        self._measured(key, pixel_passes, seconds)
        for r in results:
            r.seconds = seconds / max(1, len(results))
        return results

    def dtype_for(self, precision: str) -> torch.dtype:
        """The dtype a precision name means on this server's device (``auto``: the fastest safe one)."""
        return resolve_dtype(precision, self.device)

    def vae(self, name: str, precision: str) -> VAE:
        """The VAE called ``name``, loaded in the dtype ``precision`` resolves to (held in the LRU)."""
        return self.models.get(name, self.dtype_for(precision))

    def _run(self, vae: VAE, key: WorkKey, items: Sequence[object]) -> list[WorkResult]:
        opts = CodecOptions(precision=key.precision, tiling=key.tiling)
        sha = vae.origin.sha256 or ""
        dtype = str(vae.dtype).removeprefix("torch.")
        self.forward_calls += 1
        if key.op == "encode":
            images = [torch.as_tensor(i) for i in items]
            enc = pipeline.encode(vae, images, opts)
            return self._stamp(
                [
                    WorkResult(latent=z.detach().float().cpu(), image_size=s, padding=p, notes=list(enc.notes))
                    for z, s, p in zip(enc.latents, enc.image_sizes, enc.paddings, strict=True)
                ],
                vae,
                sha,
                vae.family,
                dtype,
            )
        if key.op == "decode":
            decode_items = [i for i in items if isinstance(i, DecodeItem)]
            dec = pipeline.decode(
                vae,
                [d.latent for d in decode_items],
                opts,
                image_size=[d.image_size for d in decode_items],
                padding=[d.padding for d in decode_items],
            )
            return self._stamp(
                [WorkResult(image=img.detach().float().cpu(), notes=list(dec.notes)) for img in dec.images],
                vae,
                sha,
                vae.family,
                dtype,
            )
        if key.op == "roundtrip":
            enc, dec = pipeline.roundtrip(vae, [torch.as_tensor(i) for i in items], opts)
            notes = list(enc.notes) + list(dec.notes)
            results = [
                WorkResult(
                    latent=z.detach().float().cpu(),
                    image=img[:3].detach().float().cpu(),
                    image_size=s,
                    padding=p,
                    notes=notes,
                )
                for z, img, s, p in zip(enc.latents, dec.images, enc.image_sizes, enc.paddings, strict=True)
            ]
            return self._stamp(results, vae, sha, vae.family, dtype)
        raise ValueError(f"unknown operation {key.op!r}")

    @staticmethod
    def _stamp(results: list[WorkResult], vae: VAE, sha: str, family: str, dtype: str) -> list[WorkResult]:
        for r in results:
            r.vae_sha256, r.family, r.dtype, r.vae = sha, family, dtype, vae
        return results
