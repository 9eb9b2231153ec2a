"""``vaekit encode``, ``vaekit decode`` and ``vaekit roundtrip``: images <-> latent files through the ops layer."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.markup import escape
from rich.table import Table

from vaekit.errors import BadInputError
from vaekit.formats.latent_file import load_latents, save_latents, vae_sha256
from vaekit.interfaces.cli import core as cli
from vaekit.interfaces.cli.common import (
    DeviceOption,
    JsonOption,
    MaxMemoryOption,
    OverwriteOption,
    PrecisionOption,
    TileSizeOption,
    TilingOption,
    VaeOption,
    expand_images,
    load_selected_vae,
    parse_memory,
    refuse_existing,
    track,
    warn,
    writing,
)
from vaekit.interfaces.cli.core import app
from vaekit.interfaces.cli.output import emit_json
from vaekit.ops import codec as pipeline
from vaekit.ops.images import LoadedImage, read_image, save_image
from vaekit.vae import VAE

InputsArgument = Annotated[list[str], typer.Argument(help="Image files, folders, globs, or `builtin` (sample photos).")]
OutDirOption = Annotated[Path, typer.Option("-o", "--output", help="Output folder (created if missing).")]
CompileOption = Annotated[bool, typer.Option("--compile", help="torch.compile the model (pays off on many images).")]


def _options(
    precision: str,
    tiling: str,
    max_memory: str | None,
    tile_size: int | None,
    sample: bool = False,
    seed: int | None = None,
    compile_: bool = False,
) -> pipeline.CodecOptions:
    return pipeline.CodecOptions(
        precision=precision,
        tiling=tiling,
        max_memory=parse_memory(max_memory),
        tile_size=tile_size,
        sample=sample,
        seed=seed,
        compile=compile_,
    )


def _destinations(sources: list[Path], out_dir: Path, suffix: str, overwrite: bool) -> list[Path]:
    """One output per input (same stem, new suffix), checked before any work: no collisions, nothing overwritten."""
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInputError(f"{out_dir}: exists and is not a folder; give a folder to -o")
    dests = [out_dir / (src.stem + suffix) for src in sources]
    seen: dict[Path, Path] = {}
    for src, dest in zip(sources, dests, strict=True):
        if dest in seen:
            raise BadInputError(f"{seen[dest]} and {src} would both be written to {dest}; rename one or run twice")
        seen[dest] = src
        refuse_existing(dest, overwrite)
    return dests


def _read_images(paths: list[Path]) -> list[tuple[Path, LoadedImage]]:
    """Read every image; unreadable ones are skipped with a warning, an error only when none is usable."""
    images: list[tuple[Path, LoadedImage]] = []
    for p in paths:
        try:
            images.append((p, read_image(p)))
        except BadInputError as e:
            warn(f"skipped: {e}")
    if not images:
        raise BadInputError(f"none of the {len(paths)} input(s) is a readable image; give PNG, JPEG or WebP files")
    return images


def _summary(verb: str, n: int, seconds: float, out_dir: Path, unit: str = "image") -> str:
    per = seconds / max(n, 1)
    return f"{verb} {n} {unit}{'s' if n != 1 else ''} in {seconds:.2f} s ({per:.3f} s/{unit}) -> {out_dir}"


def _note_all(notes: list[str], label: str) -> None:
    for message in dict.fromkeys(notes):
        warn(f"{label}: {message}")


@app.command("encode")
def encode_command(
    inputs: InputsArgument,
    output: OutDirOption,
    vae: VaeOption = None,
    precision: PrecisionOption = "auto",
    tiling: TilingOption = "auto",
    max_memory: MaxMemoryOption = None,
    tile_size: TileSizeOption = None,
    device: DeviceOption = "auto",
    sample: Annotated[bool, typer.Option("--sample", help="Sample the posterior instead of taking its mode.")] = False,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for --sample.")] = None,
    posterior: Annotated[
        bool, typer.Option("--posterior", help="Also store the posterior mean and log-variance.")
    ] = False,
    compile_: CompileOption = False,
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
) -> None:
    """Encode images to latent files (one .safetensors per image, with the metadata needed to decode it)."""
    options = _options(precision, tiling, max_memory, tile_size, sample, seed, compile_)
    paths = expand_images(inputs)
    dests = _destinations(paths, output, ".safetensors", overwrite)
    images = _read_images(paths)
    model = load_selected_vae(vae, device)
    by_path = dict(zip(paths, dests, strict=True))
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for path, img in track(images, len(images), "encoding"):
        t0 = time.perf_counter()
        if img.alpha is not None:
            warn(f"{path.name}: the alpha channel is not encoded (latents hold RGB only)")
        enc = pipeline.encode(model, img.rgb.unsqueeze(0), options)
        _note_all(enc.notes, path.name)
        dest = by_path[path]
        with writing(dest):
            save_latents(
                dest,
                enc.latents,
                model,
                image_size=enc.image_sizes[0],
                padding=enc.paddings[0],
                mean=enc.mean if posterior else None,
                logvar=enc.logvar if posterior else None,
                overwrite=overwrite,
                sampled=enc.sampled,
            )
        latents = enc.latents
        assert isinstance(latents, torch.Tensor)
        rows.append(
            {
                "input": str(path),
                "output": str(dest),
                "size": list(img.size),
                "latent_shape": list(latents.shape[1:]),
                "dtype": str(enc.dtype).removeprefix("torch."),
                "tiled": enc.tiled,
                "seconds": round(time.perf_counter() - t0, 4),
            }
        )
    elapsed = time.perf_counter() - start
    if as_json:
        emit_json({"vae": model.origin.name, "items": rows, "seconds": round(elapsed, 4)})
        return
    table = Table(title=f"latents in {output}", title_justify="left")
    for column in ("image", "size", "latent", "dtype", "tiled", "time"):
        table.add_column(column)
    for r in rows:
        shape = "x".join(map(str, r["latent_shape"]))
        table.add_row(escape(Path(r["input"]).name), "x".join(map(str, r["size"])), shape, r["dtype"], _yn(r), _secs(r))
    cli.out.print(table)
    cli.out.print(escape(_summary("encoded", len(rows), elapsed, output)))


def _yn(row: dict[str, Any]) -> str:
    return "yes" if row["tiled"] else "no"


def _secs(row: dict[str, Any]) -> str:
    return f"{row['seconds']:.2f} s"


def _expand_latents(inputs: list[str]) -> list[Path]:
    """Latent files, folders (recursive) and globs -> .safetensors paths."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths.extend(sorted(q for q in p.rglob("*.safetensors") if q.is_file()))
        elif p.is_file():
            paths.append(p)
        elif any(c in item for c in "*?["):
            paths.extend(sorted(q for q in Path().glob(item) if q.is_file()))
        else:
            raise BadInputError(f"{item}: no such file, folder or matching glob")
    if not paths:
        raise BadInputError(f"no latent files found in {' '.join(inputs)}; give .safetensors files made by encode")
    return list(dict.fromkeys(paths))


