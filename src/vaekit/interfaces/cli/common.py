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

from vaekit.errors import BadInputError, ExitCode, VaekitError, reason
from vaekit.formats.io import check_destination, is_disk_full
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


def parse_device(text: str) -> str:
    """Check ``--device`` against what this PyTorch can use: auto, cpu, gpu (CUDA or MPS), cuda, cuda:N, mps."""
    name = text.strip().lower()
    if name in ("auto", "cpu"):
        return name
    cuda_ok = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps and mps.is_available())
    no_cuda = "this PyTorch is a CPU-only build" if torch.version.cuda is None else "no CUDA device or driver found"
    if name == "gpu":
        if cuda_ok or mps_ok:
            return "cuda" if cuda_ok else "mps"
        raise BadInputError(f"--device {text}: no GPU is usable ({no_cuda}); use --device cpu or auto")
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if m:
        if not cuda_ok:
            raise BadInputError(f"--device {text}: CUDA is not usable ({no_cuda}); use --device cpu or auto")
        index, count = int(m.group(1) or 0), torch.cuda.device_count()
        if index >= count:
            raise BadInputError(f"--device {text}: there are {count} CUDA device(s), numbered from 0")
        return name
    if name == "mps":
        if not mps_ok:
            raise BadInputError(f"--device {text}: Apple's MPS is not usable here; use --device cpu or auto")
        return name
    raise BadInputError(f"--device {text!r}: use auto, cpu, gpu, cuda, cuda:N or mps")


def _device_callback(value: str | None) -> str | None:
    return None if value is None else parse_device(value)


def parse_family(name: str | None) -> str | None:
    """Check ``--family`` against the known families (None stays None)."""
    if name is None:
        return None
    from vaekit.families import FAMILIES

    if name not in FAMILIES:
        raise BadInputError(f"--family {name!r}: use one of {', '.join(FAMILIES)}")
    return name


def _family_callback(value: str | None) -> str | None:
    return parse_family(value)


def cli_words(text: str) -> str:
    """Library messages name the API's keyword (``family=...``); on the command line the flag is ``--family``."""
    return text.replace("family=...", "--family").replace("family=", "--family ")


DeviceOption = Annotated[
    str, typer.Option("--device", help="auto, cpu, gpu, cuda, cuda:1 or mps.", callback=_device_callback)
]
FamilyOption = Annotated[
    str | None,
    typer.Option(
        "--family",
        help="Override an ambiguous family (sd1/sdxl share an architecture, as do sd3/flux).",
        callback=_family_callback,
    ),
]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="Replace destinations that already exist.")]
SkipExistingOption = Annotated[
    bool,
    typer.Option("--skip-existing", help="Leave outputs that already exist and do the rest (to finish a run)."),
]
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


def resolve_selected_vae(
    vae_opt: str | None, checkpoint: str | os.PathLike[str] | None = None, announce: bool = True
) -> ResolvedVAE:
    """Resolve ``--vae`` (or the selection) and print which VAE is used, and why, on stderr.

    With ``announce=False`` the caller prints it (:func:`announce_vae`) once the file has proved to be a VAE, so
    that a bad file gives its one error line and nothing else.
    """
    resolved = resolve_vae(vae_opt, checkpoint)
    if announce:
        announce_vae(resolved)
    return resolved


def announce_vae(resolved: ResolvedVAE) -> None:
    """Say on stderr which VAE a command uses, and why."""
    cli.message(f"VAE: {escape(resolved.describe())}")


