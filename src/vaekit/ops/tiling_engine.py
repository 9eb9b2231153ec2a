"""The staged tile engine behind exact tiling of the KL autoencoder.

The network is cut into *stages*, one per GroupNorm (plus the resamplers and the first conv): a stage reads the
whole activation of its input *store*, normalises it with statistics taken over the whole image, applies SiLU and
one 3x3 convolution (and the residual add where a resnet block ends) and writes the whole activation of its output
store. Each stage runs tile by tile; a tile reads its input region plus a one-pixel halo (the 3x3 kernel) from the
input store, so nothing outside the image is ever zero-padded except where the untiled network pads too. While a
stage writes its output it accumulates per-group (count, mean, M2) per tile and combines them with Chan's parallel
formula in float64: the statistics the next GroupNorm uses are those of the untiled activation, between-tile term
included. Stores live in RAM or, when they do not fit the budget, in files read and written by row bands.
"""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vaekit.models.stages import Stage

Stats = tuple[torch.Tensor, torch.Tensor]  # (mean, var) of shape (N, G), float64


def decoder_stages(model: nn.Module) -> list[Stage]:
    """The KL decoder as stages (the model describes itself: :meth:`AutoencoderKL.stages`)."""
    return model.stages("decode")  # type: ignore[operator]


def encoder_stages(model: nn.Module) -> list[Stage]:
    """The KL encoder as stages (see :meth:`AutoencoderKL.stages`)."""
    return model.stages("encode")  # type: ignore[operator]


# --- stores ----------------------------------------------------------------------------------------------------
class RamStore:
    """A whole activation held in memory."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.shape = tuple(tensor.shape)

    @classmethod
    def empty(cls, shape: tuple[int, ...], like: torch.Tensor) -> RamStore:
        """An uninitialised store with the dtype, device and memory format of ``like``."""
        fmt = torch.channels_last if _is_channels_last(like) else torch.contiguous_format
        return cls(torch.empty(shape, dtype=like.dtype, device=like.device).contiguous(memory_format=fmt))

    def rows(self, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of every item and channel (a view)."""
        return self.tensor[:, :, a:b]

    def band(self, a: int, b: int) -> torch.Tensor:
        """A writable buffer for rows [a, b) (a view: writes land in the store)."""
        return self.tensor[:, :, a:b]

    def commit(self, a: int, b: int, band: torch.Tensor) -> None:
        """Nothing to do: :meth:`band` is a view."""

    def close(self) -> None:
        """Release the memory."""
        self.tensor = torch.empty(0)


