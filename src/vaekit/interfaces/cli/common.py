"""What every command shares: the option definitions, VAE selection, input expansion and destination checks.

Use the ``*Option`` aliases in command signatures so flags are spelled and documented the same everywhere::

    @app.command("mycommand")
    def mycommand(vae: VaeOption = None, device: DeviceOption = "auto", precision: PrecisionOption = "auto") -> None:
        model = load_selected_vae(vae, device)
"""

from __future__ import annotations

import errno
import glob
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, TypeVar

import torch
import typer
from rich.markup import escape

from vaekit.errors import BadInputError, VaekitError
from vaekit.interfaces.cli import core as cli
from vaekit.library import ResolvedVAE, resolve_vae
from vaekit.vae import VAE, load_vae

T = TypeVar("T")

# --- shared options ----------------------------------------------------------------------------------------------

VaeOption = Annotated[
    str | None,
    typer.Option(
        "--vae",
        help="VAE file, diffusers folder, library name or hash prefix (default: the selection, see `vaekit use`).",
    ),
]
PrecisionOption = Annotated[
    str, typer.Option("--precision", help="auto, fp32, fp16 or bf16 (auto: the fastest that is safe for this VAE).")
]
TilingOption = Annotated[
    str,
    typer.Option(
        "--tiling", help="auto, off, exact or fast (auto: tile only when the image does not fit the memory budget)."
    ),
]
MaxMemoryOption = Annotated[
    str | None, typer.Option("--max-memory", help="Memory budget for one pass, e.g. 3GB or 512MiB (default: free).")
]
TileSizeOption = Annotated[int | None, typer.Option("--tile-size", help="Tile size in pixels (default: automatic).")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1 or mps.")]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="Replace destinations that already exist.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
ForceOption = Annotated[bool, typer.Option("--force", help="Accept a VAE whose family does not match.")]

DTYPES: Mapping[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
    "t": 1024**4,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_memory(text: str | None) -> int | None:
    """'3GB' -> 3e9 bytes, '512MiB' -> 512 * 2**20, '2G' -> 2 * 2**30, '1000' -> 1000; None stays None."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise BadInputError(f"--max-memory {text!r}: give a size such as 3GB, 512MiB or 2G")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise BadInputError(f"--max-memory {text!r}: must be more than zero")
    return value


def parse_dtype(name: str | None) -> torch.dtype | None:
    """'fp16' / 'bf16' / 'fp32' (or the torch names) -> torch dtype; None stays None."""
    if name is None:
        return None
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise BadInputError(f"unknown dtype {name!r}: use fp16, bf16 or fp32") from None


# --- VAE selection -----------------------------------------------------------------------------------------------


def resolve_selected_vae(vae_opt: str | None, checkpoint: str | os.PathLike[str] | None = None) -> ResolvedVAE:
    """Resolve ``--vae`` (or the selection) and print which VAE is used, and why, on stderr."""
    resolved = resolve_vae(vae_opt, checkpoint)
    cli.err.print(f"VAE: {escape(resolved.describe())}")
    return resolved


def load_selected_vae(
    vae_opt: str | None,
    device: str | None = "auto",
    dtype: torch.dtype | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
) -> VAE:
    """Load the VAE that ``--vae`` names, else the selection (per checkpoint, global, bundled default); the choice
    is printed on stderr so nobody wonders which VAE ran.
    """
    resolved = resolve_selected_vae(vae_opt, checkpoint)
    return load_vae(resolved.source, device=device, dtype=dtype)


# --- inputs and outputs ------------------------------------------------------------------------------------------


def expand_images(inputs: list[str]) -> list[Path]:
    """Image files, folders (recursive), globs and the word ``builtin`` (scikit-image's photos) -> paths."""
    from vaekit.ops.images import builtin_image_paths, list_images

    paths: list[Path] = []
    for item in inputs:
        if item == "builtin":
            paths.extend(builtin_image_paths())
        elif not Path(item).exists() and any(c in item for c in "*?["):
            # glob.glob takes absolute patterns too (Path.glob does not); "**" matches folders recursively
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not matches:
                raise BadInputError(f"{item}: no such file, folder or matching glob")
            paths.extend(list_images(matches))
        else:
            paths.extend(list_images([item]))
    if not paths:
        raise BadInputError(f"no images found in {' '.join(inputs)}; give image files, folders, globs or `builtin`")
    return list(dict.fromkeys(paths))


def refuse_existing(dest: Path, overwrite: bool) -> None:
    """A destination that exists is refused unless ``--overwrite``."""
    if dest.exists() and not overwrite:
        raise BadInputError(f"{dest}: already exists; pass --overwrite to replace it, or choose another -o")


@contextmanager
def writing(dest: Path) -> Iterator[None]:
    """Turn an OS error while writing ``dest`` (full disk, permissions) into one line; atomic writers leave the
    destination untouched.
    """
    try:
        yield
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise VaekitError(
                f"{dest}: no space left on the device; nothing was written; free space and retry"
            ) from None
        reason = e.strerror or str(e)
        raise VaekitError(f"{dest}: cannot write ({reason}); nothing was written") from None


def track(items: Iterable[T], total: int, description: str) -> Iterator[T]:
    """Iterate with a Rich progress bar and ETA on stderr (hidden when stderr is not a terminal)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=cli.err, disable=not cli.err.is_terminal, transient=True) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)


def note(message: str) -> None:
    """A message for the user on stderr."""
    cli.err.print(escape(message))


def warn(message: str) -> None:
    """A warning on stderr."""
    cli.err.print(f"[yellow]warning:[/] {escape(message)}")
