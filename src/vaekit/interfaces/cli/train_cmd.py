"""``vaekit train`` (from scratch or fine-tune) and ``vaekit calibrate`` (latent scale and shift)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.markup import escape

from vaekit.errors import BadInputError
from vaekit.interfaces.cli import core as cli
from vaekit.interfaces.cli.core import app
from vaekit.interfaces.cli.output import emit_json, kv_table

Opt = typer.Option


def _progress_printer(log_every: int, total: int):  # type: ignore[no-untyped-def]
    """A Rich progress bar on a terminal; a plain line every ``log_every`` steps otherwise (nohup logs)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    started = time.monotonic()
    if cli.err.is_terminal:
        progress = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=cli.err,
        )
        task = progress.add_task("train", total=total, loss="-")

        def update(step: int, steps: int, parts: dict[str, float]) -> None:
            progress.update(task, completed=step, loss=f"{parts.get('loss', float('nan')):.4f}")

        return progress, update

    first: list[int] = []

    def plain(step: int, steps: int, parts: dict[str, float]) -> None:
        if not first:
            first.append(step - 1)
        if step % log_every and step != steps:
            return
        spent = time.monotonic() - started
        done = step - first[0]
        eta = spent / max(done, 1) * (steps - step)
        shown = " ".join(f"{k} {v:.4g}" for k, v in parts.items() if k != "lr")
        cli.err.print(escape(f"step {step}/{steps} {shown} lr {parts.get('lr', 0):.3g} eta {eta / 60:.1f} min"))

    return None, plain


