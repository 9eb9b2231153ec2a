"""Latent files: ``.safetensors`` holding latents (and optionally the posterior) with the metadata to use them.

Layout: tensors ``latents`` (N, C, h, w), normalised, and optionally ``mean`` and ``logvar`` (the raw posterior,
(N, c, h', w'): FLUX.2's raw latent has 1/4 the channels and twice the sides); metadata ``format =
"vaekit-latents"``, ``version`` and ``vaekit.latents``, a JSON object with the VAE's identity (sha256, short hash,
name, family, kind), its latent normaliser (``normaliser``: the spec of :mod:`vaekit.normalisers`), each image's
original size and padding, the dtype, whether the latents were sampled or are the posterior mode, and the caller's
``extra`` strings. Version 1 files (before normaliser objects) stored ``scaling_factor``/``shift_factor`` only;
they still load, as a scalar normaliser.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

from vaekit.errors import BadInputError
from vaekit.formats.io import file_sha256, find_diffusers_weights, write_safetensors
from vaekit.normalisers import Normaliser, ScalarAffine, from_spec

if TYPE_CHECKING:
    from vaekit.vae import VAE

PathLike = str | os.PathLike[str]
FORMAT_NAME = "vaekit-latents"
FORMAT_VERSION = 2
METADATA_KEY = "vaekit.latents"
SHORT_HASH_LEN = 10

Size = tuple[int, int]
Padding = tuple[int, int, int, int]

# sha256 of weight files, keyed by (path, size, mtime): hashing a 300 MB file once per process is enough.
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def vae_sha256(vae: VAE) -> str:
    """The VAE's identity: the sha256 of its weight file, or ``random-init:<preset>`` for a preset model."""
    origin = vae.origin
    if origin.sha256:
        return origin.sha256
    if origin.path is None:
        return f"random-init:{origin.name.split(' ')[0]}"
    path = Path(origin.path)
    if path.is_dir():
        path = find_diffusers_weights(path)[1]
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = file_sha256(path)
    return _SHA_CACHE[key]


def short_hash(sha: str) -> str:
    """The first hex digits of a sha256 (what UIs show); random-init identities are returned whole."""
    return sha if sha.startswith("random-init:") else sha[:SHORT_HASH_LEN]


@dataclass
class LatentFile:
    """A latent file read back: tensors and parsed metadata."""

    latents: torch.Tensor  # (N, C, h, w), scaled as diffusion models use them
    mean: torch.Tensor | None
    logvar: torch.Tensor | None
    vae_sha256: str
    vae_short_hash: str
    vae_name: str
    family: str
    kind: str
    normaliser: Normaliser
    image_sizes: list[Size]  # (width, height) of each original image
    paddings: list[Padding]  # (left, top, right, bottom) pixels
    dtype: str
    sampled: bool
    extra: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    alphas: list[torch.Tensor | None] = field(default_factory=list)  # (1, H, W) per item, from RGBA images

    def raw(self) -> torch.Tensor:
        """The latents turned back into the VAE's raw latent (what its decoder network takes)."""
        return self.normaliser.denormalise(self.latents.float())

    @property
    def image_size(self) -> Size:
        """(width, height) of the first image (all of them when the file holds one)."""
        return self.image_sizes[0]

    @property
    def padding(self) -> Padding:
        """Padding of the first image."""
        return self.paddings[0]

    def check_vae(self, vae: VAE) -> None:
        """Raise BadInputError when ``vae`` cannot decode these latents (another family or channel count)."""
        if vae.latent_channels != self.latents.shape[1]:
            raise BadInputError(
                f"{self.path}: latents have {self.latents.shape[1]} channels, the {vae.family} VAE takes "
                f"{vae.latent_channels}"
            )
        if vae.family != self.family and "custom" not in (vae.family, self.family):
            raise BadInputError(f"{self.path}: latents of the {self.family} family; this VAE is {vae.family}")


