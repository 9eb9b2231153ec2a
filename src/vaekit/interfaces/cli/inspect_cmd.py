"""``vaekit inspect``: what each VAE file is, whether its weights are sound, and whether fp16 would overflow."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from vaekit.formats.source import open_source
from vaekit.health import PROBE_SIZE, ActivationRange, WeightHealth, activation_range, weight_health
from vaekit.inspection import Inspection, inspect
from vaekit.interfaces.cli import core as cli
from vaekit.interfaces.cli.common import DeviceOption, JsonOption
from vaekit.interfaces.cli.core import app
from vaekit.interfaces.cli.output import emit_json, kv_table
from vaekit.vae import load_vae


def check_file(
    path: Path, family: str | None = None, probe: bool = True, probe_size: int = PROBE_SIZE, device: str = "auto"
) -> tuple[Inspection, WeightHealth, ActivationRange | None]:
    """Inspect ``path``, check its weights, and (if ``probe`` and the weights are finite) probe fp16's range."""
    info = inspect(path, family=family)
    health = weight_health(open_source(path, family=family).state_dict())
    act = None
    if probe and health.ok:
        act = activation_range(load_vae(path, device=device, family=family), size=probe_size)
    return info, health, act


@app.command("inspect")
def inspect_command(
    files: Annotated[list[Path], typer.Argument(help="VAE files, diffusers folders or checkpoints.")],
    family: Annotated[str | None, typer.Option(help="Override an ambiguous family (sd1, sdxl, sd3, flux).")] = None,
    probe: Annotated[
        bool, typer.Option("--probe/--no-probe", help="Run a probe photo through the model to check fp16's range.")
    ] = True,
    probe_size: Annotated[int, typer.Option("--probe-size", help="Side of the probe photo in pixels.")] = PROBE_SIZE,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Family, layout, channels, dtype, parameters, container, scaling, hashes, weight health and fp16 safety."""
    results = [check_file(f, family, probe, probe_size, device) for f in files]
    if as_json:
        emit_json([_to_dict(*r) for r in results])
        return
    for r, health, act in results:
        family_text = r.family if r.family_certain else f"{r.family} (uncertain: {r.family_note})"
        if act is not None:
            fp16_text = act.summary()
        elif not health.ok:
            fp16_text = "not probed: the weights hold NaN/inf"
        else:
            fp16_text = "not probed (--no-probe)"
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
            ("normaliser", r.normaliser),
            ("sha256", r.sha256),
            ("short hash", r.short_hash),
            ("known as", r.known_as or "-"),
            ("weights", health.summary()),
            ("fp16", fp16_text),
        ]
        cli.out.print(kv_table(r.path, rows))


def _to_dict(info: Inspection, health: WeightHealth, act: ActivationRange | None) -> dict[str, Any]:
    return {**info.to_dict(), "weights": health.to_dict(), "fp16": act.to_dict() if act is not None else None}
