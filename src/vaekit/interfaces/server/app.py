"""``create_app(settings)``: the FastAPI application (API + UI) wrapped in the request guards."""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

import vaekit
from vaekit.errors import BadInputError, VaekitError
from vaekit.interfaces.server.catalog import UnknownVAEError
from vaekit.interfaces.server.payloads import PayloadTooLargeError, UnsupportedFormatError
from vaekit.interfaces.server.routes import router
from vaekit.interfaces.server.scheduler import QueueFullError, RequestTimeoutError, ShuttingDownError
from vaekit.interfaces.server.security import BodyTooLarge, GuardMiddleware
from vaekit.interfaces.server.settings import ServerSettings, is_loopback
from vaekit.interfaces.server.state import ServerState, build_state
from vaekit.interfaces.ui import static_dir

log = logging.getLogger("vaekit.server")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def _status_for(exc: VaekitError) -> int:
    if isinstance(exc, PayloadTooLargeError):
        return 413
    if isinstance(exc, UnsupportedFormatError):
        return 415
    if isinstance(exc, UnknownVAEError):
        return 404
    if isinstance(exc, QueueFullError | ShuttingDownError):
        return 503
    if isinstance(exc, RequestTimeoutError):
        return 504
    if isinstance(exc, BadInputError):
        return 400
    return 500


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(VaekitError)
    async def vaekit_error(request: Request, exc: VaekitError) -> JSONResponse:
        status = _status_for(exc)
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, QueueFullError) else None
        if status >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, exc)
        return _error(status, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body"))
            parts.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
        return _error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return _error(413, "request body over the cap")  # the guard answers with the cap in its message

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # A client that went away, or a body cut off at the cap, is not the server's fault: nothing to report.
        if isinstance(exc, ClientDisconnect | BodyTooLarge) or isinstance(exc.__cause__, ClientDisconnect):
            log.debug("%s %s: the client went away", request.method, request.url.path)
            return _error(499, "the client went away")
        # One line in the log (the traceback only at debug level); the client gets no library internals.
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        log.error("internal error in %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, first)
        log.debug("traceback of the internal error", exc_info=exc)
        return _error(500, "internal error: the server could not complete this request (its log has the details)")


def create_app(settings: ServerSettings | None = None) -> GuardMiddleware:
    """The ASGI application of ``vaekit serve``: the API, the UI at ``/`` and ``/docs``, behind the guards.

    The library is scanned and the default VAE resolved here, so configuration errors surface before serving;
    the worker thread and the private temp folder live as long as the app's lifespan.
    """
    settings = (settings or ServerSettings()).validated()
    state = build_state(settings, Path(tempfile.gettempdir()))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Uploads that outgrow memory spill into temporary files: point them at a private folder removed at exit.
        tmpdir = Path(tempfile.mkdtemp(prefix="vaekit-serve-"))
        saved_tempdir = tempfile.tempdir
        tempfile.tempdir = str(tmpdir)
        state.tmpdir = tmpdir
        state.scheduler.start()
        try:
            yield
        finally:
            state.scheduler.stop()
            state.models.clear()
            tempfile.tempdir = saved_tempdir
            shutil.rmtree(tmpdir, ignore_errors=True)

    app = FastAPIOffline(  # a FastAPI app whose /docs and /redoc load their scripts from the package, not a CDN
        title="vaekit",
        version=vaekit.__version__,
        summary="Encode, decode, round-trip and compare images with the VAEs of latent diffusion models.",
        lifespan=lifespan,
    )
    app.state.vaekit = state
    _install_error_handlers(app)
    app.include_router(router)
    ui = static_dir()
    app.mount("/ui", StaticFiles(directory=ui), name="ui")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(ui / "index.html", headers={"Cache-Control": "no-store"})

    return GuardMiddleware(
        app,
        token=settings.token,
        max_body_bytes=settings.max_body_bytes,
        loopback_only=is_loopback(settings.host),
    )


def server_state(app: GuardMiddleware) -> ServerState:
    """The state behind an app made by :func:`create_app` (for tests and embedding)."""
    return app.app.state.vaekit  # type: ignore[attr-defined]


def make_server(
    app: GuardMiddleware, host: str, port: int, log_level: str = "info", access_log: bool = False
) -> uvicorn.Server:
    """A uvicorn server for ``app`` whose shutdown (SIGTERM, Ctrl-C) first stops the work in progress and answers
    the queued requests with 503, so it does not wait for a long batch to finish."""

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            server_state(app).scheduler.stop(wait=False)
            await super().shutdown(sockets)

    return Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log))
