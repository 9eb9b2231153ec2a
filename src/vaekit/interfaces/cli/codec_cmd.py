"""``vaekit encode``, ``vaekit decode`` and ``vaekit roundtrip``: images <-> latent files through the ops layer.

Every input is checked before any work (a bad file is named, nothing is written); each output is written
atomically; Ctrl-C or a failure half-way says how many outputs were written, and ``--skip-existing`` lets the
rerun do only the rest. Latent files are vaekit's (``.safetensors``) or ComfyUI's (``.latent``); images keep
their alpha, bit depth and greyscale mode through a latent file, and output PNGs carry the VAE's name and short
hash in the ``parameters`` text chunk AUTOMATIC1111 reads.
"""

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

from vaekit.errors import BadInputError, LoadError, VaekitError
from vaekit.formats import comfy_latent
from vaekit.formats.image_meta import EXTRA_BITS, EXTRA_MODE, a1111_parameters
from vaekit.formats.io import read_safetensors_header, tensors_sha256
from vaekit.formats.latent_file import LatentFile, load_latents, save_latents, short_hash, vae_sha256
from vaekit.interfaces.cli import core as cli
from vaekit.interfaces.cli.common import (
    DeviceOption,
    FamilyOption,
    JsonOption,
    MaxMemoryOption,
    OverwriteOption,
    PrecisionOption,
    Progress,
    SkipExistingOption,
    TileSizeOption,
    TilingOption,
    VaeOption,
    check_output,
    expand_images,
    load_selected_vae,
    note,
    parse_memory,
    refuse_existing,
    track,
    warn,
)
from vaekit.interfaces.cli.core import app
from vaekit.interfaces.cli.output import emit_json
from vaekit.ops import codec as pipeline
from vaekit.ops.images import LoadedImage, read_image, save_image
from vaekit.vae import VAE

InputsArgument = Annotated[list[str], typer.Argument(help="Image files, folders, globs, or `builtin` (sample photos).")]
OutDirOption = Annotated[Path, typer.Option("-o", "--output", help="Output folder (created if missing).")]
CompileOption = Annotated[bool, typer.Option("--compile", help="torch.compile the model (pays off on many images).")]
LATENT_FORMATS = ("vaekit", "comfyui")
WEIGHTS_KEY = "vae_weights_sha256"  # in a latent file's extra strings: the hash of the VAE's tensors


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


def _exclusive(overwrite: bool, skip_existing: bool) -> None:
    if overwrite and skip_existing:
        raise BadInputError("give --overwrite or --skip-existing, not both")


def _plan(
    sources: list[Path], out_dir: Path, suffix: str, overwrite: bool, skip_existing: bool
) -> tuple[list[tuple[Path, Path]], int]:
    """One output per input (same stem, new suffix), checked before any work: no collisions, nothing overwritten.
    Returns the (input, output) pairs to do and how many were skipped because their output exists.
    """
    _exclusive(overwrite, skip_existing)
    check_output(out_dir, folder=True)
    seen: dict[Path, Path] = {}
    todo: list[tuple[Path, Path]] = []
    skipped = 0
    for src in sources:
        dest = out_dir / (src.stem + suffix)
        if dest in seen:
            raise BadInputError(f"{seen[dest]} and {src} would both be written to {dest}; rename one or run twice")
        seen[dest] = src
        refuse_existing(dest, overwrite, skip_existing)
        if skip_existing and dest.exists():
            skipped += 1
        else:
            todo.append((src, dest))
    if skipped:
        note(f"skipped {skipped} input(s) whose output already exists (--skip-existing)")
    return todo, skipped


def _read_images(pairs: list[tuple[Path, Path]]) -> list[tuple[Path, Path, LoadedImage]]:
    """Read every image before any work. Unreadable ones are skipped with a warning while others are usable;
    when none is, that is one error line (naming the file when there is one)."""
    images: list[tuple[Path, Path, LoadedImage]] = []
    problems: list[str] = []
    for src, dest in pairs:
        try:
            images.append((src, dest, read_image(src)))
        except BadInputError as e:
            problems.append(str(e))
    if pairs and not images:
        more = f" (and {len(problems) - 1} more like it)" if len(problems) > 1 else ""
        raise BadInputError(f"{problems[0]}{more}; give PNG, JPEG, WebP or TIFF images")
    for problem in problems:
        warn(f"skipped: {problem}")
    return images