@app.command("decode")
def decode_command(
    inputs: Annotated[list[str], typer.Argument(help="Latent files (from `vaekit encode`), folders or globs.")],
    output: OutDirOption,
    vae: VaeOption = None,
    precision: PrecisionOption = "auto",
    tiling: TilingOption = "auto",
    max_memory: MaxMemoryOption = None,
    tile_size: TileSizeOption = None,
    device: DeviceOption = "auto",
    compile_: CompileOption = False,
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
) -> None:
    """Decode latent files to PNG images, cropped back to each original image's size."""
    options = _options(precision, tiling, max_memory, tile_size, compile_=compile_)
    paths = _expand_latents(inputs)
    files = [load_latents(p) for p in paths]  # every file checked before any work
    planned: list[tuple[int, int, Path]] = []  # (file index, item index, destination)
    for i, lf in enumerate(files):
        n = lf.latents.shape[0]
        for j in range(n):
            name = paths[i].stem + (f"_{j}" if n > 1 else "") + ".png"
            planned.append((i, j, output / name))
    dests = [d for _, _, d in planned]
    if len(set(dests)) != len(dests):
        raise BadInputError("two latent files share a name and would write the same image; rename one or run twice")
    for d in dests:
        refuse_existing(d, overwrite)
    model = load_selected_vae(vae, device)
    for lf in files:
        lf.check_vae(model)
    sha = vae_sha256(model)
    for lf in {lf.vae_sha256: lf for lf in files}.values():
        if lf.vae_sha256 != sha:
            warn(
                f"{lf.path}: made by {lf.vae_name or 'another VAE'} ({lf.vae_short_hash}); decoding with "
                f"{model.origin.name}: pass --vae to decode with the original"
            )
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for i, lf in track(list(enumerate(files)), len(files), "decoding"):
        t0 = time.perf_counter()
        dec = pipeline.decode(
            model, list(lf.latents.unbind(0)), options, image_size=lf.image_sizes, padding=lf.paddings
        )
        _note_all(dec.notes, paths[i].name)
        per = (time.perf_counter() - t0) / len(dec.images)
        for (fi, j, dest), image in zip([p for p in planned if p[0] == i], dec.images, strict=True):
            with writing(dest):
                save_image(image, dest, overwrite=True)
            size = [int(image.shape[2]), int(image.shape[1])]
            rows.append({"input": str(paths[fi]), "item": j, "output": str(dest), "size": size, "seconds": per})
    elapsed = time.perf_counter() - start
    if as_json:
        emit_json({"vae": model.origin.name, "items": rows, "seconds": round(elapsed, 4)})
        return
    for r in rows:
        cli.out.print(f"{escape(r['output'])}  {r['size'][0]}x{r['size'][1]}")
    cli.out.print(escape(_summary("decoded", len(rows), elapsed, output)))


