"""Round-trip every image through every VAE (and precision / tiling variant) and measure the results.

``compare(vaes, images)`` returns a :class:`Comparison`: one :class:`Row` per VAE x variant with the per-image
values of every metric, their means with 95 % confidence intervals, plain-words colour flags, and per metric the
winner when a paired test on the same images says so (see :mod:`vaekit.eval.stats`).

A VAE that fails to load or run, or cannot decode the latents it is given, gets its reason in its row and the run
goes on; unreadable images are listed and skipped; no readable image at all is a :class:`BadInputError`.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vaekit.errors import BadInputError, VaekitError
from vaekit.eval import metrics as M
from vaekit.eval.stats import Summary, Winner, call_winner, mean_ci
from vaekit.ops import codec as pipeline
from vaekit.ops.device import PeakMemory, choose_device, synchronize
from vaekit.ops.images import builtin_image_paths, list_images, read_image
from vaekit.vae import VAE, load_vae

PathLike = str | os.PathLike[str]
VAESpec = str | os.PathLike[str] | VAE
ImagesSpec = str | os.PathLike[str] | Sequence[str | os.PathLike[str] | torch.Tensor]
Progress = Callable[[str], None]

DEFAULT_MAX_SIZE = 1024
WARMUP_SIZE = 64
STATUS_OK, STATUS_FAILED, STATUS_INCOMPATIBLE = "ok", "failed", "incompatible"
TIME_METRICS = ("encode_s_per_mpx", "decode_s_per_mpx", "peak_mib")


@dataclass
class ImageInfo:
    """One measured image: its name, source and size as measured (after ``max_size``) and as read."""

    name: str
    path: str | None
    width: int
    height: int
    original_width: int
    original_height: int
    files: dict[str, str] = field(default_factory=dict)  # report files, relative to the report folder


@dataclass
class SkippedImage:
    """An image that could not be read, and why."""

    path: str
    reason: str


@dataclass
class Row:
    """One VAE x variant: status, per-image values per metric, summaries, flags and notes."""

    label: str
    vae: str
    family: str
    precision: str
    tiling: str
    status: str = STATUS_OK
    reason: str = ""
    values: dict[str, list[float]] = field(default_factory=dict)
    summary: dict[str, Summary] = field(default_factory=dict)
    set_values: dict[str, float] = field(default_factory=dict)  # set-level metrics (rFID): one value per row
    flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: list[dict[str, str]] = field(default_factory=list)  # per image: report files of this row

    @property
    def ok(self) -> bool:
        """True when every image went through this row."""
        return self.status == STATUS_OK

    def mean(self, metric: str) -> float:
        """Mean of ``metric`` over the images (nan when not measured)."""
        if metric in self.set_values:
            return self.set_values[metric]
        s = self.summary.get(metric)
        return s.mean if s else math.nan

    def to_dict(self, per_image: bool = True) -> dict[str, Any]:
        """Plain dict for JSON (nan -> None)."""
        d: dict[str, Any] = {
            "label": self.label,
            "vae": self.vae,
            "family": self.family,
            "precision": self.precision,
            "tiling": self.tiling,
            "status": self.status,
            "reason": self.reason,
            "summary": {k: v.to_dict() for k, v in self.summary.items()},
            "set_metrics": {k: _json_float(v) for k, v in self.set_values.items()},
            "flags": list(self.flags),
            "notes": list(self.notes),
        }
        if per_image:
            d["per_image"] = {k: [_json_float(x) for x in v] for k, v in self.values.items()}
            d["files"] = self.files
        return d


def _json_float(x: float) -> float | None:
    return x if math.isfinite(x) else None


@dataclass
class Comparison:
    """The result of :func:`compare`: rows (VAE x variant), images, winners, and what was skipped.

    Table-like: ``len()``, iteration over rows, ``comparison["label"]`` or ``comparison[0]``, ``to_rows()`` for one
    flat dict per row (means and intervals), ``to_json()`` for everything including per-image values.
    """

    rows: list[Row]
    images: list[ImageInfo]
    skipped_images: list[SkippedImage]
    metrics: list[str]
    skipped_metrics: dict[str, str]
    winners: dict[str, Winner]
    settings: dict[str, Any]
    report_dir: Path | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows)

    def __getitem__(self, key: int | str) -> Row:
        if isinstance(key, int):
            return self.rows[key]
        for row in self.rows:
            if row.label == key:
                return row
        raise KeyError(f"no row labelled {key!r}; rows: {', '.join(r.label for r in self.rows)}")

    @property
    def labels(self) -> list[str]:
        """Row labels in order."""
        return [r.label for r in self.rows]

    def to_rows(self) -> list[dict[str, Any]]:
        """One flat dict per row: label, status, reason, and ``<metric>``, ``<metric>_low``, ``<metric>_high``."""
        out = []
        for row in self.rows:
            d: dict[str, Any] = {
                "label": row.label,
                "vae": row.vae,
                "family": row.family,
                "precision": row.precision,
                "tiling": row.tiling,
                "status": row.status,
                "reason": row.reason,
            }
            for key in self.metrics:
                if key in row.set_values:
                    d[key], d[f"{key}_low"], d[f"{key}_high"] = row.set_values[key], math.nan, math.nan
                    continue
                s = row.summary.get(key, Summary(math.nan, math.nan, math.nan, 0))
                d[key], d[f"{key}_low"], d[f"{key}_high"] = s.mean, s.low, s.high
            d["flags"] = "; ".join(row.flags)
            out.append(d)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain data (nan -> None)."""
        return {
            "settings": self.settings,
            "metrics": {
                k: {"label": M.METRICS[k].label, "unit": M.METRICS[k].unit, "better": M.METRICS[k].better}
                for k in self.metrics
            },
            "skipped_metrics": self.skipped_metrics,
            "images": [vars(i) for i in self.images],
            "skipped_images": [vars(s) for s in self.skipped_images],
            "rows": [r.to_dict() for r in self.rows],
            "winners": {k: w.to_dict() for k, w in self.winners.items()},
        }

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text of :meth:`to_dict` (strict JSON: no NaN)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False, default=str)

    def __str__(self) -> str:
        from vaekit.eval.report import text_table

        return text_table(self)


