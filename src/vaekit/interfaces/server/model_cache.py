"""VAEs loaded once and kept: a least-recently-used set of loaded models under a cap on their weights' bytes."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from vaekit.interfaces.server.catalog import Catalog
from vaekit.vae import VAE, load_vae


@dataclass(frozen=True)
class LoadedInfo:
    """A model held in memory."""

    name: str
    dtype: str
    weight_bytes: int


def weight_bytes(vae: VAE) -> int:
    """Bytes held by a VAE's parameters and buffers."""
    tensors = [*vae.model.parameters(), *vae.model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if not t.is_meta)


class ModelCache:
    """Loaded VAEs keyed by (name, dtype); the least recently used are dropped to stay under ``max_bytes``.

    The model being asked for is always kept, even alone over the cap: the cap bounds what is *kept*.
    """

    def __init__(self, catalog: Catalog, device: str = "auto", max_bytes: int = 2 * 1024**3) -> None:
        self.catalog = catalog
        self.device = device
        self.max_bytes = max_bytes
        self._models: OrderedDict[tuple[str, torch.dtype], tuple[str, VAE, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0
        self.evictions = 0

    def get(self, name: str, dtype: torch.dtype) -> VAE:
        """The VAE called ``name`` in ``dtype``, loading it (and evicting others) when it is not held."""
        entry = self.catalog.resolve(name)
        key = (entry.id, dtype)
        with self._lock:
            held = self._models.get(key)
            if held is not None and held[0] == entry.sha256:
                self._models.move_to_end(key)
                return held[1]
        vae = load_vae(entry.path, device=self.device, dtype=dtype)
        # The pipeline runs NHWC (channels_last); holding the weights that way spares it a converted copy.
        vae.model.to(memory_format=torch.channels_last)
        size = weight_bytes(vae)
        with self._lock:
            self._models.pop(key, None)
            while self._models and sum(s for _, _, s in self._models.values()) + size > self.max_bytes:
                self._models.popitem(last=False)
                self.evictions += 1
            self._models[key] = (entry.sha256 or "", vae, size)
            self.loads += 1
        return vae

    def loaded(self) -> list[LoadedInfo]:
        """The models held now, least recently used first."""
        with self._lock:
            return [
                LoadedInfo(name, str(dtype).removeprefix("torch."), size)
                for (name, dtype), (_, _, size) in self._models.items()
            ]

    def clear(self) -> None:
        """Drop every loaded model."""
        with self._lock:
            self._models.clear()
