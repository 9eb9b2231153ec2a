"""The comparison report: terminal tables, report.json / report.csv / per_image.csv, and a self-contained
report.html (no network: images are files beside it with relative links, charts are inline PNGs, CSS is inline).

Per image the page shows the original, each row's reconstruction and an amplified difference heatmap
(|output - input| averaged over RGB, times ``amplify``, clipped at 1, "magma" colour map) as thumbnails linked to
the full-size PNGs.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from rich.table import Table

from vaekit.errors import BadInputError
from vaekit.eval.metrics import METRICS, MetricInfo
from vaekit.eval.stats import Summary
from vaekit.formats.io import atomic_path
from vaekit.ops.images import save_image, to_pil

if TYPE_CHECKING:
    from vaekit.eval.compare import Comparison, Row

THUMB_SIZE = 256
REPORT_FILES = ("report.html", "report.json", "report.csv", "per_image.csv")


# --- formatting ----------------------------------------------------------------------------------------------------
def _value(row: Row, key: str) -> tuple[float, float]:
    """(mean, half-width of the interval) of a metric in a row; half-width nan when there is none."""
    if key in row.set_values:
        return row.set_values[key], math.nan
    s = row.summary.get(key, Summary(math.nan, math.nan, math.nan, 0))
    return s.mean, (s.high - s.low) / 2


def format_cell(info: MetricInfo, mean: float, half: float, sep: str = " ") -> str:
    """'31.25 ±0.84' (or '31.25' without an interval, 'n/a' when not measured)."""
    if not math.isfinite(mean):
        return "n/a"
    fmt = info.fmt
    if fmt == "auto":
        size = abs(mean)
        fmt = ".0f" if size >= 100 else ".1f" if size >= 10 else ".2f" if size >= 1 else ".3f"
    text = format(mean, fmt)
    if math.isfinite(half):
        text += sep + "±" + format(half, fmt.lstrip("+"))
    return text


def best_rows(comparison: Comparison) -> dict[str, str]:
    """Per metric, the label of the ok row with the best mean (highlighted; not necessarily a called winner)."""
    best: dict[str, str] = {}
    for key in comparison.metrics:
        info = METRICS[key]
        scored = [(info.loss(_value(r, key)[0]), r.label) for r in comparison.rows if r.ok]
        scored = [(s, label) for s, label in scored if math.isfinite(s)]
        if len(scored) > 1:
            best[key] = min(scored)[1]
    return best


def _header(info: MetricInfo) -> str:
    arrow = {"higher": "↑", "lower": "↓", "target": f"→{info.target:g}"}[info.better]
    return f"{info.label}{' (' + info.unit + ')' if info.unit else ''} {arrow}"


def _short_header(info: MetricInfo) -> str:
    arrow = {"higher": "↑", "lower": "↓", "target": f"→{info.target:g}"}[info.better]
    return f"{info.short or info.label}\n{info.unit + ' ' if info.unit else ''}{arrow}"


def rich_table(comparison: Comparison) -> Table:
    """A Rich table: one line per row (mean over ±interval), best mean per column in bold green, a called winner
    starred; flags and failures are counted in the status column and spelled out by :func:`row_messages`."""
    best = best_rows(comparison)
    table = Table(title=f"VAE comparison on {len(comparison.images)} image(s) (mean ±95% CI)", title_justify="left")
    table.add_column("VAE", style="bold", min_width=12)
    for key in comparison.metrics:
        table.add_column(_short_header(METRICS[key]), justify="right")
    table.add_column("status")
    for row in comparison.rows:
        cells = []
        for key in comparison.metrics:
            text = format_cell(METRICS[key], *_value(row, key), sep="\n") if row.ok else "-"
            if comparison.winners[key].label == row.label:
                text = "★ " + text
            cells.append(f"[bold green]{text}[/]" if best.get(key) == row.label else text)
        if not row.ok:
            status = f"[red]{row.status}[/]"
        else:
            status = f"[yellow]{len(row.flags)} flag(s)[/]" if row.flags else "ok"
        table.add_row(row.label, *cells, status)
    return table


def row_messages(comparison: Comparison) -> list[str]:
    """One line per colour flag, failure or note of a row, in plain words."""
    lines = []
    for row in comparison.rows:
        if not row.ok:
            lines.append(f"{row.label}: {row.status}: {row.reason}")
        lines += [f"{row.label}: {flag}" for flag in row.flags]
        lines += [f"{row.label}: note: {note}" for note in row.notes]
    return lines


def text_table(comparison: Comparison) -> str:
    """A plain-text table (what ``str(comparison)`` prints)."""
    head = ["VAE", *(_header(METRICS[k]) for k in comparison.metrics), "status / flags"]
    lines = []
    for row in comparison.rows:
        cells = [row.label]
        for key in comparison.metrics:
            cells.append(format_cell(METRICS[key], *_value(row, key)) if row.ok else "-")
        cells.append("; ".join(row.flags) if row.ok else f"{row.status}: {row.reason}")
        lines.append(cells)
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head) - 1)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)) + "  " + cells[-1]  # noqa: E731
    return "\n".join([fmt(head), *(fmt(c) for c in lines)])


def markdown_table(comparison: Comparison) -> str:
    """A Markdown table of the means (for docs), best mean in bold, called winners starred."""
    best = best_rows(comparison)
    head = ["VAE", *(_header(METRICS[k]) for k in comparison.metrics), "flags"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in comparison.rows:
        cells = [row.label]
        for key in comparison.metrics:
            text = format_cell(METRICS[key], *_value(row, key)) if row.ok else "-"
            text = ("★ " if comparison.winners[key].label == row.label else "") + text
            cells.append(f"**{text}**" if best.get(key) == row.label else text)
        cells.append("; ".join(row.flags) if row.ok else f"{row.status}: {row.reason}")
        out.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(out)


# --- images --------------------------------------------------------------------------------------------------------
def difference_heatmap(ref: torch.Tensor, out: torch.Tensor, amplify: float) -> torch.Tensor:
    """|out - ref| averaged over RGB, times ``amplify``, clipped to 1, coloured with "magma"; (3, H, W) in [0, 1]."""
    from matplotlib import colormaps

    diff = ((out.float() - ref.float()).abs().mean(dim=0) * amplify).clamp(0, 1).cpu().numpy()
    rgb = colormaps["magma"](diff)[..., :3].astype(np.float32)
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"


class ReportWriter:
    """Writes a report folder: image files during the run (:meth:`original`, :meth:`reconstruction`), tables,
    charts and the HTML page at the end (:meth:`finish`). Every file is written atomically."""

    def __init__(self, root: Path, overwrite: bool = False, amplify: float = 5.0) -> None:
        if root.exists() and not root.is_dir():
            raise BadInputError(f"{root}: exists and is not a folder")
        if root.is_dir() and any(root.iterdir()) and not overwrite:
            raise BadInputError(f"{root}: folder exists and is not empty (use --overwrite or another -o)")
        if amplify <= 0:
            raise BadInputError(f"difference amplification must be positive, got {amplify}")
        self.root = root
        self.amplify = amplify
        self._slugs: dict[str, str] = {}
        (root / "images").mkdir(parents=True, exist_ok=True)

    def _image_dir(self, name: str) -> Path:
        d = self.root / "images" / _slug(name)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _save_pair(self, rgb: torch.Tensor, folder: Path, stem: str) -> dict[str, str]:
        full = save_image(rgb, folder / f"{stem}.png")
        thumb = to_pil(rgb)
        thumb.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.LANCZOS)
        with atomic_path(folder / f"{stem}-thumb.jpg") as tmp:
            thumb.save(tmp, format="JPEG", quality=85)
        rel = lambda p: p.relative_to(self.root).as_posix()  # noqa: E731
        return {"full": rel(full), "thumb": rel(folder / f"{stem}-thumb.jpg")}

    def original(self, name: str, rgb: torch.Tensor) -> dict[str, str]:
        """Save an input image (as measured) and its thumbnail; returns their relative paths."""
        return self._save_pair(rgb, self._image_dir(name), "original")

    def reconstruction(self, label: str, name: str, ref: torch.Tensor, out: torch.Tensor) -> dict[str, str]:
        """Save a reconstruction and its difference heatmap (each with a thumbnail); returns relative paths."""
        if label not in self._slugs:
            slug, k = _slug(label), 2
            while slug in self._slugs.values() or slug == "original":
                slug, k = f"{_slug(label)}-{k}", k + 1
            self._slugs[label] = slug
        folder, slug = self._image_dir(name), self._slugs[label]
        files = self._save_pair(out, folder, slug)
        diff = self._save_pair(difference_heatmap(ref, out, self.amplify), folder, f"{slug}-diff")
        return {**files, "diff": diff["full"], "diff_thumb": diff["thumb"]}

    def finish(self, comparison: Comparison) -> None:
        """Write report.json, report.csv, per_image.csv and report.html."""
        write_tables(comparison, self.root)
        _write_text(self.root / "report.html", render_html(comparison, amplify=self.amplify))


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_tables(comparison: Comparison, root: Path) -> None:
    """report.json (everything), report.csv (one line per row) and per_image.csv (row, image, metric, value)."""
    root.mkdir(parents=True, exist_ok=True)
    _write_text(root / "report.json", comparison.to_json())
    rows = comparison.to_rows()
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()})
    _write_text(root / "report.csv", buf.getvalue())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["row", "image", "metric", "value"])
    for row in comparison.rows:
        for key, values in row.values.items():
            for im, v in zip(comparison.images, values, strict=True):
                w.writerow([row.label, im.name, key, "" if not math.isfinite(v) else repr(v)])
    _write_text(root / "per_image.csv", buf.getvalue())


# --- charts --------------------------------------------------------------------------------------------------------
def bar_chart_png(comparison: Comparison, key: str) -> bytes | None:
    """A bar chart (PNG bytes) of one metric's means with 95 % intervals over the ok rows; None if unmeasured."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    info = METRICS[key]
    rows = [r for r in comparison.rows if r.ok and math.isfinite(_value(r, key)[0])]
    if not rows:
        return None
    means = [_value(r, key)[0] for r in rows]
    errs = [_value(r, key)[1] for r in rows]
    errs = [e if math.isfinite(e) else 0.0 for e in errs]
    winner = comparison.winners[key].label
    fig = Figure(figsize=(3.9, 0.55 + 0.42 * len(rows)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = ["#2e7d32" if r.label == winner else "#5c7cba" for r in rows]
    y = list(range(len(rows)))
    ax.barh(y, means, xerr=errs, color=colours, capsize=3)
    ax.set_yticks(y, [r.label if len(r.label) <= 28 else r.label[:27] + "…" for r in rows], fontsize=8)
    ax.invert_yaxis()
    if info.better == "target":
        ax.axvline(info.target, color="#444", linewidth=1, linestyle="--")
    lo = min(m - e for m, e in zip(means, errs, strict=True))
    if info.better == "higher" and lo > 0:  # zoom to where the bars differ; the axis says where it starts
        hi = max(m + e for m, e in zip(means, errs, strict=True))
        ax.set_xlim(max(0.0, lo - 0.15 * (hi - lo + 1e-9)), hi + 0.05 * (hi - lo + 1e-9))
    ax.set_title(_header(info) + ("" if winner else "  (no clear winner)"), fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --- HTML ----------------------------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#222;background:#fff}
h1{margin:0 0 .2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}.meta{color:#555}
table{border-collapse:collapse;font-size:13px}th,td{padding:4px 8px;border-bottom:1px solid #e4e4e4;text-align:right}
th:first-child,td:first-child,td.flags{text-align:left}td:first-child{min-width:11em}td.best{font-weight:bold;color:#1b5e20;background:#eef7ee}
td.flags{color:#a15c00}tr.bad td{color:#999}.charts{display:flex;flex-wrap:wrap;gap:10px}
.charts img{border:1px solid #eee}.strip{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}
figure{margin:0;width:auto;max-width:260px;font-size:12px}figure img{display:block;border:1px solid #ccc}
figcaption{margin-top:2px;color:#333}.warn{color:#a15c00}ul{margin:.3em 0}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _figure(href: str, thumb: str, caption_html: str, alt: str) -> str:
    return f'<figure><a href="{_e(href)}"><img src="{_e(thumb)}" alt="{_e(alt)}"></a>' + (
        f"<figcaption>{caption_html}</figcaption></figure>"
    )


def render_html(comparison: Comparison, amplify: float = 5.0) -> str:
    """The report page as one HTML string (references image files relative to the report folder)."""
    best = best_rows(comparison)
    s = comparison.settings
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<meta name=viewport content='width=device-width,initial-scale=1'><title>vaekit compare</title>",
        f"<style>{_CSS}</style></head><body><h1>VAE comparison</h1>",
        f"<p class=meta>{len(comparison.images)} image(s) (long side ≤ {_e(s.get('max_size') or 'unlimited')} px), "
        f"device {_e(s.get('device'))}, precisions {_e(', '.join(s.get('precisions', [])))}, tilings "
        f"{_e(', '.join(s.get('tilings', [])))}"
        + (f", latents from {_e(s['latents_from'])}" if s.get("latents_from") else "")
        + ". Means with 95 % t-intervals over the images; ★ marks a winner called by a paired t-test against every "
        "other row (p &lt; 0.05); bold marks the best mean.</p>",
        "<h2>Summary</h2><table><tr><th>VAE</th>",
    ]
    parts += [f"<th>{_e(_header(METRICS[k]))}</th>" for k in comparison.metrics] + ["<th>status / flags</th></tr>"]
    for row in comparison.rows:
        parts.append(f"<tr class={'ok' if row.ok else 'bad'}><td>{_e(row.label)}</td>")
        for key in comparison.metrics:
            text = format_cell(METRICS[key], *_value(row, key)) if row.ok else "-"
            star = "★ " if comparison.winners[key].label == row.label else ""
            cls = " class=best" if best.get(key) == row.label else ""
            parts.append(f"<td{cls}>{star}{_e(text)}</td>")
        status = "; ".join(row.flags) if row.ok else f"{row.status}: {row.reason}"
        parts.append(f"<td class=flags>{_e(status) or 'ok'}</td></tr>")
    parts.append("</table><h2>Winners</h2><ul>")
    for key, w in comparison.winners.items():
        verdict = f"<b>{_e(w.label)}</b> — {_e(w.reason)}" if w.label else _e(w.reason)
        parts.append(f"<li>{_e(METRICS[key].label)}: {verdict}</li>")
    parts.append("</ul>")
    notes = [f"{METRICS[k].label if k in METRICS else k}: {v}" for k, v in comparison.skipped_metrics.items()]
    notes += [f"unreadable image skipped: {x.path} ({x.reason})" for x in comparison.skipped_images]
    notes += [f"{r.label}: {n}" for r in comparison.rows for n in r.notes]
    if s.get("ms_ssim_scales") and s["ms_ssim_scales"] != [5]:
        notes.append(f"MS-SSIM used {', '.join(map(str, s['ms_ssim_scales']))} scale(s): images too small for 5")
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li class=warn>{_e(n)}</li>" for n in notes) + "</ul>")
    parts.append(
        f"<h2>Images</h2><p class=meta>Each reconstruction is followed by its difference to the original, "
        f"amplified {amplify:g}×. Click a thumbnail for the full-size PNG.</p>"
    )
    for i, im in enumerate(comparison.images):
        parts.append(f"<h3>{_e(im.name)} ({im.width}×{im.height})</h3><div class=strip>")
        if im.files:
            parts.append(_figure(im.files["full"], im.files["thumb"], "original", f"{im.name}: original"))
        for row in comparison.rows:
            if i >= len(row.files):
                continue
            f = row.files[i]
            psnr, ssim = row.values["psnr"][i], row.values["ssim"][i]
            caption = f"{_e(row.label)}<br>PSNR {psnr:.2f} dB, SSIM {ssim:.4f}"
            parts.append(_figure(f["full"], f["thumb"], caption, f"{im.name}: {row.label}"))
            diff_caption = f"{_e(row.label)}: difference ×{amplify:g}"
            parts.append(_figure(f["diff"], f["diff_thumb"], diff_caption, f"{im.name}: {row.label} difference"))
        parts.append("</div>")
    charts = [(k, bar_chart_png(comparison, k)) for k in comparison.metrics]
    parts.append("<h2>Charts</h2><div class=charts>")
    for key, png in charts:
        if png:
            data = base64.b64encode(png).decode("ascii")
            parts.append(f"<img src='data:image/png;base64,{data}' alt='{_e(METRICS[key].label)} chart'>")
    parts.append("</div>")
    parts.append("</body></html>\n")
    return "".join(parts)
