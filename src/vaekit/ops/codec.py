"""Encode and decode at any size and precision: padding, batching, tiling dispatch, the NaN guard.

Batches of mixed sizes are processed as groups of equal size, each image padded to the model's multiple on its
own, so every image gets exactly the latent it would get if it were encoded alone (padding all images to one
common size would change the results: reflect padding feeds into GroupNorm statistics and attention).

Results mirror the input: a tensor in gives a tensor out; a list in gives a list out (one tensor per image).
"""

from __future__ import annotations

import dataclasses
import importlib
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vaekit import validation
from vaekit.errors import BadInputError, VaekitError
from vaekit.ops import precision as prec
from vaekit.ops.device import choose_device, default_budget
from vaekit.ops.images import crop_padding, pad_to_multiple

if TYPE_CHECKING:
    from vaekit.vae import VAE

TILING_MODES = ("auto", "off", "exact", "fast")

Padding = tuple[int, int, int, int]
Size = tuple[int, int]


@dataclass(frozen=True)
class CodecOptions:
    """How to run an encode or decode: precision, tiling, memory budget, sampling, device."""

    precision: str = "fp32"  # "fp32" | "bf16" | "fp16" | "auto"
    tiling: str = "auto"  # "auto" | "off" | "exact" | "fast"
    max_memory: int | None = None  # bytes; None = a fraction of the device's free memory
    tile_size: int | None = None  # force a tile size (pixels), else derived from max_memory
    sample: bool = False  # sample the posterior instead of taking its mode
    seed: int | None = None
    compile: bool = False  # torch.compile the model's encode/decode
    device: str | None = None  # run on another device than the weights' (a converted copy is cached)
    channels_last: bool = True  # NHWC activations: faster convolutions with oneDNN and cuDNN
    fast: bool = True  # run rewritten inference blocks (vaekit.ops.fastpath): same maths, fewer operations

    def __post_init__(self) -> None:
        prec.parse_precision(self.precision)
        if self.tiling not in TILING_MODES:
            raise BadInputError(f"unknown tiling mode {self.tiling!r}; use one of {', '.join(TILING_MODES)}")
        if self.max_memory is not None and self.max_memory <= 0:
            raise BadInputError(f"max_memory must be a positive number of bytes, got {self.max_memory}")
        if self.tile_size is not None and self.tile_size <= 0:
            raise BadInputError(f"tile_size must be a positive number of pixels, got {self.tile_size}")