def _summary(verb: str, n: int, seconds: float, out_dir: Path, unit: str = "image") -> str:
    per = seconds / max(n, 1)
    return f"{verb} {n} {unit}{'s' if n != 1 else ''} in {seconds:.2f} s ({per:.3f} s/{unit}) -> {out_dir}"


def _note_all(notes: list[str], label: str) -> None:
    for message in dict.fromkeys(notes):
        warn(f"{label}: {message}")


def _fail_json(as_json: bool, payload: dict[str, Any], error: VaekitError) -> None:
    """With --json, a run that stops half-way still prints what it wrote, and why it stopped."""
    if as_json:
        emit_json({**payload, "error": str(error), "complete": False})


def _weights_sha256(model: VAE) -> str:
    """The hash of the VAE's tensors (the same weights in any container hash the same)."""
    return tensors_sha256(model.state_dict())


def _png_text(model: VAE, size: tuple[int, int]) -> dict[str, str]:
    return {"parameters": a1111_parameters(model.origin.name, vae_sha256(model), size)}


@app.command("encode")
def encode_command(
    inputs: InputsArgument,
    output: OutDirOption,
    vae: VaeOption = None,
    family: FamilyOption = None,
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
    latent_format: Annotated[
        str,
        typer.Option("--format", help="vaekit (.safetensors with sizes, alpha, posterior) or comfyui (.latent)."),
    ] = "vaekit",
    compile_: CompileOption = False,
    overwrite: OverwriteOption = False,
    skip_existing: SkipExistingOption = False,
    as_json: JsonOption = False,
) -> None:
    """Encode images to latent files (one per image, with the metadata needed to decode it)."""
    options = _options(precision, tiling, max_memory, tile_size, sample, seed, compile_)
    if latent_format not in LATENT_FORMATS:
        raise BadInputError(f"--format {latent_format!r}: use vaekit or comfyui")
    if latent_format == "comfyui" and posterior:
        raise BadInputError("--posterior is for vaekit latent files; ComfyUI's .latent holds the latents only")
    suffix = comfy_latent.SUFFIX if latent_format == "comfyui" else ".safetensors"
    todo, skipped = _plan(expand_images(inputs), output, suffix, overwrite, skip_existing)
    images = _read_images(todo)
    model = load_selected_vae(vae, device, family=family)
    weights = _weights_sha256(model)
    rows: list[dict[str, Any]] = []
    progress = Progress(len(images))
    start = time.perf_counter()
    try:
        for path, dest, img in track(images, len(images), "encoding"):
            with progress.item(str(path)):
                rows.append(_encode_one(model, path, dest, img, options, posterior, latent_format, weights, overwrite))
                progress.written += 1
    except VaekitError as e:
        _fail_json(as_json, {"vae": model.origin.name, "items": rows}, e)
        raise
    elapsed = time.perf_counter() - start
    if as_json:
        emit_json(
            {
                "vae": model.origin.name,
                "items": rows,
                "skipped": skipped,
                "seconds": round(elapsed, 4),
                "complete": True,
            }
        )
        return
    table = Table(title=f"latents in {output}", title_justify="left")
    for column in ("image", "size", "latent", "dtype", "tiled", "time"):
        table.add_column(column)
    for r in rows:
        shape = "x".join(map(str, r["latent_shape"]))
        table.add_row(escape(Path(r["input"]).name), "x".join(map(str, r["size"])), shape, r["dtype"], _yn(r), _secs(r))
    cli.out.print(table)
    cli.out.print(escape(_summary("encoded", len(rows), elapsed, output)))


