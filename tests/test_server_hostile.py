"""`vaekit serve` against hostile and careless clients: abandoned work really stops, a 500 keeps the connection,
disconnects and over-cap bodies are not logged as internal errors, long streams leave room for other clients, and
the thin-image attack is refused while others are served. Real uvicorn servers in threads on loopback ports."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from tests.test_server import (  # noqa: F401  (library, config_dir and isolated_env are fixtures)
    config_dir,
    expect_error,
    isolated_env,
    library,
    photo,
    png_bytes,
    threaded_server,
)
from vaekit.interfaces.server import server_state

WORKER = "vaekit-worker"  # the scheduler's worker thread


@contextmanager
def slow_worker(delay_s: float) -> Iterator[list[int]]:
    """Every module call on the server's worker thread sleeps ``delay_s`` and is counted: a slow model whose
    progress the test can watch (the list's one item is the count)."""
    calls = [0]

    def hook(module: torch.nn.Module, args: object) -> None:
        if threading.current_thread().name == WORKER:
            calls[0] += 1
            time.sleep(delay_s)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


class Records(logging.Handler):
    """Collects the log records of the server's and uvicorn's loggers."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def internal_errors(self) -> list[str]:
        """Records that report an internal error or carry a traceback."""
        return [
            r.getMessage()
            for r in self.records
            if r.levelno >= logging.WARNING
            and (r.exc_info or "internal error" in r.getMessage() or "Exception in ASGI" in r.getMessage())
        ]


@contextmanager
def captured_logs() -> Iterator[Records]:
    handler = Records()
    loggers = [logging.getLogger(n) for n in ("vaekit.server", "uvicorn.error", "uvicorn")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield handler
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def wait_for(predicate: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def raw_request(sock: socket.socket, method: str, path: str, body: bytes, host: str) -> tuple[int, bytes]:
    """One HTTP/1.1 request on an open socket (keep-alive); returns (status, body)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        data += chunk
    header, rest = data.split(b"\r\n\r\n", 1)
    lines = header.decode("latin-1").split("\r\n")
    length = next(int(v) for k, v in (ln.split(":", 1) for ln in lines[1:]) if k.lower() == "content-length")
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        rest += chunk
    return int(lines[0].split()[1]), rest[:length]


# --- abandoned work stops ------------------------------------------------------------------------------------------
def test_disconnected_and_timed_out_jobs_stop_their_work(library: Path, isolated_env: None) -> None:  # noqa: F811
    img = png_bytes(photo(64, 64, seed=1))
    with threaded_server(library=library, request_timeout_s=2.0) as (url, app):
        stats = server_state(app).scheduler.stats  # type: ignore[arg-type]
        assert httpx.post(f"{url}/roundtrip", content=img, timeout=60).status_code == 200  # model loaded and warm
        with slow_worker(0.0) as calls:  # a finished round trip, for scale: this many module calls
            assert httpx.post(f"{url}/roundtrip", content=img, timeout=60).status_code == 200
        full_calls = calls[0]
        assert full_calls > 50, full_calls
        with slow_worker(0.05) as calls:  # now a round trip would take full_calls x 0.05 s (~6 s)
            # 1. The client goes away (its read timeout closes the connection) while its round trip runs.
            before = (stats.completed, stats.cancelled, stats.stopped_batches)
            start = calls[0]
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/roundtrip", content=img, timeout=httpx.Timeout(30, read=0.6))
            wait_for(lambda: stats.stopped_batches > before[2])
            stopped_at = calls[0]
            time.sleep(1.0)
            assert calls[0] == stopped_at  # no module ran after the batch stopped: the work really stopped
            assert stopped_at - start < full_calls / 2  # stopped part-way
            assert stats.completed == before[0] and stats.cancelled == before[1] + 1

            # 2. The request times out on the server (504): its work stops too.
            before = (stats.completed, stats.cancelled, stats.stopped_batches)
            start = calls[0]
            r = httpx.post(f"{url}/roundtrip", content=img, timeout=60)
            expect_error(r, 504, "timeout")
            wait_for(lambda: stats.stopped_batches > before[2])
            stopped_at = calls[0]
            time.sleep(1.0)
            assert calls[0] == stopped_at and stopped_at - start < full_calls
            assert stats.completed == before[0] and stats.timed_out >= 1
        # the server is still healthy, and fast again without the slow hook
        assert httpx.post(f"{url}/roundtrip", content=img, timeout=60).status_code == 200


def test_shutdown_stops_a_running_batch(library: Path, isolated_env: None) -> None:  # noqa: F811
    img = png_bytes(photo(64, 64, seed=2))
    with slow_worker(0.2) as calls:  # a round trip would take ~25 s
        with threaded_server(library=library) as (url, app):
            sent = threading.Thread(target=lambda: httpx.post(f"{url}/roundtrip", content=img, timeout=60), daemon=True)
            sent.start()
            wait_for(lambda: calls[0] > 3)
            t0 = time.monotonic()
        assert time.monotonic() - t0 < 10  # the server's exit did not wait for the batch to finish
        sent.join(timeout=10)


# --- connections and logs ------------------------------------------------------------------------------------------
def test_keep_alive_connection_survives_a_500(library: Path, isolated_env: None) -> None:  # noqa: F811
    good, bad = png_bytes(photo(16, 16, seed=3)), png_bytes(photo(24, 16, seed=4))
    with threaded_server(library=library) as (url, app), captured_logs() as logs:
        sched = server_state(app).scheduler  # type: ignore[arg-type]
        real = sched.run_group

        def failing(key: object, items: object) -> object:  # a model error the server did not foresee
            if getattr(key, "shape", None) == (3, 16, 24):
                raise RuntimeError("Argument #6: Padding size should be less than the corresponding input dimension")
            return real(key, items)  # type: ignore[arg-type]

        sched.run_group = failing  # type: ignore[assignment]
        host = url.removeprefix("http://")
        port = int(host.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            for _ in range(10):
                status, body = raw_request(sock, "POST", "/encode?format=raw", bad, host)
                assert status == 500
                message = json.loads(body)["error"]
                assert "internal error" in message and "Argument" not in message and "RuntimeError" not in message
                status, _ = raw_request(sock, "POST", "/encode?format=raw", good, host)
                assert status == 200  # the same connection, right after the 500
        errors = [r for r in logs.records if r.levelno >= logging.ERROR]
        assert errors and all(r.exc_info is None for r in errors)  # logged, one line each, no traceback
        assert all("Exception in ASGI" not in r.getMessage() for r in errors)


def test_disconnects_and_over_cap_chunked_bodies_are_not_internal_errors(
    library: Path,  # noqa: F811
    isolated_env: None,  # noqa: F811
) -> None:
    with threaded_server(library=library, max_body_bytes=256 * 1024) as (url, _), captured_logs() as logs:

        def chunks() -> Iterator[bytes]:
            for _ in range(16):
                yield b"\0" * 65536

        for path in ("/encode", "/decode", "/vaes/select"):
            expect_error(httpx.post(f"{url}{path}", content=chunks(), timeout=30), 413, "over the cap")
        files = {"a": ("a.png", b"\0" * 300_000, "image/png"), "b": ("b.png", b"x", "image/png")}
        expect_error(httpx.post(f"{url}/interpolate", files=files, timeout=30), 413, "over the cap")
        # a client that promises a body and hangs up half-way, and one that hangs up while its work waits
        host = url.removeprefix("http://")
        port = int(host.rsplit(":", 1)[1])
        for body, declared in ((b"\x89PNG\r\n", 100_000), (png_bytes(photo(64, 64)), None)):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                length = declared if declared is not None else len(body)
                head = f"POST /roundtrip HTTP/1.1\r\nHost: {host}\r\nContent-Length: {length}\r\n\r\n"
                sock.sendall(head.encode() + body)
                time.sleep(0.3)
        time.sleep(1.0)
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
        assert logs.internal_errors() == []


# --- admission and fairness ----------------------------------------------------------------------------------------
def thin_png(width: int, height: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_thin_image_attack_is_refused_while_others_are_served(library: Path, isolated_env: None) -> None:  # noqa: F811
    attack = thin_png(1, 4_000_000)  # under the default cap of 2048 x 2048 pixels, but 8 x 4,000,000 once padded
    assert len(attack) < 64 * 1024
    normal = png_bytes(photo(32, 32, seed=5))
    with threaded_server(library=library) as (url, app):  # the default caps

        async def main() -> tuple[list[httpx.Response], list[httpx.Response], float]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                t0 = time.monotonic()
                attacks = [c.post(p, content=attack) for p in ("/roundtrip", "/encode", "/latents/channels")] * 2
                others = [c.post("/roundtrip", content=normal) for _ in range(4)]
                answers = await asyncio.gather(*attacks, *others)
                return list(answers[: len(attacks)]), list(answers[len(attacks) :]), time.monotonic() - t0

        refused, served, seconds = asyncio.run(main())
        for r in refused:
            expect_error(r, 413, "padded to 8x4000000")
        assert all(r.status_code == 200 for r in served)
        assert seconds < 60
        stats = server_state(app).scheduler.stats  # type: ignore[arg-type]
        assert stats.submitted == 4  # the attacks never reached the queue
        # A thin image within the cap once padded is admitted and finishes in a bounded time.
        t0 = time.monotonic()
        r = httpx.post(f"{url}/roundtrip", content=thin_png(3, 20_000), timeout=120)
        assert r.status_code == 200 and Image.open(__import__("io").BytesIO(r.content)).size == (3, 20_000)
        assert time.monotonic() - t0 < 120


def test_request_cost_cap_counts_items_and_passes(library: Path, isolated_env: None) -> None:  # noqa: F811
    img = png_bytes(photo(64, 64, seed=6))
    # 64 x 64 padded is 4096 pixels: a round trip is 8192 pixel-passes; interpolation (2 + steps) x 4096
    with threaded_server(library=library, max_pixels=4096, max_request_pixels=6 * 4096) as (url, app):
        assert httpx.post(f"{url}/roundtrip", content=img, timeout=60).status_code == 200
        files = {"a": ("a.png", img), "b": ("b.png", img)}
        r = httpx.post(f"{url}/interpolate", params={"steps": 4}, files=files, timeout=60)
        assert r.status_code == 200 and json.loads(r.text.splitlines()[-1])["event"] == "done"
        r = httpx.post(f"{url}/interpolate", params={"steps": 5}, files=files, timeout=60)
        expect_error(r, 413, "pixels of work")
        r = httpx.post(f"{url}/compare", params={"vaes": "small-sd1,small-taesd"}, content=img, timeout=60)
        assert r.status_code == 200
        # A measured rate makes the server refuse work that would outlast the request timeout.
        state = server_state(app)  # type: ignore[arg-type]
        state.engine.seconds_per_pixel[("small-sd1", "fp32")] = 1.0  # as if it took a second per pixel
        expect_error(httpx.post(f"{url}/encode", content=img, timeout=60), 413, "would take about 4096 s")


def interpolation(url: str, steps: int, seed: int) -> tuple[int, list[dict]]:
    a, b = png_bytes(photo(32, 32, seed=seed)), png_bytes(photo(32, 32, seed=seed + 1))
    r = httpx.post(f"{url}/interpolate", params={"steps": steps}, files={"a": a, "b": b}, timeout=120)
    return r.status_code, [json.loads(line) for line in r.text.splitlines()] if r.status_code == 200 else [r.json()]


def test_long_streams_leave_room_for_other_clients(library: Path, isolated_env: None) -> None:  # noqa: F811
    # A small queue: before the fix two 32-frame interpolations filled it and a third client got 200 and then an
    # in-stream "server is busy". Each stream now keeps one batch of frames queued at a time.
    with threaded_server(library=library, max_queue=12, max_batch=2, batch_window_ms=5) as (url, app):
        state = server_state(app)  # type: ignore[arg-type]
        assert state.max_streams == 3
        results: dict[str, object] = {}
        with slow_worker(0.002):
            threads = [
                threading.Thread(target=lambda i=i: results.__setitem__(f"stream{i}", interpolation(url, 32, 10 * i)))
                for i in range(2)
            ]
            for t in threads:
                t.start()
            wait_for(lambda: state.streams == 2, timeout=60)
            assert state.scheduler.queued <= 2 * state.stream_window
            third = interpolation(url, 6, 50)
            other = httpx.post(f"{url}/roundtrip", content=png_bytes(photo(32, 32, seed=60)), timeout=120)
            for t in threads:
                t.join(timeout=300)
        assert other.status_code == 200
        for status, events in [third, results["stream0"], results["stream1"]]:  # type: ignore[list-item]
            assert status == 200, events
            assert [e for e in events if e["event"] == "error"] == []
            assert events[-1]["event"] == "done"
            assert len([e for e in events if e["event"] == "frame"]) == events[0]["total"]
        assert state.streams == 0 and state.scheduler.queued == 0


def test_compare_tie_has_no_winner(library: Path, isolated_env: None, tmp_path: Path) -> None:  # noqa: F811
    import shutil

    twins = tmp_path / "twins"
    twins.mkdir()
    for name in ("first", "second"):  # identical weights under two names
        shutil.copy(library / "small-taesd.safetensors", twins / f"{name}.safetensors")
    with threaded_server(library=twins, default_vae="first") as (url, _):
        r = httpx.post(f"{url}/compare", params={"vaes": "first,second"}, content=png_bytes(photo(32, 32)), timeout=60)
        data = r.json()
        assert r.status_code == 200 and data["best"] is None and sorted(data["tied"]) == ["first", "second"]
        assert data["results"][0]["psnr"] == data["results"][1]["psnr"]


def test_a_stream_whose_client_leaves_abandons_its_frames(library: Path, isolated_env: None) -> None:  # noqa: F811
    a, b = png_bytes(photo(32, 32, seed=70)), png_bytes(photo(32, 32, seed=71))
    with threaded_server(library=library, max_batch=2) as (url, app):
        state = server_state(app)  # type: ignore[arg-type]
        stats = state.scheduler.stats
        with slow_worker(0.01) as calls:  # each frame's decode takes ~0.5 s
            with httpx.Client(base_url=url, timeout=60) as c:
                with c.stream("POST", "/interpolate", params={"steps": 32}, files={"a": a, "b": b}) as r:
                    lines = r.iter_lines()
                    assert json.loads(next(lines))["event"] == "start"
                    assert json.loads(next(lines))["event"] == "frame"
                # the client closed the stream after one frame
            wait_for(lambda: state.streams == 0 and state.scheduler.queued == 0)
            stopped = calls[0]
            time.sleep(1.0)
            assert calls[0] == stopped  # nothing more was decoded for it
        # two encodes, then at most the frames already in its window when it left: far from the 32 it asked for
        assert stats.submitted <= 2 + 3 * state.stream_window and stats.completed + stats.cancelled == stats.submitted
