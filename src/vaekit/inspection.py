"""``vaekit.inspect``: say exactly what a VAE file is, without building the model."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vaekit.formats.io import file_sha256, legacy_model_hash
from vaekit.formats.known_hashes import KNOWN_HASHES
from vaekit.formats.source import open_source

PathLike = str | os.PathLike[str]


@dataclass
class Inspection:
    """What a VAE file holds, as :func:`inspect` found it."""

    path: str
    format: str  # safetensors, pickle, diffusers
    layout: str  # ldm, diffusers, taesd, taesd-diffusers
    container: str  # bare or checkpoint
    prefix: str
    kind: str  # kl or tiny
    family: str
    family_certain: bool
    family_source: str
    family_note: str
    latent_channels: int
    downscale: int
    dtype: str
    parts: list[str]
    params_encoder: int
    params_decoder: int
    params_total: int
    scaling_factor: float
    shift_factor: float
    sha256: str
    short_hash: str  # A1111/ComfyUI convention: first 10 hex digits of the file's SHA-256
    legacy_hash: str  # old A1111 model hash: 8 hex digits of SHA-256 over 64 KiB at 1 MiB
    known_as: str | None
    file_bytes: int
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        return asdict(self)


def inspect(path: PathLike | list[PathLike], family: str | None = None) -> Inspection:
    """Detect family, layout, channels, dtype, parameter counts, container, factors and hashes of a VAE file."""
    src = open_source(path, family=family)
    det = src.detection
    weights = src.files[0].path
    sha = src.sha256 or file_sha256(weights)
    if det.family_source == "latent channels only" and sha in KNOWN_HASHES and not family:
        src = open_source(path, family=KNOWN_HASHES[sha][0])
        det = src.detection
    counts = {"encoder": 0, "decoder": 0, "other": 0}
    sizes = {ours: math.prod(f.shapes[theirs]) for f, km in src.file_key_maps() for ours, theirs in km.items()}
    for ours, size in sizes.items():
        part = ours.split(".", 1)[0]
        counts[part if part in counts else "other"] += size
    cfg = det.config
    return Inspection(
        path=str(src.path),
        format=src.format,
        layout=det.layout,
        container=det.container,
        prefix=det.prefix,
        kind=cfg.kind,
        family=cfg.family,
        family_certain=det.family_certain,
        family_source=det.family_source,
        family_note=det.family_note,
        latent_channels=cfg.latent_channels,
        downscale=cfg.downscale,
        dtype=det.dtype,
        parts=list(det.parts),
        # quant/post-quant convs belong to the encoder/decoder side they sit on
        params_encoder=counts["encoder"] + sizes.get("quant_conv.weight", 0) + sizes.get("quant_conv.bias", 0),
        params_decoder=counts["decoder"]
        + sizes.get("post_quant_conv.weight", 0)
        + sizes.get("post_quant_conv.bias", 0),
        params_total=sum(counts.values()),
        scaling_factor=cfg.scaling_factor,
        shift_factor=cfg.shift_factor,
        sha256=sha,
        short_hash=sha[:10],
        legacy_hash=legacy_model_hash(weights),
        known_as=KNOWN_HASHES[sha][1] if sha in KNOWN_HASHES else None,
        file_bytes=sum(Path(f.path).stat().st_size for f in src.files),
        config=cfg.to_dict(),
    )
