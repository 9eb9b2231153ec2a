"""``vaekit inspect``: what each VAE file is, whether its weights are sound, and whether fp16 would overflow."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from vaekit.errors import BadInputError, VaekitError
from vaekit.formats.source import open_source
from vaekit.health import PROBE_SIZE, ActivationRange, WeightHealth, activation_range, weight_health
from vaekit.inspection import Inspection, inspect
from vaekit.interfaces.cli import core as cli
from vaekit.interfaces.cli.common import DeviceOption, FamilyOption, JsonOption, cli_words, parse_device
from vaekit.interfaces.cli.core import app
from vaekit.interfaces.cli.output import emit_json, kv_table
from vaekit.vae import load_vae


def probe_fp16(path: Path, family: str | None, probe_size: int, device: str) -> ActivationRange:
    """Run the fp16 range probe with a spinner on stderr saying what it is doing (it takes seconds)."""
    what = f"{path.name}: checking fp16's range (a {probe_size} px photo through the encoder and decoder)"
    with cli.err.status(what, spinner="dots"):
        return activation_range(load_vae(path, device=parse_device(device), family=family), size=probe_size)


def check_file(
    path: Path, family: str | None = None, probe: bool = True, probe_size: int = PROBE_SIZE, device: str = "auto"
) -> tuple[Inspection, WeightHealth, ActivationRange | None]:
    """Inspect ``path``, check its weights, and (if ``probe`` and the weights are finite) probe fp16's range."""
    info = inspect(path, family=family)
    health = weight_health(open_source(path, family=family).state_dict())
    act = None
    if probe and health.ok:
        act = probe_fp16(path, family, probe_size, device)
    return info, health, act


@app.command("inspect")
def inspect_command(
    files: Annotated[list[Path], typer.Argument(help="VAE files, diffusers folders or checkpoints.")],
    family: FamilyOption = None,
    probe: Annotated[
        bool, typer.Option("--probe/--no-probe", help="Run a probe photo through the model to check fp16's range.")
    ] = True,
    probe_size: Annotated[int, typer.Option("--probe-size", help="Side of the probe photo in pixels.")] = PROBE_SIZE,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
) -> None:
    """Family, layout, channels, dtype, parameters, container, scaling, hashes, weight health and fp16 safety.

    Every file is reported; the ones that cannot be read are listed in one error line at the end (exit 2).
    """
    if probe_size < 8 or probe_size > 4096:
        raise BadInputError(f"--probe-size {probe_size}: give a side between 8 and 4096 pixels")
    failures: list[str] = []
    reports: list[dict[str, Any]] = []
    for f in files:
        try:
            result = check_file(f, family, probe, probe_size, device)
        except VaekitError as e:
            failures.append(str(e))
            reports.append({"path": str(f), "error": str(e)})
            continue
        if as_json:
            reports.append(_to_dict(*result))
        else:
            _print(*result)
    if as_json:
        emit_json(reports)
    if failures:
        if len(files) == 1:
            raise BadInputError(failures[0])
        raise BadInputError(f"{len(failures)} of {len(files)} files could not be inspected: {'; '.join(failures)}")


def _print(r: Inspection, health: WeightHealth, act: ActivationRange | None) -> None:
    """One file's report as a table."""
    family_text = r.family if r.family_certain else f"{r.family} (uncertain: {cli_words(r.family_note)})"
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