class DiskStore:
    """A whole activation kept in a file, row-major as (H, N, C, W) so that any row range is one contiguous read."""

    def __init__(self, shape: tuple[int, ...], like: torch.Tensor, folder: str) -> None:
        self.shape = shape
        self.dtype = like.dtype
        self.device = like.device
        n, c, _, w = shape
        self.row_elems = n * c * w
        self.itemsize = torch.empty(0, dtype=self.dtype).element_size()
        fd, self.path = tempfile.mkstemp(prefix="vaekit-tile-", suffix=".bin", dir=folder)
        self.file = os.fdopen(fd, "r+b")

    def _raw(self, t: torch.Tensor) -> torch.Tensor:
        # numpy has no bfloat16: move the bytes through an integer view of the same width.
        return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[self.itemsize])

    def rows(self, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) read from the file as (N, C, b - a, W)."""
        n, c, _, w = self.shape
        buf = torch.empty((b - a, n, c, w), dtype=self.dtype)
        self.file.seek(a * self.row_elems * self.itemsize)
        self.file.readinto(memoryview(self._raw(buf).numpy()).cast("B"))
        return buf.permute(1, 2, 0, 3).to(self.device)

    def band(self, a: int, b: int) -> torch.Tensor:
        """A fresh buffer for rows [a, b); :meth:`commit` writes it."""
        n, c, _, w = self.shape
        return torch.empty((n, c, b - a, w), dtype=self.dtype, device=self.device)

    def commit(self, a: int, b: int, band: torch.Tensor) -> None:
        """Write rows [a, b) to the file."""
        data = band.permute(2, 0, 1, 3).contiguous().cpu()
        self.file.seek(a * self.row_elems * self.itemsize)
        self.file.write(memoryview(self._raw(data).numpy()).cast("B"))

    def close(self) -> None:
        """Delete the file."""
        self.file.close()
        os.unlink(self.path)


Store = RamStore | DiskStore


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


# --- statistics ------------------------------------------------------------------------------------------------
class GroupStats:
    """Per (item, group) count, mean and M2 of an activation seen tile by tile (Chan et al.'s parallel update)."""

    def __init__(self, n: int, groups: int, device: torch.device) -> None:
        self.groups = groups
        self.count = 0.0
        self.mean = torch.zeros(n, groups, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(n, groups, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        """Fold in one tile (N, C, h, w)."""
        n, c = x.shape[:2]
        xg = x.reshape(n, self.groups, -1).float()
        var, mean = torch.var_mean(xg, dim=-1, correction=0)
        cnt = float(xg.shape[-1])
        total = self.count + cnt
        delta = mean.double() - self.mean
        self.mean += delta * (cnt / total)
        self.m2 += var.double() * cnt + delta.square() * (self.count * cnt / total)
        self.count = total

    def result(self) -> Stats:
        """(mean, biased variance) per item and group, as GroupNorm uses them."""
        return self.mean, self.m2 / self.count


def stats_of(x: torch.Tensor, groups: int, rows: int = 64) -> Stats:
    """Statistics of a whole activation, folded in bands of ``rows`` rows (no full-size temporary)."""
    acc = GroupStats(x.shape[0], groups, x.device)
    for y in range(0, x.shape[2], rows):
        acc.add(x[:, :, y : y + rows])
    return acc.result()


# --- parameters in a given dtype -------------------------------------------------------------------------------
class Params:
    """Module weights in the compute dtype; float32 copies are made on first use (for the NaN fallback)."""

    def __init__(self) -> None:
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def get(self, m: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of ``m`` in ``dtype``."""
        w, b = m.weight, m.bias
        if w.dtype == dtype:
            return w, b
        key = (id(m), dtype)
        if key not in self._cache:
            self._cache[key] = (w.to(dtype), None if b is None else b.to(dtype))
        return self._cache[key]

    def upsample_phases(self, m: nn.Conv2d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of the four 2x2 phase kernels equivalent to ``m`` after nearest x2, in ``dtype``."""
        key = (id(m), dtype, "phases")
        if key not in self._cache:
            from vaekit.ops.fastpath import upsample_phase_weights

            w = upsample_phase_weights(m.weight.float()).to(dtype)
            self._cache[key] = (w, None if m.bias is None else m.bias.to(dtype).repeat(4))
        return self._cache[key]


# --- one tile of one stage ---------------------------------------------------------------------------------------
@dataclass
class TileJob:
    """Everything one tile of one stage needs: its grid position, its output window and the band it reads."""

    stage: Stage
    pos: tuple[int, int]
    y0: int
    y1: int
    x0: int
    x1: int
    src_rows: torch.Tensor  # rows [src_a, src_b) of the input store
    src_a: int
    src_size: tuple[int, int]  # (H, W) of the input store
    in_stats: Stats | None
    skip_rows: torch.Tensor | None  # rows [y0, y1) of the residual store
    params: Params


def _window(lo: int, hi: int, size: int, resample: str) -> tuple[int, int, int, int, int]:
    """Input rows to read, the offset into the (upsampled) read to start at, and the zero padding, for output
    rows [lo, hi) of a 3x3 conv: (read_lo, read_hi, offset, pad_lo, pad_hi)."""
    if resample == "down":
        want_lo, want_hi, full = 2 * lo, 2 * hi + 1, size  # LDM pads one zero row at the bottom only
    elif resample == "up":
        want_lo, want_hi, full = lo - 1, hi + 1, 2 * size
    else:
        want_lo, want_hi, full = lo - 1, hi + 1, size
    clip_lo, clip_hi = max(0, want_lo), min(full, want_hi)
    pad_lo, pad_hi = clip_lo - want_lo, want_hi - clip_hi
    if resample == "up":
        read_lo, read_hi = clip_lo // 2, (clip_hi - 1) // 2 + 1
        return read_lo, read_hi, clip_lo - 2 * read_lo, pad_lo, pad_hi
    return clip_lo, clip_hi, 0, pad_lo, pad_hi


def read_range(stage: Stage, lo: int, hi: int, size: int) -> tuple[int, int]:
    """Input rows [a, b) a band of output rows [lo, hi) reads."""
    a, b, *_ = _window(lo, hi, size, stage.resample)
    return a, b


def norm_act(
    x: torch.Tensor, norm: nn.GroupNorm, stats: Stats, params: Params, dtype: torch.dtype, act: bool = True
) -> torch.Tensor:
    """GroupNorm of ``x`` with given (global) statistics, then SiLU; computed in float32, returned in ``dtype``."""
    mean, var = stats
    cpg = x.shape[1] // norm.num_groups
    w, b = params.get(norm, torch.float32)
    rstd = (var + norm.eps).rsqrt().repeat_interleave(cpg, dim=1)  # (N, C) float64
    scale = (rstd * w.double()).float()
    shift = (b.double() - mean.repeat_interleave(cpg, dim=1) * rstd * w.double()).float()
    y = torch.addcmul(shift[:, :, None, None], x.float(), scale[:, :, None, None])
    if act:
        y = F.silu(y, inplace=True)
    return y.to(dtype)


def _conv(x: torch.Tensor, m: nn.Conv2d, params: Params, dtype: torch.dtype, padding: int = 0) -> torch.Tensor:
    w, b = params.get(m, dtype)
    return F.conv2d(x, w, b, m.stride, padding)


def upsample_conv(
    x: torch.Tensor, conv: nn.Conv2d, pad: tuple[int, ...], params: Params, dtype: torch.dtype
) -> torch.Tensor:
    """Valid 3x3 conv of the nearest x2 upsampling of ``x`` (already zero-padded by one low-resolution pixel on
    the sides in ``pad``), as four 2x2 convs on ``x`` (one per output phase, see
    :func:`fastpath.upsample_phase_weights`) interleaved: 2.25x fewer multiply-adds and no upsampled copy.

    Output pair p reads input rows (p, p + 1) and gives upsampled rows 2p + 1 (phase 1) and 2p + 2 (phase 0) of
    the unpadded input, so the interleaved result starts at upsampled row 1 (or -1 where padded: cropped)."""
    w, b = params.upsample_phases(conv, dtype)
    y = F.conv2d(x, w, b)
    n, _, h, wd = y.shape
    o = conv.out_channels
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1 else None
    out = torch.empty((n, o, 2 * h, 2 * wd), dtype=y.dtype, device=y.device)
    if fmt is not None:
        out = out.contiguous(memory_format=fmt)
    for k in range(4):  # phase (a, b) lands on rows offset 1 - a, columns offset 1 - b
        a, c = divmod(k, 2)
        out[:, :, 1 - a :: 2, 1 - c :: 2] = y[:, k * o : (k + 1) * o]
    top, bottom, left, right = pad
    return out[:, :, top : 2 * h - bottom, left : 2 * wd - right]


def _upsample_window(
    x: torch.Tensor,
    conv: nn.Conv2d,
    params: Params,
    dtype: torch.dtype,
    read_at: tuple[int, int],
    out_at: tuple[int, int],
    size: tuple[int, int],
    pads: tuple[int, int, int, int],
) -> torch.Tensor:
    """Output window (``out_at``, ``size``) of nearest x2 + 3x3 conv, from the low-resolution rows/columns read at
    ``read_at``, computed as four phase convs (:func:`upsample_conv`); ``pads`` (top, bottom, left,
    right) say which sides are image borders, where the untiled conv zero-pads."""
    pad = tuple(1 if v else 0 for v in pads)
    if any(pad):
        x = F.pad(x, (pad[2], pad[3], pad[0], pad[1]))
    y = upsample_conv(x, conv, pad, params, dtype)  # starts at upsampled row 2 * read + 1 - pad (0 at a border)
    r0 = out_at[0] - (2 * read_at[0] + 1 - pad[0])
    c0 = out_at[1] - (2 * read_at[1] + 1 - pad[2])
    return y[:, :, r0 : r0 + size[0], c0 : c0 + size[1]]


def stage_tile(job: TileJob, dtype: torch.dtype) -> torch.Tensor:
    """Output window of one conv stage for one tile, computed in ``dtype``."""
    st, p = job.stage, job.params
    h_in, w_in = job.src_size
    ra, rb, _, rpl, rph = _window(job.y0, job.y1, h_in, st.resample)
    ca, cb, _, cpl, cph = _window(job.x0, job.x1, w_in, st.resample)
    x = job.src_rows[:, :, ra - job.src_a : rb - job.src_a, ca:cb].to(dtype)
    if st.pre is not None:
        x = _conv(x, st.pre, p, dtype)
    if st.norm is not None:
        assert job.in_stats is not None
        x = norm_act(x, st.norm, job.in_stats, p, dtype)
    if st.resample == "up":
        out = _upsample_window(x, st.conv, p, dtype, (ra, ca), (job.y0, job.x0), (job.y1 - job.y0, job.x1 - job.x0),
                               (rpl, rph, cpl, cph))  # fmt: skip
    else:
        if rpl or rph or cpl or cph:
            x = F.pad(x, (cpl, cph, rpl, rph))
        out = _conv(x, st.conv, p, dtype)
    if st.post is not None:
        out = _conv(out, st.post, p, dtype)
    if job.skip_rows is not None:
        skip = job.skip_rows[:, :, :, job.x0 : job.x1].to(dtype)
        if st.shortcut is not None:
            skip = _conv(skip, st.shortcut, p, dtype)
        out = skip + out
    return out


# --- the executor ----------------------------------------------------------------------------------------------
class PromoteToFloat32(Exception):
    """A tile overflowed the store dtype even after its float32 recompute: the whole op must run in float32."""


@dataclass
class RunResult:
    """Output of :func:`run_stages` and what happened on the way."""

    output: torch.Tensor
    used_stats: dict[str, Stats]  # per stage name: the statistics its GroupNorm used
    notes: list[str] = field(default_factory=list)
    passes: int = 0
    disk: bool = False


def last_uses(stages: list[Stage]) -> dict[str, int]:
    """Index of the last stage that reads each store."""
    last: dict[str, int] = {}
    for k, st in enumerate(stages):
        for name in (st.src, st.skip):
            if name is not None:
                last[name] = k
    return last


def store_shapes(stages: list[Stage], in_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Shape of every store for an input of ``in_shape``."""
    shapes = {"in": tuple(in_shape)}
    for st in stages:
        n, _, h, w = shapes[st.src]
        shapes[st.dst] = (n, st.out_channels, *st.out_size(h, w))
    return shapes


def _finite(t: torch.Tensor) -> bool:
    # one float32 reduction: any NaN or inf makes the sum non-finite (a cheaper pass than isfinite().all())
    return bool(t.sum(dtype=torch.float32).isfinite())


def guarded(
    compute: Callable[[torch.dtype], torch.Tensor],
    dtype: torch.dtype,
    fallback: bool,
    what: str,
    notes: list[str],
) -> torch.Tensor:
    """Run ``compute(dtype)``; on NaN/inf in a reduced dtype redo it in float32 and cast back (noted)."""
    out = compute(dtype)
    if not fallback or dtype == torch.float32 or _finite(out):
        return out
    out = compute(torch.float32).to(dtype)
    if not _finite(out):
        raise PromoteToFloat32(what)
    notes.append(f"{what} recomputed in fp32 after NaN/inf in {dtype_name(dtype)}")
    return out


def dtype_name(dtype: torch.dtype) -> str:
    """Short name of a float dtype (fp32, bf16, fp16)."""
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere). With activations on disk the
    tiles' band buffers are freed stage after stage; glibc keeps them mapped, and the resident size crept up by
    hundreds of MB over a run in files (measured: ``bench_tiling.py --quick``)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc: ctypes.CDLL | bool | None = None


SPILL_PREFIX = "vaekit-tiles-"


def spill_folder() -> tempfile.TemporaryDirectory:
    """A temporary folder for spilled activations, named after this process. Folders left by processes that no
    longer exist (a run killed before it could clean up: up to several GB each) are removed first."""
    remove_orphan_folders()
    return tempfile.TemporaryDirectory(prefix=f"{SPILL_PREFIX}{os.getpid()}-")


def remove_orphan_folders(root: str | None = None) -> list[Path]:
    """Delete this user's spill folders whose process is gone; returns what was removed."""
    removed = []
    for d in Path(root or tempfile.gettempdir()).glob(f"{SPILL_PREFIX}*-*"):
        pid = d.name[len(SPILL_PREFIX) :].split("-")[0]
        try:
            mine = d.is_dir() and d.stat().st_uid == os.getuid()
        except OSError:
            continue
        if mine and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but is not ours to signal
        return True
    return True


def run_stages(
    stages: list[Stage],
    x: torch.Tensor,
    tile: int,
    *,
    scale_of: Callable[[int], int],
    groups: int,
    disk: bool = False,
    fixed_stats: dict[str, Stats] | None = None,
    fallback: bool = True,
    attn_chunk: int = 4096,
    tag: str = "",
) -> RunResult:
    """Run ``stages`` on ``x`` tile by tile with exact global GroupNorm statistics (or ``fixed_stats``).

    ``tile`` is the tile side at the reference resolution; ``scale_of(h)`` gives the factor from the reference
    resolution to a store of height ``h`` so that every stage uses the same grid, aligned to the resamplers.
    """
    dtype = x.dtype
    params = Params()
    last = last_uses(stages)
    stores: dict[str, Store] = {"in": RamStore(x)}
    stats: dict[str, Stats] = {}
    if fixed_stats is None and any(st.norm is not None and st.src == "in" for st in stages):
        stats["in"] = stats_of(x, groups)  # a part that starts with a norm (fast mode's cut)
    used: dict[str, Stats] = {}
    notes: list[str] = []
    shapes = store_shapes(stages, tuple(x.shape))
    folder = spill_folder() if disk else None
    try:
        for k, st in enumerate(stages):
            src = stores[st.src]
            shape = shapes[st.dst]
            final = st.dst == "out"
            dst: Store
            if disk and not final and folder is not None:
                dst = DiskStore(shape, x, folder.name)
            else:
                dst = RamStore.empty(shape, x)
            in_stats = None
            if st.norm is not None:
                in_stats = fixed_stats[st.name] if fixed_stats is not None else stats[st.src]
                used[st.name] = in_stats
            acc = None if final or fixed_stats is not None else GroupStats(shape[0], groups, x.device)
            step = tile * scale_of(shape[2])
            if st.attn is not None:
                assert in_stats is not None
                _run_attention(st, src, dst, in_stats, step, params, acc, dtype, fallback, attn_chunk, notes, tag)
            else:
                skip = stores[st.skip] if st.skip is not None else None
                _run_conv(st, src, dst, skip, in_stats, step, params, acc, dtype, fallback, notes, tag)
            if acc is not None:
                stats[st.dst] = acc.result()
            stores[st.dst] = dst
            for name in {st.src, st.skip} - {None, "in"}:
                if last.get(name) == k:  # type: ignore[arg-type]
                    stores.pop(name).close()  # type: ignore[arg-type]
        out = stores["out"]
        assert isinstance(out, RamStore)
        return RunResult(out.tensor, used, notes, passes=len(stages), disk=disk)
    finally:
        for s in stores.values():
            if isinstance(s, DiskStore):
                s.close()
        if folder is not None:
            folder.cleanup()


def _grid(size: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(a + step, size)) for a in range(0, size, step)]


def _run_conv(
    st: Stage,
    src: Store,
    dst: Store,
    skip: Store | None,
    in_stats: Stats | None,
    step: int,
    params: Params,
    acc: GroupStats | None,
    dtype: torch.dtype,
    fallback: bool,
    notes: list[str],
    tag: str,
) -> None:
    _, _, h_in, w_in = src.shape
    _, _, h_out, w_out = dst.shape
    for i, (y0, y1) in enumerate(_grid(h_out, step)):
        a, b = read_range(st, y0, y1, h_in)
        src_rows = src.rows(a, b)
        skip_rows = skip.rows(y0, y1) if skip is not None else None
        band = dst.band(y0, y1)
        for j, (x0, x1) in enumerate(_grid(w_out, step)):
            job = TileJob(st, (i, j), y0, y1, x0, x1, src_rows, a, (h_in, w_in), in_stats, skip_rows, params)
            out = guarded(
                lambda dt, job=job: stage_tile(job, dt), dtype, fallback, f"{tag}tile ({i},{j}) of {st.name}", notes
            )
            band[:, :, :, x0:x1] = out
            if acc is not None:
                acc.add(out)
        dst.commit(y0, y1, band)
        if isinstance(dst, DiskStore):
            del band, src_rows, skip_rows, job, out  # the band buffers, before handing free pages back
            release_free_memory()


def _run_attention(
    st: Stage,
    src: Store,
    dst: Store,
    in_stats: Stats,
    step: int,
    params: Params,
    acc: GroupStats | None,
    dtype: torch.dtype,
    fallback: bool,
    chunk: int,
    notes: list[str],
    tag: str,
) -> None:
    """The mid-block attention over the whole latent: K and V of every position first, then queries per tile."""
    attn = st.attn
    assert attn is not None
    n, c, h, w = src.shape
    keys = torch.empty((n, h, w, c), dtype=dtype, device=_device_of(src))
    values = torch.empty_like(keys)
    grid_y, grid_x = _grid(h, step), _grid(w, step)
    for i, (y0, y1) in enumerate(grid_y):
        rows = src.rows(y0, y1)
        for j, (x0, x1) in enumerate(grid_x):
            xt = rows[:, :, :, x0:x1]

            def kv(dt: torch.dtype, xt: torch.Tensor = xt) -> torch.Tensor:
                y = norm_act(xt.to(dt), attn.norm, in_stats, params, dt, act=False)
                return torch.cat([_conv(y, attn.k, params, dt), _conv(y, attn.v, params, dt)], dim=1)

            out = guarded(kv, dtype, fallback, f"{tag}tile ({i},{j}) of {st.name} keys", notes)
            keys[:, y0:y1, x0:x1] = out[:, :c].permute(0, 2, 3, 1)
            values[:, y0:y1, x0:x1] = out[:, c:].permute(0, 2, 3, 1)
    k_all, v_all = keys.view(n, 1, h * w, c), values.view(n, 1, h * w, c)
    for i, (y0, y1) in enumerate(grid_y):
        rows = src.rows(y0, y1)
        band = dst.band(y0, y1)
        for j, (x0, x1) in enumerate(grid_x):
            xt = rows[:, :, :, x0:x1]

            def query(dt: torch.dtype, xt: torch.Tensor = xt) -> torch.Tensor:
                y = norm_act(xt.to(dt), attn.norm, in_stats, params, dt, act=False)
                q = _conv(y, attn.q, params, dt)
                th, tw = q.shape[2:]
                q = q.reshape(n, 1, c, th * tw).transpose(2, 3)
                kk, vv = k_all.to(dt), v_all.to(dt)
                parts = [F.scaled_dot_product_attention(qc, kk, vv) for qc in q.split(chunk, dim=2)]
                o = torch.cat(parts, dim=2).transpose(2, 3).reshape(n, c, th, tw)
                return xt.to(dt) + _conv(o, attn.proj_out, params, dt)

            out = guarded(query, dtype, fallback, f"{tag}tile ({i},{j}) of {st.name}", notes)
            band[:, :, :, x0:x1] = out
            if acc is not None:
                acc.add(out)
        dst.commit(y0, y1, band)


def _device_of(store: Store) -> torch.device:
    return store.tensor.device if isinstance(store, RamStore) else store.device


def receptive_halo(stages: list[Stage], in_height: int) -> int:
    """Halo (in input pixels of the first stage) that covers the receptive field of ``stages``: tiles with at
    least this halo compute their core exactly as the whole image would, given the same GroupNorm statistics."""
    halo = 0.0
    h = in_height
    for st in stages:
        out_h = st.out_size(h, h)[0]
        # one pixel at the conv's own resolution (the output resolution for "up", the input one otherwise)
        res = out_h if st.resample == "up" else h
        if st.attn is None:
            halo += in_height / res
        h = out_h
    return math.ceil(halo)
