"""``vaekit extract`` and ``vaekit bake``: take the VAE out of a full checkpoint, or put another one in."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from vaekit.errors import BadInputError
from vaekit.formats.checkpoint import bake_vae, checkpoint_vae
from vaekit.formats.export import write_vae
from vaekit.formats.io import TensorFile
from vaekit.formats.source import open_source
from vaekit.interfaces.cli import core as cli
from vaekit.interfaces.cli.common import (
    ForceOption,
    JsonOption,
    OverwriteOption,
    VaeOption,
    announce_vae,
    check_output,
    note,
    parse_dtype,
    refuse_existing,
    resolve_selected_vae,
    writing,
)
from vaekit.interfaces.cli.core import app
from vaekit.interfaces.cli.output import emit_json
from vaekit.library import check_family_match, checkpoint_family, find_checkpoint, vae_family

OutputOption = Annotated[Path, typer.Option("-o", "--output", help="Where to write.")]
LayoutOption = Annotated[str, typer.Option("--layout", help="ldm (one .safetensors file) or diffusers (a folder).")]


def _same_file(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and a.resolve() == b.resolve()


@app.command("extract")
def extract_command(
    checkpoint_name: Annotated[
        str, typer.Argument(metavar="CHECKPOINT", help="A checkpoint with a VAE baked in: a path or a library name.")
    ],
    output: OutputOption,
    layout: LayoutOption = "ldm",
    dtype: Annotated[str | None, typer.Option("--dtype", help="fp16, bf16 or fp32 (default: as stored).")] = None,
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
) -> None:
    """Write the VAE baked into CHECKPOINT as its own file (LDM layout with vaekit metadata, or diffusers)."""
    torch_dtype = parse_dtype(dtype)
    if layout not in ("ldm", "diffusers"):
        raise BadInputError(f"--layout {layout!r}: use ldm or diffusers")
    if layout == "ldm" and output.suffix.lower() not in (".safetensors", ".sft"):
        raise BadInputError(f"{output}: the ldm layout is one .safetensors file; name the output *.safetensors")
    checkpoint = find_checkpoint(checkpoint_name)
    check_output(output, folder=layout == "diffusers")
    refuse_existing(output, overwrite)
    det = checkpoint_vae(TensorFile(checkpoint))
    if det is None:
        raise BadInputError(
            f"{checkpoint}: holds no VAE (no first_stage_model.* or vae.* tensors), so there is nothing to extract; "
            "use a separate VAE file with it (vaekit use --for)"
        )
    if det.container == "bare":
        raise BadInputError(f"{checkpoint}: already a bare VAE file; use `vaekit convert` to change its format")
    src = open_source(checkpoint)
    cfg = src.detection.config
    with writing(output):
        write_vae(
            src.state_dict(), cfg, output, layout, torch_dtype, overwrite, {"vaekit.extracted_from": checkpoint.name}
        )
    stored = str(torch_dtype).removeprefix("torch.") if torch_dtype else src.detection.dtype
    summary = {
        "checkpoint": str(checkpoint),
        "output": str(output),
        "family": cfg.family,
        "family_certain": src.detection.family_certain,
        "layout": layout,
        "dtype": stored,
        "tensors": len(src.detection.key_map),
        "prefix": src.detection.prefix,
    }
    if as_json:
        emit_json(summary)
        return
    cli.out.print(
        f"extracted the {cfg.family} VAE ({summary['tensors']} tensors under {src.detection.prefix!r}, {stored}) "
        f"-> {escape(str(output))}"
    )


@app.command("bake")
def bake_command(
    checkpoint_name: Annotated[
        str,
        typer.Argument(
            metavar="CHECKPOINT", help="A full checkpoint (.safetensors or .ckpt): a path or a library name."
        ),
    ],
    vae: VaeOption = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="The new checkpoint to write.")] = None,
    in_place: Annotated[bool, typer.Option("--in-place", help="Replace CHECKPOINT itself (atomically).")] = False,
    force: ForceOption = False,
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
) -> None:
    """Replace the VAE baked into CHECKPOINT; every other tensor and the metadata are kept bit-exact."""
    checkpoint = find_checkpoint(checkpoint_name)
    if in_place and output is not None and not _same_file(output, checkpoint):
        raise BadInputError("give either -o NEW or --in-place, not both")
    if in_place:
        dest = checkpoint
    elif output is None:
        raise BadInputError("give -o NEW_CHECKPOINT (or --in-place to replace the original)")
    elif _same_file(output, checkpoint):
        raise BadInputError(f"{output}: that is the original checkpoint; pass --in-place to replace it")
    else:
        dest = output
        refuse_existing(dest, overwrite)
    if dest.suffix.lower() not in (".safetensors", ".sft"):
        raise BadInputError(f"{dest}: baked checkpoints are written as .safetensors; name the output *.safetensors")
    check_output(dest)
    resolved = resolve_selected_vae(vae, checkpoint, announce=False)
    if resolved.path is None:
        raise BadInputError(f"{resolved.preset!r} is a preset with random weights; bake a VAE file")
    ckpt_family = checkpoint_family(checkpoint)  # both files are checked before anything is said or written
    src = open_source(resolved.path)
    if not force:
        check_family_match(vae_family(resolved.path), ckpt_family, resolved.path.name, checkpoint.name)
    if set(src.detection.parts) != {"encoder", "decoder"}:
        raise BadInputError(f"{resolved.path}: holds only the {src.detection.parts[0]}; bake a whole VAE")
    announce_vae(resolved)
    with writing(dest):
        report = bake_vae(checkpoint, src.state_dict(), src.detection.config.kind, dest)
    for message in report.notes:
        note(message)
    if as_json:
        emit_json(
            {
                "checkpoint": str(checkpoint),
                "vae": str(resolved.path),
                "output": str(report.dest),
                "prefix": report.prefix,
                "layout": report.layout,
                "dtype": report.dtype,
                "replaced": report.replaced,
                "written": report.written,
                "kept": report.kept,
                "notes": report.notes,
            }
        )
        return
    cli.out.print(
        f"baked {escape(resolved.path.name)} into {escape(str(report.dest))}: {report.written} VAE tensors under "
        f"{report.prefix!r} ({report.layout}, {report.dtype}), {report.kept} other tensors and the metadata kept "
        "bit-exact"
    )