def load_selected_vae(
    vae_opt: str | None,
    device: str | None = "auto",
    dtype: torch.dtype | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    family: str | None = None,
) -> VAE:
    """Load the VAE that ``--vae`` names, else the selection (per checkpoint, global, bundled default); the choice
    is printed on stderr so nobody wonders which VAE ran. An uncertain family is said, with the flag to fix it.
    """
    resolved = resolve_selected_vae(vae_opt, checkpoint, announce=False)
    try:
        dev, fam = parse_device(device or "auto"), parse_family(family)
        model = load_vae(resolved.source, device=dev, dtype=dtype, family=fam)
    except (ValueError, KeyError) as e:  # a --family whose channel count does not fit this VAE
        raise BadInputError(f"--family {family}: {reason(e)}") from None
    announce_vae(resolved)
    if not model.origin.family_certain and family is None and model.origin.family_note:
        warn(cli_words(model.origin.family_note))
    return model


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


def refuse_existing(dest: Path, overwrite: bool, skip_existing: bool = False) -> None:
    """A destination that exists is refused unless ``--overwrite`` (or ``--skip-existing``, which leaves it)."""
    check_output(dest)
    if dest.exists() and not overwrite and not skip_existing:
        raise BadInputError(
            f"{dest}: already exists; pass --overwrite to replace it, --skip-existing to keep it, or choose another -o"
        )


def check_output(dest: Path, folder: bool = False) -> Path:
    """Check a destination before any work: no file where a folder must be, and a folder that can be written.

    A path component that is a file is bad input (exit 2); a folder without write permission is a failure (exit 1).
    """
    check_destination(dest / "x" if folder else dest)
    if folder and dest.exists() and not dest.is_dir():
        raise BadInputError(f"{dest}: exists and is a file; give a folder to -o")
    existing = next((p for p in [dest if folder else dest.parent, *dest.parents] if p.exists()), None)
    if existing is not None and existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise VaekitError(f"{dest}: cannot write there: {existing} is not writable; choose another -o")
    return dest


@contextmanager
def writing(dest: Path) -> Iterator[None]:
    """Turn an OS error while writing ``dest`` (full disk, permissions) into one line; atomic writers leave the
    destination untouched.
    """
    try:
        yield
    except OSError as e:
        raise write_error(dest, e) from None


def write_error(dest: Path, e: OSError) -> VaekitError:
    """One line for an OS error while writing ``dest``: exit 1 (full disk, permissions), exit 2 for a bad path."""
    if is_disk_full(e):
        return VaekitError(f"{dest}: no space left on the device; nothing was written; free space and retry")
    if e.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.ENAMETOOLONG):
        return BadInputError(f"{dest}: cannot be written there ({e.strerror or reason(e)}); choose another -o")
    return VaekitError(f"{dest}: cannot write ({e.strerror or reason(e)}); nothing was written")


class Interrupted(VaekitError):
    """Ctrl-C during a run of many outputs; the message says how many were written."""

    exit_code = ExitCode.INTERRUPTED


class Progress:
    """Counts the outputs of a run; turns Ctrl-C and a failure half-way into one line saying how far it got."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.written = 0

    @contextmanager
    def item(self, label: str) -> Iterator[None]:
        """Run the work for one output; an error names ``label`` and how many outputs were written before it."""
        try:
            yield
        except KeyboardInterrupt:
            raise Interrupted(self.interrupted()) from None
        except OSError as e:
            raise self._with_count(write_error(Path(e.filename or label), e)) from None
        except VaekitError as e:
            raise self._with_count(e, label) from None

    def interrupted(self) -> str:
        """The line for Ctrl-C."""
        rest = "; rerun with --skip-existing to do the rest" if self.written < self.total else ""
        return f"interrupted: {self.written} of {self.total} written{rest}"

    def _with_count(self, e: VaekitError, label: str | None = None) -> VaekitError:
        message = str(e) if label is None or str(e).startswith(label) else f"{label}: {e}"
        if self.written:
            message += f" ({self.written} of {self.total} written before it; --skip-existing keeps them)"
        e.args = (message,)
        return e


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
    """A message for the user on stderr (held back until success when stderr is not a terminal)."""
    cli.message(escape(message))


def warn(message: str) -> None:
    """A warning on stderr (held back until success when stderr is not a terminal)."""
    cli.message(f"[yellow]warning:[/] {escape(message)}")
