"""Safe readers and writers of weight files: safetensors, restricted pickles, diffusers folders.

Readers turn every malformed input into one :class:`~vaekit.errors.LoadError` line (a refused pickle into an
:class:`~vaekit.errors.UnsafeFileError`, which is a kind of LoadError); nothing a file holds is run. Writers are
atomic: a file is written beside its destination and renamed onto it only when complete, a folder is built in a
temporary folder and renamed; an error leaves the destination as it was. Writes go through Python file objects, so
a full disk is an ordinary ``OSError`` (ENOSPC) naming the file. PyTorch is imported only when a tensor is read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import pickletools
import shutil
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from vaekit.errors import BadInputError, LoadError, UnsafeFileError, reason

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
DIFFUSERS_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)


def _numpy_safe_globals() -> list[Any]:
    """NumPy scalar types some old SD .ckpt files pickle (e.g. for ``global_step``); data only, no code."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    return [scalar, np.dtype, *{type(np.dtype(t)) for t in ("float32", "float64", "int64", "int32")}]


def read_pickle(path: Path) -> dict[str, Any]:
    """Load a PyTorch pickle with ``weights_only=True``: tensors and plain containers only, never code."""
    import torch

    if path.stat().st_size == 0:
        raise LoadError(f"{path}: the file is empty")
    is_zip = _is_zip(path)
    if not is_zip and _first_byte(path) != 0x80:  # a pickle starts with the PROTO opcode
        raise LoadError(f"{path}: not a PyTorch file (neither a zip archive nor a pickle)")
    try:
        # PyTorch warns (two lines) about pickle protocols and storages while refusing a file: noise for the user.
        with warnings.catch_warnings(), torch.serialization.safe_globals(_numpy_safe_globals()):
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        raise _pickle_refusal(path, e) from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, TypeError, KeyError, IndexError) as e:
        raise LoadError(f"{path}: not a readable PyTorch file ({reason(e)})") from None
    except (OverflowError, MemoryError, RecursionError, struct.error) as e:
        raise LoadError(f"{path}: not a readable PyTorch file (damaged: {type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise LoadError(f"{path}: holds a {type(obj).__name__}, not a dictionary of tensors")
    return obj


# Globals a weights-only PyTorch file may name: tensor rebuilders, storages, OrderedDict, NumPy scalars.
_DATA_GLOBALS = ("torch.", "collections.OrderedDict", "numpy.", "_codecs.encode", "builtins.set", "builtins.slice")


def _pickle_refusal(path: Path, e: pickle.UnpicklingError) -> LoadError:
    """Say why weights-only loading refused ``path``: code it would run (unsafe), or bytes that are no pickle."""
    names, intact = pickle_globals(path)
    code = [n for n in names if not n.startswith(_DATA_GLOBALS)]
    if code:
        return UnsafeFileError(
            f"{path}: refused: this pickle needs code to load (it calls {code[0]}); nothing in it was run. "
            "Convert it to .safetensors with a tool you trust"
        )
    if not intact:
        return LoadError(f"{path}: not a readable PyTorch file (its pickle data is damaged or it is not a pickle)")
    lines = [ln for ln in str(e).splitlines() if ln.strip().startswith(("Trying to", "Unsupported", "Can only"))]
    why = reason(Exception(lines[0]), 160) if lines else "it holds objects that are not tensors"
    return UnsafeFileError(f"{path}: refused: weights-only loading does not allow this pickle ({why}); nothing was run")


def pickle_globals(path: Path, limit: int = 64 << 20) -> tuple[list[str], bool]:
    """The ``module.name`` globals a PyTorch pickle refers to, read with :mod:`pickletools` (which runs nothing),
    and whether its pickles parsed to the end. Zip files: ``*/data.pkl``; legacy files: the first four pickles.
    """
    names: list[str] = []
    try:
        if _is_zip(path):
            with zipfile.ZipFile(path) as z:
                entry = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                if entry is None:
                    return names, False
                with z.open(entry) as f:
                    _scan_pickle(f, names)
            return names, True
        with path.open("rb") as f:
            for _ in range(4):  # legacy torch.save: magic number, protocol, sys info, then the object
                if f.tell() >= min(limit, path.stat().st_size):
                    break
                _scan_pickle(f, names)
        return names, True
    except (ValueError, EOFError, zipfile.BadZipFile, OSError, KeyError, IndexError, TypeError, struct.error):
        return names, False
    except (OverflowError, MemoryError):  # a length field of a damaged pickle asking for an absurd read
        return names, False


def _scan_pickle(f: BinaryIO, names: list[str]) -> None:
    strings: list[str] = []  # strings pushed so far (STACK_GLOBAL takes the last two), memoised ones by index
    memo: dict[int, str] = {}
    for op, arg, _ in pickletools.genops(f):
        if op.name == "GLOBAL" and isinstance(arg, str):
            names.append(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.append(f"{strings[-2]}.{strings[-1]}")
        elif isinstance(arg, str) and ("UNICODE" in op.name or op.name.endswith("STRING")):
            strings.append(arg)
        elif op.name == "MEMOIZE" and strings:
            memo[len(memo)] = strings[-1]
        elif op.name in ("BINGET", "LONG_BINGET", "GET") and isinstance(arg, int) and arg in memo:
            strings.append(memo[arg])
        if op.name == "STOP":
            return
    raise ValueError("pickle ended without STOP")


def _first_byte(path: Path) -> int:
    with path.open("rb") as f:
        head = f.read(1)
    return head[0] if head else -1


def _is_zip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _one_line(e: BaseException) -> str:
    return reason(e)


def flatten_tensors(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Unwrap ``state_dict``/``model`` wrappers and keep the tensor entries of a loaded pickle."""
    import torch

    for wrapper in ("state_dict", "model", "module"):
        inner = obj.get(wrapper)
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


class TensorFile:
    """Lazy view of one weight file: keys, shapes and dtypes up front; tensors read on demand."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise LoadError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise LoadError(f"{self.path}: is a folder, not a weight file")
        self.metadata: dict[str, str] = {}
        self._tensors: dict[str, torch.Tensor] | None = None
        suffix = self.path.suffix.lower()
        if suffix in SAFETENSORS_SUFFIXES or (suffix not in PICKLE_SUFFIXES and _looks_safetensors(self.path)):
            self.format = "safetensors"
            self._open_safetensors()
        elif suffix in PICKLE_SUFFIXES or _is_zip(self.path):
            self.format = "pickle"
            self._tensors = flatten_tensors(read_pickle(self.path))
            self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
            self.dtypes = {k: v.dtype for k, v in self._tensors.items()}
        else:
            raise LoadError(f"{self.path}: unknown weight format (expected {', '.join(WEIGHT_SUFFIXES)})")
        if not self.shapes:
            raise LoadError(f"{self.path}: holds no tensors")

    def _open_safetensors(self) -> None:
        header, self.metadata, _ = read_safetensors_header(self.path)
        self.shapes = {k: tuple(v["shape"]) for k, v in header.items()}
        self.dtypes = {k: _st_dtype(v["dtype"]) for k, v in header.items()}

    def keys(self) -> list[str]:
        """All tensor names in the file."""
        return list(self.shapes)

    def load(self, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Read the named tensors (all when ``keys`` is None)."""
        from safetensors import SafetensorError, safe_open

        wanted = self.keys() if keys is None else keys
        if self._tensors is not None:
            return {k: self._tensors[k] for k in wanted}
        try:
            with safe_open(str(self.path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in wanted}
        except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as e:
            raise LoadError(f"{self.path}: cannot read tensors ({_one_line(e)}); is the file truncated?") from None


def _looks_safetensors(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


# safetensors dtype names and their item sizes in bytes (the format's own list).
ST_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
# Safetensors' own reader refuses headers over 100 MB; a larger length field is damage or an attack.
MAX_HEADER_BYTES = 100_000_000


def read_safetensors_header(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    """(tensor entries, metadata, start of the data) of a safetensors file, every field checked: the header
    length, JSON, dtypes, shapes, and each tensor's byte range against its shape and the file's size.
    """
    size = path.stat().st_size
    if size < 8:
        raise LoadError(f"{path}: the file is empty or truncated" if size else f"{path}: the file is empty")
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise LoadError(f"{path}: not a valid safetensors file (header length {n} bytes: damaged or not one)")
        if n > size - 8:
            raise LoadError(f"{path}: not a valid safetensors file (the header runs past the end: truncated?)")
        raw = f.read(n)
    bad = f"{path}: not a valid safetensors file"
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise LoadError(f"{bad} (its header is not JSON: {reason(e, 80)})") from None
    if not isinstance(header, dict):
        raise LoadError(f"{bad} (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise LoadError(f"{bad} (__metadata__ must map strings to strings)")
    start, data = 8 + n, size - 8 - n
    for name, info in header.items():
        where = f"{bad} (tensor {reason(Exception(name), 60)!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise LoadError(f"{where} lacks dtype, shape or data_offsets)")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ST_ITEMSIZE:
            raise LoadError(f"{where} has an unknown dtype {reason(Exception(str(dtype)), 20)})")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise LoadError(f"{where} has a bad shape)")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(o) for o in offsets):
            raise LoadError(f"{where} has bad data_offsets)")
        begin, end = offsets
        count = 1
        for d in shape:
            count *= d
        if not 0 <= begin <= end or end - begin != count * ST_ITEMSIZE[dtype]:
            raise LoadError(f"{where}: its byte range does not match its shape)")
        if end > data:
            raise LoadError(f"{where} lies past the end of the file: truncated?)")
    # As safetensors itself requires: the tensors tile the data buffer exactly, with no gap or overlap.
    spans = sorted((info["data_offsets"][0], info["data_offsets"][1]) for info in header.values())
    at = 0
    for begin, end in spans:
        if begin != at:
            raise LoadError(f"{bad} (tensors overlap or leave gaps in the data)")
        at = end
    if at != data:
        raise LoadError(f"{bad} (the data is {data} bytes but its tensors take {at}: truncated or padded?)")
    return header, metadata, start


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _st_dtype(name: str) -> torch.dtype:
    import torch

    table = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", torch.uint8),
        "F8_E5M2": getattr(torch, "float8_e5m2", torch.uint8),
    }  # fmt: skip
    return table.get(name.upper(), torch.float32)


def find_diffusers_weights(folder: Path) -> tuple[Path, Path]:
    """Return (config.json, weights) of a diffusers VAE folder or a pipeline folder with a ``vae/`` subfolder."""
    for root in (folder, folder / "vae"):
        config = root / "config.json"
        if config.is_file():
            for name in DIFFUSERS_WEIGHT_NAMES:
                if (root / name).is_file():
                    return config, root / name
            raise LoadError(f"{root}: has config.json but no diffusion_pytorch_model weights")
    raise LoadError(f"{folder}: not a diffusers VAE folder (no config.json, nor vae/config.json)")


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, with a one-line error when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"{path}: not valid JSON ({_one_line(e)})") from None
    if not isinstance(data, dict):
        raise LoadError(f"{path}: expected a JSON object")
    return data


def check_destination(dest: str | os.PathLike[str]) -> Path:
    """Refuse (exit 2) a destination that cannot exist because a component of its path is a file."""
    dest = Path(dest)
    for parent in [dest, *dest.parents][1:]:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise BadInputError(f"{dest}: cannot be created: {parent} is a file, not a folder; choose another path")
            break
    return dest


def _make_parent(dest: Path) -> None:
    check_destination(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise BadInputError(f"{dest}: cannot be created: part of its path is a file, not a folder") from None


@contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only if the block succeeds."""
    dest = Path(dest)
    _make_parent(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the result the permissions a plain open() would (or the old file's).
        os.chmod(tmp_path, dest.stat().st_mode & 0o777 if dest.exists() else 0o666 & ~_umask())
        os.replace(tmp_path, dest)
    except OSError as e:
        _name_destination(e, tmp_path, dest)
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


def _name_destination(e: OSError, tmp: Path, dest: Path) -> None:
    """An error about the temporary file (or anything inside a temporary folder) names the destination."""
    if e.filename and (str(e.filename) == str(tmp) or str(e.filename).startswith(str(tmp) + os.sep)):
        e.filename = str(dest)


@contextmanager
def atomic_dir(dest: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; it becomes ``dest`` only if the block succeeds.

    An existing ``dest`` is replaced only with ``overwrite`` (moved aside, then removed once the new one is in
    place); after an error neither a partial folder nor a missing original is left behind.
    """
    dest = Path(dest)
    _make_parent(dest)
    if dest.exists() and not overwrite:
        raise BadInputError(f"{dest}: already exists (pass overwrite=True / --overwrite to replace it)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    old: Path | None = None
    try:
        try:
            yield tmp
        except OSError as e:
            _name_destination(e, tmp, dest)
            raise
        os.chmod(tmp, 0o777 & ~_umask())
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            os.replace(dest, old / "previous")
        try:
            os.replace(tmp, dest)
        except OSError:
            if old is not None:
                os.replace(old / "previous", dest)  # put the original back
                shutil.rmtree(old, ignore_errors=True)
                old = None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(data: bytes, dest: str | os.PathLike[str]) -> None:
    """Write bytes atomically."""
    with atomic_path(dest) as tmp, tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_safetensors(
    tensors: dict[str, torch.Tensor], dest: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> None:
    """Write tensors atomically as safetensors, streamed tensor by tensor (a full disk is an OSError)."""
    from vaekit.formats.checkpoint import _tensor_entry, write_stream

    entries = [_tensor_entry(k, v.detach()) for k, v in tensors.items()]
    with atomic_path(dest) as tmp, tmp.open("wb") as out:
        write_stream(out, entries, dict(metadata or {}), None)


def write_json(data: dict[str, Any], dest: str | os.PathLike[str]) -> None:
    """Write JSON atomically."""
    write_bytes((json.dumps(data, indent=2) + "\n").encode("utf-8"), dest)


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors themselves (names, dtypes, shapes, values; in name order): the same weights in
    another container (safetensors, .ckpt, a diffusers folder, a checkpoint) give the same hash."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(_uint8()).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _uint8() -> torch.dtype:
    import torch

    return torch.uint8


def is_disk_full(e: OSError) -> bool:
    """True for the errors a full disk or quota gives."""
    return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """SHA-256 of a whole file, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def legacy_model_hash(path: str | os.PathLike[str]) -> str:
    """The old A1111 model hash: SHA-256 of 64 KiB at offset 1 MiB, first 8 hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(0x100000)
        h.update(f.read(0x10000))
    return h.hexdigest()[:8]
