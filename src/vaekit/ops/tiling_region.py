"""One tile through many stages at once, with margins that shrink as the convolutions consume them.

Fast tiling runs the high-resolution part of the KL network once per tile. The tile is read with a margin (halo)
that covers the receptive field; instead of zero-padding every conv and cropping at the end (which recomputes the
whole margin at every stage), each 3x3 conv here is *valid* on the sides where the tile has image neighbours and
zero-padded only on the sides that lie on the image border, exactly where the untiled network pads. The margin
left after each stage is tracked per side, residuals are cropped to it, and the cost of a tile shrinks towards
that of its core as the resolution rises: at the decoder's top level (the most expensive one) the margin is a few
pixels. Given the same GroupNorm statistics, the core equals the untiled computation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from vaekit.ops import tiling_engine as eng
from vaekit.ops.tiling_engine import Stage, Stats

Margins = tuple[int, int, int, int]  # top, bottom, left, right: pixels of the tensor outside the core window
Border = tuple[bool, bool, bool, bool]  # which sides of the region lie on the image border (zero-padded there)


def _crop(t: torch.Tensor, have: Margins, want: Margins) -> torch.Tensor:
    """``t`` (with margins ``have``) cut down to margins ``want``."""
    top, bottom, left, right = (h - w for h, w in zip(have, want, strict=True))
    if top == bottom == left == right == 0:
        return t
    return t[:, :, top : t.shape[2] - bottom, left : t.shape[3] - right]


def _down_margins(m: Margins, border: Border) -> tuple[Margins, Margins]:
    """Margins after the LDM downsample (pad right/bottom by one zero, 3x3 conv, stride 2) and the rows/columns
    to drop first so the stride stays aligned with the image (the core starts at an even position)."""
    top, left = m[0] // 2, m[2] // 2
    bottom = m[1] // 2 if border[1] else (m[1] - 1) // 2
    right = m[3] // 2 if border[3] else (m[3] - 1) // 2
    keep = (2 * top, m[1] if border[1] else 2 * bottom + 1, 2 * left, m[3] if border[3] else 2 * right + 1)
    return (top, bottom, left, right), keep


def stage_region(
    st: Stage,
    x: torch.Tensor,
    m: Margins,
    border: Border,
    stats: Stats | None,
    skip: tuple[torch.Tensor, Margins] | None,
    params: eng.Params,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, Margins]:
    """One conv stage on a region with margins ``m``: returns the output and its (smaller) margins."""
    if st.pre is not None:
        x = eng._conv(x, st.pre, params, dtype)
    if st.norm is not None:
        assert stats is not None
        x = eng.norm_act(x, st.norm, stats, params, dtype)
    if st.resample == "down":
        out_m, keep = _down_margins(m, border)
        x = _crop(x, m, keep)
        x = F.pad(x, (0, 1 if border[3] else 0, 0, 1 if border[1] else 0))
        out = eng._conv(x, st.conv, params, dtype)
    else:
        pad = tuple(1 if b else 0 for b in border)
        if any(pad):
            x = F.pad(x, (pad[2], pad[3], pad[0], pad[1]))
        if st.resample == "up":
            out = eng.upsample_conv(x, st.conv, pad, params, dtype)
            m = (2 * m[0], 2 * m[1], 2 * m[2], 2 * m[3])
        else:
            out = eng._conv(x, st.conv, params, dtype)
        out_m = tuple(v if b else v - 1 for v, b in zip(m, border, strict=True))  # type: ignore[assignment]
    if min(out_m) < 0:
        raise ValueError(f"halo too small for {st.name}")  # a planning bug, never the user's input
    if st.post is not None:
        out = eng._conv(out, st.post, params, dtype)
    if skip is not None:
        res = _crop(skip[0], skip[1], out_m).to(dtype)
        if st.shortcut is not None:
            res = eng._conv(res, st.shortcut, params, dtype)
        out = out.add_(res) if out.dtype == res.dtype else out + res
    return out, out_m


def run_region(
    stages: list[Stage],
    x: torch.Tensor,
    margins: Margins,
    border: Border,
    stats: Callable[[str], Stats] | dict[str, Stats],
    params: eng.Params,
) -> torch.Tensor:
    """The core of ``stages`` applied to region ``x`` (conv stages only, no attention), in ``x.dtype``.

    ``margins`` are the region's pixels outside the core on each side; they must cover the receptive field
    (:func:`tiling_engine.receptive_halo`) on the sides that are not on the image ``border`` (margin 0 there).
    ``stats`` gives the GroupNorm statistics of each stage by stage name.
    """
    get = stats.__getitem__ if isinstance(stats, dict) else stats
    dtype = x.dtype
    last = eng.last_uses(stages)
    stores: dict[str, tuple[torch.Tensor, Margins]] = {"in": (x, margins)}
    for k, st in enumerate(stages):
        if st.attn is not None:
            raise ValueError(f"{st.name}: attention cannot run on a region")
        src, m = stores[st.src]
        skip = stores[st.skip] if st.skip is not None else None
        stores[st.dst] = stage_region(st, src, m, border, get(st.name) if st.norm else None, skip, params, dtype)
        for name in {st.src, st.skip} - {None, "in"}:
            if last.get(name) == k:  # type: ignore[arg-type]
                del stores[name]  # type: ignore[arg-type]
    out, m = stores["out"]
    return _crop(out, m, (0, 0, 0, 0))
