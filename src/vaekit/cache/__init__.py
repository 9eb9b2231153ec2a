"""Latent caching: encode whole image datasets once into sharded safetensors with a SQLite manifest, and read them
back as PyTorch datasets.

    from vaekit.cache import build_cache, Preprocess
    report = build_cache("images/", "cache/", vae, Preprocess(resolution=512, buckets=auto_buckets(512)))
    ds = vaekit.cache.open("cache/")          # torch Dataset: ds[i]["latents"], ds.sample(ds[i])
    stream = ds.stream(shuffle=True)          # IterableDataset reading shard by shard
"""

from __future__ import annotations

import os

from vaekit.cache.build import CacheReport, build_cache, collect_images
from vaekit.cache.dataset import LatentCache, LatentStream
from vaekit.cache.encoding import EncodeSettings
from vaekit.cache.preprocess import Preprocess, auto_buckets, parse_buckets

__all__ = [
    "CacheReport",
    "EncodeSettings",
    "LatentCache",
    "LatentStream",
    "Preprocess",
    "auto_buckets",
    "build_cache",
    "collect_images",
    "open",
    "parse_buckets",
]


def open(cache_dir: str | os.PathLike[str]) -> LatentCache:  # noqa: A001 - vaekit.cache.open reads like builtins'
    """Open a latent cache for reading: a PyTorch ``Dataset`` (``.stream()`` for an ``IterableDataset``)."""
    return LatentCache(cache_dir)
