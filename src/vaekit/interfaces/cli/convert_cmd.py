"""``vaekit convert``: .ckpt to .safetensors, LDM <-> diffusers layout, dtype changes; warns when fp16 overflows."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.markup import escape

from vaekit.errors import BadInputError
from vaekit.formats.export import write_vae
from vaekit.formats.source import open_source
from vaekit.health import PROBE_SIZE, activation_range
from vaekit.interfaces.cli import core as cli
from vaekit.interfaces.cli.common import (
    FamilyOption,
    JsonOption,
    OverwriteOption,
    check_output,
    parse_dtype,
    refuse_existing,
    warn,
    writing,
)
from vaekit.interfaces.cli.core import app
from vaekit.interfaces.cli.output import emit_json
from vaekit.vae import load_vae


@app.command("convert")
def convert_command(
    file: Annotated[Path, typer.Argument(help="A VAE file, diffusers folder, or a checkpoint (its VAE is taken).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output .safetensors file or diffusers folder.")],
    layout: Annotated[
        str, typer.Option("--layout", help="ldm (one .safetensors file) or diffusers (a folder).")
    ] = "ldm",
    dtype: Annotated[str | None, typer.Option("--dtype", help="fp16, bf16 or fp32 (default: as stored).")] = None,
    family: FamilyOption = None,
    probe: Annotated[
        bool, typer.Option("--probe/--no-probe", help="Check fp16's range on a probe photo before writing fp16.")
    ] = True,
    probe_size: Annotated[int, typer.Option("--probe-size", help="Side of the probe photo in pixels.")] = PROBE_SIZE,
    overwrite: OverwriteOption = False,
    as_json: JsonOption = False,
) -> None:
    """Convert a VAE between formats, layouts and dtypes (written atomically, with vaekit metadata)."""
    torch_dtype = parse_dtype(dtype)
    if layout not in ("ldm", "diffusers"):
        raise BadInputError(f"--layout {layout!r}: use ldm or diffusers")
    if layout == "ldm" and output.suffix.lower() not in (".safetensors", ".sft"):
        raise BadInputError(f"{output}: the ldm layout is one .safetensors file; name the output *.safetensors")
    if output.exists() and file.exists() and output.resolve() == file.resolve():
        raise BadInputError(f"{output}: that is the input; write the conversion to another path")
    check_output(output, folder=layout == "diffusers")
    refuse_existing(output, overwrite)
    src = open_source(file, family=family)
    state = src.state_dict()
    result: dict[str, Any] = {
        "input": str(file),
        "output": str(output),
        "family": src.detection.family,
        "layout": layout,
        "dtype": str(torch_dtype or _dtype_of(state)).removeprefix("torch."),
        "fp16": None,
    }
    if torch_dtype == torch.float16 and probe:
        with cli.err.status(f"checking fp16's range first (a {probe_size} px photo through the VAE)", spinner="dots"):
            act = activation_range(load_vae(file, device="cpu", family=family), size=probe_size)
        result["fp16"] = act.to_dict()
        if act.verdict() != "safe":
            warn(
                f"this VAE {'overflows' if act.fp16_overflows else 'comes close to overflowing'} fp16 "
                f"({act.summary()}); fp16 runs may give NaN or black images: prefer --dtype bf16 or fp32"
            )
    with writing(output):
        write_vae(
            state, src.detection.config, output, layout, torch_dtype, overwrite, {"vaekit.converted_from": file.name}
        )
    if as_json:
        emit_json(result)
        return
    cli.out.print(
        f"converted {escape(str(file))} ({src.format}, {src.detection.layout}, {src.detection.dtype}) -> "
        f"{escape(str(output))} ({layout}, {result['dtype']})"
    )


def _dtype_of(state: dict[str, torch.Tensor]) -> torch.dtype:
    floats = [t.dtype for t in state.values() if t.is_floating_point()]
    return max(set(floats), key=floats.count) if floats else torch.float32