def psnr(reference: torch.Tensor, output: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, 1] (inf when identical)."""
    mse = float(torch.mean((reference.float() - output.float()) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


@dataclass
class _Roundtrip:
    path: Path
    dest: Path
    size: tuple[int, int]
    psnr: float
    seconds: float
    tiled: bool


@app.command("roundtrip")
def roundtrip_command(
    inputs: InputsArgument,
    output: OutDirOption,
    vae: VaeOption = None,
    precision: PrecisionOption = "auto",
    tiling: TilingOption = "auto",
    max_memory: MaxMemoryOption = None,
    tile_size: TileSizeOption = None,
    device: DeviceOption = "auto",
    compile_: CompileOption = False,
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
) -> None:
    """Encode and decode each image, write the reconstruction (same name, PNG) and report its PSNR."""
    options = _options(precision, tiling, max_memory, tile_size, compile_=compile_)
    paths = expand_images(inputs)
    dests = _destinations(paths, output, ".png", overwrite)
    images = _read_images(paths)
    model = load_selected_vae(vae, device)
    by_path = dict(zip(paths, dests, strict=True))
    results: list[_Roundtrip] = []
    start = time.perf_counter()
    for path, img in track(images, len(images), "roundtrip"):
        results.append(_one_roundtrip(model, path, img, by_path[path], options))
    elapsed = time.perf_counter() - start
    finite = [r.psnr for r in results if math.isfinite(r.psnr)]
    mean_psnr = sum(finite) / len(finite) if finite else math.inf
    if as_json:
        emit_json(
            {
                "vae": model.origin.name,
                "items": [
                    {
                        "input": str(r.path),
                        "output": str(r.dest),
                        "size": list(r.size),
                        "psnr": r.psnr if math.isfinite(r.psnr) else None,
                        "seconds": round(r.seconds, 4),
                        "tiled": r.tiled,
                    }
                    for r in results
                ],
                "mean_psnr": mean_psnr if math.isfinite(mean_psnr) else None,
                "seconds": round(elapsed, 4),
            }
        )
        return
    table = Table(title=f"reconstructions in {output}", title_justify="left")
    for column in ("image", "size", "PSNR (dB)", "time", "written to"):
        table.add_column(column, justify="right" if column in ("PSNR (dB)", "time") else "left")
    for r in results:
        table.add_row(
            escape(r.path.name), f"{r.size[0]}x{r.size[1]}", f"{r.psnr:.2f}", f"{r.seconds:.2f} s", escape(str(r.dest))
        )
    cli.out.print(table)
    cli.out.print(escape(_summary("reconstructed", len(results), elapsed, output) + f"; mean PSNR {mean_psnr:.2f} dB"))


def _one_roundtrip(model: VAE, path: Path, img: LoadedImage, dest: Path, options: pipeline.CodecOptions) -> _Roundtrip:
    t0 = time.perf_counter()
    enc, dec = pipeline.roundtrip(model, img.rgb.unsqueeze(0), options)
    _note_all(enc.notes + dec.notes, path.name)
    images = dec.images
    assert isinstance(images, torch.Tensor)
    recon = images[0, :3]
    with writing(dest):
        save_image(recon, dest, alpha=img.alpha, overwrite=True)
    return _Roundtrip(path, dest, img.size, psnr(img.rgb, recon), time.perf_counter() - t0, enc.tiled or dec.tiled)
