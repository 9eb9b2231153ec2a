"""The local engine: a torch DataLoader whose worker processes read, decode and preprocess images.

On CPU each worker also holds the model (shared copy-on-write after fork) and encodes its own groups with a fixed
number of threads, so N workers run N encoders side by side; the main process only writes shards. On a GPU the
workers decode and group, and the main process encodes every group on the device.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vaekit.cache.encoding import (
    Encoded,
    EncodeSettings,
    Failed,
    Task,
    deterministic,
    encode_or_fail,
    encode_tasks,
    prepare_and_group,
)
from vaekit.cache.preprocess import Preprocess
from vaekit.ops.device import free_memory
from vaekit.vae import VAE

# Live activations of an encoder, in multiples of (first-level channels x pixels x batch): a rough upper bound
# measured from the KL encoder's peak (input, two resnet temporaries, the skip, GroupNorm statistics).
_ACTIVATION_FACTOR = 8


def available_cpus() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def encoder_memory(vae: VAE, params: Preprocess, settings: EncodeSettings) -> int:
    """Rough peak bytes of one encoder: its weights plus activations for one group at the largest target size."""
    sizes = params.buckets or ((params.resolution, params.resolution),)
    pixels = max(w * h for w, h in sizes)
    cfg = vae.config
    width = cfg.base_channels if cfg.kind == "kl" else cfg.width  # type: ignore[union-attr]
    weights = sum(p.numel() * p.element_size() for p in vae.model.parameters())
    return int(weights + _ACTIVATION_FACTOR * width * pixels * settings.batch_size * 4)


def default_workers(vae: VAE, params: Preprocess, settings: EncodeSettings, n_tasks: int) -> int:
    """Worker processes sized to the machine: on CPU one encoder per ``threads`` cores that fits in half the free
    memory; on an accelerator enough decoders to feed it (up to 8).
    """
    cpus = available_cpus()
    if vae.device.type != "cpu":
        return max(1, min(8, cpus - 1, n_tasks))
    by_memory = int(free_memory("cpu") * 0.5) // max(1, encoder_memory(vae, params, settings))
    return max(1, min(cpus // settings.threads, by_memory, n_tasks))


class _Stream(IterableDataset):  # type: ignore[type-arg]
    """Each worker takes every n-th task; yields encoded groups (``vae`` given) or prepared groups, and failures."""

    def __init__(self, tasks: list[Task], params: Preprocess, settings: EncodeSettings, vae: VAE | None) -> None:
        self.tasks = tasks
        self.params = params
        self.settings = settings
        self.vae = vae

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        mine = self.tasks if info is None else self.tasks[info.id :: info.num_workers]
        if self.vae is not None:
            yield from encode_tasks(self.vae, mine, self.params, self.settings)
        else:
            yield from prepare_and_group(mine, self.params, self.settings.batch_size)


def _identity(item: Any) -> Any:
    return item


def run_local(
    vae: VAE, tasks: list[Task], params: Preprocess, settings: EncodeSettings, workers: int
) -> Iterator[list[Encoded] | Failed]:
    """Encode ``tasks`` with ``workers`` DataLoader workers (0: everything in this process)."""
    if not tasks:
        return
    on_cpu = vae.device.type == "cpu"
    if workers == 0:
        yield from encode_tasks(vae, tasks, params, settings)
        return
    stream = _Stream(tasks, params, settings, vae if on_cpu else None)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=_identity, prefetch_factor=2)
    if on_cpu:
        yield from loader
        return
    with deterministic(vae.device, settings.threads):
        for item in loader:
            if isinstance(item, Failed):
                yield item
            else:
                yield from encode_or_fail(vae, item, settings)