def _per_item(value: Any, n: int, length: int, what: str) -> list[tuple[int, ...]]:
    if isinstance(value, (list, tuple)) and len(value) == length and all(isinstance(v, int) for v in value):
        return [tuple(int(v) for v in value)] * n
    if isinstance(value, (list, tuple)) and len(value) == n and all(isinstance(v, (list, tuple)) for v in value):
        if all(len(v) == length and all(isinstance(x, int) for x in v) for v in value):
            return [tuple(int(x) for x in v) for v in value]
    raise BadInputError(f"{what} must be {length} integers or one such entry per latent, got {value!r}")


def _batch(t: torch.Tensor | list[torch.Tensor] | None, what: str) -> torch.Tensor | None:
    if t is None:
        return None
    if isinstance(t, list):
        if len({tuple(x.shape) for x in t}) > 1:
            raise BadInputError(f"{what} of different sizes cannot share one file: save them one per file")
        t = torch.stack(t)
    if not isinstance(t, torch.Tensor):
        raise BadInputError(f"{what} must be a tensor, got {type(t).__name__}")
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4:
        raise BadInputError(f"{what} must be (N, C, h, w) or (C, h, w), got shape {tuple(t.shape)}")
    return t


def save_latents(
    path: PathLike,
    latents: torch.Tensor | list[torch.Tensor],
    vae: VAE,
    *,
    image_size: Size | list[Size],
    padding: Padding | list[Padding],
    mean: torch.Tensor | list[torch.Tensor] | None = None,
    logvar: torch.Tensor | list[torch.Tensor] | None = None,
    overwrite: bool = False,
    extra: dict[str, str] | None = None,
    sampled: bool = False,
    alphas: list[torch.Tensor | None] | None = None,
) -> Path:
    """Write latents (and optionally the raw posterior mean/logvar) with their metadata, atomically.

    ``alphas``: each image's alpha channel (1, H, W), kept aside at encode and restored at decode.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise BadInputError(f"{path}: latent files are .safetensors")
    if path.exists() and not overwrite:
        raise BadInputError(f"{path}: already exists (pass overwrite=True / --overwrite to replace it)")
    lat = _batch(latents, "latents")
    assert lat is not None
    if lat.shape[1] != vae.latent_channels:
        raise BadInputError(f"latents have {lat.shape[1]} channels, this {vae.family} VAE makes {vae.latent_channels}")
    if not lat.is_floating_point() or not bool(torch.isfinite(lat).all()):
        raise BadInputError("latents must be finite floating-point values")
    n = lat.shape[0]
    tensors = {"latents": lat}
    raw_shape = tuple(vae.denormalise(lat[:1].float()).shape[1:])
    for name, t in (("mean", _batch(mean, "mean")), ("logvar", _batch(logvar, "logvar"))):
        if t is not None:
            if tuple(t.shape) != (n, *raw_shape):
                raise BadInputError(f"{name} has shape {tuple(t.shape)}, the raw latents {(n, *raw_shape)}")
            tensors[name] = t
    if ("mean" in tensors) != ("logvar" in tensors):
        raise BadInputError("save the posterior mean and logvar together, or neither")
    sizes = _per_item(image_size, n, 2, "image_size")
    pads = _per_item(padding, n, 4, "padding")
    if extra is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise BadInputError("extra metadata must map strings to strings")
    if alphas:
        from vaekit.formats.image_meta import ALPHA_PREFIX, pack_alpha

        bits = int((extra or {}).get("image_bits", "8"))
        tensors.update({f"{ALPHA_PREFIX}{i}": pack_alpha(a, bits) for i, a in enumerate(alphas) if a is not None})
    sha = vae_sha256(vae)
    info = {
        "vae_sha256": sha,
        "vae_short_hash": short_hash(sha),
        "vae_name": vae.origin.name,
        "family": vae.family,
        "kind": vae.config.kind,
        "normaliser": vae.normaliser.spec(),
        "image_sizes": [list(s) for s in sizes],
        "paddings": [list(p) for p in pads],
        "dtype": str(lat.dtype).removeprefix("torch."),
        "sampled": bool(sampled),
        "extra": dict(extra or {}),
    }
    metadata = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION), METADATA_KEY: json.dumps(info)}
    write_safetensors(tensors, path, metadata)
    return path


def _not_ours(path: Path, why: str) -> BadInputError:
    return BadInputError(f"{path}: not a vaekit latent file ({why})")


def load_latents(path: PathLike) -> LatentFile:
    """Read a latent file written by :func:`save_latents`; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != FORMAT_NAME or METADATA_KEY not in meta:
                raise _not_ours(path, "no vaekit latent metadata; is it a model file?")
            keys = set(f.keys())
            if "latents" not in keys:
                raise _not_ours(path, "no 'latents' tensor")
            tensors = {k: f.get_tensor(k) for k in ("latents", "mean", "logvar") if k in keys}
            packed = {k: f.get_tensor(k) for k in keys if k.startswith("alpha_png.")}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise _not_ours(path, f"unreadable safetensors: {first}") from None
    try:
        version = int(meta.get("version", "0"))
    except ValueError:
        raise _not_ours(path, f"bad version {meta.get('version')!r}") from None
    if version > FORMAT_VERSION:
        raise BadInputError(f"{path}: latent file version {version} is newer than this vaekit reads; upgrade vaekit")
    if tensors["latents"].is_floating_point() and not bool(torch.isfinite(tensors["latents"]).all()):
        raise BadInputError(f"{path}: the latents hold NaN or infinite values; re-encode the image")
    try:
        info = json.loads(meta[METADATA_KEY])
        lat = tensors["latents"]
        if lat.ndim != 4:
            raise ValueError(f"latents have shape {tuple(lat.shape)}")
        n = lat.shape[0]
        sizes = [(int(w), int(h)) for w, h in info["image_sizes"]]
        pads = [tuple(int(x) for x in p) for p in info["paddings"]]
        if len(sizes) != n or len(pads) != n or any(len(p) != 4 for p in pads):
            raise ValueError("image sizes or paddings do not match the number of latents")
        if "normaliser" in info:
            normaliser = from_spec(info["normaliser"])
        else:  # version 1
            normaliser = ScalarAffine(float(info["scaling_factor"]), float(info["shift_factor"]))
        if "mean" in tensors:
            raw_shape = tuple(normaliser.denormalise(lat[:1].float()).shape[1:])
            for name in ("mean", "logvar"):
                if name in tensors and tuple(tensors[name].shape) != (n, *raw_shape):
                    raise ValueError(f"{name} shape {tuple(tensors[name].shape)} does not fit the latents'")
        from vaekit.formats.image_meta import unpack_alpha

        alphas = [
            unpack_alpha(packed[f"alpha_png.{i}"], str(path)) if f"alpha_png.{i}" in packed else None for i in range(n)
        ]
        return LatentFile(
            latents=lat,
            mean=tensors.get("mean"),
            logvar=tensors.get("logvar"),
            vae_sha256=str(info["vae_sha256"]),
            vae_short_hash=str(info["vae_short_hash"]),
            vae_name=str(info.get("vae_name", "")),
            family=str(info["family"]),
            kind=str(info.get("kind", "kl")),
            normaliser=normaliser,
            image_sizes=sizes,
            paddings=pads,  # type: ignore[arg-type]
            dtype=str(info.get("dtype", str(lat.dtype).removeprefix("torch."))),
            sampled=bool(info.get("sampled", False)),
            extra={str(k): str(v) for k, v in dict(info.get("extra", {})).items()},
            path=path,
            alphas=alphas,
        )
    except BadInputError as e:
        raise _not_ours(path, str(e)) from None
    except (KeyError, TypeError, ValueError, RuntimeError, json.JSONDecodeError) as e:
        raise _not_ours(path, f"damaged metadata: {str(e)[:160]}") from None


def save_encoded(
    path: PathLike,
    result: Any,
    vae: VAE,
    *,
    with_posterior: bool = False,
    overwrite: bool = False,
    extra: dict[str, str] | None = None,
) -> Path:
    """Write an :class:`~vaekit.ops.codec.EncodeResult` (all its items must share one size)."""
    return save_latents(
        path,
        result.latents,
        vae,
        image_size=list(result.image_sizes),
        padding=list(result.paddings),
        mean=result.mean if with_posterior else None,
        logvar=result.logvar if with_posterior else None,
        overwrite=overwrite,
        extra=extra,
        sampled=result.sampled,
    )