# --- images --------------------------------------------------------------------------------------------------------
@dataclass
class _Image:
    info: ImageInfo
    rgb: torch.Tensor  # (3, H, W) float32 in [0, 1], after max_size


def _downscale(rgb: torch.Tensor, max_size: int | None) -> torch.Tensor:
    h, w = rgb.shape[1:]
    if not max_size or max(h, w) <= max_size:
        return rgb
    s = max_size / max(h, w)
    size = (max(1, round(h * s)), max(1, round(w * s)))
    return F.interpolate(rgb[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1)


def _image_sources(images: ImagesSpec) -> list[Path | torch.Tensor]:
    if isinstance(images, (str, os.PathLike)):
        if str(images) == "builtin":
            return list(builtin_image_paths())
        return list(list_images([images]))
    if isinstance(images, torch.Tensor):
        batch = images if images.ndim == 4 else images[None]
        return list(batch.unbind(0))
    out: list[Path | torch.Tensor] = []
    for item in images:
        if isinstance(item, torch.Tensor):
            out.append(item)
        elif str(item) == "builtin":
            out.extend(builtin_image_paths())
        else:
            out.extend(list_images([item]))
    return out


def load_images(images: ImagesSpec, max_size: int | None = DEFAULT_MAX_SIZE) -> tuple[list[_Image], list[SkippedImage]]:
    """Read and downscale the images; unreadable ones are returned as skipped, never raised."""
    loaded: list[_Image] = []
    skipped: list[SkippedImage] = []
    names: set[str] = set()
    for i, src in enumerate(_image_sources(images)):
        if isinstance(src, torch.Tensor):
            rgb, path, name = src, None, f"image-{i}"
            if rgb.ndim != 3 or rgb.shape[0] not in (3, 4) or not rgb.is_floating_point() or 0 in rgb.shape:
                skipped.append(SkippedImage(name, f"not a float (3, H, W) image tensor (shape {tuple(rgb.shape)})"))
                continue
            rgb = rgb[:3].detach().float().cpu().clamp(0, 1)
        else:
            path, name = str(src), src.stem
            try:
                rgb = read_image(src).rgb
            except VaekitError as e:
                skipped.append(SkippedImage(str(src), str(e)))
                continue
            except Exception as e:  # noqa: BLE001 - a broken file must not abort the comparison
                skipped.append(SkippedImage(str(src), f"not a readable image ({type(e).__name__}: {e})"))
                continue
        base, k = name, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.add(name)
        h, w = rgb.shape[1:]
        small = _downscale(rgb, max_size)
        info = ImageInfo(name, path, int(small.shape[2]), int(small.shape[1]), int(w), int(h))
        loaded.append(_Image(info, small.contiguous()))
    return loaded, skipped


# --- VAEs ----------------------------------------------------------------------------------------------------------
def _load(spec: VAESpec, device: torch.device) -> tuple[VAE, str]:
    """A VAE and its display name, from a VAE object, a file, a library name or a preset."""
    if isinstance(spec, VAE):
        return spec, spec.origin.name
    from vaekit.library import resolve_vae

    resolved = resolve_vae(str(spec))
    vae = load_vae(resolved.source, device=device)
    name = resolved.path.stem if resolved.path is not None else f"{resolved.preset} (random)"
    return vae, name


def _spec_name(spec: VAESpec) -> str:
    if isinstance(spec, VAE):
        return spec.origin.name
    return Path(str(spec)).stem if os.sep in str(spec) or Path(str(spec)).suffix else str(spec)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


# --- the measurement -----------------------------------------------------------------------------------------------
def _warm_up(vae: VAE, opts: pipeline.CodecOptions, latents_only: bool, side: int) -> None:
    """One untimed pass so one-time costs (kernel selection, the precision copy) are not billed to image 1."""
    side = max(vae.downscale, min(WARMUP_SIZE, side) // vae.downscale * vae.downscale)
    x = torch.rand(3, side, side, generator=torch.Generator().manual_seed(0))
    if latents_only:
        z = torch.zeros(vae.latent_channels, side // vae.downscale, side // vae.downscale)
        pipeline.decode(vae, z, opts)
        return
    enc = pipeline.encode(vae, x, opts)
    pipeline.decode(vae, enc.latents, opts)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand memory freed by earlier images back to the OS, so the next CPU peak (resident set size above the
    start) measures this image's own working memory rather than what the allocator kept from the last one."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _roundtrip_one(
    vae: VAE,
    img: torch.Tensor,
    opts: pipeline.CodecOptions,
    latent: tuple[torch.Tensor, Any] | None,
    device: torch.device,
) -> tuple[torch.Tensor, float, float, int, list[str]]:
    """(reconstruction, encode seconds, decode seconds, peak bytes, notes) for one image."""
    notes: list[str] = []
    if device.type == "cpu":
        release_freed_memory()
    with PeakMemory(device) as mem:
        if latent is None:
            synchronize(device)
            t0 = time.perf_counter()
            enc = pipeline.encode(vae, img, opts)
            synchronize(device)
            t_enc = time.perf_counter() - t0
            z, size, pad = enc.latents, enc.image_sizes, enc.paddings
            notes += enc.notes
        else:
            t_enc = math.nan
            z, (size, pad) = latent
        synchronize(device)
        t0 = time.perf_counter()
        dec = pipeline.decode(vae, z, opts, image_size=size, padding=pad)
        synchronize(device)
        t_dec = time.perf_counter() - t0
        notes += dec.notes
    out = dec.images
    assert isinstance(out, torch.Tensor)
    return out[0].float().cpu(), t_enc, t_dec, mem.peak, notes


def _label(name: str, precision: str, tiling: str, precisions: int, tilings: int) -> str:
    """The VAE's name, plus the precision / tiling mode where the run compares several."""
    parts = [name] + ([precision] if precisions > 1 else []) + ([f"tiling {tiling}"] if tilings > 1 else [])
    return " · ".join(parts)


def compare(
    vaes: Sequence[VAESpec] | VAESpec,
    images: ImagesSpec = "builtin",
    *,
    precisions: Sequence[str] = ("fp32",),
    tilings: Sequence[str] = ("off",),
    max_size: int | None = DEFAULT_MAX_SIZE,
    device: str | torch.device | None = None,
    latents_from: VAESpec | None = None,
    lpips_weights: Sequence[PathLike] | PathLike | None = None,
    inception_weights: PathLike | None = None,
    report_dir: PathLike | None = None,
    overwrite: bool = False,
    amplify: float = 5.0,
    warmup: bool = True,
    progress: Progress | None = None,
) -> Comparison:
    """Round-trip ``images`` through every VAE x precision x tiling and measure each reconstruction.

    ``vaes``: files, library names, presets or :class:`VAE` objects. ``images``: ``"builtin"``, a folder, a file,
    a glob, or a list of paths and (3, H, W) tensors in [0, 1]. ``latents_from``: encode every image with this VAE
    and decode with each compared VAE (a decoder swap); one that cannot decode those latents is "incompatible".
    ``lpips_weights`` / ``inception_weights``: local backbone files; without them LPIPS / rFID are skipped (never
    downloaded). ``report_dir``: also write report.html/json/csv with images and charts there. ``warmup``: one
    untimed pass per row first, so one-time costs do not inflate the first image's timing.
    """
    from vaekit.eval import perceptual
    from vaekit.eval.report import ReportWriter

    if isinstance(vaes, (str, os.PathLike, VAE)):
        vaes = [vaes]
    if not vaes:
        raise BadInputError("give at least one VAE to compare")
    say = progress or (lambda _msg: None)
    precisions = [pipeline.prec.parse_precision(p) for p in precisions] or ["fp32"]
    tilings = list(tilings) or ["off"]
    for t in tilings:
        if t not in pipeline.TILING_MODES:
            raise BadInputError(f"unknown tiling mode {t!r}; use one of {', '.join(pipeline.TILING_MODES)}")
    if max_size is not None and max_size < 0:
        raise BadInputError(f"max_size must be positive (or 0 for no limit), got {max_size}")
    dev = choose_device(device)
    writer = ReportWriter(Path(report_dir), overwrite=overwrite, amplify=amplify) if report_dir else None

    # Optional perceptual metrics: load (and validate) the user's local weights before the long run.
    skipped_metrics: dict[str, str] = {}
    lpips_model = perceptual.load_lpips(lpips_weights, dev) if lpips_weights else None
    if lpips_model is None:
        skipped_metrics["lpips"] = "skipped: no local backbone weights given (--lpips-weights); nothing downloaded"
    inception = perceptual.load_inception(inception_weights, dev) if inception_weights else None
    if inception is None:
        skipped_metrics["rfid"] = "skipped: no local Inception weights given (--inception-weights); nothing downloaded"

    loaded, skipped = load_images(images, max_size)
    for s in skipped:
        say(f"skipped {s.path}: {s.reason}")
    if not loaded:
        why = f" ({len(skipped)} unreadable, e.g. {skipped[0].reason})" if skipped else ""
        raise BadInputError(f"no readable image to compare on{why}")
    if writer:
        for im in loaded:
            im.info.files = writer.original(im.info.name, im.rgb)

    metric_keys = ["psnr", "ssim", "ms_ssim"] + (["lpips"] if lpips_model else [])
    metric_keys += ["saturation_ratio", "colourfulness_change", "delta_e"]
    metric_keys += [] if latents_from is not None else ["encode_s_per_mpx"]
    metric_keys += ["decode_s_per_mpx", "peak_mib"]

    # A decoder swap: every image encoded once by the source VAE (fp32, untiled).
    source_latents: list[tuple[torch.Tensor, Any]] | None = None
    source_family = ""
    if latents_from is not None:
        try:
            src_vae, src_name = _load(latents_from, dev)
            say(f"encoding the images with {src_name} (--latents-from)")
            opts = pipeline.CodecOptions(precision="fp32", tiling="off")
            source_latents = []
            for im in loaded:
                enc = pipeline.encode(src_vae, im.rgb, opts)
                source_latents.append((enc.latents, (enc.image_sizes, enc.paddings)))
            source_family = src_vae.family
            del src_vae
        except VaekitError as e:
            raise BadInputError(f"--latents-from {latents_from}: {_first_line(e)}") from None

    n_prec, n_tile = len(precisions), len(tilings)
    rows: list[Row] = []
    labels: set[str] = set()
    fake_images: dict[str, list[torch.Tensor]] = {}  # reconstructions, kept only for rFID
    keep_outputs = inception is not None
    for spec in vaes:
        name = _spec_name(spec)
        try:
            vae, name = _load(spec, dev)
            load_error = None
        except Exception as e:  # noqa: BLE001 - a VAE that cannot load gets its reason in its row
            vae, load_error = None, _first_line(e)
        for precision in precisions:
            for tiling in tilings:
                base = _label(name, precision, tiling, n_prec, n_tile)
                label, k = base, 2
                while label in labels:
                    label, k = f"{base} #{k}", k + 1
                labels.add(label)
                row = Row(label, str(spec) if not isinstance(spec, VAE) else name, "", precision, tiling)
                row.values = {key: [math.nan] * len(loaded) for key in metric_keys}
                rows.append(row)
                if vae is None:
                    row.status, row.reason = STATUS_FAILED, f"could not load: {load_error}"
                    continue
                row.family = vae.family
                if source_latents is not None and source_family != vae.family:
                    row.notes.append(f"decodes {source_family} latents with a {vae.family} VAE")
                say(f"{label}: {len(loaded)} image(s)")
                _measure_row(
                    row, vae, loaded, source_latents, dev, lpips_model, writer, fake_images, say, warmup, keep_outputs
                )
        del vae

    # rFID: one value per row over the whole image set.
    if inception is not None:
        real = [im.rgb for im in loaded]
        for row in rows:
            if row.ok and row.label in fake_images:
                row.set_values["rfid"] = perceptual.rfid(inception, real, fake_images[row.label])
        metric_keys.insert(metric_keys.index("saturation_ratio"), "rfid")

    for row in rows:
        row.summary = {k: mean_ci(v) for k, v in row.values.items() if k != "rfid"}
        if row.ok:
            row.flags = M.colour_flags(
                row.mean("saturation_ratio"), row.mean("colourfulness_change"), row.mean("delta_e")
            )
    ok_rows = [r for r in rows if r.ok]
    winners = {
        key: call_winner(M.METRICS[key], {r.label: r.values[key] for r in ok_rows})
        if key != "rfid"
        else Winner(key, None, "set-level metric: no per-image values to test")
        for key in metric_keys
    }
    scales = sorted({int(v) for r in ok_rows for v in r.values.get("ms_ssim_scales", []) if math.isfinite(v)})
    settings = {
        "device": str(dev),
        "precisions": precisions,
        "tilings": tilings,
        "max_size": max_size,
        "latents_from": None if latents_from is None else _spec_name(latents_from),
        "ms_ssim_scales": scales,
        "difference_amplification": amplify,
        "confidence": 0.95,
        "torch": torch.__version__,
    }
    for row in rows:
        row.values.pop("ms_ssim_scales", None)
        row.summary.pop("ms_ssim_scales", None)
    comparison = Comparison(
        rows=rows,
        images=[im.info for im in loaded],
        skipped_images=skipped,
        metrics=metric_keys,
        skipped_metrics=skipped_metrics,
        winners=winners,
        settings=settings,
        report_dir=writer.root if writer else None,
    )
    if writer:
        writer.finish(comparison)
    return comparison


def _measure_row(
    row: Row,
    vae: VAE,
    loaded: list[_Image],
    source_latents: list[tuple[torch.Tensor, Any]] | None,
    dev: torch.device,
    lpips_model: Any,
    writer: Any,
    fake_images: dict[str, list[torch.Tensor]],
    say: Progress,
    warmup: bool,
    keep_outputs: bool,
) -> None:
    """Fill ``row`` with the per-image values of ``vae`` at the row's precision and tiling (or its failure)."""
    from vaekit.eval import perceptual

    row.values["ms_ssim_scales"] = [math.nan] * len(loaded)
    try:
        opts = pipeline.CodecOptions(precision=row.precision, tiling=row.tiling)
        if warmup:
            side = min(min(im.rgb.shape[1:]) for im in loaded)
            _warm_up(vae, opts, latents_only=source_latents is not None, side=side)
    except BadInputError as e:
        if source_latents is not None:
            row.status, row.reason = STATUS_INCOMPATIBLE, f"cannot decode these latents: {_first_line(e)}"
        else:
            row.status, row.reason = STATUS_FAILED, _first_line(e)
        return
    except Exception as e:  # noqa: BLE001 - any failure of one VAE is reported in its row
        row.status, row.reason = STATUS_FAILED, _first_line(e)
        return
    fakes: list[torch.Tensor] = []
    for i, im in enumerate(loaded):
        latent = source_latents[i] if source_latents is not None else None
        try:
            out, t_enc, t_dec, peak, notes = _roundtrip_one(vae, im.rgb, opts, latent, dev)
        except Exception as e:  # noqa: BLE001
            status = STATUS_INCOMPATIBLE if source_latents is not None and isinstance(e, BadInputError) else None
            row.status = status or STATUS_FAILED
            row.reason = f"image {im.info.name}: {_first_line(e)}"
            return
        for note in notes:
            note = note.replace("item 0", f"image {im.info.name}")
            if note not in row.notes:
                row.notes.append(note)
        mpx = im.rgb.shape[1] * im.rgb.shape[2] / 1e6
        values = M.image_metrics(im.rgb, out)
        values["encode_s_per_mpx"] = t_enc / mpx
        values["decode_s_per_mpx"] = t_dec / mpx
        values["peak_mib"] = peak / 2**20
        if lpips_model is not None:
            values["lpips"] = perceptual.lpips(lpips_model, im.rgb, out)
        for key, v in values.items():
            if key in row.values:
                row.values[key][i] = v
        if writer is not None:
            row.files.append(writer.reconstruction(row.label, im.info.name, im.rgb, out))
        if keep_outputs:
            fakes.append(out)
        say(f"  {im.info.name}: PSNR {values['psnr']:.2f} dB, SSIM {values['ssim']:.4f}")
    if keep_outputs:
        fake_images[row.label] = fakes
