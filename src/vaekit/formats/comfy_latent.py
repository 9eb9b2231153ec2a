"""ComfyUI's latent files (``.latent``, written by its SaveLatent node and read by LoadLatent).

Format (a safetensors file): tensor ``latent_tensor`` (N, C, h, w) holding the VAE's *raw* latents (ComfyUI applies
a model's scaling/shift inside the sampler, not in the file), an empty tensor ``latent_format_version_0`` marking
the current version, and string metadata such as ``prompt`` and ``workflow`` (JSON). Files without the version
marker are the first version, which stored latents multiplied by SD's 0.18215: LoadLatent divides them back.
There is no image size or padding: decoded images are the latent size times the VAE's downscale.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vaekit.errors import BadInputError, LoadError, reason
from vaekit.formats.io import read_safetensors_header, write_safetensors

if TYPE_CHECKING:
    import torch

TENSOR_KEY = "latent_tensor"
VERSION_KEY = "latent_format_version_0"
SUFFIX = ".latent"
V0_MULTIPLIER = 0.18215  # what the first version stored latents multiplied by

PathLike = str | os.PathLike[str]


@dataclass
class ComfyLatent:
    """A ComfyUI latent file read back: raw (unscaled) latents and the file's metadata."""

    raw: torch.Tensor  # (N, C, h, w) float32, the VAE's own output (before the diffusion scaling)
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    @property
    def vaekit_info(self) -> dict[str, str]:
        """What vaekit wrote into the metadata (VAE name, hashes, family, image sizes), if vaekit wrote it."""
        try:
            data = json.loads(self.metadata.get("vaekit", "{}"))
        except ValueError:
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def is_comfy_latent(path: PathLike) -> bool:
    """True when ``path`` is a safetensors file holding ComfyUI's ``latent_tensor``."""
    try:
        header, _, _ = read_safetensors_header(Path(path))
    except (LoadError, OSError):
        return False
    return TENSOR_KEY in header


def read_comfy_latent(path: PathLike) -> ComfyLatent:
    """Read a ComfyUI ``.latent`` file; a one-line error for anything else (checked before any tensor is read)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no such file")
    header, metadata, _ = read_safetensors_header(path)
    info = header.get(TENSOR_KEY)
    if info is None:
        raise LoadError(f"{path}: not a ComfyUI latent file (no {TENSOR_KEY!r} tensor)")
    if len(info["shape"]) != 4 or not all(info["shape"]) or info["dtype"] not in ("F32", "F16", "BF16", "F64"):
        raise LoadError(
            f"{path}: {TENSOR_KEY} must be floating-point (N, C, h, w), got {info['dtype']} {info['shape']}"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.get_tensor(TENSOR_KEY).float()
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoadError(f"{path}: cannot read {TENSOR_KEY} ({reason(e)})") from None
    if VERSION_KEY not in header:
        raw = raw / V0_MULTIPLIER
    if not bool(raw.isfinite().all()):
        raise BadInputError(f"{path}: the latents hold NaN or infinite values; re-encode the image")
    return ComfyLatent(raw, dict(metadata), path)


def write_comfy_latent(
    path: PathLike, raw: torch.Tensor, metadata: dict[str, str] | None = None, vaekit_info: dict[str, str] | None = None
) -> Path:
    """Write raw latents (N, C, h, w) as a ComfyUI ``.latent`` file (atomically), as its SaveLatent does."""
    import torch

    path = Path(path)
    if raw.ndim == 3:
        raw = raw.unsqueeze(0)
    if raw.ndim != 4 or not raw.is_floating_point():
        raise BadInputError(f"ComfyUI latents are floating-point (N, C, h, w), got {raw.dtype} {tuple(raw.shape)}")
    meta = dict(metadata or {})
    if vaekit_info:
        meta["vaekit"] = json.dumps(vaekit_info, sort_keys=True)
    tensors = {TENSOR_KEY: raw.detach().float().cpu().contiguous(), VERSION_KEY: torch.tensor([])}
    write_safetensors(tensors, path, meta or None)
    return path
