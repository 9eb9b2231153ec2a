"""The server's shared state: settings, the VAE catalog, loaded models, the scheduler, the temp folder."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vaekit.errors import BadInputError
from vaekit.interfaces.server.catalog import Catalog, CatalogEntry
from vaekit.interfaces.server.engine import Engine, WorkKey, WorkResult
from vaekit.interfaces.server.model_cache import ModelCache
from vaekit.interfaces.server.scheduler import BatchScheduler
from vaekit.interfaces.server.settings import ServerSettings
from vaekit.ops.codec import TILING_MODES
from vaekit.ops.precision import parse_precision


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

    async def run(
        self, op: str, entry: CatalogEntry, precision: str, tiling: str, item: object, shape: tuple[int, ...]
    ) -> WorkResult:
        """Queue one item of work for the worker and wait for its result."""
        key = WorkKey(op, entry.id, precision, tiling, shape)
        return await self.scheduler.submit(key, item)

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
    engine = Engine(models, device)
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
