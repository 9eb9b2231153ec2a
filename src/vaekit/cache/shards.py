"""Shard files: many latents per ``.safetensors`` file, written whole or not at all.

A shard holds, for each entry ``i``, the tensors ``"{i}/mean"`` and (KL VAEs) ``"{i}/logvar"``, plus
``"{i}/mean_flip"`` and ``"{i}/logvar_flip"`` when the flipped variant is cached. Entries of one shard may have
different shapes (aspect-ratio buckets), which is why they are separate tensors rather than one stacked tensor.

A shard is written to a temporary file, flushed to disk, then renamed to its final name; only after that is it
committed to the manifest. Files in ``shards/`` that the manifest does not know are leftovers of an interrupted run
and are removed by :func:`remove_orphans`.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SHARD_DIR = "shards"
SHARD_SUFFIX = ".safetensors"
TMP_SUFFIX = ".tmp"
TENSOR_NAMES = ("mean", "logvar", "mean_flip", "logvar_flip")


def shard_dir(cache_dir: Path) -> Path:
    """The folder holding the shard files of a cache."""
    return cache_dir / SHARD_DIR


def new_shard_name(run_id: str, seq: int) -> str:
    """A shard file name unique across runs: ``{run}-{seq}.safetensors``."""
    return f"{run_id}-{seq:06d}{SHARD_SUFFIX}"


def new_run_id() -> str:
    """A short random id that prefixes the shards of one run."""
    return uuid.uuid4().hex[:12]


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Serialise and flush to disk (the one place that writes shard bytes)."""
    save_file(tensors, str(path), metadata=metadata)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_shard(
    folder: Path, name: str, entries: list[dict[str, torch.Tensor]], metadata: dict[str, str] | None = None
) -> int:
    """Write ``entries`` (one dict of tensors per latent) as ``folder/name`` atomically; returns the file size."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{i}/{k}": t.detach().contiguous().cpu() for i, entry in enumerate(entries) for k, t in entry.items()}
    meta = {"format": "vaekit-latent-shard", "version": "1", "count": str(len(entries)), **(metadata or {})}
    dest = folder / name
    tmp = folder / f".{name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
    try:
        _save(tensors, tmp, meta)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(folder)
    return dest.stat().st_size


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform lets a directory be opened.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_orphans(folder: Path, known: set[str]) -> list[str]:
    """Delete temporary files and shards the manifest does not know; returns the names removed."""
    removed: list[str] = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        if path.is_file() and (path.name.endswith(TMP_SUFFIX) or path.name not in known):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def remove_shards(folder: Path, names: list[str]) -> None:
    """Delete shard files (missing ones are fine)."""
    for name in names:
        (folder / name).unlink(missing_ok=True)


class ShardReader:
    """Reads entries from shard files, keeping a few recently used files open (memory-mapped)."""

    def __init__(self, folder: Path, max_open: int = 8) -> None:
        self.folder = folder
        self.max_open = max_open
        self._open: OrderedDict[str, tuple[Any, set[str]]] = OrderedDict()

    def _handle(self, name: str) -> tuple[Any, set[str]]:
        entry = self._open.get(name)
        if entry is None:
            handle = safe_open(str(self.folder / name), framework="pt")
            entry = (handle, set(handle.keys()))
            self._open[name] = entry
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(name)
        return entry

    def read(self, name: str, index: int) -> dict[str, torch.Tensor]:
        """The tensors of entry ``index`` of shard ``name`` (keys among :data:`TENSOR_NAMES`)."""
        handle, keys = self._handle(name)
        return {key: handle.get_tensor(f"{index}/{key}") for key in TENSOR_NAMES if f"{index}/{key}" in keys}

    def close(self) -> None:
        """Drop the open files."""
        self._open.clear()

    def __getstate__(self) -> dict[str, Any]:
        # Open files do not cross process boundaries (DataLoader workers): each process reopens its own.
        return {"folder": self.folder, "max_open": self.max_open, "_open": OrderedDict()}
