"""The unit of work both engines share: prepare one image, encode fixed-size groups deterministically.

Bit-for-bit reproducibility: convolution kernels pick their algorithm (and so their summation order) from the
batch size and, on CPU, the number of threads. Measured on oneDNN: the same image encoded alone and in a batch of
two differs in the last bits, and so does one thread against two; which other images share the batch does not
matter. So every encoder, in every engine, encodes groups of exactly ``batch_size`` images of one shape (the last
group of a shape is padded by repeating its last image) with exactly ``threads`` intra-op threads, under
``torch.use_deterministic_algorithms``. With the same settings, device and precision, an image's latents are the
same whatever the engine, the worker count and the order.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from vaekit.cache.preprocess import Geometry, Preprocess, load_prepared
from vaekit.errors import BadInputError, VaekitError
from vaekit.ops.codec import CodecOptions
from vaekit.ops.codec import encode as pipeline_encode
from vaekit.ops.precision import DTYPES, parse_precision
from vaekit.vae import VAE


@dataclass(frozen=True)
class Task:
    """An image to encode: a key that identifies it within the run, its path and its content hash."""

    key: int
    path: str
    content_sha256: str


@dataclass
class Prepared:
    """An image turned into its encoder input (3, h, w) in [0, 1]."""

    key: int
    pixels: torch.Tensor
    geometry: Geometry


@dataclass
class Encoded:
    """The cached tensors of one image (``mean``, ``logvar``, ``mean_flip``, ``logvar_flip``) and its geometry."""

    key: int
    geometry: Geometry
    tensors: dict[str, torch.Tensor]


@dataclass
class Failed:
    """An image that could not be cached, with the one-line reason."""

    key: int
    reason: str


@dataclass(frozen=True)
class EncodeSettings:
    """How encoders run: precision, group size, threads per encoder (CPU), stored dtype, flipped variant."""

    precision: str = "fp32"
    batch_size: int = 1
    threads: int = 1
    store_dtype: str = "fp32"
    flip: bool = False

    def __post_init__(self) -> None:
        parse_precision(self.precision)
        if self.store_dtype not in DTYPES:
            raise BadInputError(f"unknown stored dtype {self.store_dtype!r}; use one of {', '.join(DTYPES)}")
        if self.batch_size < 1:
            raise BadInputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.threads < 1:
            raise BadInputError(f"--threads must be at least 1, got {self.threads}")


def prepare(task: Task, params: Preprocess) -> Prepared | Failed:
    """Read and preprocess one image; an unreadable image becomes a :class:`Failed` with the reason."""
    try:
        pixels, geometry = load_prepared(task.path, params, task.content_sha256)
    except BadInputError as e:
        return Failed(task.key, str(e))
    except (OSError, ValueError, RuntimeError, MemoryError) as e:
        return Failed(task.key, f"{task.path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    return Prepared(task.key, pixels, geometry)


@contextmanager
def deterministic(device: torch.device, threads: int) -> Iterator[None]:
    """Fixed intra-op threads (CPU) and deterministic kernels for the duration; the previous state is restored."""
    saved = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for reproducible GEMMs
    if device.type == "cpu" and saved[0] != threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        if torch.get_num_threads() != saved[0]:
            torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        torch.backends.cudnn.benchmark = saved[3]


def _posterior(vae: VAE, batch: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    result = pipeline_encode(vae, batch, CodecOptions(precision=precision, tiling="off"))
    if not vae.gaussian:
        return result.latents, None  # type: ignore[return-value]
    return result.mean, result.logvar  # type: ignore[return-value]


def encode_group(vae: VAE, items: list[Prepared], settings: EncodeSettings) -> list[Encoded]:
    """Encode up to ``batch_size`` same-shape inputs as one batch of exactly ``batch_size`` (padded by repetition)."""
    if not items or len(items) > settings.batch_size:
        raise VaekitError(f"internal: a group of {len(items)} images for batch size {settings.batch_size}")
    pixels = [p.pixels for p in items]
    pixels += [pixels[-1]] * (settings.batch_size - len(pixels))
    batch = torch.stack(pixels)
    store = DTYPES[settings.store_dtype]
    variants = [("", batch)] + ([("_flip", batch.flip(-1))] if settings.flip else [])
    out = [Encoded(p.key, p.geometry, {}) for p in items]
    for suffix, x in variants:
        mean, logvar = _posterior(vae, x, settings.precision)
        for i, enc in enumerate(out):
            enc.tensors["mean" + suffix] = mean[i].to("cpu", store).clone()
            if logvar is not None:
                enc.tensors["logvar" + suffix] = logvar[i].to("cpu", store).clone()
    return out


class Grouper:
    """Collects prepared images by shape and hands out groups of ``batch_size`` (and the leftovers at the end)."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self._pending: dict[tuple[int, ...], list[Prepared]] = {}

    def add(self, item: Prepared) -> list[Prepared] | None:
        """Add an item; returns a full group when this one completes it."""
        group = self._pending.setdefault(tuple(item.pixels.shape), [])
        group.append(item)
        if len(group) == self.batch_size:
            del self._pending[tuple(item.pixels.shape)]
            return group
        return None

    def flush(self) -> list[list[Prepared]]:
        """The incomplete groups left over."""
        groups = list(self._pending.values())
        self._pending.clear()
        return groups


def prepare_and_group(tasks: Iterable[Task], params: Preprocess, batch_size: int) -> Iterator[list[Prepared] | Failed]:
    """Prepare ``tasks`` in order and yield same-shape groups of ``batch_size`` (leftovers last) and failures."""
    grouper = Grouper(batch_size)
    for task in tasks:
        item = prepare(task, params)
        if isinstance(item, Failed):
            yield item
        elif (group := grouper.add(item)) is not None:
            yield group
    yield from grouper.flush()


def encode_tasks(
    vae: VAE, tasks: Iterable[Task], params: Preprocess, settings: EncodeSettings
) -> Iterator[list[Encoded] | Failed]:
    """Prepare and encode ``tasks`` in this process (deterministic settings applied); yields groups and failures."""
    with deterministic(vae.device, settings.threads):
        for item in prepare_and_group(tasks, params, settings.batch_size):
            if isinstance(item, Failed):
                yield item
            else:
                yield from encode_or_fail(vae, item, settings)


def encode_or_fail(vae: VAE, group: list[Prepared], settings: EncodeSettings) -> list[list[Encoded] | Failed]:
    """:func:`encode_group`, turning an encoder failure (NaN even in fp32) into failures of the group's images."""
    try:
        return [encode_group(vae, group, settings)]
    except VaekitError as e:
        return [Failed(p.key, f"encoding failed: {e}") for p in group]
