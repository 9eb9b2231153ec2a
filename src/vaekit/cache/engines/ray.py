"""The Ray engine: encoder actors on every node read, encode and write whole shards; the driver only commits.

The driver splits the images into chunks of up to ``--shard-size`` and hands them to a pool of encoder actors
(one per GPU, or one per ``threads`` CPUs on CPU-only clusters), two chunks in flight per actor. An actor reads
and preprocesses its chunk (itself, or on GPU clusters in decode tasks on its own node), encodes it in groups of
exactly ``batch_size`` with the same deterministic settings as the local engine, writes the shard into the shared
cache folder (temporary file, fsync, rename: :func:`vaekit.cache.shards.write_shard`) and returns a
:class:`ShardRecord`: the shard's name and size, and per image its key and geometry (9 integers), or its failure
reason. The driver checks the file is there and commits the record to the manifest. No latent and no pixel
travels through the driver: it receives about a hundred bytes per image (measured by ``benchmarks/bench_cache.py``).

Faults: an actor that dies (its node lost, its process killed) is dropped and its chunks go back to the queue for
the surviving actors; a shard it had already renamed into place is never committed and is removed at the end of
the run (and by the next run's recovery). When no actor is left the run stops with one line; a rerun finishes it.
Plain Ray actors rather than Ray Data: a chunk is a shard, and what happens when a worker is lost is decided here
(requeue, or stop) instead of by retries that wait for resources a lost node no longer offers.

Requirements: the cache folder and the images at the same paths on every node (shared storage), vaekit installed
on every node. The weights are put once in Ray's object store, so the VAE file need not exist on the workers.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
from vaekit.cache.shards import new_shard_name, shard_dir, write_shard
from vaekit.errors import BadInputError, VaekitError
from vaekit.models import build
from vaekit.vae import VAE, VAEOrigin

# Test hook: seconds an actor waits before writing each shard, so a test can kill a node or the driver while
# chunks are in flight. Read by the driver and passed to the actors.
DELAY_ENV = "VAEKIT_CACHE_SHARD_DELAY"
IN_FLIGHT = 2  # chunks queued per actor: the next one is ready when the current one is written


def import_ray() -> Any:
    """The ``ray`` module, or a clear error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise BadInputError("--engine ray needs Ray: pip install 'vaekit[ray]' (or: pip install 'ray')") from None
    return ray


@dataclass(frozen=True)
class ShardRecord:
    """What an encoder actor reports for one chunk: the shard it wrote (None when every image failed) and, per
    image in shard order, ``(key, original_w, original_h, resized_w, resized_h, left, top, right, bottom)``."""

    name: str | None
    nbytes: int
    entries: tuple[tuple[int, ...], ...]
    failed: tuple[tuple[int, str], ...] = ()
    cpu_seconds: float = 0.0  # CPU time the actor's process spent on the chunk
    node: str = ""  # the node that wrote it (for error messages)

    def geometry(self, i: int) -> Geometry:
        """The geometry of entry ``i``."""
        v = self.entries[i]
        return Geometry(v[1], v[2], v[3], v[4], (v[5], v[6], v[7], v[8]))


@dataclass
class RayStats:
    """What the driver measured: bytes of the records it received, the actors' CPU time, actors lost."""

    received_bytes: int = 0
    sent_bytes: int = 0
    worker_cpu_seconds: float = 0.0
    actors: int = 0
    actors_lost: int = 0
    chunks: int = 0
    nodes: set[str] = field(default_factory=set)


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


def _prepare_many(tasks: list[Task], params: dict[str, Any]) -> list[Prepared | Failed]:
    """Decode task (GPU layout): read and preprocess images into encoder inputs."""
    prep = Preprocess.from_dict(params)
    return [prepare(t, prep) for t in tasks]


