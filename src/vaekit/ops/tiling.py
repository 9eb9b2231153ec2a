"""Tiled encode and decode within a memory budget: ``exact`` (what the untiled network computes) and ``fast``.

KL autoencoder, exact: the network runs as stages split at every GroupNorm (see :mod:`vaekit.ops.tiling_engine`);
each GroupNorm uses statistics gathered over the whole image from all tiles, each 3x3 conv reads a one-pixel halo
from the whole input activation, and the mid-block attention attends over the whole latent with the queries cut
into tiles and chunks. Whole activations live in RAM when the budget allows, else in temporary files.

KL autoencoder, fast: the stage list is cut in two. Below the cut everything runs exactly as above, in RAM: always
the latent-resolution part (decoder conv_in, mid block, lowest level; encoder lowest level, mid block, conv_out),
and as many further stages as the budget holds (all of them when it holds everything: fast is then exact). Above
the cut, at the high-resolution end, the stages run once per tile with a halo covering their receptive field and
GroupNorm statistics estimated on a downscaled copy of the cut's input (the idea of the A1111 "Tiled VAE"
extension): tiles agree exactly with each other, there are no seams to blend, and the only error left is that of
the estimated statistics.

Tiny autoencoder (no GroupNorm): each tile runs with a halo covering the receptive field, aligned to the downscale
factor; both modes are exact.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vaekit import models
from vaekit.errors import BadInputError
from vaekit.models.config import KLConfig, TinyConfig, VAEConfig
from vaekit.ops import tiling_engine as eng
from vaekit.ops.tiling_engine import Stage
from vaekit.ops.tiling_region import Border, Margins, run_region

MODES = ("exact", "fast")
# Measured untiled peak / modelled live-tensor bytes (benchmarks/bench_tiling.py --calibrate); see docs/tiling.md.
CALIBRATION = 1.15
# Tiled runs allocate many differently sized per-tile temporaries; measured peaks (bench_tiling.py part 2) were about
# twice the modelled bytes (allocator fragmentation, oneDNN reorders), so tile plans count the temporaries with this
# factor. Whole activations, attention keys and values and file bands are single allocations, counted once.
TILED_CALIBRATION = 2.4
# Smallest tile side, in latent pixels, worth running from RAM stores before spilling whole activations to disk.
MIN_RAM_TILE = 8
_HUGE = 1 << 30
DOWNSCALE_MODE = "nearest"
# Fast KL: sizes of the statistics pass relative to the full input, largest first; the plan takes the largest that
# fits the budget. Measured on random sd1 weights (docs/tiling.md): 0.5 -> 36-38 dB, 0.75 -> 42-45 dB.
STATS_SCALES = (0.75, 0.5, 0.25, 0.125, 0.0625, 0.03125)
# rows per band (and tile side) of the statistics pass when its activations spill to files: the largest that fits
STATS_TILES = (512, 256, 128, 64)


@dataclass(frozen=True)
class TilePlan:
    """How one tiled op runs: tile grid, halo, where whole activations are kept, and the estimated peak."""

    mode: str
    op: str
    tile: int  # tile side in latent pixels
    tile_px: int  # tile side in image pixels
    grid: tuple[int, int]  # tile rows, tile columns
    halo: int  # halo in latent pixels (exact KL: 1 conv pixel per stage, exchanged at every stage: 0 here)
    store: str  # where whole activations live: "ram" | "disk" (exact KL; fast KL's latent-size part), "none" (tiny)
    stats_scale: float  # fast KL: size of the statistics pass relative to the input (1.0 otherwise)
    estimated_peak: int  # bytes, activations only (weights and the input excluded, the output included)
    budget: int
    stats_store: str = "ram"  # fast KL: where the statistics pass keeps its whole activations ("ram" | "disk")
    stats_tile: int = STATS_TILES[-1]  # fast KL, statistics pass in files: rows per band and tile side
    # fast KL: the range of stages run tile by tile in one pass with estimated statistics (the rest run exactly);
    # empty when the whole op fits the exact engine in RAM
    estimated: tuple[int, int] = (0, 0)

    @property
    def tiles(self) -> int:
        """Number of tiles."""
        return self.grid[0] * self.grid[1]


@dataclass
class TileReport:
    """What a tiled op did: the plan, passes over the data, notes (fp32 recomputes...) and measured error."""

    plan: TilePlan
    passes: int
    notes: list[str] = field(default_factory=list)
    error: dict[str, float] | None = None  # {"psnr_db", "max_abs", "rmse"} against untiled when asked

    @property
    def tiles(self) -> int:
        """Number of tiles."""
        return self.plan.tiles

    @property
    def tile_size(self) -> int:
        """Tile side in image pixels."""
        return self.plan.tile_px

    @property
    def halo(self) -> int:
        """Halo in image pixels."""
        return self.plan.halo * (self.plan.tile_px // max(self.plan.tile, 1))


# --- network descriptions --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _meta_model(cfg: VAEConfig) -> nn.Module:
    from vaekit.models import build

    return build(cfg, "meta")


def _stages(model: nn.Module, op: str) -> list[Stage]:
    return eng.decoder_stages(model) if op == "decode" else eng.encoder_stages(model)


def _split(stages: list[Stage], op: str, in_shape: tuple[int, ...], latent_h: int) -> tuple[int, int]:
    """(start, end) of the high-resolution part: the stages whose output is not at latent resolution."""
    shapes = eng.store_shapes(stages, in_shape)
    hi = [k for k, st in enumerate(stages) if shapes[st.dst][2] != latent_h]
    return hi[0], hi[-1] + 1


def _elt(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


# --- memory model ----------------------------------------------------------------------------------------------
def _area(shape: tuple[int, ...]) -> int:
    return shape[0] * shape[2] * shape[3]


def _untiled_stage_bytes(st: Stage, shapes: dict[str, tuple[int, ...]], e: int) -> int:
    """Live bytes while the plain module forward runs the part of the network ``st`` stands for."""
    src, out = shapes[st.src], shapes[st.dst]
    cin, cout = src[1], out[1]
    n_src, n_out = cin * _area(src), cout * _area(out)
    live = n_src + n_out
    if st.attn is not None:
        live += 6 * n_src  # normed input, q, k, v, attention output, projection
    elif st.resample == "up":
        live += cin * _area(out)  # the nearest-upsampled copy
    elif st.resample == "down":
        live += n_src  # the padded copy
    else:
        live += 2 * n_src if st.norm is not None else n_src  # norm output and SiLU output
    if st.pre is not None:
        live += n_src
    if st.skip is not None:
        skip = shapes[st.skip]
        live += skip[1] * _area(skip) + (n_out if st.shortcut is not None else 0)
    return live * e


def _tile_temp_bytes(st: Stage, shapes: dict[str, tuple[int, ...]], step: int, e: int, region_in: bool) -> int:
    """Temporaries of one tile of one stage (output window ``step`` x ``step`` at the stage's resolution)."""
    src, out = shapes[st.src], shapes[st.dst]
    n, cin, cout = src[0], src[1], out[1]
    th, tw = min(step, out[2]), min(step, out[3])
    if st.attn is not None:
        return n * cin * th * tw * (4 + 6 * e)  # normed, q, out, proj, sum (keys and values: see _exact_need)
    fin = 2 if st.resample == "down" else 1
    rin = cin * (fin * th + 2) * (fin * tw + 2) if st.resample != "up" else cin * (th // 2 + 2) * (tw // 2 + 2)
    temps = rin * (4 + e) if st.norm is not None else rin * e  # float32 norm result and its cast
    if st.resample == "up":
        temps += 2 * cin * (th + 2) * (tw + 2) * e  # upsampled and padded
    else:
        temps += rin * e  # padded copy
    if region_in:  # disk stores: the input region is a fresh read, not a view
        temps += rin * e
    temps += cout * th * tw * (3 * e + 4)  # conv output, residual, sum; float32 copy for the statistics
    return n * temps


def _live_stores(stages: list[Stage], shapes: dict[str, tuple[int, ...]], e: int) -> list[int]:
    """Bytes of whole activations alive during each stage when stores are kept in RAM (the input excluded)."""
    last = eng.last_uses(stages)
    alive: dict[str, int] = {}
    result = []
    for k, st in enumerate(stages):
        alive[st.dst] = shapes[st.dst][1] * _area(shapes[st.dst]) * e
        result.append(sum(alive.values()))
        for name in (st.src, st.skip):
            if name is not None and name in alive and last.get(name) == k:
                del alive[name]
    return result


def _band_bytes(st: Stage, shapes: dict[str, tuple[int, ...]], step: int, e: int) -> int:
    """Row bands a stage holds when its stores are on disk: input rows (with halo), residual rows, output rows."""
    src, out = shapes[st.src], shapes[st.dst]
    n, rows = src[0], min(step, out[2])
    a, b = eng.read_range(st, 0, rows, src[2])
    band = src[1] * (b - a + 2) * src[3] * e
    band += out[1] * rows * out[3] * e * 2  # output band and the contiguous copy written to the file
    if st.skip is not None:
        band += shapes[st.skip][1] * rows * out[3] * e
    return n * band


def _exact_need(
    stages: list[Stage],
    shapes: dict[str, tuple[int, ...]],
    tile: int,
    e: int,
    latent_h: int,
    disk: bool,
    uniform: bool = False,
) -> int:
    """Estimated peak bytes of :func:`tiling_engine.run_stages` with latent tile side ``tile`` (``uniform``: the
    same ``tile`` pixels at every store's own resolution, as the statistics pass runs)."""
    out_bytes = shapes["out"][1] * _area(shapes["out"]) * e
    live = _live_stores(stages, shapes, e)
    peak = 0
    for k, st in enumerate(stages):
        step = tile if uniform else tile * (shapes[st.dst][2] // latent_h)
        temps = _tile_temp_bytes(st, shapes, step, e, region_in=disk) * TILED_CALIBRATION
        kv = 2 * _area(shapes[st.src]) * shapes[st.src][1] * e if st.attn is not None else 0
        if disk:
            need = out_bytes + _band_bytes(st, shapes, step, e) + temps + kv
        else:
            need = live[k] + temps + kv
        peak = max(peak, need)
    return int(peak)


def _candidates(size: int) -> list[int]:
    """Tile sides that give distinct grids over ``size`` latent pixels, largest first."""
    return sorted({math.ceil(size / n) for n in range(1, size + 1)}, reverse=True)


# --- public: estimates and plans -------------------------------------------------------------------------------
def estimate_memory(cfg: VAEConfig, op: str, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Peak activation bytes of the untiled ``op`` ("encode": image shape N,C,H,W; "decode": latent shape),
    calibrated against measured peaks; weights and the input are not counted, the output is."""
    _check_op(op)
    e = _elt(dtype)
    if isinstance(cfg, TinyConfig):
        return int(_tiny_bytes(_meta_model(cfg), op, shape, e) * CALIBRATION)
    if cfg.kind in models.FOREIGN:
        return int(_traced_bytes(_meta_model(cfg), op, shape, e) * CALIBRATION)
    stages = _stages(_meta_model(cfg), op)
    shapes = eng.store_shapes(stages, tuple(shape))
    return int(max(_untiled_stage_bytes(st, shapes, e) for st in stages) * CALIBRATION)


def plan_tiles(
    cfg: VAEConfig,
    op: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    max_memory: int,
    tile_size: int | None = None,
    mode: str = "exact",
) -> TilePlan:
    """Choose the tile grid (and halo, stores, statistics pass) so the estimated peak stays within ``max_memory``."""
    _check_op(op)
    _check_mode(mode)
    if max_memory <= 0:
        raise BadInputError(f"max_memory must be a positive number of bytes, got {max_memory}")
    f = cfg.downscale
    latent = (shape[2], shape[3]) if op == "decode" else (shape[2] // f, shape[3] // f)
    forced = None
    if tile_size is not None:
        if tile_size <= 0 or tile_size % f:
            raise BadInputError(f"tile_size must be a positive multiple of {f} pixels, got {tile_size}")
        forced = tile_size // f
    e = _elt(dtype)
    model = _meta_model(cfg)
    if isinstance(cfg, TinyConfig):
        return _plan_tiny(model, cfg, op, shape, latent, e, max_memory, forced, mode)
    if cfg.kind in models.FOREIGN:
        return _plan_region(model, cfg, op, shape, latent, e, max_memory, forced, mode)
    assert isinstance(cfg, KLConfig)
    stages = _stages(model, op)
    if mode == "fast":
        return _plan_fast(stages, cfg, op, shape, latent, e, max_memory, forced)
    shapes = eng.store_shapes(stages, tuple(shape))
    for disk in (False, True):
        found = _exact_tile(stages, shapes, latent, e, max_memory, forced, disk)
        if found is not None:
            t, need = found
            grid = (math.ceil(latent[0] / t), math.ceil(latent[1] / t))
            return TilePlan("exact", op, t, t * f, grid, 0, "disk" if disk else "ram", 1.0, need, max_memory)
    smallest = _exact_need(stages, shapes, forced or 1, e, latent[0], True)
    what = f"a {forced * f} px tile" if forced else "the smallest tile"
    raise BadInputError(
        f"max_memory {_fmt(max_memory)} is too small for exact tiled {op} of {_shape_str(shape)}: "
        f"{what} needs about {_fmt(smallest)}"
    )


def _exact_tile(
    stages: list[Stage],
    shapes: dict[str, tuple[int, ...]],
    latent: tuple[int, int],
    e: int,
    budget: int,
    forced: int | None,
    disk: bool,
) -> tuple[int, int] | None:
    """The largest latent tile side (and its estimated peak) for the exact engine within ``budget``, or None. RAM
    stores are used only with tiles of at least MIN_RAM_TILE (unless the tile is forced): below that, files win."""
    side = max(latent)
    for t in [forced] if forced is not None else _candidates(side):
        need = _exact_need(stages, shapes, t, e, latent[0], disk)
        if need <= budget and (disk or t >= min(MIN_RAM_TILE, side) or forced is not None):
            return t, need
    return None


def _tile_parts(stages: list[Stage], op: str, lo: int, hi: int) -> list[tuple[int, int]]:
    """Candidate stage ranges for fast mode's single tile pass, the smallest (most stages exact) first.

    The range always touches the high-resolution end of the network (the decoder's output, the encoder's input)
    and lies within ``[lo, hi)``, the stages above latent resolution; everything outside it runs through the
    exact staged engine. A range must be self-contained: it reads only its own first input and hands on only its
    last output (no residual crosses the cut). The empty range means the whole op runs exactly."""
    last = eng.last_uses(stages)

    def closed(a: int, b: int) -> bool:
        if a == b:
            return True
        made_before = {"in"} | {st.dst for st in stages[:a]}
        reads = {n for st in stages[a:b] for n in (st.src, st.skip) if n is not None}
        if reads & made_before != {stages[a].src}:
            return False
        made_inside = {st.dst for st in stages[a : b - 1]}
        return all(last.get(n, -1) < b for n in made_inside)

    if op == "decode":
        return [(a, hi) for a in range(hi, lo - 1, -1) if closed(a, hi)]
    return [(lo, b) for b in range(lo, hi + 1) if closed(lo, b)]


def _plan_fast(
    stages: list[Stage],
    cfg: KLConfig,
    op: str,
    shape: tuple[int, ...],
    latent: tuple[int, int],
    e: int,
    budget: int,
    forced: int | None,
) -> TilePlan:
    """Fast KL plan: exact statistics for every stage whose whole activations fit the budget in RAM, estimated
    statistics (a downscaled pass) for the high-resolution stages that do not, which then run tile by tile in one
    pass. Preference: the largest statistics pass, then the most stages exact, then the largest tile."""
    f = cfg.downscale
    lo, hi = _split(stages, op, shape, latent[0])
    shapes = eng.store_shapes(stages, tuple(shape))
    out_bytes = shapes["out"][1] * _area(shapes["out"]) * e
    tiles = [forced] if forced is not None else _candidates(max(latent))
    parts = _tile_parts(stages, op, lo, hi)
    widest = parts[-1]

    def grid(t: int) -> tuple[int, int]:
        return (math.ceil(latent[0] / t), math.ceil(latent[1] / t))

    def exact_need(part: list[Stage], in_shape: tuple[int, ...], t: int, disk: bool) -> int:
        return _exact_need(_rename_io(part), eng.store_shapes(_rename_io(part), in_shape), t, e, latent[0], disk)

    if parts[0][0] == parts[0][1]:  # everything exact in RAM: the staged engine is both exact and the fastest
        found = _exact_tile(stages, shapes, latent, e, budget, forced, disk=False)
        if found is not None:
            t, need = found
            return TilePlan("fast", op, t, t * f, grid(t), 0, "ram", 1.0, need, budget, estimated=(0, 0))
    for s in STATS_SCALES:
        for a, b in parts:
            if a == b:
                continue
            part = stages[a:b]
            hi_stages = _rename_io(part)
            hi_in = shapes[stages[a - 1].dst] if a > 0 else tuple(shape)
            hi_out = shapes[part[-1].dst]
            exact_part = stages[:a] if op == "decode" else stages[b:]
            unit_in = hi_in[2] // latent[0]
            halo = math.ceil(eng.receptive_halo(hi_stages, hi_in[2]) / unit_in)
            held = (hi_in[1] * _area(hi_in) if op == "decode" else hi_out[1] * _area(hi_out)) * e
            unit = f if op == "encode" else 1
            small = (hi_in[0], hi_in[1], _down(hi_in[2], s, unit), _down(hi_in[3], s, unit))
            small_shapes = eng.store_shapes(hi_stages, small)
            stats_need = None
            for disk, st_tile in ((False, _HUGE), *((True, t) for t in STATS_TILES)):
                need = (
                    held + small[1] * _area(small) * e + _exact_need(hi_stages, small_shapes, st_tile, e, 1, disk, True)
                )
                if need <= budget:
                    stats_need, stats_store, stats_tile = need, "disk" if disk else "ram", min(st_tile, STATS_TILES[0])
                    break
            if stats_need is None:
                continue
            exact_in = tuple(shape) if op == "decode" else hi_out
            stores = ("ram", "disk") if (a, b) == widest else ("ram",)  # only the latent-size part spills
            for t in tiles:
                th, tw = min(t, latent[0]), min(t, latent[1])
                region = (hi_in[0], hi_in[1], (th + 2 * halo) * unit_in, (tw + 2 * halo) * unit_in)
                tile_need = max(held + out_bytes + _region_need(hi_stages, region, e), stats_need)
                for store in stores:
                    ex = exact_need(exact_part, exact_in, t, store == "disk") + (held if op == "encode" else 0)
                    need = max(ex, tile_need)
                    if need <= budget:
                        return TilePlan(
                            "fast", op, t, t * f, grid(t), halo, store, s, need, budget, stats_store, stats_tile, (a, b)
                        )
    raise BadInputError(
        f"max_memory {_fmt(budget)} is too small for fast tiled {op} of {_shape_str(shape)}"
        + (f" with {forced * f} px tiles" if forced else "")
    )


def _down(size: int, s: float, unit: int) -> int:
    """``size`` scaled by ``s``, rounded up to a multiple of ``unit`` (at least one unit)."""
    return max(unit, math.ceil(size * s / unit) * unit)


def _region_need(stages: list[Stage], in_shape: tuple[int, ...], e: int) -> int:
    """Peak bytes of running ``stages`` on one whole region from RAM stores (one tile per stage)."""
    return _exact_need(stages, eng.store_shapes(stages, in_shape), _HUGE, e, 1, False)


# --- tiny autoencoder --------------------------------------------------------------------------------------------
def _tiny_walk(seq: nn.Sequential) -> list[tuple[nn.Module, float]]:
    """Each layer with the resolution (relative to the input) it reads."""
    res, out = 1.0, []
    for layer in seq:
        out.append((layer, res))
        if isinstance(layer, nn.Upsample):
            res *= float(layer.scale_factor)  # type: ignore[arg-type]
        elif isinstance(layer, nn.Conv2d) and layer.stride[0] == 2:
            res /= 2
    return out


def _tiny_halo(seq: nn.Sequential) -> float:
    """Receptive-field halo of the tiny encoder/decoder in input pixels."""
    halo = 0.0
    for layer, res in _tiny_walk(seq):
        convs = [m for m in layer.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1]
        halo += sum(m.kernel_size[0] // 2 for m in convs) / res
    return halo


def _tiny_bytes(model: nn.Module, op: str, shape: tuple[int, ...], e: int) -> int:
    """Peak live bytes of the tiny encoder/decoder on an input of ``shape``."""
    seq = model.encoder if op == "encode" else model.decoder
    n, _, h, w = shape
    peak = 0
    for layer, res in _tiny_walk(seq):
        convs = [m for m in layer.modules() if isinstance(m, nn.Conv2d)]
        width = max((m.out_channels for m in convs), default=shape[1])
        area = n * h * w * res * res * (4 if isinstance(layer, nn.Upsample) else 1)
        live = (5 if convs and len(convs) > 1 else 3) * width * area  # block: input, 2 temporaries, skip, output
        peak = max(peak, int(live * e))
    return peak


def _plan_tiny(
    model: nn.Module,
    cfg: TinyConfig,
    op: str,
    shape: tuple[int, ...],
    latent: tuple[int, int],
    e: int,
    budget: int,
    forced: int | None,
    mode: str,
) -> TilePlan:
    f = cfg.downscale
    seq = model.encoder if op == "encode" else model.decoder
    halo = math.ceil(_tiny_halo(seq) / (f if op == "encode" else 1))
    out_c = cfg.latent_channels if op == "encode" else cfg.out_channels
    return _plan_single_pass(
        lambda region: _tiny_bytes(model, op, region, e), cfg, op, shape, latent, halo, out_c, e, budget, forced, mode
    )


def _plan_single_pass(
    bytes_of: Callable[[tuple[int, ...]], int],
    cfg: VAEConfig,
    op: str,
    shape: tuple[int, ...],
    latent: tuple[int, int],
    halo: int,
    out_c: int,
    e: int,
    budget: int,
    forced: int | None,
    mode: str,
) -> TilePlan:
    """The largest tile whose region (tile + halo, latent cells) fits the budget, by ``bytes_of(region shape)``."""
    f = cfg.downscale
    unit = f if op == "encode" else 1
    out_bytes = shape[0] * out_c * latent[0] * latent[1] * (f * f if op == "decode" else 1) * e
    for t in [forced] if forced is not None else _candidates(max(latent)):
        th, tw = min(t, latent[0]) + 2 * halo, min(t, latent[1]) + 2 * halo
        region = (shape[0], shape[1], th * unit, tw * unit)
        need = int(bytes_of(region) * TILED_CALIBRATION) + out_bytes
        if need <= budget:
            grid = (math.ceil(latent[0] / t), math.ceil(latent[1] / t))
            return TilePlan(mode, op, t, t * f, grid, halo, "none", 1.0, need, budget)
    raise BadInputError(
        f"max_memory {_fmt(budget)} is too small for tiled {op} of {_shape_str(shape)}"
        + (f" with {forced * f} px tiles" if forced else "")
    )


def region_tile(
    run: Callable[[torch.Tensor], torch.Tensor], region: torch.Tensor, pos: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """One tile of a single-pass tiled run (tiny VAE, fast KL): ``run`` on the region with halo, in ``dtype``."""
    return run(region.to(dtype))


def _single_pass(
    run: Callable[[torch.Tensor, tuple[int, int, int, int], tuple[bool, bool, bool, bool]], torch.Tensor],
    x: torch.Tensor,
    out: torch.Tensor,
    plan: TilePlan,
    unit_in: int,
    unit_out: int,
    fallback: bool,
    notes: list[str],
) -> None:
    """Each tile with its halo through ``run(region, margins, border)``, which returns the tile's core (margins in
    input pixels, border: which sides of the region are image edges); cores are written into ``out`` (no overlap)."""
    t, halo = plan.tile, plan.halo
    lat_h, lat_w = x.shape[2] // unit_in, x.shape[3] // unit_in
    for i, y0 in enumerate(range(0, lat_h, t)):
        y1 = min(y0 + t, lat_h)
        ya, yb = max(0, y0 - halo), min(lat_h, y1 + halo)
        for j, x0 in enumerate(range(0, lat_w, t)):
            x1 = min(x0 + t, lat_w)
            xa, xb = max(0, x0 - halo), min(lat_w, x1 + halo)
            region = x[:, :, ya * unit_in : yb * unit_in, xa * unit_in : xb * unit_in]
            margins = ((y0 - ya) * unit_in, (yb - y1) * unit_in, (x0 - xa) * unit_in, (xb - x1) * unit_in)
            border = (ya == 0, yb == lat_h, xa == 0, xb == lat_w)
            res = eng.guarded(
                lambda dt, region=region, pos=(i, j), m=margins, b=border: region_tile(
                    lambda r: run(r, m, b), region, pos, dt
                ),
                x.dtype,
                fallback,
                f"tile ({i},{j})",
                notes,
            )
            u = unit_out
            out[:, :, y0 * u : y1 * u, x0 * u : x1 * u] = res


# --- architectures with their own module (vaekit.models.FOREIGN): one pass of whole-model regions -------------------
def _traced_bytes(model: nn.Module, op: str, shape: tuple[int, ...], e: int) -> int:
    """Peak live bytes of ``model.encode``/``decode`` on ``shape``, read from the model itself: a forward pass on the
    meta device (no memory, no arithmetic) records each leaf module's input and output sizes; the peak is the largest
    input + output + residual (the input again) of one leaf."""
    peak = 0

    def hook(_m: nn.Module, inputs: tuple, output: object) -> None:
        nonlocal peak
        size_in = sum(t.numel() for t in inputs if isinstance(t, torch.Tensor))
        outs = output if isinstance(output, tuple) else (output,)
        size_out = sum(t.numel() for t in outs if isinstance(t, torch.Tensor))
        peak = max(peak, (2 * size_in + size_out) * e)

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        x = torch.empty(shape, device="meta")
        with torch.no_grad():
            getattr(model, op)(x)
    finally:
        for h in handles:
            h.remove()
    return peak


def _plan_region(
    model: nn.Module,
    cfg: VAEConfig,
    op: str,
    shape: tuple[int, ...],
    latent: tuple[int, int],
    e: int,
    budget: int,
    forced: int | None,
    mode: str,
) -> TilePlan:
    """Tiles of whole-model regions with a halo of the module's receptive field (``TILING_HALO``, latent cells).

    That is exact only for a network whose every part is local: a global part (attention over the frame, a norm
    whose statistics cover the image) sees just its region, so ``exact`` is refused for those and ``fast`` says so.
    """
    mod = models.FOREIGN[cfg.kind]
    global_part = getattr(mod, "GLOBAL_PART", "")
    if mode == "exact" and global_part:
        raise BadInputError(
            f"exact tiling of a {cfg.kind} VAE is not possible: its {global_part} reads the whole image; use "
            "tiling='fast' (tiles with a halo of context) or 'off'"
        )
    out_c = (cfg.latent_channels * (2 if cfg.gaussian else 1)) if op == "encode" else cfg.out_channels
    return _plan_single_pass(
        lambda region: _traced_bytes(model, op, region, e),
        cfg,
        op,
        shape,
        latent,
        int(mod.TILING_HALO[op]),
        out_c,
        e,
        budget,
        forced,
        mode,
    )


def _execute_region(
    model: nn.Module, cfg: VAEConfig, op: str, x: torch.Tensor, plan: TilePlan, fallback: bool, notes: list[str]
) -> tuple[torch.Tensor, int]:
    f = cfg.downscale
    n, _, h, w = x.shape
    if op == "encode":
        out_c = cfg.latent_channels * (2 if cfg.gaussian else 1)
        out = torch.empty((n, out_c, h // f, w // f), dtype=x.dtype, device=x.device)
        unit_in, unit_out = f, 1
    else:
        out = torch.empty((n, cfg.out_channels, h * f, w * f), dtype=x.dtype, device=x.device)
        unit_in, unit_out = 1, f
    dtype = next(model.parameters()).dtype
    fp32: list[nn.Module] = []  # a float32 copy, made when the NaN guard first retries a tile

    def run(region: torch.Tensor, margins: tuple[int, int, int, int], border: object) -> torch.Tensor:
        if region.dtype == dtype:
            y = getattr(model, op)(region)
        else:
            if not fp32:
                fp32.append(copy.deepcopy(model).float())
            y = getattr(fp32[0], op)(region.float())
        y = torch.cat(y, dim=1) if isinstance(y, tuple) else y
        scale = unit_out / unit_in
        top, bottom, left, right = (int(m * scale) for m in margins)
        return y[:, :, top : y.shape[2] - bottom, left : y.shape[3] - right]

    _single_pass(run, x, out, plan, unit_in, unit_out, fallback, notes)
    return _finish(model, op, out) if op == "encode" and cfg.gaussian else out, 1


def _params_fp32(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in module.state_dict().items()}


def _tiny_runner(seq: nn.Module, scale: float) -> Callable[..., torch.Tensor]:
    """Runs the tiny encoder/decoder on a region and crops the core (``scale``: output px per input px)."""
    fp32: dict[str, torch.Tensor] = {}

    def run(x: torch.Tensor, margins: tuple[int, int, int, int], border: object) -> torch.Tensor:
        if x.dtype == next(seq.parameters()).dtype:
            y = seq(x)
        else:
            if not fp32:
                fp32.update(_params_fp32(seq))
            y = torch.func.functional_call(seq, fp32, (x,))
        top, bottom, left, right = (int(m * scale) for m in margins)
        return y[:, :, top : y.shape[2] - bottom, left : y.shape[3] - right]

    return run


# --- public: tiled ops -----------------------------------------------------------------------------------------
def auto_mode(cfg: VAEConfig) -> str:
    """The tiling mode ``tiling="auto"`` takes when a run does not fit: exact where the architecture allows it."""
    if cfg.kind in models.FOREIGN and getattr(models.FOREIGN[cfg.kind], "GLOBAL_PART", ""):
        return "fast"
    return "exact"


def tiled_encode(
    model: nn.Module,
    x: torch.Tensor,
    mode: str = "exact",
    max_memory: int | None = None,
    tile_size: int | None = None,
    fp32_fallback: bool = True,
    measure_error: bool = False,
) -> tuple[tuple[torch.Tensor, torch.Tensor] | torch.Tensor, TileReport]:
    """Tiled ``model.encode``: images in [0, 1] -> (mean, logvar) of a KL model, or a tiny model's latents."""
    return _tiled(model, x, "encode", mode, max_memory, tile_size, fp32_fallback, measure_error)


def tiled_decode(
    model: nn.Module,
    z: torch.Tensor,
    mode: str = "exact",
    max_memory: int | None = None,
    tile_size: int | None = None,
    fp32_fallback: bool = True,
    measure_error: bool = False,
) -> tuple[torch.Tensor, TileReport]:
    """Tiled ``model.decode``: raw latent -> images in [0, 1] (not clamped), as ``model.decode``."""
    out, report = _tiled(model, z, "decode", mode, max_memory, tile_size, fp32_fallback, measure_error)
    assert isinstance(out, torch.Tensor)
    return out, report


def _tiled(
    model: nn.Module,
    x: torch.Tensor,
    op: str,
    mode: str,
    max_memory: int | None,
    tile_size: int | None,
    fallback: bool,
    measure_error: bool,
) -> tuple[tuple[torch.Tensor, torch.Tensor] | torch.Tensor, TileReport]:
    _check_mode(mode)
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, KLConfig | TinyConfig) and getattr(cfg, "kind", None) not in models.FOREIGN:
        raise BadInputError(f"tiling needs a vaekit model, got {type(model).__name__}")
    _check_input(cfg, op, x)
    if max_memory is None:
        from vaekit.ops.device import default_budget

        max_memory = default_budget(x.device)
    plan = plan_tiles(cfg, op, tuple(x.shape), x.dtype, max_memory, tile_size, mode)
    notes: list[str] = []
    with torch.inference_mode():
        foreign = cfg.kind in models.FOREIGN  # those run whole model.encode/decode on regions: [0, 1] in and out
        net_x = model.net_input(x) if op == "encode" and not foreign else x  # the model owns its input range
        try:
            out, passes = _execute(model, cfg, op, net_x, plan, fallback, notes)
        except eng.PromoteToFloat32 as e:
            notes.append(f"{e} overflowed {eng.dtype_name(x.dtype)} even in fp32; whole {op} recomputed in fp32")
            out, passes = _execute(model, cfg, op, net_x.float(), plan, fallback, notes)
            out = _cast_back(out, x.dtype)
        if op == "decode" and not foreign:
            out = model.net_output(out)
        report = TileReport(plan, passes, notes)
        if measure_error:
            report.error = _error(getattr(model, op)(x), out)
    return out, report


def _cast_back(out: torch.Tensor | tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor | tuple:
    if isinstance(out, tuple):
        return tuple(_cast_back(o, dtype) for o in out)
    cast = out.to(dtype)
    return cast if bool(torch.isfinite(cast).all()) else out


def _execute(
    model: nn.Module,
    cfg: VAEConfig,
    op: str,
    x: torch.Tensor,
    plan: TilePlan,
    fallback: bool,
    notes: list[str],
) -> tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor], int]:
    f = cfg.downscale
    if cfg.kind in models.FOREIGN:
        return _execute_region(model, cfg, op, x, plan, fallback, notes)
    if isinstance(cfg, TinyConfig):
        seq = model.encoder if op == "encode" else model.decoder
        n, _, h, w = x.shape
        out_c = cfg.latent_channels if op == "encode" else cfg.out_channels
        oh, ow = (h // f, w // f) if op == "encode" else (h * f, w * f)
        out = torch.empty((n, out_c, oh, ow), dtype=x.dtype, device=x.device)
        unit_in, unit_out = (f, 1) if op == "encode" else (1, f)
        _single_pass(_tiny_runner(seq, unit_out / unit_in), x, out, plan, unit_in, unit_out, fallback, notes)
        return out, 1
    stages = _stages(model, op)
    latent_h = x.shape[2] // f if op == "encode" else x.shape[2]
    attn_chunk = _attn_chunk(plan.budget, latent_h * (x.shape[3] // (f if op == "encode" else 1)))
    if plan.mode == "exact":
        res = eng.run_stages(
            stages,
            x,
            plan.tile,
            scale_of=lambda h: h // latent_h,
            groups=cfg.norm_groups,
            disk=plan.store == "disk",
            fallback=fallback,
            attn_chunk=attn_chunk,
        )
        notes.extend(res.notes)
        return _finish(model, op, res.output), res.passes
    out, passes = _fast(model, cfg, op, x, stages, plan, fallback, notes, attn_chunk)
    return _finish(model, op, out), passes


def _fast(
    model: nn.Module,
    cfg: KLConfig,
    op: str,
    x: torch.Tensor,
    stages: list[Stage],
    plan: TilePlan,
    fallback: bool,
    notes: list[str],
    attn_chunk: int,
) -> tuple[torch.Tensor, int]:
    f = cfg.downscale
    latent_h = x.shape[2] // f if op == "encode" else x.shape[2]
    groups = cfg.norm_groups

    def exact(part: list[Stage], inp: torch.Tensor) -> torch.Tensor:
        res = eng.run_stages(
            _rename_io(part),
            inp,
            plan.tile,
            scale_of=lambda h: max(1, h // latent_h),
            groups=groups,
            disk=plan.store == "disk",
            fallback=fallback,
            attn_chunk=attn_chunk,
        )
        notes.extend(res.notes)
        return res.output

    a, b = plan.estimated
    if a == b:  # every stage fits the exact engine in RAM
        return exact(stages, x), len(stages)
    hi_part = _rename_io(stages[a:b])
    unit = f if op == "encode" else 1
    feed = x if a == 0 else exact(stages[:a], x)
    # statistics pass on a downscaled copy of the tile pass's input
    s = plan.stats_scale
    small_size = (_down(feed.shape[2], s, unit), _down(feed.shape[3], s, unit))
    small = F.interpolate(feed.float(), size=small_size, mode=DOWNSCALE_MODE).to(feed.dtype)
    disk = plan.stats_store == "disk"
    est = eng.run_stages(
        hi_part,
        small,
        plan.stats_tile if disk else _HUGE,
        scale_of=lambda h: 1,
        groups=groups,
        disk=disk,
        fallback=fallback,
    )
    del small
    notes.extend(f"statistics pass: {n}" for n in est.notes)
    stats = dict(est.used_stats)
    if a > 0:  # the feed is whole and exact: its own statistics need no estimate
        feed_stats = eng.stats_of(feed, groups)
        stats.update({st.name: feed_stats for st in hi_part if st.norm is not None and st.src == "in"})

    params = eng.Params()

    def run(region: torch.Tensor, margins: Margins, border: Border) -> torch.Tensor:
        return run_region(hi_part, region, margins, border, stats, params)

    out_shape = eng.store_shapes(hi_part, tuple(feed.shape))["out"]
    hi_out = torch.empty(out_shape, dtype=feed.dtype, device=feed.device)
    # pixels per latent pixel on each side of the tile pass (the encoder's part ends above the latent resolution)
    unit_in = feed.shape[2] // latent_h
    unit_out = out_shape[2] // latent_h
    _single_pass(run, feed, hi_out, plan, unit_in, unit_out, fallback, notes)
    del feed
    if op == "decode":
        return hi_out, 3
    return exact(stages[b:], hi_out), 3


def _rename_io(part: list[Stage]) -> list[Stage]:
    """A slice of the stage list as a network of its own: its first input is ``in``, its last output ``out``."""
    first_src, last_dst = part[0].src, part[-1].dst

    def fix(name: str | None) -> str | None:
        if name == first_src:
            return "in"
        if name == last_dst:
            return "out"
        return name

    return [dataclasses.replace(st, src=fix(st.src), dst=fix(st.dst), skip=fix(st.skip)) for st in part]


def _finish(model: nn.Module, op: str, out: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if op == "decode":
        return out
    mean, logvar = out.chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def _attn_chunk(budget: int, latent_positions: int) -> int:
    """Queries per attention call, so that a float32 score block (queries x all positions) takes <= budget / 8."""
    return max(256, min(16384, budget // (8 * 4 * max(latent_positions, 1))))


def _error(
    ref: torch.Tensor | tuple[torch.Tensor, ...], out: torch.Tensor | tuple[torch.Tensor, ...]
) -> dict[str, float]:
    """PSNR (data range of the reference), max abs and RMS error of ``out`` against the untiled ``ref``."""
    r = ref[0] if isinstance(ref, tuple) else ref
    o = out[0] if isinstance(out, tuple) else out
    r, o = r.double(), o.double()
    rmse = float((r - o).square().mean().sqrt())
    rng = float(r.max() - r.min()) or 1.0
    psnr = float("inf") if rmse == 0 else 20 * math.log10(rng / rmse)
    return {"psnr_db": psnr, "max_abs": float((r - o).abs().max()), "rmse": rmse}


# --- argument checks -------------------------------------------------------------------------------------------
def _check_op(op: str) -> None:
    if op not in ("encode", "decode"):
        raise BadInputError(f"unknown op {op!r}; use 'encode' or 'decode'")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise BadInputError(f"unknown tiling mode {mode!r}; use one of {', '.join(MODES)}")


def _check_input(cfg: VAEConfig, op: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise BadInputError(f"tiled {op} needs a 4-D (N, C, H, W) tensor, got {_shape_str(getattr(x, 'shape', ()))}")
    want = cfg.in_channels if op == "encode" else cfg.latent_channels
    if x.shape[1] != want:
        raise BadInputError(f"tiled {op} input has {x.shape[1]} channels, this VAE takes {want}")
    if min(x.shape) == 0:
        raise BadInputError(f"empty input of shape {_shape_str(x.shape)}")
    f = cfg.downscale
    if op == "encode" and (x.shape[2] % f or x.shape[3] % f):
        raise BadInputError(f"image size {x.shape[3]}x{x.shape[2]} is not a multiple of {f}; pad it first")
    if not x.is_floating_point():
        raise BadInputError(f"tiled {op} needs a float tensor, got {x.dtype}")


def _fmt(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _shape_str(shape: object) -> str:
    return "x".join(str(int(s)) for s in shape) if isinstance(shape, tuple | torch.Size) else str(shape)
