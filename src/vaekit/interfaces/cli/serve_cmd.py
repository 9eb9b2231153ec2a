"""``vaekit serve``: the HTTP API and the browser workbench in one process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from vaekit.interfaces.cli import core as cli
from vaekit.interfaces.cli.core import app


@app.command("serve")
def serve_command(
    host: Annotated[
        str, typer.Option(help="Address to bind. Anything but loopback needs --allow-remote.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free port).")] = 8000,
    library: Annotated[
        Path | None, typer.Option(help="VAE library folder (default: VAEKIT_HOME, the config file, ./models/VAE).")
    ] = None,
    vae: Annotated[
        str | None, typer.Option("--vae", help="VAE selected at start (default: the library's selection).")
    ] = None,
    allow_remote: Annotated[
        bool, typer.Option("--allow-remote", help="Allow a non-loopback --host; an API token is then required.")
    ] = False,
    token: Annotated[
        str | None, typer.Option(help="API token required on every request (default: $VAEKIT_TOKEN).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 or mps.")] = "auto",
    precision: Annotated[str, typer.Option(help="Default precision of requests: fp32, bf16, fp16 or auto.")] = "fp32",
    max_body_mb: Annotated[float, typer.Option(help="Largest request body in MB (413 above).")] = 32.0,
    max_pixels: Annotated[int, typer.Option(help="Largest image, in pixels, uploaded or decoded (413 above).")] = 2048
    * 2048,
    max_queue: Annotated[int, typer.Option(help="Requests allowed to wait; more get 503 with Retry-After.")] = 64,
    max_batch: Annotated[int, typer.Option(help="Most same-size requests run in one forward pass.")] = 8,
    batch_window_ms: Annotated[float, typer.Option(help="How long to wait for requests to batch together.")] = 10.0,
    timeout: Annotated[float, typer.Option(help="Per-request timeout in seconds (504 after).")] = 120.0,
    model_memory_gb: Annotated[float, typer.Option(help="Cap on the weights of the VAEs kept loaded.")] = 2.0,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve encode/decode/round-trip/compare over HTTP (docs at /docs) and the browser workbench at /."""
    from vaekit.interfaces.server import create_app, make_server
    from vaekit.interfaces.server.settings import TOKEN_ENV, ServerSettings, is_loopback

    settings = ServerSettings(
        host=host,
        port=port,
        library=library,
        default_vae=vae,
        token=token or os.environ.get(TOKEN_ENV) or None,
        allow_remote=allow_remote,
        device=device,
        precision=precision,
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        max_pixels=max_pixels,
        max_queue=max_queue,
        max_batch=max_batch,
        batch_window_ms=batch_window_ms,
        request_timeout_s=timeout,
        model_memory_bytes=int(model_memory_gb * 1024**3),
    )
    asgi = create_app(settings)  # validates the settings and the library before binding
    state = asgi.app.state.vaekit  # type: ignore[attr-defined]
    shown = f"[{host}]" if ":" in host else host
    cli.err.print(f"VAE: {state.selected or 'none (the library is empty)'}; library: {state.catalog.home or 'default'}")
    if settings.token:
        cli.err.print("API token required on every request (Authorization: Bearer ...; the UI: /?token=...)")
    if not is_loopback(host):
        cli.err.print(f"[yellow]warning:[/] listening on {host}: reachable from other machines")
    cli.err.print(f"serving on http://{shown}:{port}/  (API docs: /docs)")
    make_server(asgi, host, port, log_level=log_level, access_log=log_level == "debug").run()