class _ShardEncoder:
    """Encoder actor: turns a chunk of tasks into one shard file in the cache folder and a small record."""

    def __init__(
        self,
        spec: Any,
        params: dict[str, Any],
        settings: dict[str, Any],
        device: str,
        cache_dir: str,
        separate_decode: bool,
        delay: float,
    ) -> None:
        import ray

        self.vae = _rebuild(spec, device)
        self.params = Preprocess.from_dict(params)
        self.params_dict = params
        self.settings = EncodeSettings(**settings)
        self.folder = shard_dir(Path(cache_dir))
        self.separate = separate_decode
        self.delay = delay
        self.node = ray.get_runtime_context().get_node_id()

    def ready(self) -> str:
        """The node this actor runs on (answered once the model is built)."""
        return self.node

    def _decoded(self, tasks: list[Task]) -> Iterator[Prepared | Failed]:
        """Decode tasks, a few images each, all submitted at once and read in order. Ray's default scheduling puts
        them on this actor's node while it has free CPUs (the pixels then stay in its object store), else spills."""
        import ray

        step = max(2, self.settings.batch_size)
        remote = ray.remote(_prepare_many).options(num_cpus=1)
        refs = [remote.remote(tasks[i : i + step], self.params_dict) for i in range(0, len(tasks), step)]
        for ref in refs:
            yield from ray.get(ref)

    def _encode(self, tasks: list[Task]) -> Iterator[Encoded | Failed]:
        if not self.separate:
            for item in encode_tasks(self.vae, tasks, self.params, self.settings):
                yield from [item] if isinstance(item, Failed) else item
            return
        grouper = Grouper(self.settings.batch_size)
        groups: list[list[Prepared]] = []
        for item in self._decoded(tasks):
            if isinstance(item, Failed):
                yield item
            elif (group := grouper.add(item)) is not None:
                groups.append(group)
        groups.extend(grouper.flush())
        with deterministic(self.vae.device, self.settings.threads):
            for group in groups:
                for out in encode_or_fail(self.vae, group, self.settings):
                    yield from [out] if isinstance(out, Failed) else out

    def encode_shard(self, tasks: list[Task], name: str) -> ShardRecord:
        """Encode ``tasks``, write the encoded ones as shard ``name``, and report what is in it."""
        cpu = time.process_time()
        encoded: list[Encoded] = []
        failed: list[tuple[int, str]] = []
        for item in self._encode(tasks):
            if isinstance(item, Failed):
                failed.append((item.key, item.reason))
            else:
                encoded.append(item)
        if self.delay > 0:
            time.sleep(self.delay)
        nbytes = write_shard(self.folder, name, [e.tensors for e in encoded]) if encoded else 0
        entries = tuple(
            (e.key, e.geometry.original_w, e.geometry.original_h, e.geometry.resized_w, e.geometry.resized_h,
             *e.geometry.crop_box)
            for e in encoded
        )  # fmt: skip
        return ShardRecord(
            name if encoded else None, nbytes, entries, tuple(failed), time.process_time() - cpu, self.node
        )


