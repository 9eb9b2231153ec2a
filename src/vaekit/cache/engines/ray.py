"""The Ray engine: Ray Data reads, decodes and preprocesses on CPU workers and encodes in an actor pool.

Each actor holds one copy of the model, built from weights put once in Ray's object store (so the VAE file need
not exist on the workers), and encodes with the same deterministic settings as the local engine. With GPUs in the
cluster there is one actor per GPU, fed by decode tasks on the CPUs; on CPU-only clusters the actors take one CPU
slot per ``threads`` cores and decode their own images (the encoder is ~50x slower than decoding there, and a
separate decode stage would take CPU slots from the encoders). The driver streams results back and writes shards,
so only the driver needs the cache folder; the images must be readable at the same paths on every node.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from vaekit.cache.encoding import (
    Encoded,
    EncodeSettings,
    Failed,
    Grouper,
    Prepared,
    Task,
    deterministic,
    encode_or_fail,
    encode_tasks,
    prepare,
)
from vaekit.cache.preprocess import Geometry, Preprocess
from vaekit.cache.shards import TENSOR_NAMES
from vaekit.errors import BadInputError, VaekitError
from vaekit.models import build
from vaekit.ops.precision import DTYPES
from vaekit.vae import VAE, VAEOrigin

_GEOMETRY = ("original_w", "original_h", "resized_w", "resized_h", "left", "top", "right", "bottom")


def import_ray() -> Any:
    """The ``ray`` module, or a clear error saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise BadInputError("--engine ray needs Ray: pip install 'vaekit[ray]' (or: pip install 'ray[data]')") from None
    return ray


# --- tensors as bytes: Arrow columns take bytes of any length, whatever the shape and dtype ----------------------
def _to_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape).clone()


def _geometry_columns(rows: list[Geometry | None]) -> dict[str, np.ndarray]:
    values = [(g.original_w, g.original_h, g.resized_w, g.resized_h, *g.crop_box) if g else (0,) * 8 for g in rows]
    return {name: np.array([v[i] for v in values], dtype=np.int64) for i, name in enumerate(_GEOMETRY)}


def _geometry(batch: dict[str, np.ndarray], i: int) -> Geometry:
    v = [int(batch[name][i]) for name in _GEOMETRY]
    return Geometry(v[0], v[1], v[2], v[3], (v[4], v[5], v[6], v[7]))


def _tasks(batch: dict[str, np.ndarray]) -> list[Task]:
    return [Task(int(k), str(p), str(s)) for k, p, s in zip(batch["key"], batch["path"], batch["sha"], strict=True)]


def _result_columns(results: list[Encoded | Failed]) -> dict[str, np.ndarray]:
    """Encoded/failed images -> one row each: key, error, geometry, latent shape and each tensor as bytes."""
    enc = [r if isinstance(r, Encoded) else None for r in results]
    cols: dict[str, np.ndarray] = {
        "key": np.array([r.key for r in results], dtype=np.int64),
        "error": np.array([r.reason if isinstance(r, Failed) else "" for r in results], dtype=object),
        **_geometry_columns([e.geometry if e else None for e in enc]),
    }
    shapes = [tuple(e.tensors["mean"].shape) if e else (0, 0, 0) for e in enc]
    for j, axis in enumerate(("c", "h", "w")):
        cols[axis] = np.array([s[j] for s in shapes], dtype=np.int64)
    for name in TENSOR_NAMES:
        data = [_to_bytes(e.tensors[name]) if e and name in e.tensors else b"" for e in enc]
        cols[name] = np.array(data, dtype=object)
    return cols


def _results(batch: dict[str, np.ndarray], store: torch.dtype) -> Iterator[list[Encoded] | Failed]:
    for i in range(len(batch["key"])):
        key = int(batch["key"][i])
        if batch["error"][i]:
            yield Failed(key, str(batch["error"][i]))
            continue
        shape = (int(batch["c"][i]), int(batch["h"][i]), int(batch["w"][i]))
        tensors = {n: _from_bytes(batch[n][i], store, shape) for n in TENSOR_NAMES if len(batch[n][i])}
        yield [Encoded(key, _geometry(batch, i), tensors)]


# --- the model inside an actor -----------------------------------------------------------------------------------
def _model_spec(vae: VAE) -> dict[str, Any]:
    return {"config": vae.config, "state": {k: v.cpu() for k, v in vae.state_dict().items()}, "name": vae.origin.name}


def _rebuild(spec: Any, device: str) -> VAE:
    import ray

    if isinstance(spec, ray.ObjectRef):
        spec = ray.get(spec)
    model = build(spec["config"])
    model.load_state_dict(spec["state"], strict=True)
    return VAE(model, spec["config"], VAEOrigin(name=spec["name"])).to(device)


