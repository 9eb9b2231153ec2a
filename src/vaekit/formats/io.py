"""Safe readers and writers of weight files: safetensors, restricted pickles, diffusers folders."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vaekit.errors import LoadError, UnsafeFileError

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
    if path.stat().st_size == 0:
        raise LoadError(f"{path}: the file is empty")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeFileError(
            f"{path}: refused: this pickle needs code to load ({first[:160]}); "
            "nothing in it was run. Convert it to .safetensors with a tool you trust."
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, TypeError) as e:
        raise LoadError(f"{path}: not a readable PyTorch file ({_one_line(e)})") from None
    if not isinstance(obj, dict):
        raise LoadError(f"{path}: holds a {type(obj).__name__}, not a dictionary of tensors")
    return obj


def _is_zip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def flatten_tensors(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Unwrap ``state_dict``/``model`` wrappers and keep the tensor entries of a loaded pickle."""
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
        if self.path.stat().st_size < 8:
            raise LoadError(f"{self.path}: the file is empty or truncated")
        try:
            with safe_open(str(self.path), framework="pt") as f:
                self.metadata = dict(f.metadata() or {})
                keys = list(f.keys())
                self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
                self.dtypes = {k: _st_dtype(f.get_slice(k).get_dtype()) for k in keys}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise LoadError(f"{self.path}: not a valid safetensors file ({_one_line(e)})") from None

    def keys(self) -> list[str]:
        """All tensor names in the file."""
        return list(self.shapes)

    def load(self, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Read the named tensors (all when ``keys`` is None)."""
        wanted = self.keys() if keys is None else keys
        if self._tensors is not None:
            return {k: self._tensors[k] for k in wanted}
        try:
            with safe_open(str(self.path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in wanted}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise LoadError(f"{self.path}: cannot read tensors ({_one_line(e)}); is the file truncated?") from None


def _looks_safetensors(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _st_dtype(name: str) -> torch.dtype:
    return _ST_DTYPES.get(name.upper(), torch.float32)


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


@contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the result the permissions a plain open() would (or the old file's).
        os.chmod(tmp_path, dest.stat().st_mode & 0o777 if dest.exists() else 0o666 & ~_umask())
        os.replace(tmp_path, dest)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_safetensors(
    tensors: dict[str, torch.Tensor], dest: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> None:
    """Write tensors atomically as safetensors (contiguous copies where needed)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(dest) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def write_json(data: dict[str, Any], dest: str | os.PathLike[str]) -> None:
    """Write JSON atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


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
