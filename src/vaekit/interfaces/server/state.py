"""The server's shared state: settings, the VAE catalog, loaded models, the scheduler, the temp folder."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from starlette.requests import ClientDisconnect, Request

from vaekit.errors import BadInputError
from vaekit.interfaces.server.catalog import Catalog, CatalogEntry
from vaekit.interfaces.server.engine import Engine, WorkKey, WorkResult
from vaekit.interfaces.server.model_cache import ModelCache
from vaekit.interfaces.server.payloads import PayloadTooLargeError
from vaekit.interfaces.server.scheduler import BatchScheduler, QueueFullError
from vaekit.interfaces.server.settings import ServerSettings
from vaekit.ops.codec import TILING_MODES
from vaekit.ops.precision import parse_precision


async def _until_disconnect(request: Request) -> None:
    """Return when the client of ``request`` (whose body was read) disconnects, or its response is complete."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def disconnect_watch(request: Request) -> asyncio.Future[None]:
    """One task per request that completes when its client goes away (no polling: the server wakes it)."""
    watch = getattr(request.state, "vaekit_disconnect", None)
    if watch is None:
        watch = asyncio.ensure_future(_until_disconnect(request))
        request.state.vaekit_disconnect = watch
    return watch


@dataclass
class ServerState:
    """Everything the routes share; built by the app's lifespan."""

    settings: ServerSettings
    catalog: Catalog
    models: ModelCache
    engine: Engine
    scheduler: BatchScheduler
    tmpdir: Path
    device: torch.device
    selected: str | None = None
    started: float = field(default_factory=time.time)
    streams: int = 0  # interpolation streams in progress
    _select_lock: threading.Lock = field(default_factory=threading.Lock)

    # --- options of a request ----------------------------------------------------------------------------------
    async def entry(self, name: str | None) -> CatalogEntry:
        """The catalog entry a request names (or the selected default), resolved off the event loop."""
        chosen = name or self.selected
        if not chosen:
            raise BadInputError("no VAE is selected and the library is empty: add VAE files to the library folder")
        return await asyncio.to_thread(self.catalog.resolve, chosen)

    def precision(self, name: str | None) -> str:
        """A validated precision name (the server's default when None)."""
        return parse_precision(name or self.settings.precision)

    @staticmethod
    def tiling(name: str | None) -> str:
        """A validated tiling mode."""
        mode = (name or "auto").lower()
        if mode == "on":
            mode = "exact"
        if mode not in TILING_MODES:
            raise BadInputError(f"unknown tiling mode {name!r}; use one of {', '.join(TILING_MODES)} (on = exact)")
        return mode

    def admit(self, entry: CatalogEntry, precision: str, pixel_passes: int) -> None:
        """Admission by real cost, before any work is queued: a request's padded pixels times forward passes must
        be under the cap, its compute time (from what was measured on this VAE) under the timeout, and the queue
        must have room."""
        cap = self.settings.request_pixels
        if pixel_passes > cap:
            raise PayloadTooLargeError(
                f"this request is {pixel_passes} pixels of work (padded pixels x encoder/decoder passes), over the "
                f"server's cap of {cap}: send fewer or smaller images"
            )
        timeout = self.settings.request_timeout_s
        seconds = self.engine.estimate_seconds(entry.id, precision, pixel_passes)
        if seconds is not None and seconds > timeout:
            raise PayloadTooLargeError(
                f"this request would take about {seconds:.0f} s of computing with {entry.id!r} on this server, over "
                f"its timeout of {timeout:g} s: send fewer or smaller images"
            )
        self.scheduler.check_room()

    async def run(
        self,
        op: str,
        entry: CatalogEntry,
        precision: str,
        tiling: str,
        item: object,
        shape: tuple[int, ...],
        request: Request | None = None,
        admitted: bool = False,
    ) -> WorkResult:
        """Queue one item of work for the worker and wait for its result.

        With ``request``, the client's connection is watched while it waits: when the client goes away the job is
        abandoned (taken out of the queue, or its running batch stopped) and ClientDisconnect is raised.
        ``admitted`` marks the later items of a request that already passed admission (see the scheduler).
        """
        key = WorkKey(op, entry.id, precision, tiling, shape)
        task = asyncio.ensure_future(self.scheduler.submit(key, item, admitted=admitted))
        try:
            if request is None:
                return await task
            await asyncio.wait({task, disconnect_watch(request)}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            raise ClientDisconnect
        finally:
            if not task.done():
                task.cancel()  # the scheduler abandons the job

    @property
    def stream_window(self) -> int:
        """Frames one stream may have queued or running at a time: its fair share, one batch."""
        return max(1, self.settings.max_batch)

    @property
    def max_streams(self) -> int:
        """Streams served at once: their windows together fill at most half of ``max_queue``."""
        return max(2, self.settings.max_queue // (2 * self.stream_window))

    def check_stream_room(self) -> None:
        """QueueFullError when ``max_streams`` streams are in progress (a stream counts itself while it runs)."""
        if self.streams >= self.max_streams:
            self.scheduler.stats.rejected += 1
            raise QueueFullError(f"the server is busy ({self.streams} interpolations in progress); retry later", 5)

    def select(self, entry: CatalogEntry) -> None:
        """Make ``entry`` the VAE used when a request names none."""
        with self._select_lock:
            self.selected = entry.id


def build_state(settings: ServerSettings, tmpdir: Path) -> ServerState:
    """Create the catalog, model cache, engine and scheduler for ``settings`` (the scheduler is not started)."""
    from vaekit.ops.device import choose_device

    device = choose_device(settings.device)
    catalog = Catalog(settings.library, include_bundled=settings.include_bundled)
    models = ModelCache(catalog, device=str(device), max_bytes=settings.model_memory_bytes)
    engine = Engine(models, device, max_pixels=settings.max_pixels)
    scheduler = BatchScheduler(
        engine.run,  # type: ignore[arg-type]
        max_queue=settings.max_queue,
        window_s=settings.batch_window_ms / 1000,
        max_batch=settings.max_batch,
        timeout_s=settings.request_timeout_s,
    )
    state = ServerState(settings, catalog, models, engine, scheduler, tmpdir, device)
    if settings.default_vae:
        state.select(catalog.resolve(settings.default_vae))
    else:
        state.selected = catalog.default_id()
    return state