class _PrepareEncode:
    """CPU actor: decodes, preprocesses and encodes its rows (one CPU slot per ``threads`` cores)."""

    def __init__(self, spec: Any, params: dict[str, Any], settings: dict[str, Any]) -> None:
        self.vae = _rebuild(spec, "cpu")
        self.params = Preprocess.from_dict(params)
        self.settings = EncodeSettings(**settings)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results: list[Encoded | Failed] = []
        for item in encode_tasks(self.vae, _tasks(batch), self.params, self.settings):
            results.extend([item] if isinstance(item, Failed) else item)
        return _result_columns(results)


def _prepare_rows(batch: dict[str, np.ndarray], params: dict[str, Any]) -> dict[str, np.ndarray]:
    """CPU task: decode and preprocess rows into encoder inputs (float32 bytes) or errors."""
    prep = Preprocess.from_dict(params)
    items = [prepare(t, prep) for t in _tasks(batch)]
    ok = [i if isinstance(i, Prepared) else None for i in items]
    return {
        "key": np.array([i.key for i in items], dtype=np.int64),
        "error": np.array([i.reason if isinstance(i, Failed) else "" for i in items], dtype=object),
        "ph": np.array([p.pixels.shape[1] if p else 0 for p in ok], dtype=np.int64),
        "pw": np.array([p.pixels.shape[2] if p else 0 for p in ok], dtype=np.int64),
        "pixels": np.array([_to_bytes(p.pixels) if p else b"" for p in ok], dtype=object),
        **_geometry_columns([p.geometry if p else None for p in ok]),
    }


class _Encode:
    """Accelerator actor: encodes prepared rows in same-shape groups of ``batch_size``."""

    def __init__(self, spec: Any, settings: dict[str, Any], device: str) -> None:
        self.vae = _rebuild(spec, device)
        self.settings = EncodeSettings(**settings)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results: list[Encoded | Failed] = []
        grouper = Grouper(self.settings.batch_size)
        groups: list[list[Prepared]] = []
        for i in range(len(batch["key"])):
            key = int(batch["key"][i])
            if batch["error"][i]:
                results.append(Failed(key, str(batch["error"][i])))
                continue
            pixels = _from_bytes(batch["pixels"][i], torch.float32, (3, int(batch["ph"][i]), int(batch["pw"][i])))
            if (group := grouper.add(Prepared(key, pixels, _geometry(batch, i)))) is not None:
                groups.append(group)
        groups.extend(grouper.flush())
        with deterministic(self.vae.device, self.settings.threads):
            for group in groups:
                for out in encode_or_fail(self.vae, group, self.settings):
                    results.extend([out] if isinstance(out, Failed) else out)
        return _result_columns(results)


def run_ray(
    vae: VAE,
    tasks: list[Task],
    params: Preprocess,
    settings: EncodeSettings,
    workers: int | None = None,
    address: str | None = None,
    separate_decode: bool | None = None,
) -> Iterator[list[Encoded] | Failed]:
    """Encode ``tasks`` on a Ray cluster (``address``) or a local Ray instance; yields results as they arrive.

    ``workers`` is the number of encoder actors (default: one per GPU, else one per ``threads`` CPUs).
    ``separate_decode`` forces decoding in separate CPU tasks (the default on GPUs) or inside the actors.
    """
    if not tasks:
        return
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        resources = ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
        use_gpu = vae.device.type == "cuda"
        if use_gpu and gpus == 0:
            raise VaekitError("the VAE is on a GPU but the Ray cluster has none; load it on the CPU (--device cpu)")
        separate = use_gpu if separate_decode is None else separate_decode
        slots = gpus if use_gpu else max(1, cpus // settings.threads - (1 if separate else 0))
        actors = max(1, min(workers or slots, len(tasks)))
        spec = ray.put(_model_spec(vae))
        settings_dict = asdict(settings)
        # Rows per actor call: one group while that keeps the actors evenly loaded (a few calls each would leave
        # one actor idle at the end), up to 4 groups for long runs where per-call overhead starts to count.
        b = settings.batch_size
        per_call = b * max(1, min(4, len(tasks) // (actors * b * 16)))
        pool = ray.data.ActorPoolStrategy(size=actors)
        rows = [{"key": t.key, "path": t.path, "sha": t.content_sha256} for t in tasks]
        ds = ray.data.from_items(rows, override_num_blocks=-(-len(rows) // per_call))
        if separate:
            ds = ds.map_batches(
                _prepare_rows, fn_kwargs={"params": params.to_dict()}, batch_size=per_call, num_cpus=1
            ).map_batches(
                _Encode,
                fn_constructor_kwargs={"spec": spec, "settings": settings_dict, "device": str(vae.device)},
                batch_size=per_call,
                compute=pool,
                num_gpus=1 if use_gpu else 0,
                num_cpus=1 if use_gpu else settings.threads,
            )
        else:
            ds = ds.map_batches(
                _PrepareEncode,
                fn_constructor_kwargs={"spec": spec, "params": params.to_dict(), "settings": settings_dict},
                batch_size=per_call,
                compute=pool,
                num_cpus=settings.threads,
            )
        store = DTYPES[settings.store_dtype]
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
            yield from _results(batch, store)
    finally:
        if started:
            ray.shutdown()
