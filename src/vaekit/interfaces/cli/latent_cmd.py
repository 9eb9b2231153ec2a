"""Latent space commands: sample, interpolate, preview, fit-preview, show-latent, noise, augment, anomaly."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.markup import escape

from vaekit.errors import BadInputError
from vaekit.interfaces.cli import core as cli
from vaekit.interfaces.cli.common import (
    DeviceOption,
    JsonOption,
    OverwriteOption,
    VaeOption,
    expand_images,
    load_selected_vae,
    note,
    refuse_existing,
    resolve_selected_vae,
    writing,
)
from vaekit.interfaces.cli.core import app
from vaekit.interfaces.cli.output import emit_json, kv_table
from vaekit.latent import anomaly, augmentation, channels, interpolation, noise, preview, render, sampling
from vaekit.ops.images import IMAGE_SUFFIXES, load_image, save_image
from vaekit.vae import load_vae

DEFAULT_TIMESTEPS = "0,100,250,500,750,1000"
SHEET_TILE = 128  # pixels per picture on contact sheets
SeedOption = Annotated[int, typer.Option("--seed", help="Random seed (the same seed gives the same result).")]


def _say(text: str) -> None:
    """A result line on stdout, printed literally (paths may hold [brackets])."""
    cli.out.print(escape(text))


def _save(image: torch.Tensor, dest: Path, overwrite: bool) -> Path:
    refuse_existing(dest, overwrite)
    with writing(dest):
        return save_image(image, dest)


def _out_dir(dest: Path, names: list[str], overwrite: bool) -> None:
    """Create an output folder, refusing before anything is written if one of the files exists already."""
    if dest.exists() and not dest.is_dir():
        raise BadInputError(f"{dest}: exists and is not a folder")
    for name in names:
        refuse_existing(dest / name, overwrite)
    dest.mkdir(parents=True, exist_ok=True)


def _image(path: Path) -> torch.Tensor:
    return load_image(path).rgb


def _sheet_tile(images: list[torch.Tensor]) -> int:
    """Side of the square each picture gets on a contact sheet: the largest image's, at most SHEET_TILE."""
    return min(SHEET_TILE, max(max(img.shape[-2:]) for img in images))


def _resize_max(image: torch.Tensor, max_side: int | None) -> torch.Tensor:
    h, w = image.shape[-2:]
    if not max_side or max(h, w) <= max_side:
        return image
    s = max_side / max(h, w)
    size = (max(1, round(h * s)), max(1, round(w * s)))
    out = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)
    return out[0].clamp(0, 1)


# --- sample --------------------------------------------------------------------------------------------------------


@app.command("sample")
def sample_command(
    n: Annotated[int, typer.Option("--n", help="Number of samples.")] = 8,
    size: Annotated[int, typer.Option("--size", help="Image size in pixels (square; a multiple of 8).")] = 256,
    temperature: Annotated[
        float, typer.Option("--temperature", help="Scale of the prior's noise (1 = N(0, I)).")
    ] = 1.0,
    seed: SeedOption = 0,
    output: Annotated[Path, typer.Option("-o", "--output", help="Grid image to write.")] = Path("samples.png"),
    columns: Annotated[int | None, typer.Option("--columns", help="Grid columns (default: near square).")] = None,
    latents_out: Annotated[
        Path | None, typer.Option("--save-latents", help="Also write the drawn latents as a latent file.")
    ] = None,
    vae: VaeOption = None,
    device: DeviceOption = "auto",
    overwrite: OverwriteOption = False,
) -> None:
    """Draw latents from the prior N(0, I) in the VAE's scaled space (seeded), decode them, write a grid."""
    refuse_existing(output, overwrite)
    model = load_selected_vae(vae, device)
    z = sampling.sample_latents(model, n, size, size, temperature, seed)
    images = model.decode(z)
    _save(render.grid(images, columns), output, overwrite)
    if latents_out is not None:
        from vaekit.formats.latent_file import save_latents

        with writing(latents_out):
            save_latents(latents_out, z, model, image_size=(size, size), padding=(0, 0, 0, 0), overwrite=overwrite)
        note(f"latents: {latents_out}")
    _say(f"{n} samples (temperature {temperature}, seed {seed}) -> {output}")


# --- interpolate ---------------------------------------------------------------------------------------------------