def _encode_one(
    model: VAE,
    path: Path,
    dest: Path,
    img: LoadedImage,
    options: pipeline.CodecOptions,
    posterior: bool,
    latent_format: str,
    weights: str,
    overwrite: bool,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    enc = pipeline.encode(model, img.rgb.unsqueeze(0), options)
    _note_all(enc.notes, path.name)
    latents = enc.latents
    assert isinstance(latents, torch.Tensor)
    extra = {EXTRA_BITS: str(img.bits), EXTRA_MODE: "grey" if img.grey else "rgb", WEIGHTS_KEY: weights}
    if latent_format == "comfyui":
        sha = vae_sha256(model)
        w, h = enc.image_sizes[0]
        info = {
            "vae_name": model.origin.name,
            "vae_sha256": sha,
            "vae_short_hash": short_hash(sha),
            "family": model.family,
            "image_size": f"{w}x{h}",
            "padding": ",".join(map(str, enc.paddings[0])),
            **extra,
        }
        if img.alpha is not None:
            warn(f"{path.name}: ComfyUI's latent files have no place for the alpha channel; it is not kept")
        comfy_latent.write_comfy_latent(dest, model.denormalise(latents.float()), vaekit_info=info)
    else:
        save_latents(
            dest,
            latents,
            model,
            image_size=enc.image_sizes[0],
            padding=enc.paddings[0],
            mean=enc.mean if posterior else None,
            logvar=enc.logvar if posterior else None,
            overwrite=True,
            sampled=enc.sampled,
            extra=extra,
            alphas=[img.alpha] if img.alpha is not None else None,
        )
    return {
        "input": str(path),
        "output": str(dest),
        "size": list(img.size),
        "latent_shape": list(latents.shape[1:]),
        "dtype": str(enc.dtype).removeprefix("torch."),
        "tiled": enc.tiled,
        "alpha_kept": img.alpha is not None and latent_format == "vaekit",
        "seconds": round(time.perf_counter() - t0, 4),
    }


def _yn(row: dict[str, Any]) -> str:
    return "yes" if row["tiled"] else "no"


def _secs(row: dict[str, Any]) -> str:
    return f"{row['seconds']:.2f} s"


LATENT_SUFFIXES = (".safetensors", comfy_latent.SUFFIX)


def _expand_latents(inputs: list[str]) -> list[Path]:
    """Latent files, folders (recursive) and globs -> .safetensors and .latent paths."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths.extend(sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in LATENT_SUFFIXES))
        elif p.is_file():
            paths.append(p)
        elif any(c in item for c in "*?["):
            paths.extend(sorted(q for q in Path().glob(item) if q.is_file()))
        else:
            raise BadInputError(f"{item}: no such file, folder or matching glob")
    if not paths:
        raise BadInputError(
            f"no latent files found in {' '.join(inputs)}; give .safetensors files made by encode or .latent files"
        )
    return list(dict.fromkeys(paths))


@dataclass
class _Latents:
    """One latent file to decode, whichever format it came in."""

    path: Path
    latents: torch.Tensor | None  # scaled (vaekit files); None until the VAE is known (ComfyUI files)
    raw: torch.Tensor | None  # unscaled (ComfyUI files)
    sizes: list[tuple[int, int]] | None
    paddings: list[tuple[int, int, int, int]] | None
    alphas: list[torch.Tensor | None]
    extra: dict[str, str]
    vae_sha256: str
    vae_name: str
    family: str | None
    vaekit: LatentFile | None

    @property
    def count(self) -> int:
        t = self.latents if self.latents is not None else self.raw
        assert t is not None
        return int(t.shape[0])


def _read_latents(path: Path) -> _Latents:
    """Read and check one latent file (vaekit's or ComfyUI's); the error names the file."""
    try:  # a damaged or hostile header is refused before any reader opens the file
        read_safetensors_header(path)
    except LoadError as e:
        why = str(e).removeprefix(f"{path}: ")
        raise BadInputError(f"{path}: not a vaekit latent file nor a ComfyUI .latent ({why})") from None
    if comfy_latent.is_comfy_latent(path):
        c = comfy_latent.read_comfy_latent(path)
        info = c.vaekit_info
        sizes = paddings = None
        try:
            if "image_size" in info:
                w, h = (int(v) for v in info["image_size"].split("x"))
                sizes = [(w, h)] * c.raw.shape[0]
                pad = tuple(int(v) for v in info.get("padding", "0,0,0,0").split(","))
                paddings = [pad] * c.raw.shape[0]  # type: ignore[list-item]
        except ValueError:
            sizes = paddings = None  # damaged vaekit notes in a ComfyUI file: decode at the latent's own size
        n = c.raw.shape[0]
        return _Latents(
            path, None, c.raw, sizes, paddings, [None] * n, info, info.get("vae_sha256", ""),
            info.get("vae_name", ""), info.get("family"), None,
        )  # fmt: skip
    lf = load_latents(path)
    n = lf.latents.shape[0]
    alphas = lf.alphas or [None] * n
    return _Latents(
        path, lf.latents, None, list(lf.image_sizes), list(lf.paddings), alphas, lf.extra, lf.vae_sha256,
        lf.vae_name, lf.family, lf,
    )  # fmt: skip


def _check_decodable(item: _Latents, model: VAE) -> None:
    if item.vaekit is not None:
        item.vaekit.check_vae(model)
        return
    assert item.raw is not None
    if item.raw.shape[1] != model.raw_channels:
        raise BadInputError(
            f"{item.path}: raw latents have {item.raw.shape[1]} channels, the {model.family} VAE makes "
            f"{model.raw_channels}"
        )


def _warn_other_vae(items: list[_Latents], model: VAE) -> None:
    """Warn about latents made by another VAE: by the hash of the weights when the file has it (the same weights
    in another container are the same VAE), else by the file hash."""
    sha = vae_sha256(model)
    weights: str | None = None
    for item in {i.vae_sha256 + i.extra.get(WEIGHTS_KEY, ""): i for i in items}.values():
        if not item.vae_sha256 or item.vae_sha256 == sha:
            continue
        if item.extra.get(WEIGHTS_KEY):
            weights = weights or _weights_sha256(model)
            if item.extra[WEIGHTS_KEY] == weights:
                continue
        warn(
            f"{item.path}: made by {item.vae_name or 'another VAE'} ({short_hash(item.vae_sha256)}); decoding with "
            f"{model.origin.name}: pass --vae to decode with the original"
        )


@app.command("decode")
def decode_command(
    inputs: Annotated[list[str], typer.Argument(help="Latent files (vaekit .safetensors, ComfyUI .latent), folders.")],
    output: OutDirOption,
    vae: VaeOption = None,
    family: FamilyOption = None,
    precision: PrecisionOption = "auto",
    tiling: TilingOption = "auto",
    max_memory: MaxMemoryOption = None,
    tile_size: TileSizeOption = None,
    device: DeviceOption = "auto",
    compile_: CompileOption = False,
    overwrite: OverwriteOption = False,
    skip_existing: SkipExistingOption = False,
    as_json: JsonOption = False,
) -> None:
    """Decode latent files to PNG images, cropped back to each original image's size, alpha and depth restored."""
    options = _options(precision, tiling, max_memory, tile_size, compile_=compile_)
    _exclusive(overwrite, skip_existing)
    check_output(output, folder=True)
    paths = _expand_latents(inputs)
    files = [_read_latents(p) for p in paths]  # every file checked before any work
    planned: list[tuple[int, int, Path]] = []  # (file index, item index, destination)
    for i, item in enumerate(files):
        n = item.count
        for j in range(n):
            planned.append((i, j, output / (paths[i].stem + (f"_{j}" if n > 1 else "") + ".png")))
    dests = [d for _, _, d in planned]
    if len(set(dests)) != len(dests):
        raise BadInputError("two latent files share a name and would write the same image; rename one or run twice")
    for d in dests:
        refuse_existing(d, overwrite, skip_existing)
    todo = [p for p in planned if not (skip_existing and p[2].exists())]
    if len(todo) < len(planned):
        note(f"skipped {len(planned) - len(todo)} output(s) that already exist (--skip-existing)")
    model = load_selected_vae(vae, device, family=family)
    for item in files:
        _check_decodable(item, model)
    _warn_other_vae(files, model)
    rows: list[dict[str, Any]] = []
    progress = Progress(len(todo))
    start = time.perf_counter()
    by_file: dict[int, list[tuple[int, Path]]] = {}
    for i, j, dest in todo:
        by_file.setdefault(i, []).append((j, dest))
    try:
        for i, jobs in track(list(by_file.items()), len(by_file), "decoding"):
            item = files[i]
            with progress.item(str(paths[i])):
                rows += _decode_file(model, item, jobs, options, progress)
    except VaekitError as e:
        _fail_json(as_json, {"vae": model.origin.name, "items": rows}, e)
        raise
    elapsed = time.perf_counter() - start
    if as_json:
        emit_json({"vae": model.origin.name, "items": rows, "seconds": round(elapsed, 4), "complete": True})
        return
    for r in rows:
        cli.out.print(f"{escape(r['output'])}  {r['size'][0]}x{r['size'][1]}")
    cli.out.print(escape(_summary("decoded", len(rows), elapsed, output)))


def _decode_file(
    model: VAE, item: _Latents, jobs: list[tuple[int, Path]], options: pipeline.CodecOptions, progress: Progress
) -> list[dict[str, Any]]:
    t0 = time.perf_counter()
    latents = item.latents if item.latents is not None else model.normalise(item.raw)  # type: ignore[arg-type]
    wanted = [j for j, _ in jobs]
    ds = model.downscale
    sizes = item.sizes or [(int(latents.shape[3]) * ds, int(latents.shape[2]) * ds)] * item.count
    pads = item.paddings or [(0, 0, 0, 0)] * item.count
    dec = pipeline.decode(
        model,
        [latents[j] for j in wanted],
        options,
        image_size=[sizes[j] for j in wanted],
        padding=[pads[j] for j in wanted],
    )
    _note_all(dec.notes, item.path.name)
    per = (time.perf_counter() - t0) / max(len(wanted), 1)
    bits = int(item.extra.get(EXTRA_BITS, "8") or 8)
    grey = item.extra.get(EXTRA_MODE) == "grey"
    rows = []
    for (j, dest), image in zip(jobs, dec.images, strict=True):
        size = (int(image.shape[2]), int(image.shape[1]))
        save_image(
            image[:3],
            dest,
            alpha=item.alphas[j],
            overwrite=True,
            bits=bits,
            grey=grey,
            text=_png_text(model, size),
        )
        progress.written += 1
        rows.append({"input": str(item.path), "item": j, "output": str(dest), "size": list(size), "seconds": per})
    return rows


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


def _roundtrip_rows(results: list[_Roundtrip]) -> list[dict[str, Any]]:
    return [
        {
            "input": str(r.path),
            "output": str(r.dest),
            "size": list(r.size),
            "psnr": r.psnr if math.isfinite(r.psnr) else None,
            "seconds": round(r.seconds, 4),
            "tiled": r.tiled,
        }
        for r in results
    ]


@app.command("roundtrip")
def roundtrip_command(
    inputs: InputsArgument,
    output: OutDirOption,
    vae: VaeOption = None,
    family: FamilyOption = None,
    precision: PrecisionOption = "auto",
    tiling: TilingOption = "auto",
    max_memory: MaxMemoryOption = None,
    tile_size: TileSizeOption = None,
    device: DeviceOption = "auto",
    compile_: CompileOption = False,
    overwrite: OverwriteOption = False,
    skip_existing: SkipExistingOption = False,
    as_json: JsonOption = False,
) -> None:
    """Encode and decode each image, write the reconstruction (same name, PNG) and report its PSNR."""
    options = _options(precision, tiling, max_memory, tile_size, compile_=compile_)
    todo, skipped = _plan(expand_images(inputs), output, ".png", overwrite, skip_existing)
    images = _read_images(todo)
    model = load_selected_vae(vae, device, family=family)
    results: list[_Roundtrip] = []
    progress = Progress(len(images))
    start = time.perf_counter()
    try:
        for path, dest, img in track(images, len(images), "roundtrip"):
            with progress.item(str(path)):
                results.append(_one_roundtrip(model, path, img, dest, options))
                progress.written += 1
    except VaekitError as e:
        _fail_json(as_json, {"vae": model.origin.name, "items": _roundtrip_rows(results)}, e)
        raise
    elapsed = time.perf_counter() - start
    finite = [r.psnr for r in results if math.isfinite(r.psnr)]
    mean_psnr = sum(finite) / len(finite) if finite else math.inf
    if as_json:
        emit_json(
            {
                "vae": model.origin.name,
                "items": _roundtrip_rows(results),
                "skipped": skipped,
                "mean_psnr": mean_psnr if math.isfinite(mean_psnr) else None,
                "seconds": round(elapsed, 4),
                "complete": True,
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
    save_image(
        recon, dest, alpha=img.alpha, overwrite=True, bits=img.bits, grey=img.grey, text=_png_text(model, img.size)
    )
    return _Roundtrip(path, dest, img.size, psnr(img.rgb, recon), time.perf_counter() - t0, enc.tiled or dec.tiled)
