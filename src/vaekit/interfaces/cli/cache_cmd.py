"""``vaekit cache``: encode a whole image dataset into a resumable latent cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

from vaekit.cache import CacheReport, EncodeSettings, Preprocess, build_cache, parse_buckets
from vaekit.interfaces.cli import core as cli
from vaekit.interfaces.cli.common import DeviceOption, JsonOption, VaeOption, load_selected_vae
from vaekit.interfaces.cli.core import app
from vaekit.interfaces.cli.output import emit_json, kv_table


class _RateColumn(ProgressColumn):
    """Images per second, from Rich's moving estimate."""

    def render(self, task: Task) -> Text:
        """The rate as text."""
        speed = task.finished_speed or task.speed
        return Text("-- img/s" if speed is None else f"{speed:.2f} img/s", style="cyan")


def _print_report(report: CacheReport, total_ok: int) -> None:
    workers = report.workers or "auto"
    rows = [
        ("images found", report.images),
        ("encoded", report.encoded),
        ("already cached", report.skipped),
        ("reused (same content elsewhere)", report.reused),
        ("failed", len(report.failed)),
        ("failed before, unchanged", report.failed_unchanged),
        ("pruned" if report.pruned else "gone, kept (--prune removes)", report.pruned or report.stale),
        ("recovered leftovers", report.recovered),
        ("shards written", report.shards_written),
        ("throughput", f"{report.images_per_second:.2f} images/s ({report.engine} engine, {workers} workers)"),
        ("time", f"{report.seconds:.1f} s (encoding {report.encode_seconds:.1f} s)"),
        ("images in cache", total_ok),
    ]
    if report.engine == "ray" and report.nodes:
        done = max(1, report.encoded + len(report.failed))
        lost = f", {report.actors_lost} lost (their chunks redone)" if report.actors_lost else ""
        rows.insert(-2, ("ray", f"{report.workers} actors on {report.nodes} nodes{lost}; the driver received "
                               f"{report.received_bytes / done:.0f} bytes per image"))  # fmt: skip
    cli.out.print(kv_table(report.cache_dir, rows))
    for path, reason in report.failed:
        cli.err.print(f"[yellow]failed:[/] {escape(reason if path in reason else f'{path}: {reason}')}")


@app.command("cache")
def cache_command(
    inputs: Annotated[list[str], typer.Argument(help="Image folders, files, globs, .txt lists of paths, or builtin.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Cache folder (created or updated).")],
    vae: VaeOption = None,
    device: DeviceOption = "auto",
    precision: Annotated[str, typer.Option(help="fp32, bf16, fp16 or auto (the fastest safe one here).")] = "fp32",
    store_dtype: Annotated[str, typer.Option("--store-dtype", help="dtype of the stored latents.")] = "fp32",
    resolution: Annotated[int, typer.Option(help="Target side (square) or bucket area resolution².")] = 512,
    crop: Annotated[str, typer.Option(help="center or random (seeded per image, recorded).")] = "center",
    buckets: Annotated[
        str | None, typer.Option(help="Aspect-ratio buckets: auto, or a list like 512x512,640x384 (default: none).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random crops.")] = 0,
    flip: Annotated[bool, typer.Option("--flip", help="Also cache the horizontally flipped image.")] = False,
    engine: Annotated[str, typer.Option(help="local (DataLoader) or ray (Ray Data).")] = "local",
    workers: Annotated[
        int | None, typer.Option(help="Local: worker processes (0: none); ray: encoder actors. Default: sized here.")
    ] = None,
    threads: Annotated[int, typer.Option(help="Torch threads per CPU encoder (changes the last bits).")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per encoder call (changes last bits).")] = 1,
    shard_size: Annotated[int, typer.Option("--shard-size", help="Images per shard file.")] = 256,
    address: Annotated[str | None, typer.Option(help="Ray cluster to join (e.g. auto or ray://host:10001).")] = None,
    prune: Annotated[bool, typer.Option("--prune", help="Drop cached images no longer in the inputs.")] = False,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Start over if the VAE or preprocessing changed.")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Retry images that failed before.")] = False,
    rehash: Annotated[bool, typer.Option("--rehash", help="Hash every file, even if size and mtime match.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Encode every image into sharded safetensors (posterior mean and log-variance) with a SQLite manifest;
    reruns encode only new or changed images.
    """
    params = Preprocess(resolution, crop, parse_buckets(buckets, resolution), seed, flip)
    settings = EncodeSettings(precision=precision, batch_size=batch_size, threads=threads, store_dtype=store_dtype)
    model = load_selected_vae(vae, device)
    columns = (TextColumn("encoding"), BarColumn(), MofNCompleteColumn(), _RateColumn(), TimeElapsedColumn())
    with Progress(*columns, console=cli.err, transient=False) as bar:
        job = bar.add_task("encoding", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(job, completed=done, total=total)

        report = build_cache(
            inputs,
            output,
            model,
            params,
            settings,
            engine=engine,
            workers=workers,
            shard_size=shard_size,
            prune=prune,
            rebuild=rebuild,
            retry_failed=retry_failed,
            rehash=rehash,
            address=address,
            progress=progress,
        )
    from vaekit.cache import open as open_cache

    total_ok = len(open_cache(output))
    if as_json:
        emit_json({**report.to_dict(), "images_in_cache": total_ok})
        return
    _print_report(report, total_ok)