@app.command("interpolate")
def interpolate_command(
    image_a: Annotated[Path, typer.Argument(help="First image.")],
    image_b: Annotated[Path, typer.Argument(help="Second image.")],
    steps: Annotated[int, typer.Option("--steps", help="Frames, both endpoints included.")] = 8,
    method: Annotated[str, typer.Option("--method", help="slerp (keeps the latent's norm) or lerp.")] = "slerp",
    resize: Annotated[
        bool, typer.Option("--resize", help="Resize the second image to the first's size (else sizes must match).")
    ] = False,
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for frames, grid and animation.")] = Path(
        "interpolation"
    ),
    animation: Annotated[str, typer.Option("--animation", help="Animation format: gif, webp or none.")] = "gif",
    fps: Annotated[float, typer.Option("--fps", help="Animation frames per second.")] = 8.0,
    bounce: Annotated[bool, typer.Option("--bounce", help="Play the animation forth and back.")] = False,
    vae: VaeOption = None,
    device: DeviceOption = "auto",
    overwrite: OverwriteOption = False,
) -> None:
    """Encode two images, walk between their latents (slerp or lerp) and decode every step."""
    if animation not in ("gif", "webp", "none"):
        raise BadInputError(f"--animation {animation!r}: use gif, webp or none")
    if steps < 2:
        raise BadInputError(f"--steps must be at least 2 (the two endpoints), got {steps}")
    a, b = _image(image_a), _image(image_b)
    names = [f"frame_{i:03d}.png" for i in range(steps)] + ["grid.png"]
    names += [] if animation == "none" else [f"animation.{animation}"]
    interpolation.match_size(a, b, resize)  # refuse mismatched sizes before loading the VAE
    if method not in interpolation.METHODS:
        raise BadInputError(f"unknown interpolation {method!r}: use slerp or lerp")
    _out_dir(output, names, overwrite)
    model = load_selected_vae(vae, device)
    frames = interpolation.interpolate(model, a, b, steps, method, resize)  # type: ignore[arg-type]
    with writing(output):
        for i, frame in enumerate(frames):
            save_image(frame, output / f"frame_{i:03d}.png")
        save_image(render.grid(frames, columns=len(frames)), output / "grid.png")
        if animation != "none":
            render.save_animation(frames, output / f"animation.{animation}", fps, bounce)
    _say(
        f"{steps} frames ({method}) -> {output}/ (frame_*.png, grid.png"
        + (f", animation.{animation})" if animation != "none" else ")")
    )


# --- preview and fit-preview ---------------------------------------------------------------------------------------


@app.command("preview")
def preview_command(
    latents: Annotated[Path, typer.Argument(help="A latent file (.safetensors written by vaekit).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Preview image to write.")] = Path("preview.png"),
    scale: Annotated[int, typer.Option("--scale", help="Enlargement (8 = the image's size; 1 = a pixel a cell).")] = 8,
    vae: VaeOption = None,
    overwrite: OverwriteOption = False,
) -> None:
    """A fast approximate RGB preview of latents without the decoder: a per-family linear map plus bias.

    The VAE's own fitted map (see fit-preview) is used when --vae names a file that has one; without --vae,
    the published map of the latents' family, else the selected VAE's fitted map.
    """
    from vaekit.formats.latent_file import load_latents

    refuse_existing(output, overwrite)
    lf = load_latents(latents)
    if vae is None and preview.published_factors(lf.family) is not None:
        pmap = preview.family_preview_map(lf.family)
    else:
        model = load_selected_vae(vae, "cpu")
        lf.check_vae(model)
        pmap = preview.preview_map_for(model)
    if pmap.channels != lf.latents.shape[1]:
        raise BadInputError(
            f"{latents}: latents have {lf.latents.shape[1]} channels; the {pmap.family} preview map takes "
            f"{pmap.channels}: they were made by a VAE of another family"
        )
    images = preview.preview_images(lf.latents, pmap, scale)
    _save(images[0] if len(images) == 1 else render.grid(images), output, overwrite)
    _say(f"preview ({pmap.source}) of {len(images)} latent(s) -> {output}")


