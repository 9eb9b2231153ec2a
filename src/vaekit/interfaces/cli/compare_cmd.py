"""``vaekit compare``: which VAE gives better images, measured and shown side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from vaekit.errors import BadInputError
from vaekit.interfaces.cli import core as cli
from vaekit.interfaces.cli.core import app
from vaekit.interfaces.cli.output import emit_json


def _split(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise BadInputError(f"{what}: give at least one value (comma-separated)")
    return items


@app.command("compare")
def compare_command(
    vaes: Annotated[list[str], typer.Argument(help="VAE files, diffusers folders, library names or presets.")],
    images: Annotated[
        str, typer.Option("--images", "-i", help="'builtin' (scikit-image's photos), a folder, a file or a glob.")
    ] = "builtin",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Report folder: report.html/json/csv, images, charts.")
    ] = None,
    precisions: Annotated[str, typer.Option(help="Comma-separated precisions to run each VAE in (fp32,bf16,fp16).")] = (
        "fp32"
    ),
    tilings: Annotated[str, typer.Option(help="Comma-separated tiling modes to run each VAE in (off,exact,fast).")] = (
        "off"
    ),
    max_size: Annotated[int, typer.Option(help="Downscale images whose long side exceeds this (0: never).")] = 1024,
    latents_from: Annotated[
        str | None, typer.Option(help="Encode with this VAE and decode with each compared VAE (decoder swap).")
    ] = None,
    lpips_weights: Annotated[
        list[Path] | None,
        typer.Option(help="Local torchvision AlexNet/VGG16 backbone file for LPIPS (repeat to add LPIPS heads)."),
    ] = None,
    inception_weights: Annotated[
        Path | None, typer.Option(help="Local pt_inception-2015-12-05 weights for rFID (needs the fid extra).")
    ] = None,
    amplify: Annotated[float, typer.Option(help="Amplification of the difference heatmaps in the report.")] = 5.0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1 or mps.")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a non-empty report folder.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full result as JSON instead of a table.")] = False,
) -> None:
    """Round-trip every image through every VAE and compare PSNR, SSIM, MS-SSIM, colour fidelity, speed, memory."""
    from vaekit.eval.compare import compare
    from vaekit.eval.metrics import METRICS
    from vaekit.eval.report import rich_table, row_messages

    result = compare(
        vaes,
        images,
        precisions=_split(precisions, "--precisions"),
        tilings=_split(tilings, "--tilings"),
        max_size=max_size or None,
        device=device,
        latents_from=latents_from,
        lpips_weights=lpips_weights or None,
        inception_weights=inception_weights,
        report_dir=output,
        overwrite=overwrite,
        amplify=amplify,
        progress=lambda msg: cli.err.print(escape(msg)),
    )
    if as_json:
        emit_json(result.to_dict())
        return
    cli.out.print(rich_table(result))
    for line in row_messages(result):
        cli.out.print(f"[yellow]{escape(line)}[/]")
    for key, winner in result.winners.items():
        verdict = escape(winner.reason)
        if winner.label:
            verdict = f"[bold]{escape(winner.label)}[/] ({verdict})"
        cli.out.print(f"{METRICS[key].label}: {verdict}")
    for key, why in result.skipped_metrics.items():
        cli.out.print(f"[yellow]{key}: {escape(why)}[/]")
    for s in result.skipped_images:
        cli.out.print(f"[yellow]unreadable image skipped: {escape(s.path)} ({escape(s.reason)})[/]")
    if result.report_dir is not None:
        cli.out.print(f"report: {escape(str(result.report_dir / 'report.html'))}")
