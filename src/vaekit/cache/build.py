"""Build or update a latent cache: plan what is new or changed, run an engine, write and commit shards, report.

The order of operations is what makes a cache safe to interrupt: leftovers of an earlier run are cleaned first
(shard files the manifest does not know, shards the manifest knows whose files vanished), then only images whose
content hash is not cached yet are encoded, and every shard is committed to the manifest after its file is
complete. Killed at any point, a rerun finds a consistent manifest and finishes the job without duplicates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vaekit.cache.encoding import Encoded, EncodeSettings, Failed, Task
from vaekit.cache.manifest import BINDING_SETTINGS, ImageRow, Manifest
from vaekit.cache.preprocess import Preprocess
from vaekit.cache.shards import new_run_id, new_shard_name, remove_orphans, remove_shards, shard_dir, write_shard
from vaekit.errors import BadInputError, VaekitError
from vaekit.formats.io import file_sha256
from vaekit.ops.images import builtin_image_paths, list_images
from vaekit.ops.precision import DTYPE_NAMES, resolve_dtype
from vaekit.vae import VAE

PathLike = str | os.PathLike[str]
ENGINES = ("local", "ray")
LIST_SUFFIXES = (".txt", ".lst", ".list")
LOCK_NAME = ".lock"
FORMAT_VERSION = 1


@dataclass
class CacheReport:
    """What a run did: counts, failures with reasons, time and throughput."""

    cache_dir: str
    engine: str
    workers: int
    images: int = 0  # images found in the inputs
    encoded: int = 0  # encoded in this run
    reused: int = 0  # identical content already cached under another path
    skipped: int = 0  # already current
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) in this run
    failed_unchanged: int = 0  # known failures whose file did not change (not retried)
    pruned: int = 0  # rows of vanished images removed (--prune)
    stale: int = 0  # rows of vanished images kept (no --prune)
    recovered: int = 0  # leftovers of interrupted runs cleaned (orphan files, lost shards)
    shards_written: int = 0
    seconds: float = 0.0
    encode_seconds: float = 0.0
    # Ray engine only: what crossed into the driver, the encoder actors' CPU time, nodes used, actors lost.
    received_bytes: int = 0
    worker_cpu_seconds: float = 0.0
    nodes: int = 0
    actors_lost: int = 0

    @property
    def images_per_second(self) -> float:
        """Encoded (and failed) images per second of the encoding phase."""
        done = self.encoded + len(self.failed)
        return done / self.encode_seconds if self.encode_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        data = dataclasses.asdict(self)
        data["failed"] = [{"path": p, "reason": r} for p, r in self.failed]
        data["images_per_second"] = round(self.images_per_second, 3)
        return data


# --- inputs ------------------------------------------------------------------------------------------------------
def collect_images(inputs: Sequence[PathLike] | PathLike) -> list[Path]:
    """Folders (recursive), image files, globs, list files (.txt: one path per line, relative to the list) and the
    word ``builtin`` (scikit-image's photos)."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if str(item) == "builtin" and not p.exists():
            paths.extend(builtin_image_paths())
        elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
            for line in p.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    q = Path(line)
                    paths.append(q if q.is_absolute() else p.parent / q)
        else:
            paths.extend(list_images([item]))
    unique = list(dict.fromkeys(q.resolve() for q in paths))
    if not unique:
        raise BadInputError(f"no images found in {', '.join(str(i) for i in items)}")
    return unique


def weights_sha256(vae: VAE) -> str:
    """SHA-256 over the VAE's architecture and tensors (names, dtypes, shapes, bytes): identifies what made a latent."""
    h = hashlib.sha256(json.dumps(vae.config.to_dict(), sort_keys=True).encode())
    for name, t in sorted(vae.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_settings(vae: VAE, params: Preprocess, settings: EncodeSettings) -> dict[str, Any]:
    """The settings recorded in a cache's manifest; those in ``BINDING_SETTINGS`` must match to extend it."""
    return {
        "format": FORMAT_VERSION,
        "vae_sha256": weights_sha256(vae),
        "vae_name": vae.origin.name,
        "vae_file_sha256": vae.origin.sha256,
        "weights_dtype": DTYPE_NAMES.get(vae.dtype, str(vae.dtype)),
        "family": vae.family,
        "kind": vae.config.kind,
        "latent_channels": vae.latent_channels,
        "downscale": vae.downscale,
        "normaliser": vae.normaliser.spec(),
        "precision": settings.precision,
        "store_dtype": settings.store_dtype,
        "preprocess": params.to_dict(),
        "preprocess_fingerprint": params.fingerprint(),
    }


def _mismatch(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    words = {
        "vae_sha256": f"another VAE ({old.get('vae_name')}, weights {str(old.get('vae_sha256'))[:12]}; "
        f"now {new.get('vae_name')}, {str(new.get('vae_sha256'))[:12]})",
        "precision": f"precision {old.get('precision')} (now {new.get('precision')})",
        "store_dtype": f"stored dtype {old.get('store_dtype')} (now {new.get('store_dtype')})",
        "preprocess_fingerprint": f"other preprocessing ({old.get('preprocess')}; now {new.get('preprocess')})",
    }
    return [words[k] for k in BINDING_SETTINGS if old.get(k) != new.get(k)]


@contextlib.contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    """One writer per cache: a second run on the same folder is refused instead of corrupting the first.

    A POSIX record lock (``lockf``), not ``flock``: it belongs to this process only, so worker processes forked
    from it do not inherit it, and a killed run's orphaned workers cannot keep the next run out.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no advisory locks, one writer is the user's job
        yield
        return
    with open(cache_dir / LOCK_NAME, "a+") as f:
        try:
            fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise BadInputError(f"{cache_dir}: another vaekit cache run is writing this cache") from None
        try:
            yield
        finally:
            fcntl.lockf(f.fileno(), fcntl.LOCK_UN)


def _write_error(e: OSError, cache_dir: Path, committed: int) -> VaekitError:
    what = "no space left on the device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    return VaekitError(
        f"{cache_dir}: cannot write a shard ({what}); the manifest is consistent and holds the {committed} "
        "images committed so far; rerun to finish"
    )


class _ShardWriter:
    """Buffers encoded images and commits them shard by shard (file first, then the manifest rows)."""

    def __init__(
        self, manifest: Manifest, cache_dir: Path, shard_size: int, make_rows: Callable[[Encoded, str, int], list]
    ) -> None:
        self.manifest = manifest
        self.cache_dir = cache_dir
        self.folder = shard_dir(cache_dir)
        self.shard_size = shard_size
        self.make_rows = make_rows
        self.run_id = new_run_id()
        self.pending: list[Encoded] = []
        self.shards = 0
        self.committed = 0

    def add(self, item: Encoded) -> None:
        """Buffer one encoded image; writes a shard when the buffer is full."""
        self.pending.append(item)
        if len(self.pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write and commit what is buffered."""
        if not self.pending:
            return
        name = new_shard_name(self.run_id, self.shards)
        try:
            nbytes = write_shard(self.folder, name, [e.tensors for e in self.pending])
        except OSError as e:
            self.pending.clear()
            raise _write_error(e, self.cache_dir, self.committed) from None
        rows = [row for i, e in enumerate(self.pending) for row in self.make_rows(e, name, i)]
        try:
            garbage = self.manifest.commit_shard(name, len(self.pending), nbytes, rows)
        except BaseException:
            (self.folder / name).unlink(missing_ok=True)  # never committed: not part of the cache
            raise
        remove_shards(self.folder, garbage)
        self.shards += 1
        self.committed += len(self.pending)
        self.pending.clear()

    def commit(self, written: list[tuple[str, int, int, list[ImageRow], str]]) -> None:
        """Commit shards workers wrote (Ray engine), ``(name, count, bytes, rows, node)`` each, in one transaction:
        each is first checked to be in the cache folder with its size."""
        for name, _, nbytes, _, node in written:
            path = self.folder / name
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                size = -1
            if size != nbytes:
                where = f" on node {node[:12]}" if node else ""
                raise VaekitError(
                    f"{path}: a worker{where} wrote this shard but it is {'missing' if size < 0 else 'another size'}"
                    f" here: the cache folder must be on storage shared by every node; the {self.committed} images "
                    "committed so far are kept"
                )
        try:
            garbage = self.manifest.commit_shards([w[:4] for w in written])
        except BaseException:
            for w in written:  # never committed: not part of the cache
                (self.folder / w[0]).unlink(missing_ok=True)
            raise
        remove_shards(self.folder, garbage)
        self.shards += len(written)
        self.committed += sum(w[1] for w in written)


def _hash_files(paths: list[Path]) -> dict[Path, str | OSError]:
    def one(p: Path) -> str | OSError:
        try:
            return file_sha256(p)
        except OSError as e:
            return e

    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        return dict(zip(paths, pool.map(one, paths), strict=True))


def build_cache(
    inputs: Sequence[PathLike] | PathLike,
    cache_dir: PathLike,
    vae: VAE,
    params: Preprocess | None = None,
    settings: EncodeSettings | None = None,
    *,
    engine: str = "local",
    workers: int | None = None,
    shard_size: int = 256,
    prune: bool = False,
    rebuild: bool = False,
    retry_failed: bool = False,
    rehash: bool = False,
    address: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CacheReport:
    """Encode every image of ``inputs`` into the cache at ``cache_dir`` (creating or updating it).

    Only images whose content is not cached yet are encoded; files whose size and modification time match the
    manifest are trusted without rehashing unless ``rehash``. ``progress(done, total)`` is called as images finish.
    """
    t0 = time.perf_counter()
    params = params or Preprocess()
    settings = settings or EncodeSettings()
    # "auto" depends on the machine: the cache records the precision it resolved to here.
    precision = DTYPE_NAMES[resolve_dtype(settings.precision, vae.device)]
    settings = dataclasses.replace(settings, flip=params.flip, precision=precision)
    if engine not in ENGINES:
        raise BadInputError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    if shard_size < 1:
        raise BadInputError(f"--shard-size must be at least 1, got {shard_size}")
    if workers is not None and workers < 0:
        raise BadInputError(f"--workers must be 0 or more, got {workers}")
    vae.require("encoder")
    params.check_multiple(vae.downscale)
    paths = collect_images(inputs)
    root = Path(cache_dir)
    if root.exists() and not root.is_dir():
        raise BadInputError(f"{root}: exists and is not a folder")
    root.mkdir(parents=True, exist_ok=True)
    wanted = cache_settings(vae, params, settings)
    with _locked(root):
        manifest = Manifest(root)
        try:
            return _run(paths, root, manifest, vae, params, settings, wanted, engine, workers, shard_size,
                        prune, rebuild, retry_failed, rehash, address, progress, t0)  # fmt: skip
        finally:
            manifest.close()


def _run(
    paths: list[Path],
    root: Path,
    manifest: Manifest,
    vae: VAE,
    params: Preprocess,
    settings: EncodeSettings,
    wanted: dict[str, Any],
    engine: str,
    workers: int | None,
    shard_size: int,
    prune: bool,
    rebuild: bool,
    retry_failed: bool,
    rehash: bool,
    address: str | None,
    progress: Callable[[int, int], None] | None,
    t0: float,
) -> CacheReport:
    folder = shard_dir(root)
    report = CacheReport(str(root), engine, 0, images=len(paths))
    # 1. settings: the cache must have been made the same way, unless rebuilding.
    old = manifest.settings()
    if old is None:
        manifest.set_settings(wanted)
    elif rebuild:
        remove_shards(folder, manifest.reset(wanted))
    elif problems := _mismatch(old, wanted):
        raise BadInputError(f"{root}: this cache was built with {'; '.join(problems)}; pass --rebuild to start over")
    elif old != wanted:
        manifest.set_settings({**old, **{k: v for k, v in wanted.items() if k not in BINDING_SETTINGS}})
    # 2. recovery: shards no image uses, files the manifest does not know, shards it knows whose files are gone.
    remove_shards(folder, manifest.collect_garbage())
    known = manifest.shard_names()
    report.recovered += len(remove_orphans(folder, known))
    missing = {n for n in known if not (folder / n).is_file()}
    report.recovered += len(missing)
    manifest.drop_shards(missing)
    # 3. plan: what is current, what can reuse cached latents, what must be encoded.
    rows = {r.path: r for r in manifest.rows()}
    stats: dict[Path, os.stat_result] = {}
    to_hash: list[Path] = []
    hashes: dict[Path, str] = {}
    for p in paths:
        try:
            st = stats[p] = p.stat()
        except OSError as e:
            report.failed.append((str(p), f"{p}: cannot read ({e.strerror or e})"))
            continue
        row = rows.get(str(p))
        if row and not rehash and row.file_size == st.st_size and row.mtime_ns == st.st_mtime_ns:
            hashes[p] = row.content_sha256
        else:
            to_hash.append(p)
    for p, h in _hash_files(to_hash).items():
        if isinstance(h, OSError):
            report.failed.append((str(p), f"{p}: cannot read ({h.strerror or h})"))
            stats.pop(p)
        else:
            hashes[p] = h
    ok_by_hash = {r.content_sha256: r for r in rows.values() if r.status == "ok"}
    binding = {
        "vae_sha256": wanted["vae_sha256"],
        "precision": settings.precision,
        "store_dtype": settings.store_dtype,
        "preprocess": wanted["preprocess_fingerprint"],
    }
    refresh: list[ImageRow] = []  # rows to insert without encoding (new stats, reused latents)
    todo: dict[str, list[Path]] = {}  # content hash -> paths with that content
    for p, sha in hashes.items():
        st = stats[p]
        row = rows.get(str(p))
        if row and row.content_sha256 == sha and (row.status == "ok" or not retry_failed):
            if row.status == "ok":
                report.skipped += 1
            else:
                report.failed_unchanged += 1
            if (row.file_size, row.mtime_ns) != (st.st_size, st.st_mtime_ns):
                refresh.append(dataclasses.replace(row, file_size=st.st_size, mtime_ns=st.st_mtime_ns))
        elif sha in ok_by_hash:
            src = ok_by_hash[sha]
            refresh.append(dataclasses.replace(src, path=str(p), file_size=st.st_size, mtime_ns=st.st_mtime_ns))
            report.reused += 1
        else:
            todo.setdefault(sha, []).append(p)
    remove_shards(folder, manifest.put_rows(refresh))
    # 4. images that are gone.
    present = {str(p) for p in paths}
    gone = [path for path in rows if path not in present]
    if prune:
        remove_shards(folder, manifest.remove(gone))
        report.pruned = len(gone)
    else:
        report.stale = len(gone)
    # 5. encode.
    tasks = [Task(i, str(ps[0]), sha) for i, (sha, ps) in enumerate(todo.items())]
    by_key = {t.key: todo[t.content_sha256] for t in tasks}
    total = sum(len(ps) for ps in todo.values())

    def make_row(path: Path, sha: str, **extra: Any) -> ImageRow:
        st = stats[path]
        return ImageRow(str(path), sha, st.st_size, st.st_mtime_ns, flipped=settings.flip, **binding, **extra)

    def rows_for(enc: Encoded, shard: str, idx: int) -> list[ImageRow]:
        g = enc.geometry
        left, top, right, bottom = g.crop_box
        geo = dict(original_w=g.original_w, original_h=g.original_h, resized_w=g.resized_w, resized_h=g.resized_h,
                   crop_left=left, crop_top=top, crop_right=right, crop_bottom=bottom)  # fmt: skip
        sha = tasks[enc.key].content_sha256
        return [make_row(p, sha, status="ok", shard=shard, idx=idx, **geo) for p in by_key[enc.key]]

    writer = _ShardWriter(manifest, root, shard_size, rows_for)
    done = 0

    def record_failure(item: Failed) -> None:
        nonlocal done
        ps = by_key[item.key]
        failed_rows = [make_row(p, tasks[item.key].content_sha256, status="failed", error=item.reason) for p in ps]
        remove_shards(folder, manifest.put_rows(failed_rows))
        report.failed.extend((str(p), item.reason) for p in ps)
        done += len(ps)

    def count_encoded(key: int) -> None:
        nonlocal done
        done += len(by_key[key])
        report.encoded += len(by_key[key])

    if progress:
        progress(0, total)
    t_enc = time.perf_counter()
    if tasks and engine == "ray":
        _run_ray(writer, report, vae, tasks, params, settings, workers, address, rows_for, record_failure,
                 count_encoded, lambda: progress(done, total) if progress else None)  # fmt: skip
    elif tasks:
        from vaekit.cache.engines.local import default_workers, run_local

        report.workers = default_workers(vae, params, settings, len(tasks)) if workers is None else workers
        results = run_local(vae, tasks, params, settings, report.workers)
        try:
            for item in results:
                if isinstance(item, Failed):
                    record_failure(item)
                else:
                    for enc in item:
                        writer.add(enc)
                        count_encoded(enc.key)
                if progress:
                    progress(done, total)
            writer.flush()
        except BaseException as e:
            # Interrupted or failed mid-run: keep what is already encoded, unless writing is what failed.
            if not isinstance(e, VaekitError) and writer.pending:
                with contextlib.suppress(Exception):
                    writer.flush()
            if (err := _engine_error(e, "local", writer.committed)) is e:
                raise
            raise err from e
        finally:
            results.close()  # type: ignore[attr-defined]
    report.shards_written = writer.shards
    report.encode_seconds = time.perf_counter() - t_enc
    report.seconds = time.perf_counter() - t0
    return report


def _engine_error(e: BaseException, engine: str, committed: int) -> BaseException:
    """An engine's unexpected exception as one line saying what is kept; errors of ours and interrupts as they are."""
    if isinstance(e, Exception) and not isinstance(e, VaekitError):
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        return VaekitError(
            f"the {engine} engine failed ({type(e).__name__}: {first}); the {committed} images "
            "committed so far are kept; rerun to finish"
        )
    return e


def _run_ray(
    writer: _ShardWriter,
    report: CacheReport,
    vae: VAE,
    tasks: list[Task],
    params: Preprocess,
    settings: EncodeSettings,
    workers: int | None,
    address: str | None,
    rows_for: Callable[[Encoded, str, int], list[ImageRow]],
    record_failure: Callable[[Failed], None],
    count_encoded: Callable[[int], None],
    tick: Callable[[], None],
) -> None:
    """The Ray engine's side of a run: workers write shards, this process commits their records one by one."""
    from vaekit.cache.engines.ray import RayStats, import_ray, run_ray

    import_ray()
    stats = RayStats()
    results = run_ray(vae, tasks, params, settings, writer.cache_dir, writer.run_id, writer.shard_size, workers,
                      address, stats=stats)  # fmt: skip
    try:
        for batch in results:  # the records that arrived together: one manifest transaction for all their shards
            written = []
            for rec in batch:
                for key, reason in rec.failed:
                    record_failure(Failed(key, reason))
                if rec.name is not None:
                    rows = [row for i, entry in enumerate(rec.entries)
                            for row in rows_for(Encoded(entry[0], rec.geometry(i), {}), rec.name, i)]  # fmt: skip
                    written.append((rec.name, len(rec.entries), rec.nbytes, rows, rec.node))
            if written:
                writer.commit(written)
            for rec in batch:
                for entry in rec.entries:
                    count_encoded(entry[0])
            tick()
    except OSError as e:
        raise _write_error(e, writer.cache_dir, writer.committed) from None
    except BaseException as e:
        if (err := _engine_error(e, "ray", writer.committed)) is e:
            raise
        raise err from e
    finally:
        results.close()  # stops the actors before the sweep below
        # Shards of lost or interrupted chunks (renamed into place, never committed) and temporary files.
        with contextlib.suppress(OSError):
            report.recovered += len(remove_orphans(writer.folder, writer.manifest.shard_names()))
        report.workers = stats.actors
        report.received_bytes = stats.received_bytes
        report.worker_cpu_seconds = stats.worker_cpu_seconds
        report.nodes = len(stats.nodes)
        report.actors_lost = stats.actors_lost
