"""What the worker thread runs: one group of same-key requests as one call into the operations pipeline.

Everything here runs on the scheduler's worker thread, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from vaekit.interfaces.server.model_cache import ModelCache
from vaekit.ops import codec as pipeline
from vaekit.ops.codec import CodecOptions
from vaekit.ops.precision import resolve_dtype
from vaekit.vae import VAE

OPERATIONS = ("encode", "decode", "roundtrip")


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


class Engine:
    """Runs groups of work on VAEs held by a :class:`ModelCache`."""

    def __init__(self, models: ModelCache, device: torch.device) -> None:
        self.models = models
        self.device = device
        self.forward_calls = 0

    def dtype_for(self, precision: str) -> torch.dtype:
        """The dtype a precision name means on this server's device (``auto``: the fastest safe one)."""
        return resolve_dtype(precision, self.device)

    def vae(self, name: str, precision: str) -> VAE:
        """The VAE called ``name``, loaded in the dtype ``precision`` resolves to (held in the LRU)."""
        return self.models.get(name, self.dtype_for(precision))

    def run(self, key: WorkKey, items: Sequence[object]) -> list[WorkResult]:
        """Run one group: ``items`` are image tensors (encode, roundtrip) or :class:`DecodeItem` (decode)."""
        vae = self.vae(key.vae, key.precision)
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