@app.command("fit-preview")
def fit_preview_command(
    vae: Annotated[str, typer.Argument(help="VAE file (.safetensors or diffusers folder), library name or hash.")],
    images: Annotated[
        list[str] | None, typer.Option("--images", help="Images, folders, globs or `builtin` (default) to fit on.")
    ] = None,
    max_side: Annotated[int, typer.Option("--max-side", help="Downsize larger images to this side first.")] = 256,
    output: Annotated[
        Path | None, typer.Option("--output", help="Write a copy of the VAE with the map instead of in place.")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Fit and report, write nothing.")] = False,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Fit the latent -> RGB preview map of a VAE by least squares and store it in the file's metadata.

    Reports the preview's PSNR against the full decode (each image held out of its own fit) next to a
    mean-colour baseline, and how many times faster the preview is than decoding.
    """
    resolved = resolve_selected_vae(vae)
    if resolved.path is None:
        raise BadInputError(f"{vae}: a preset has no file to store a preview map in; save it first")
    if output is not None and output.exists():
        raise BadInputError(f"{output}: already exists; choose another output path")
    model = load_vae(resolved.source, device=device)
    paths = expand_images(images or ["builtin"])
    fit = preview.fit_preview_map(model, (_resize_max(_image(p), max_side) for p in paths))
    dest = None
    if not dry_run:
        with writing(output or resolved.path):
            dest = preview.store_preview_map(resolved.path, fit.pmap, output)
    if as_json:
        emit_json({**fit.to_dict(), "stored_in": str(dest) if dest else None})
        return
    rows = [
        ("images / latent cells", f"{fit.images} / {fit.cells}"),
        ("PSNR vs decode (held out)", f"{fit.psnr_db:.2f} dB"),
        ("baseline: mean colour", f"{fit.psnr_mean_colour_db:.2f} dB"),
        ("baseline: grey (zero map)", f"{fit.psnr_grey_db:.2f} dB"),
        (
            f"published factors ({model.family})",
            "none for this family" if fit.psnr_published_db is None else f"{fit.psnr_published_db:.2f} dB",
        ),
        ("decode time", f"{fit.decode_seconds * 1000:.1f} ms"),
        ("preview time", f"{fit.preview_seconds * 1000:.3f} ms"),
        ("speed ratio", f"{fit.speed_ratio:,.0f}x faster than decoding"),
        ("stored in", f"{dest} (metadata {preview.PREVIEW_METADATA_KEY})" if dest else "- (dry run)"),
    ]
    cli.out.print(kv_table(escape(f"preview map for {model.origin.name}"), rows))


# --- show-latent ---------------------------------------------------------------------------------------------------


@app.command("show-latent")
def show_latent_command(
    latents: Annotated[Path, typer.Argument(help="A latent file, or an image to encode first.")],
    index: Annotated[int, typer.Option("--index", help="Which latent of the file.")] = 0,
    output: Annotated[Path, typer.Option("-o", "--output", help="Channel sheet to write.")] = Path("channels.png"),
    vae: VaeOption = None,
    device: DeviceOption = "auto",
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
) -> None:
    """Each latent channel as a normalised greyscale image, with its mean, std, min and max."""
    refuse_existing(output, overwrite)
    if latents.suffix.lower() in IMAGE_SUFFIXES:
        model = load_selected_vae(vae, device)
        z = model.encode(_image(latents).unsqueeze(0))
    else:
        from vaekit.formats.latent_file import load_latents

        z = load_latents(latents).latents
    if not 0 <= index < len(z):
        raise BadInputError(f"--index {index}: the file holds {len(z)} latent(s)")
    one = z[index].float()
    _save(channels.channel_sheet(one), output, overwrite)
    stats = channels.channel_stats(one)
    if as_json:
        emit_json({"shape": list(one.shape), "channels": [s.to_dict() for s in stats], "image": str(output)})
        return
    table = kv_table(escape(f"{latents} [{index}]: {tuple(one.shape)}"), [])
    table.show_header = True
    table.columns[0].header, table.columns[1].header = "channel", "mean / std / min / max"
    for s in stats:
        table.add_row(str(s.channel), f"{s.mean:+.3f} / {s.std:.3f} / {s.min:+.3f} / {s.max:+.3f}")
    cli.out.print(table)
    _say(f"channel sheet -> {output}")


# --- noise ---------------------------------------------------------------------------------------------------------


def _timesteps(values: list[str]) -> list[int]:
    out: list[int] = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                t = float(part)
            except ValueError:
                raise BadInputError(f"--t {part!r}: give whole timesteps in [0, 1000], e.g. --t 0,250,500") from None
            noise.check_timestep(t)
            out.append(int(t))
    if not out:
        raise BadInputError("give at least one timestep with --t")
    return out


@app.command("noise")
def noise_command(
    image: Annotated[Path, typer.Argument(help="Image to encode and noise.")],
    t: Annotated[
        list[str] | None,
        typer.Option(
            "--t",
            help="Timesteps in [0, 1000], comma-separated or repeated; 0 = no noise (default 0,100,250,500,750,1000).",
        ),
    ] = None,
    seed: SeedOption = 0,
    output: Annotated[Path, typer.Option("-o", "--output", help="Strip image to write.")] = Path("noise.png"),
    vae: VaeOption = None,
    device: DeviceOption = "auto",
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
) -> None:
    """Stable Diffusion's forward diffusion in latent space: encode, noise to each t, decode; a strip across t."""
    steps = _timesteps(t or [DEFAULT_TIMESTEPS])
    refuse_existing(output, overwrite)
    rgb = _image(image)
    model = load_selected_vae(vae, device)
    frames = noise.noise_strip(model, rgb, steps, seed)
    labelled = torch.stack([render.label(f, f"t={s}") for f, s in zip(frames, steps, strict=True)])
    _save(render.grid(labelled, columns=len(steps)), output, overwrite)
    levels = [(s, noise.signal_level(s)) for s in steps]
    if as_json:
        emit_json({"image": str(output), "steps": [{"t": s, "alpha_bar": a} for s, a in levels]})
        return
    rows = [(f"t={s}", f"signal {a**0.5:.3f}, noise {(1 - a) ** 0.5:.3f} (alpha_bar {a:.4f})") for s, a in levels]
    cli.out.print(kv_table(escape(f"forward diffusion of {image.name} -> {output}"), rows))


# --- augment -------------------------------------------------------------------------------------------------------


@app.command("augment")
def augment_command(
    images: Annotated[list[str], typer.Argument(help="Images, folders, globs or `builtin`.")],
    n: Annotated[int, typer.Option("--n", help="Variants per image.")] = 4,
    mode: Annotated[str, typer.Option("--mode", help="noise or neighbours.")] = "noise",
    strength: Annotated[
        float | None,
        typer.Option("--strength", help="noise: std relative to the latent's (0.2); neighbours: max step (0.3)."),
    ] = None,
    seed: SeedOption = 0,
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for the variants.")] = Path("augmented"),
    sheet: Annotated[
        Path | None, typer.Option("--sheet", help="Also write a contact sheet: each image, then its variants.")
    ] = None,
    vae: VaeOption = None,
    device: DeviceOption = "auto",
    overwrite: OverwriteOption = False,
) -> None:
    """Data augmentation in latent space: perturb each image's latent and decode (seeded)."""
    if n < 1:
        raise BadInputError(f"--n must be at least 1, got {n}")
    paths = expand_images(images)
    stems: list[str] = []
    for p in paths:
        stem = p.stem
        while stem in stems:
            stem += "_"
        stems.append(stem)
    names = [f"{stem}_aug{k:02d}.png" for stem in stems for k in range(n)]
    if mode not in augmentation.MODES:
        raise BadInputError(f"unknown augmentation {mode!r}: use noise or neighbours")
    _out_dir(output, names, overwrite)
    model = load_selected_vae(vae, device)
    if sheet is not None:
        refuse_existing(sheet, overwrite)
    originals = [_image(p) for p in paths]
    variants = augmentation.augment(model, originals, n, mode, strength, seed)  # type: ignore[arg-type]
    with writing(output):
        for stem, batch in zip(stems, variants, strict=True):
            for k, img in enumerate(batch):
                save_image(img, output / f"{stem}_aug{k:02d}.png")
    if sheet is not None:
        side = _sheet_tile(originals)
        tiles = [render.fit_box(img, side) for o, b in zip(originals, variants, strict=True) for img in (o, *b)]
        _save(render.grid(torch.stack(tiles), columns=n + 1), sheet, overwrite)
    _say(f"{n} {mode} variants of {len(paths)} image(s) -> {output}/")


# --- anomaly -------------------------------------------------------------------------------------------------------

anomaly_app = typer.Typer(help="Anomaly detection: fit on normal images, then score new ones.", no_args_is_help=True)
app.add_typer(anomaly_app, name="anomaly")


@anomaly_app.command("fit")
def anomaly_fit_command(
    images: Annotated[list[str], typer.Option("--images", help="Normal images, folders, globs or `builtin`.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Detector file (.json).")] = Path("anomaly.json"),
    fpr: Annotated[
        float, typer.Option("--fpr", help="False-positive rate the threshold allows on normal images.")
    ] = 0.05,
    score: Annotated[str, typer.Option("--score", help="Score that decides the verdict: elbo or recon.")] = "elbo",
    max_side: Annotated[int, typer.Option("--max-side", help="Downsize larger images to this side (0: never).")] = 512,
    vae: VaeOption = None,
    device: DeviceOption = "auto",
    overwrite: OverwriteOption = False,
) -> None:
    """Fit an anomaly detector on normal images: decoder noise, latent prior and calibrated thresholds."""
    refuse_existing(output, overwrite)
    if output.suffix.lower() != ".json":
        raise BadInputError(f"{output}: anomaly models are saved as .json")
    paths = expand_images(images)
    model = load_selected_vae(vae, device)
    fitted = anomaly.fit_anomaly(model, (_image(p) for p in paths), fpr, score, max_side or None)
    with writing(output):
        anomaly.save_anomaly_model(fitted, output, overwrite)
    rows = [
        ("normal images", len(paths)),
        ("score", fitted.score),
        ("false-positive rate", fitted.fpr),
        ("threshold elbo / recon", f"{fitted.thresholds['elbo']:.4f} / {fitted.thresholds['recon']:.4f}"),
        ("decoder noise std", f"{fitted.noise_var**0.5:.4f}"),
        ("VAE weights", fitted.vae_weights_sha256[:16]),
    ]
    if len(paths) * fpr < 1:
        rows.append(("note", f"{len(paths)} images are too few to calibrate a {fpr} rate; the threshold is their max"))
    cli.out.print(kv_table(escape(f"anomaly model -> {output}"), rows))


@anomaly_app.command("score")
def anomaly_score_command(
    images: Annotated[list[str], typer.Argument(help="Images, folders or globs to score.")],
    model_path: Annotated[Path, typer.Option("--model", help="Detector file from `vaekit anomaly fit`.")] = Path(
        "anomaly.json"
    ),
    heatmaps: Annotated[
        Path | None, typer.Option("--heatmaps", help="Folder for a heatmap PNG per image (where reconstruction fails).")
    ] = None,
    sheet: Annotated[
        Path | None, typer.Option("--sheet", help="Also write a contact sheet: each image above its heatmap and score.")
    ] = None,
    vae: VaeOption = None,
    device: DeviceOption = "auto",
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
) -> None:
    """Score images with a fitted detector: per image a score, a verdict and optionally a heatmap."""
    detector = anomaly.load_anomaly_model(model_path)
    paths = expand_images(images)
    names = [f"{p.stem}_{i:03d}_heatmap.png" for i, p in enumerate(paths)]
    if heatmaps is not None:
        _out_dir(heatmaps, names, overwrite)
    if sheet is not None:
        refuse_existing(sheet, overwrite)
    model = load_selected_vae(vae, device)
    images = [_image(p) for p in paths]
    results = anomaly.score_images(detector, model, images)
    if sheet is not None:
        columns = []
        side = _sheet_tile(images)
        for img, r in zip(images, results, strict=True):
            tile = torch.cat([render.fit_box(img, side), render.fit_box(r.heatmap, side)], dim=1)
            columns.append(render.label(tile, f"{r.score:.3f} {'ANOMALY' if r.anomalous else 'ok'}"))
        _save(render.grid(torch.stack(columns), columns=min(len(columns), 8)), sheet, overwrite)
    if heatmaps is not None:
        with writing(heatmaps):
            for name, r in zip(names, results, strict=True):
                save_image(r.heatmap, heatmaps / name)
    if as_json:
        emit_json([{"image": str(p), **r.to_dict()} for p, r in zip(paths, results, strict=True)])
        return
    table = kv_table(f"anomaly scores ({detector.score}, threshold {results[0].threshold:.4f})", [])
    table.show_header = True
    table.columns[0].header, table.columns[1].header = "image", "elbo / recon / verdict"
    for p, r in zip(paths, results, strict=True):
        verdict = "[bold red]ANOMALOUS[/]" if r.anomalous else "normal"
        table.add_row(escape(str(p)), f"{r.elbo:.4f} / {r.recon:.4f} / {verdict}")
    cli.out.print(table)
    flagged = sum(r.anomalous for r in results)
    _say(f"{flagged} of {len(results)} flagged" + (f"; heatmaps in {heatmaps}/" if heatmaps else ""))
