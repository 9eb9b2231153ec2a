"""``vaekit inspect``: what each VAE file is."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vaekit.inspection import inspect
from vaekit.interfaces.cli import core as cli
from vaekit.interfaces.cli.core import app
from vaekit.interfaces.cli.output import emit_json, kv_table


@app.command("inspect")
def inspect_command(
    files: Annotated[list[Path], typer.Argument(help="VAE files, diffusers folders or checkpoints.")],
    family: Annotated[str | None, typer.Option(help="Override an ambiguous family (sd1, sdxl, sd3, flux).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Family, layout, channels, dtype, parameters, container, scaling and hashes of each file."""
    results = [inspect(f, family=family) for f in files]
    if as_json:
        emit_json([r.to_dict() for r in results])
        return
    for r in results:
        family_text = r.family if r.family_certain else f"{r.family} (uncertain: {r.family_note})"
        rows = [
            ("family", family_text),
            ("family from", r.family_source),
            ("kind / layout", f"{r.kind} / {r.layout}"),
            ("container", r.container + (f" (prefix {r.prefix!r})" if r.prefix else "")),
            ("format", r.format),
            ("latent channels", r.latent_channels),
            ("dtype", r.dtype),
            ("parts", ", ".join(r.parts)),
            ("parameters", f"{r.params_total:,} (encoder {r.params_encoder:,}, decoder {r.params_decoder:,})"),
            ("scaling / shift", f"{r.scaling_factor} / {r.shift_factor}"),
            ("sha256", r.sha256),
            ("short hash", r.short_hash),
            ("known as", r.known_as or "-"),
        ]
        cli.out.print(kv_table(r.path, rows))
