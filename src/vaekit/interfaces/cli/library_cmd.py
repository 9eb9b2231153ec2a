"""``vaekit list`` and ``vaekit use``: the VAE library and which VAE is selected."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from vaekit import library
from vaekit.errors import BadInputError, VaekitError
from vaekit.interfaces.cli import core as cli
from vaekit.interfaces.cli.common import ForceOption, JsonOption, note, warn
from vaekit.interfaces.cli.core import app
from vaekit.interfaces.cli.output import emit_json, kv_table


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _relative(path: str, roots: tuple[Path, ...]) -> str:
    for root in roots:
        try:
            return str(Path(path).relative_to(root))
        except ValueError:
            continue
    return path


def _selected_path() -> Path | None:
    """The file the global selection points to (None when unset or broken)."""
    try:
        config = library.read_config()
        return library.resolve_vae(config.vae).path if config.vae else None
    except BadInputError:
        return None


@app.command("list")
def list_command(
    home: Annotated[
        Path | None, typer.Option("--home", help="Library folder (default: VAEKIT_HOME, the config, ./models/VAE).")
    ] = None,
    checkpoints: Annotated[
        bool, typer.Option("--checkpoints", help="List the checkpoints (with their baked VAE) instead.")
    ] = False,
    refresh: Annotated[bool, typer.Option("--refresh", help="Ignore the cache: re-read and re-hash all.")] = False,
    as_json: JsonOption = False,
) -> None:
    """The VAE library: every VAE under the library folder with its family and hash (cached by size and mtime)."""
    root = home if home is not None else library.library_home()
    folders = library.library_folders(root)
    if not any(d.is_dir() for d in (folders.checkpoint_dirs if checkpoints else folders.vae_dirs)):
        if checkpoints:
            raise BadInputError(f"{root}: no checkpoint folder here (models/Stable-diffusion or models/checkpoints)")
        raise BadInputError(
            f"{root}: no VAE library folder here; create it, set VAEKIT_HOME, or run `vaekit use --home DIR`"
        )
    with cli.err.status("scanning the library", spinner="dots") as status:
        result = library.scan(
            home=root, checkpoints=checkpoints, refresh=refresh, progress=lambda p: status.update(f"reading {p.name}")
        )
    for message in result.warnings:
        warn(message)
    selected = _selected_path()
    what = "checkpoint" if checkpoints else "VAE"
    if as_json:
        emit_json(
            {
                "home": str(folders.home),
                "layout": folders.layout,
                "folders": [str(d) for d in (folders.checkpoint_dirs if checkpoints else folders.vae_dirs)],
                "entries": [
                    {**e.to_dict(), "selected": selected is not None and _same(e.path, selected)}
                    for e in result.entries
                ],
                "warnings": result.warnings,
                "hashed": result.hashed,
                "cached": result.cached,
            }
        )
        return
    roots = folders.checkpoint_dirs if checkpoints else folders.vae_dirs
    table = Table(title=f"{what}s in {folders.home} ({folders.layout})", title_justify="left")
    for column in ("", "name", "family", "kind", "ch", "layout", "dtype", "size", "hash", "path"):
        table.add_column(column, no_wrap=column in ("hash", "name"))
    for e in result.entries:
        mark = "*" if selected is not None and _same(e.path, selected) else ""
        family = e.family if e.family_certain else f"{e.family}?"
        kind = e.kind + (" (baked)" if e.container == "checkpoint" and not checkpoints else "")
        table.add_row(
            mark,
            escape(e.name),
            family,
            kind,
            str(e.latent_channels),
            e.layout,
            e.dtype,
            _size(e.size),
            e.short_hash,
            escape(_relative(e.path, roots)),
        )
    cli.out.print(table)
    note(
        f"{len(result.entries)} {what}(s); {result.hashed} read and hashed, {result.cached} from the cache"
        + ("; * = selected, ? = family guessed from channels" if result.entries else "")
    )


def _same(a: str | Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == b.resolve()
    except OSError:
        return False


@app.command("use")
def use_command(
    name: Annotated[
        str | None, typer.Argument(help="VAE file, library name or hash prefix; omit to show the selection.")
    ] = None,
    for_checkpoint: Annotated[
        str | None, typer.Option("--for", help="Select for this checkpoint only (a path or a library name).")
    ] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Forget the selection (global, or for --for).")] = False,
    home: Annotated[Path | None, typer.Option("--home", help="Remember this folder as the VAE library.")] = None,
    force: ForceOption = False,
    as_json: JsonOption = False,
) -> None:
    """Select the VAE every command uses by default, globally or for one checkpoint (persisted in config.toml)."""
    if name is not None and clear:
        raise BadInputError("give a VAE to select or --clear, not both")
    changed = name is not None or clear or home is not None
    if home is not None:
        if not home.is_dir():
            raise BadInputError(f"{home}: no such folder; create it first or give the library's folder")
        config = library.read_config()
        config.home = str(home.expanduser().resolve())
        library.write_config(config)
    if name is not None or clear:
        library.select(name, for_checkpoint, force=force)
    config = library.read_config()
    checkpoint = library.find_checkpoint(for_checkpoint) if for_checkpoint and not clear else None
    try:
        effective: library.ResolvedVAE | None = library.resolve_vae(None, checkpoint)
        problem = None
    except VaekitError as e:  # a missing bundled file or a stale name: report it, showing is not failing
        effective, problem = None, str(e)
    data: dict[str, Any] = {
        "config": str(library.config_file()),
        "home": str(library.library_home(config=config)),
        "global": config.vae,
        "checkpoints": config.checkpoints,
        "for": str(checkpoint) if checkpoint else None,
        "effective": {"path": str(effective.path), "reason": effective.reason} if effective else None,
        "problem": problem,
    }
    if as_json:
        emit_json(data)
        return
    if changed:
        target = f" for {Path(for_checkpoint).name}" if for_checkpoint else ""
        if clear:
            cli.out.print(f"cleared the selection{target}")
        elif name is not None:
            cli.out.print(f"selected {escape(name)}{target}")
        if home is not None:
            cli.out.print(f"library folder: {escape(str(config.home))}")
    rows: list[tuple[str, Any]] = [
        ("config file", data["config"]),
        ("library folder", data["home"]),
        ("global selection", config.vae or "- (bundled default)"),
    ]
    rows += [(f"for {Path(k).name}", v) for k, v in sorted(config.checkpoints.items())]
    rows.append(("in effect" + (f" for {Path(str(checkpoint)).name}" if checkpoint else ""), _effective(data)))
    cli.out.print(kv_table("VAE selection", [(k, escape(str(v))) for k, v in rows]))


def _effective(data: dict[str, Any]) -> str:
    eff = data["effective"]
    return f"{eff['path']} ({eff['reason']})" if eff else f"none: {data['problem']}"
