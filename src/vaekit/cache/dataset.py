"""Reading a latent cache back: a map-style PyTorch ``Dataset``, a streaming ``IterableDataset``, and an export
to Hugging Face ``datasets`` (an optional dependency).

Each item is a dict: the raw posterior ``mean`` and ``logvar`` (KL VAEs), ``latents`` (the scaled posterior mode,
what a diffusion model trains on when it does not sample), the ``*_flip`` variants when cached, and the SDXL-style
conditioning ``original_size`` (h, w), ``crop_top_left`` (top, left), ``target_size`` (h, w), plus ``crop_box``,
``path`` and ``content_sha256``. Use :meth:`LatentCache.sample` to draw a fresh latent from the posterior each epoch.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from vaekit.cache.manifest import ImageRow, Manifest
from vaekit.cache.shards import ShardReader, shard_dir
from vaekit.errors import BadInputError
from vaekit.normalisers import ScalarAffine, from_spec

PathLike = str | os.PathLike[str]


class LatentCache(Dataset):  # type: ignore[type-arg]
    """Random access to the cached latents of a cache folder, ordered by image path."""

    def __init__(self, cache_dir: PathLike) -> None:
        self.cache_dir = Path(cache_dir)
        if not self.cache_dir.is_dir():
            raise BadInputError(f"{self.cache_dir}: no such cache folder")
        manifest = Manifest(self.cache_dir, readonly=True)
        try:
            settings = manifest.settings()
            self.rows: list[ImageRow] = manifest.rows("ok")
        finally:
            manifest.close()
        if settings is None:
            raise BadInputError(f"{self.cache_dir}: the manifest holds no settings; was the cache ever built?")
        self.settings: dict[str, Any] = settings
        if "normaliser" in settings:
            self.normaliser = from_spec(settings["normaliser"])
        else:  # caches written before normaliser objects
            self.normaliser = ScalarAffine(float(settings["scaling_factor"]), float(settings["shift_factor"]))
        self._reader = ShardReader(shard_dir(self.cache_dir))

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        s = self.settings
        where, vae, family = str(self.cache_dir), s.get("vae_name"), s.get("family")
        return f"LatentCache({where!r}, images={len(self)}, vae={vae!r}, family={family})"

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """Raw posterior latent (C, h, w) -> the normalised latent a diffusion model uses."""
        return self.normaliser.normalise(z.float()[None])[0]

    def _item(self, row: ImageRow, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        item: dict[str, Any] = dict(tensors)
        item["latents"] = self.scale(tensors["mean"])
        if "mean_flip" in tensors:
            item["latents_flip"] = self.scale(tensors["mean_flip"])
        left, top, right, bottom = row.crop_box
        item["original_size"] = torch.tensor([row.original_h, row.original_w])
        item["crop_top_left"] = torch.tensor([top, left])
        item["target_size"] = torch.tensor([bottom - top, right - left])
        item["crop_box"] = torch.tensor([left, top, right, bottom])
        item["path"] = row.path
        item["content_sha256"] = row.content_sha256
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a cache of {len(self)} images")
        row = self.rows[index]
        return self._item(row, self._reader.read(row.shard or "", int(row.idx or 0)))

    def index_of(self, path: PathLike) -> int:
        """Position of an image (by its path) in this dataset."""
        key = str(Path(path).resolve())
        for i, row in enumerate(self.rows):
            if row.path == key:
                return i
        raise KeyError(f"{path}: not in the cache")

    def sample(
        self, item: dict[str, Any], generator: torch.Generator | None = None, flip: bool = False
    ) -> torch.Tensor:
        """A scaled latent drawn from the item's posterior (the mode for deterministic VAEs such as TAESD)."""
        suffix = "_flip" if flip else ""
        mean = item["mean" + suffix].float()
        if "logvar" + suffix not in item:
            return self.scale(mean)
        std = torch.exp(0.5 * item["logvar" + suffix].float())
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return self.scale(mean + std * noise)

    def stream(self, shuffle: bool = False, seed: int = 0) -> LatentStream:
        """An ``IterableDataset`` reading whole shards in turn (sequential I/O), split across DataLoader workers."""
        return LatentStream(self, shuffle, seed)

    def hf_rows(self) -> Iterator[dict[str, Any]]:
        """Rows as plain Python/NumPy values, in dataset order: what :meth:`to_hf_dataset` stores."""
        for i in range(len(self)):
            item = self[i]
            yield {
                k: (v.float().numpy() if v.is_floating_point() else v.tolist()) if isinstance(v, torch.Tensor) else v
                for k, v in item.items()
            }

    def to_hf_dataset(self, cache_dir: PathLike | None = None) -> Any:
        """A Hugging Face ``datasets.Dataset`` with one row per image (needs ``pip install datasets``)."""
        try:
            import datasets
        except ImportError:
            raise BadInputError("exporting to Hugging Face datasets needs the package: pip install datasets") from None
        return datasets.Dataset.from_generator(
            _hf_generator,
            gen_kwargs={"cache_dir": str(self.cache_dir)},
            cache_dir=None if cache_dir is None else str(cache_dir),
        )


def _hf_generator(cache_dir: str) -> Iterator[dict[str, Any]]:
    # A module-level function of plain arguments: datasets pickles and fingerprints it.
    yield from LatentCache(cache_dir).hf_rows()


class LatentStream(IterableDataset):  # type: ignore[type-arg]
    """Streams a cache shard by shard; with ``shuffle``, shards and the items within them come in a seeded random
    order that changes with :meth:`set_epoch`. DataLoader workers each take their share of the shards.
    """

    def __init__(self, cache: LatentCache, shuffle: bool = False, seed: int = 0) -> None:
        self.cache = cache
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        by_shard: dict[str, list[int]] = {}
        for i, row in enumerate(cache.rows):
            by_shard.setdefault(row.shard or "", []).append(i)
        self.by_shard = dict(sorted(by_shard.items()))

    def set_epoch(self, epoch: int) -> None:
        """Choose the shuffle order of the next pass."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.cache)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        names = list(self.by_shard)
        rng = random.Random(f"{self.seed}:{self.epoch}")
        if self.shuffle:
            rng.shuffle(names)
        info = get_worker_info()
        if info is not None:
            names = names[info.id :: info.num_workers]
        for name in names:
            indices = list(self.by_shard[name])
            if self.shuffle:
                rng.shuffle(indices)
            for i in indices:
                yield self.cache[i]
