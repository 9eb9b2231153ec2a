"""``vaekit.inspect``: say exactly what a VAE file is, checking its architecture on a meta model (no weights)."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vaekit import families
from vaekit.formats.convert import check_architecture
from vaekit.formats.io import file_sha256, legacy_model_hash
from vaekit.formats.known_hashes import KNOWN_HASHES
from vaekit.formats.source import open_source
from vaekit.models import build

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
    latent_channels: int  # normalised latent (what diffusion models consume)
    downscale: int  # image pixels per normalised latent cell
    raw_channels: int  # the network's raw latent
    dtype: str
    parts: list[str]
    params_encoder: int
    params_decoder: int
    params_total: int
    normaliser: str  # how raw latents are normalised, in words
    normaliser_spec: dict[str, Any]
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
    # the same strict architecture check as loading, on shapes only (a meta model: nothing allocated)
    meta = build(cfg, "meta")
    partial = len(det.parts) != 2
    skip = ("decoder." if "decoder" not in det.parts else "encoder.") if partial else None
    check_architecture(meta, src.shapes(), str(src.path), skip)
    stats = src.tensors([k for k, v in meta.state_dict().items() if k.startswith("bn.")])
    if stats:
        meta.bn.load_state_dict({k[3:]: v for k, v in stats.items()}, assign=True)  # type: ignore[union-attr]
    normaliser = families.normaliser_for(cfg, meta)
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
        latent_channels=normaliser.channels(cfg.latent_channels),
        downscale=cfg.downscale * normaliser.patch,
        raw_channels=cfg.latent_channels,
        dtype=det.dtype,
        parts=list(det.parts),
        # quant/post-quant convs belong to the encoder/decoder side they sit on
        params_encoder=counts["encoder"] + sizes.get("quant_conv.weight", 0) + sizes.get("quant_conv.bias", 0),
        # (FLUX.2's nested quant convs are counted with encoder/decoder already; bn statistics are "other")
        params_decoder=counts["decoder"]
        + sizes.get("post_quant_conv.weight", 0)
        + sizes.get("post_quant_conv.bias", 0),
        params_total=sum(counts.values()),
        normaliser=normaliser.describe(),
        normaliser_spec=normaliser.spec(),
        sha256=sha,
        short_hash=sha[:10],
        legacy_hash=legacy_model_hash(weights),
        known_as=KNOWN_HASHES[sha][1] if sha in KNOWN_HASHES else None,
        file_bytes=sum(Path(f.path).stat().st_size for f in src.files),
        config=cfg.to_dict(),
    )
