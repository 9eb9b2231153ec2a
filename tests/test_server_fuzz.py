"""The HTTP API fuzzed from its own OpenAPI schema with Schemathesis: every operation gets generated requests (valid
and invalid parameters, bodies of random bytes in each declared media type), and no answer may be a 5xx, none may
hang, and the server must be healthy afterwards. Loopback only, five examples per operation and mode, each request
with a deadline."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.test_server import library, threaded_server  # noqa: F401  (library is a fixture)

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (the test extra has it)")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402  (hypothesis comes with schemathesis)

EXAMPLES = 5  # per operation and mode: a few dozen requests in all
REQUEST_DEADLINE_S = 30.0  # any single answer slower than this counts as a hang
BINARY_MEDIA = ("image/png", "image/jpeg", "image/webp", "application/vnd.safetensors")


@schemathesis.serializer(*BINARY_MEDIA)
def _binary(ctx: object, value: object) -> bytes:
    """Generated bodies for the binary upload types: bytes as they are, anything else as its text."""
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


@pytest.fixture(scope="module")
def fuzz_server(library: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:  # noqa: F811
    saved = {k: os.environ.get(k) for k in ("VAEKIT_CONFIG", "VAEKIT_HOME")}
    os.environ["VAEKIT_CONFIG"] = str(tmp_path_factory.mktemp("fuzz-config"))
    os.environ["VAEKIT_HOME"] = ""
    try:
        # small caps so that whatever the fuzzer sends stays cheap
        with threaded_server(library=library, max_pixels=128 * 128, max_body_bytes=256 * 1024) as (url, _):
            yield url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_api_fuzz_no_5xx_no_hang(fuzz_server: str, mode: str) -> None:
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable

    assert fuzz_server.startswith("http://127.0.0.1:")  # loopback only
    schema = schemathesis.openapi.from_url(f"{fuzz_server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9, [op.label for op in operations]
    failures: list[str] = []
    calls = 0

    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,  # the per-request deadline below is the one that matters
            derandomize=True,  # the same examples every run
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def fuzz(case: object) -> None:
            nonlocal calls
            calls += 1
            started = time.monotonic()
            where = f"{case.method} {case.formatted_path}"  # type: ignore[attr-defined]
            try:
                response = case.call(base_url=fuzz_server, timeout=REQUEST_DEADLINE_S)  # type: ignore[attr-defined]
            except Exception as e:  # a hang (timeout) or a dropped connection
                failures.append(f"{where}: {type(e).__name__}: {e}")
                return
            seconds = time.monotonic() - started
            if response.status_code >= 500:
                failures.append(f"{where}: {response.status_code} {response.text[:300]}")
            elif seconds >= REQUEST_DEADLINE_S:
                failures.append(f"{where}: took {seconds:.1f} s")
            elif response.status_code >= 400:  # every refusal is a one-line JSON error
                try:
                    error = response.json().get("error")
                except ValueError:
                    error = None
                if not (isinstance(error, str) and error):
                    failures.append(f"{where}: {response.status_code} without a JSON error: {response.text[:200]}")

        try:
            fuzz()
        except Unsatisfiable:  # nothing to make invalid (an operation without parameters or body)
            assert mode == "negative", operation.label
    assert calls >= len(operations) * 3
    assert failures == [], "\n".join(failures[:20])


def test_server_healthy_after_the_fuzz(fuzz_server: str) -> None:
    with httpx.Client(base_url=fuzz_server, timeout=30) as c:
        health = c.get("/health").json()
        assert health["status"] == "ok" and health["queue"] == 0
        assert c.get("/vaes").status_code == 200