# --- the driver --------------------------------------------------------------------------------------------------
def chunk_size(n_tasks: int, actors: int, shard_size: int, batch_size: int) -> int:
    """Images per chunk (= per shard): ``shard_size`` on long runs; on short ones small enough that every actor gets
    at least four chunks (a multiple of ``batch_size``, so no group is padded needlessly)."""
    even = -(-n_tasks // (actors * 4))
    even = -(-even // batch_size) * batch_size
    return max(1, min(shard_size, even))


def _connect(ray: Any, address: str | None) -> bool:
    if ray.is_initialized():
        return False
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    return True


def run_ray(
    vae: VAE,
    tasks: list[Task],
    params: Preprocess,
    settings: EncodeSettings,
    cache_dir: Path,
    run_id: str,
    shard_size: int,
    workers: int | None = None,
    address: str | None = None,
    separate_decode: bool | None = None,
    stats: RayStats | None = None,
) -> Iterator[list[ShardRecord]]:
    """Encode ``tasks`` on a Ray cluster (``address``) or a local Ray instance into shards ``{run_id}-*`` under
    ``cache_dir``; yields the records of the chunks that finished since the last yield (one per chunk), to be
    committed before the next.

    ``workers`` is the number of encoder actors (default: one per GPU, else one per ``threads`` CPUs).
    ``separate_decode`` decodes in separate CPU tasks on the actor's node (the default on GPUs).
    """
    if not tasks:
        return
    ray = import_ray()
    from ray.exceptions import RayActorError, RayTaskError

    stats = stats if stats is not None else RayStats()
    started = _connect(ray, address)
    actors: dict[Any, Any] = {}  # ready-ref or actor -> handle, see below
    try:
        resources = ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
        use_gpu = vae.device.type == "cuda"
        if use_gpu and gpus == 0:
            raise VaekitError("the VAE is on a GPU but the Ray cluster has none; load it on the CPU (--device cpu)")
        biggest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        if not use_gpu and biggest < settings.threads:
            raise VaekitError(
                f"--threads {settings.threads} needs nodes with {settings.threads} CPUs; the largest node of the Ray "
                f"cluster has {biggest:g}"
            )
        separate = use_gpu if separate_decode is None else separate_decode
        slots = gpus if use_gpu else max(1, cpus // settings.threads - (1 if separate else 0))
        n_actors = max(1, min(workers or slots, len(tasks)))
        size = chunk_size(len(tasks), n_actors, shard_size, settings.batch_size)
        queue: deque[list[Task]] = deque(tasks[i : i + size] for i in range(0, len(tasks), size))
        spec = ray.put(_model_spec(vae))
        delay = float(os.environ.get(DELAY_ENV) or 0)
        cls = ray.remote(_ShardEncoder).options(
            num_cpus=1 if use_gpu else settings.threads,
            num_gpus=1 if use_gpu else 0,
            max_restarts=0,
            max_task_retries=0,
            scheduling_strategy="SPREAD",
        )
        args = (spec, params.to_dict(), asdict(settings), str(vae.device), str(cache_dir.resolve()), separate, delay)
        handles = [cls.remote(*args) for _ in range(n_actors)]
        stats.actors = n_actors
        pending: dict[Any, tuple[Any, list[Task] | None]] = {h.ready.remote(): (h, None) for h in handles}
        busy: dict[Any, int] = {h: 0 for h in handles}
        alive = set(handles)
        actors = {h: h for h in handles}
        seq = 0

        def feed(h: Any) -> None:
            nonlocal seq
            while queue and busy[h] < IN_FLIGHT:
                chunk = queue.popleft()
                stats.sent_bytes += len(pickle.dumps(chunk))
                ref = h.encode_shard.remote(chunk, new_shard_name(run_id, seq))
                seq += 1
                pending[ref] = (h, chunk)
                busy[h] += 1

        def lose(h: Any) -> None:
            if h in alive:
                alive.discard(h)
                stats.actors_lost += 1
                ray.kill(h, no_restart=True)
            for ref, (owner, chunk) in list(pending.items()):
                if owner is h:
                    del pending[ref]
                    if chunk is not None:
                        queue.appendleft(chunk)

        def handle(ref: Any) -> ShardRecord | None:
            """One finished call: a record to commit, or None (an actor came up, or was lost and its work requeued)."""
            h, chunk = pending.pop(ref)
            try:
                result = ray.get(ref)
            except RayActorError:
                if chunk is not None:
                    queue.appendleft(chunk)
                lose(h)
                if not alive:
                    left = sum(len(c) for c in queue)
                    raise VaekitError(
                        f"every Ray encoder actor was lost (node down or process killed) with {left} images left to"
                        f" encode; the shards committed so far are kept; rerun to finish"
                    ) from None
                for other in alive:
                    feed(other)
                return None
            except RayTaskError as e:
                if isinstance(e.cause, OSError):  # writing the shard failed (full disk, no shared folder...)
                    raise OSError(e.cause.errno, e.cause.strerror or str(e.cause)) from None
                raise
            if chunk is None:  # the actor is up: give it work
                stats.nodes.add(str(result))
                feed(h)
                return None
            busy[h] -= 1
            stats.chunks += 1
            stats.received_bytes += len(pickle.dumps(result))
            stats.worker_cpu_seconds += result.cpu_seconds
            feed(h)
            return result

        # Until every chunk is reported; actors that never start (more asked for than the cluster holds) are
        # simply never given work.
        while queue or any(chunk is not None for _, chunk in pending.values()):
            ray.wait(list(pending), num_returns=1)
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)  # all that are ready now
            batch = []
            for ref in done:
                if ref not in pending:  # dropped with an actor lost earlier in this batch
                    continue
                if (record := handle(ref)) is not None:
                    batch.append(record)
            if batch:
                yield batch
    finally:
        for h in actors:
            ray.kill(h, no_restart=True)
        if started:
            ray.shutdown()