@app.command("train")
def train_command(
    data: Annotated[
        list[str],
        typer.Argument(
            help="Image folders (recursive), files, globs, list files (.txt, one path a line), or the words "
            "'skimage' (scikit-image's photographs), 'skimage:NAME' and 'builtin'."
        ),
    ],
    out: Annotated[Path, Opt("--out", "-o", help="Run folder: checkpoint, logs, samples, vae.safetensors.")],
    val_data: Annotated[list[str] | None, Opt("--val-data", help="Held-out images (removed from training).")] = None,
    val_count: Annotated[int, Opt(help="Without --val-data: hold out this many of the last images.")] = 2,
    preset: Annotated[
        str, Opt(help="Architecture from scratch: tiny, small, small16 (the bundled default), wide16 or sd-size.")
    ] = "small",
    init: Annotated[str | None, Opt(help="Fine-tune this VAE file (any file vaekit loads) instead.")] = None,
    train_part: Annotated[str, Opt(help="full, or decoder (encoder frozen; needs --init).")] = "full",
    crop: Annotated[int, Opt(help="Random crop size in pixels (multiple of 8).")] = 128,
    resize_short: Annotated[int | None, Opt(help="Resize each image's short side to this first.")] = None,
    min_scale: Annotated[float, Opt(help="Random zoom-out: crops come from windows up to crop/min-scale.")] = 1.0,
    flip: Annotated[bool, Opt("--flip/--no-flip", help="Random horizontal flips.")] = True,
    batch_size: Annotated[int, Opt(help="Images per micro-batch.")] = 8,
    grad_accum: Annotated[int, Opt(help="Micro-batches per optimiser step.")] = 1,
    steps: Annotated[int, Opt(help="Optimiser steps.")] = 1000,
    lr: Annotated[float, Opt(help="Peak learning rate (AdamW).")] = 1e-3,
    lr_schedule: Annotated[str, Opt(help="cosine (to 10%) or constant, after warm-up.")] = "cosine",
    warmup: Annotated[int, Opt(help="Linear warm-up steps.")] = 100,
    weight_decay: Annotated[float, Opt(help="AdamW weight decay.")] = 0.01,
    ema_decay: Annotated[float, Opt(help="EMA decay of the exported weights.")] = 0.999,
    grad_clip: Annotated[float, Opt(help="Gradient norm clip (0: off).")] = 1.0,
    seed: Annotated[int, Opt(help="Seed of initialisation, crops and posterior noise.")] = 0,
    precision: Annotated[str, Opt(help="auto, bf16 or fp32 autocast (auto: bf16 where the device is fast at it).")] = (
        "auto"
    ),
    reconstruction: Annotated[str, Opt(help="l1 or mse.")] = "l1",
    ssim_weight: Annotated[float, Opt(help="Weight of (1 - SSIM).")] = 0.2,
    ssim_kind: Annotated[str, Opt(help="ssim or ms-ssim.")] = "ssim",
    kl_weight: Annotated[float, Opt(help="KL weight (LDM recipe: 1e-6).")] = 1e-6,
    learned_logvar: Annotated[bool, Opt(help="LDM's learned log-variance on the reconstruction term.")] = False,
    disc_weight: Annotated[float, Opt(help="PatchGAN hinge loss weight (0: no discriminator).")] = 0.0,
    disc_start: Annotated[int, Opt(help="Step at which the discriminator joins.")] = 0,
    lpips_weights: Annotated[str | None, Opt(help="Local LPIPS backbone file (AlexNet/VGG16).")] = None,
    lpips_weight: Annotated[float, Opt(help="Weight of the LPIPS term.")] = 0.0,
    val_every: Annotated[int, Opt(help="Validate every N steps.")] = 250,
    checkpoint_every: Annotated[int, Opt(help="Checkpoint every N steps.")] = 250,
    sample_every: Annotated[int, Opt(help="Sample grid every N steps.")] = 500,
    log_every: Annotated[int, Opt(help="Log every N steps.")] = 10,
    time_limit: Annotated[float | None, Opt(help="Stop (and export) after this many minutes.")] = None,
    resume: Annotated[bool, Opt("--resume", help="Continue the run in --out exactly where it stopped.")] = False,
    device: Annotated[str, Opt(help="cpu, cuda, cuda:1 or mps.")] = "cpu",
    threads: Annotated[int | None, Opt(help="CPU threads (default: PyTorch's).")] = None,
    export_dtype: Annotated[str, Opt(help="fp32 or fp16 weights in the exported file.")] = "fp32",
    as_json: Annotated[bool, Opt("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Train a VAE from scratch or fine-tune one; exports the EMA weights as an LDM-layout safetensors file."""
    from vaekit.train.config import TrainConfig
    from vaekit.train.loop import run_training

    if threads is not None:
        if threads < 1:
            raise BadInputError("--threads must be >= 1")
        torch.set_num_threads(threads)
    if export_dtype not in ("fp32", "fp16"):
        raise BadInputError("--export-dtype must be fp32 or fp16")
    cfg = TrainConfig(
        data=tuple(data),
        val_data=tuple(val_data or ()),
        val_count=val_count,
        preset=preset,
        init=init,
        train_part=train_part,
        crop=crop,
        resize_short=resize_short,
        min_scale=min_scale,
        flip=flip,
        batch_size=batch_size,
        grad_accum=grad_accum,
        steps=steps,
        lr=lr,
        lr_schedule=lr_schedule,
        warmup=warmup,
        weight_decay=weight_decay,
        ema_decay=ema_decay,
        grad_clip=grad_clip,
        seed=seed,
        precision=precision,
        reconstruction=reconstruction,
        ssim_weight=ssim_weight,
        ssim_kind=ssim_kind,
        kl_weight=kl_weight,
        learned_logvar=learned_logvar,
        disc_weight=disc_weight,
        disc_start=disc_start,
        lpips_weights=lpips_weights,
        lpips_weight=lpips_weight,
        val_every=val_every,
        checkpoint_every=checkpoint_every,
        sample_every=sample_every,
        log_every=log_every,
        time_limit=time_limit,
    )
    progress, update = _progress_printer(log_every, steps)
    dtype = torch.float16 if export_dtype == "fp16" else None
    if progress is not None:
        with progress:
            result = run_training(cfg, out, resume, device, update, export_dtype=dtype)
    else:
        result = run_training(cfg, out, resume, device, update, export_dtype=dtype)
    if result.skipped:
        cli.err.print(f"[yellow]warning:[/] {escape(result.skipped)}")
    summary = {
        "out": str(result.out_dir),
        "step": result.step,
        "interrupted": result.interrupted,
        "checkpoint": str(result.checkpoint),
        "export": str(result.export) if result.export else None,
        "wall_minutes": round(result.wall_seconds / 60, 2),
        **{k: round(v, 4) for k, v in result.validation.items()},
    }
    if result.interrupted:
        cli.err.print(
            escape(f"stopped at step {result.step}; checkpoint saved; continue with the same command and --resume")
        )
    if as_json:
        emit_json(summary)
    else:
        cli.out.print(kv_table(f"training run {result.out_dir}", list(summary.items())))
    if result.interrupted:
        raise typer.Exit(130)


@app.command("calibrate")
def calibrate_command(
    vae: Annotated[str, typer.Argument(help="VAE file (or library name) to calibrate.")],
    images: Annotated[list[str], Opt("--images", help="Images: folders, files, list files, 'skimage', 'builtin'.")],
    max_images: Annotated[int, Opt(help="Use at most this many images.")] = 256,
    write: Annotated[bool, Opt("--write", help="Store the factors in the file's metadata (atomically).")] = False,
    device: Annotated[str, Opt(help="cpu, cuda, cuda:1 or mps.")] = "cpu",
    as_json: Annotated[bool, Opt("--json", help="Print JSON.")] = False,
) -> None:
    """Estimate the latent scaling (1/std) and shift (mean) of a VAE over images, as SD chose 0.18215."""
    from vaekit.interfaces.cli.common import resolve_selected_vae
    from vaekit.ops.images import load_image
    from vaekit.train.calibrate import calibrate, write_factors
    from vaekit.train.data import expand_inputs
    from vaekit.vae import load_vae

    resolved = resolve_selected_vae(vae)
    model = load_vae(resolved.source, device=device)
    paths = expand_inputs(images)[:max_images]
    loaded, skipped = [], 0
    for p in paths:
        try:
            loaded.append(load_image(p).rgb)
        except BadInputError:
            skipped += 1
    if not loaded:
        raise BadInputError(f"no readable images in {' '.join(images)}")
    if skipped:
        cli.err.print(f"[yellow]warning:[/] skipped {skipped} unreadable image(s)")
    result = calibrate(model, loaded)
    written = None
    if write:
        if resolved.path is None:
            raise BadInputError(f"{vae}: a preset has no file to write the factors into")
        written = write_factors(resolved.path, model.config, result.scale, result.shift)
    data = {
        "vae": resolved.source,
        **result.to_dict(),
        "current_scale": model.config.scaling_factor,
        "current_shift": model.config.shift_factor,
        "written": str(written) if written else None,
    }
    if as_json:
        emit_json(data)
        return
    rows = [
        ("scaling factor (1/std)", f"{result.scale:.5f}  (file: {model.config.scaling_factor:.5f})"),
        ("shift factor (mean)", f"{result.shift:.5f}  (file: {model.config.shift_factor:.5f})"),
        ("images / latent values", f"{result.images} / {result.elements:,}"),
        ("written", str(written) if written else "no (pass --write to store them)"),
    ]
    cli.out.print(kv_table(f"calibration of {resolved.source}", rows))