def make_options(options: CodecOptions | None = None, **kwargs: Any) -> CodecOptions:
    """``options`` (default :class:`CodecOptions`) with fields replaced; unknown names are a clear error."""
    base = options or CodecOptions()
    names = {f.name for f in dataclasses.fields(CodecOptions)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise BadInputError(f"unknown codec option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return dataclasses.replace(base, **kwargs) if kwargs else base


@dataclass
class EncodeResult:
    """Latents (normalised as diffusion models use them), the raw posterior, and what it took to get them."""

    latents: torch.Tensor | list[torch.Tensor]
    mean: torch.Tensor | list[torch.Tensor] | None  # raw posterior mean (None for deterministic encoders)
    logvar: torch.Tensor | list[torch.Tensor] | None  # raw posterior log-variance (None for deterministic ones)
    image_sizes: list[Size]  # (width, height) of each input image
    paddings: list[Padding]  # (left, top, right, bottom) pixels added to each image
    notes: list[str] = field(default_factory=list)
    dtype: torch.dtype = torch.float32
    tiled: bool = False
    sampled: bool = False
    alphas: list[torch.Tensor | None] = field(default_factory=list)  # alpha kept aside from RGBA inputs


@dataclass
class DecodeResult:
    """Images in [0, 1] (float32, cropped to their original size) and what it took to get them."""

    images: torch.Tensor | list[torch.Tensor]
    notes: list[str] = field(default_factory=list)
    dtype: torch.dtype = torch.float32
    tiled: bool = False


# --- grouping ---------------------------------------------------------------------------------------------------
def _groups(shapes: Sequence[tuple[int, ...]]) -> list[list[int]]:
    """Indices grouped by equal shape, in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(shapes):
        groups.setdefault(tuple(s), []).append(i)
    return list(groups.values())


# --- tiling dispatch -------------------------------------------------------------------------------------------
def _tiling_module() -> Any | None:
    try:
        return importlib.import_module("vaekit.ops.tiling")
    except ModuleNotFoundError as e:
        if e.name != "vaekit.ops.tiling":
            raise
        return None


def _report_notes(report: object) -> list[str]:
    notes = report.get("notes") if isinstance(report, dict) else getattr(report, "notes", None)
    return [str(n) for n in notes or []]


@dataclass(frozen=True)
class _Plan:
    tiled: bool
    mode: str  # "exact" | "fast" when tiled
    chunk: int  # batch items per model call when untiled
    budget: int


def _plan(
    vae: VAE, op: str, item_shape: tuple[int, ...], n: int, dtype: torch.dtype, opts: CodecOptions, dev: torch.device
) -> _Plan:
    """Decide tiled or not, and how many items per call, from the memory estimate and the budget."""
    budget = opts.max_memory or default_budget(dev)
    if opts.tiling == "off":
        return _Plan(False, "", n, budget)
    tiling = _tiling_module()
    if opts.tiling in ("exact", "fast"):
        if tiling is None:
            raise VaekitError(f"tiling={opts.tiling!r} needs vaekit.ops.tiling, which this installation lacks")
        return _Plan(True, opts.tiling, 1, budget)
    if opts.tile_size is not None and tiling is not None:
        return _Plan(True, tiling.auto_mode(vae.config), 1, budget)
    if tiling is None:
        return _Plan(False, "", n, budget)
    one = int(tiling.estimate_memory(vae.config, op, (1, *item_shape), dtype))
    if one > budget:
        return _Plan(True, tiling.auto_mode(vae.config), 1, budget)
    return _Plan(False, "", max(1, min(n, budget // max(one, 1))), budget)


# --- compiled callables ----------------------------------------------------------------------------------------
_COMPILED: weakref.WeakKeyDictionary[nn.Module, dict[str, Callable[..., Any]]] = weakref.WeakKeyDictionary()


def _model_fn(model: nn.Module, op: str, compile_: bool) -> Callable[..., Any]:
    fn = getattr(model, op)
    if not compile_:
        return fn
    per_model = _COMPILED.setdefault(model, {})
    if op not in per_model:
        per_model[op] = torch.compile(fn, dynamic=False)
    return per_model[op]


def _runner(
    vae: VAE, op: str, plan: _Plan, opts: CodecOptions, dev: torch.device, notes: list[str]
) -> Callable[[torch.dtype, torch.Tensor], torch.Tensor]:
    """A function (dtype, images in [0, 1] or raw latents) -> model output (moments or images), untiled or tiled."""

    def run(dtype: torch.dtype, x: torch.Tensor) -> torch.Tensor:
        # The tiling module walks the model's own blocks, so only untiled runs get the rewritten fast blocks.
        model = prec.execution_model(vae.model, dtype, dev, opts.channels_last, fast=opts.fast and not plan.tiled)
        fmt = torch.channels_last if opts.channels_last else torch.contiguous_format
        x = x.to(device=dev, dtype=dtype, memory_format=fmt)
        if plan.tiled:
            tiling = _tiling_module()
            fn = tiling.tiled_encode if op == "encode" else tiling.tiled_decode  # type: ignore[union-attr]
            out, report = fn(model, x, plan.mode, plan.budget, opts.tile_size, fp32_fallback=True)
            notes.extend(_report_notes(report))
        else:
            out = _model_fn(model, op, opts.compile)(x)
        if isinstance(out, tuple):  # KL encode: (mean, logvar) -> moments
            out = torch.cat(out, dim=1)
        return out

    return run


# --- encode ----------------------------------------------------------------------------------------------------
def _stack(items: list[torch.Tensor]) -> torch.Tensor:
    return items[0].unsqueeze(0) if len(items) == 1 else torch.stack(items)


def encode(
    vae: VAE,
    images: torch.Tensor | list[torch.Tensor],
    options: CodecOptions | None = None,
    generator: torch.Generator | None = None,
) -> EncodeResult:
    """Images in [0, 1] (N, 3, H, W) or a list of (3, H, W) of any sizes -> scaled latents and the posterior."""
    opts = options or CodecOptions()
    vae.require("encoder")
    items, was_tensor = validation.items(images, "images")
    in_ch = vae.config.in_channels
    checked = [validation.image(img, in_ch, i) for i, img in enumerate(items)]  # all checks before any work
    dev = choose_device(opts.device) if opts.device else vae.device
    dtype = prec.resolve_dtype(opts.precision, dev)
    gaussian = vae.gaussian
    mult = vae.downscale
    notes: list[str] = []
    moments: list[torch.Tensor | None] = [None] * len(items)
    sizes: list[Size] = [(int(img.shape[2]), int(img.shape[1])) for img, _ in checked]
    paddings: list[Padding] = [(0, 0, 0, 0)] * len(items)
    any_tiled = False
    for group in _groups([img.shape for img, _ in checked]):
        batch = _stack([checked[i][0] for i in group]).float()
        batch, pad = pad_to_multiple(batch, mult)
        plan = _plan(vae, "encode", tuple(batch.shape[1:]), len(group), dtype, opts, dev)
        any_tiled |= plan.tiled
        run = _runner(vae, "encode", plan, opts, dev, notes)
        for start in range(0, len(group), plan.chunk):
            ids = group[start : start + plan.chunk]
            with torch.inference_mode():
                x = batch[start : start + plan.chunk].to(dev)
                out, item_notes = prec.run_guarded(run, x, dtype, "encode", item_ids=ids)
            notes.extend(item_notes)
            for j, i in enumerate(ids):
                moments[i] = out[j]
                paddings[i] = pad
    # Outside inference mode from here: the results are ordinary tensors that autograd code can use.
    latents: list[torch.Tensor] = []
    means: list[torch.Tensor] = []
    logvars: list[torch.Tensor] = []
    for m in moments:
        assert m is not None
        if not gaussian:
            latents.append(vae.normalise(m.clone()[None])[0])
            continue
        mean, logvar = m.clone().chunk(2, dim=0)
        logvar = logvar.clamp(-30.0, 20.0)
        z = mean
        if opts.sample:
            gen = generator
            if gen is None and opts.seed is not None:
                gen = torch.Generator().manual_seed(opts.seed)
                generator = gen  # one stream for the whole batch, in item order
            noise = torch.randn(mean.shape, generator=gen, dtype=torch.float32).to(mean.device)
            z = mean + torch.exp(0.5 * logvar) * noise
        means.append(mean)
        logvars.append(logvar)
        latents.append(vae.normalise(z[None])[0])

    def shaped(xs: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        return torch.stack(xs) if was_tensor else xs

    return EncodeResult(
        latents=shaped(latents),
        mean=shaped(means) if gaussian else None,
        logvar=shaped(logvars) if gaussian else None,
        image_sizes=sizes,
        paddings=paddings,
        notes=notes,
        dtype=dtype,
        tiled=any_tiled,
        sampled=bool(opts.sample and gaussian),
        alphas=[a for _, a in checked],
    )


# --- decode ----------------------------------------------------------------------------------------------------
def _per_item(value: object, n: int, length: int, what: str) -> list[tuple[int, ...] | None]:
    """One (w, h) / padding for all items, or a list with one per item."""
    if value is None:
        return [None] * n
    if isinstance(value, (list, tuple)) and len(value) == length and all(isinstance(v, int) for v in value):
        return [tuple(int(v) for v in value)] * n
    if isinstance(value, (list, tuple)) and len(value) == n:
        out = []
        for v in value:
            if v is not None and not (isinstance(v, (list, tuple)) and len(v) == length):
                raise BadInputError(f"{what} must be {length} integers or one such entry per item, got {value!r}")
            out.append(None if v is None else tuple(int(x) for x in v))
        return out
    raise BadInputError(f"{what} must be {length} integers or a list with one entry per item, got {value!r}")


def decode(
    vae: VAE,
    latents: torch.Tensor | list[torch.Tensor],
    options: CodecOptions | None = None,
    image_size: Size | Sequence[Size | None] | None = None,
    padding: Padding | Sequence[Padding | None] | None = None,
) -> DecodeResult:
    """Normalised latents -> images in [0, 1], float32, ``padding`` (pixels) removed and cropped to ``image_size``.

    ``image_size`` is (width, height); both it and ``padding`` take one value for all items or one per item.
    """
    opts = options or CodecOptions()
    vae.require("decoder")
    items, was_tensor = validation.items(latents, "latents")
    for i, z in enumerate(items):
        validation.latent(z, vae.latent_channels, vae.family, i)
    n = len(items)
    sizes = _per_item(image_size, n, 2, "image_size")
    pads = _per_item(padding, n, 4, "padding")
    mult = vae.downscale
    out_sizes: list[Size] = []
    for i, z in enumerate(items):
        w, h = int(z.shape[2]) * mult, int(z.shape[1]) * mult
        left, top, right, bottom = pads[i] or (0, 0, 0, 0)
        if min(left, top, right, bottom) < 0 or left + right >= w or top + bottom >= h:
            raise BadInputError(f"padding {pads[i]} does not fit the {w}x{h} image decoded from latent {i}")
        w, h = w - left - right, h - top - bottom
        if sizes[i] is not None:
            sw, sh = sizes[i]  # type: ignore[misc]
            if not (0 < sw <= w and 0 < sh <= h):
                raise BadInputError(f"image_size {sw}x{sh} does not fit the {w}x{h} image decoded from latent {i}")
            w, h = sw, sh
        out_sizes.append((w, h))
    if was_tensor and len(set(out_sizes)) > 1:
        raise BadInputError("the images have different sizes: pass the latents as a list to get a list of images")
    dev = choose_device(opts.device) if opts.device else vae.device
    dtype = prec.resolve_dtype(opts.precision, dev)
    notes: list[str] = []
    decoded: list[torch.Tensor | None] = [None] * n
    any_tiled = False
    for group in _groups([z.shape for z in items]):
        batch = vae.denormalise(_stack([items[i] for i in group]).float())  # raw latents: what the decoder takes
        plan = _plan(vae, "decode", tuple(batch.shape[1:]), len(group), dtype, opts, dev)
        any_tiled |= plan.tiled
        run = _runner(vae, "decode", plan, opts, dev, notes)
        for start in range(0, len(group), plan.chunk):
            ids = group[start : start + plan.chunk]
            with torch.inference_mode():
                z = batch[start : start + plan.chunk].to(dev)
                out, item_notes = prec.run_guarded(run, z, dtype, "decode", item_ids=ids)
            notes.extend(item_notes)
            for j, i in enumerate(ids):
                decoded[i] = out[j]
    images: list[torch.Tensor] = []
    for i, img in enumerate(decoded):
        assert img is not None
        if pads[i] is not None:
            img = crop_padding(img, pads[i])  # type: ignore[arg-type]
        w, h = out_sizes[i]
        img = img[:, :h, :w]
        images.append(img.clamp(0, 1).contiguous())  # a fresh, ordinary (non-inference) tensor
    return DecodeResult(images=torch.stack(images) if was_tensor else images, notes=notes, dtype=dtype, tiled=any_tiled)


def roundtrip(
    vae: VAE, images: torch.Tensor | list[torch.Tensor], options: CodecOptions | None = None
) -> tuple[EncodeResult, DecodeResult]:
    """Encode then decode, cropping back to each input's size; RGBA inputs get their alpha back unchanged."""
    enc = encode(vae, images, options)
    dec = decode(vae, enc.latents, options, image_size=enc.image_sizes, padding=enc.paddings)
    if any(a is not None for a in enc.alphas):
        imgs = dec.images
        merged = [
            torch.cat([img, a.to(img.device, img.dtype)]) if a is not None else img
            for img, a in zip(list(imgs), enc.alphas, strict=True)
        ]
        dec.images = torch.stack(merged) if isinstance(imgs, torch.Tensor) else merged  # a tensor: all have alpha
    return enc, dec
