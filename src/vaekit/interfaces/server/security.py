"""Request guards as one ASGI middleware: API token, body-size cap, and cross-site request refusal.

It sits outside FastAPI so that a refused request costs nothing: the body of an oversized upload is never read
(413 from ``Content-Length``, or as soon as a chunked body passes the cap), and a request without the token
never reaches a route.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlsplit

from starlette.requests import ClientDisconnect

from vaekit.interfaces.server.settings import is_loopback

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TOKEN_COOKIE = "vaekit_token"
log = logging.getLogger("vaekit.server")


class BodyTooLarge(Exception):
    """Raised inside ``receive`` when a streamed body passes the cap."""


def tokens_match(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented token with the server's."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def presented_token(scope: Scope) -> str | None:
    """The token a request carries: ``Authorization: Bearer``, ``X-API-Token``, or the UI's cookie."""
    headers = _headers(scope)
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    if "x-api-token" in headers:
        return headers["x-api-token"].strip()
    if "cookie" in headers:
        cookie: SimpleCookie = SimpleCookie()
        try:
            cookie.load(headers["cookie"])
        except Exception:  # a malformed cookie header is just no token
            return None
        if TOKEN_COOKIE in cookie:
            return cookie[TOKEN_COOKIE].value
    return None


async def send_json(send: Send, status: int, detail: str, extra_headers: list[tuple[bytes, bytes]] = ()) -> None:  # type: ignore[assignment]
    """Send a complete JSON error response ``{"error": detail}``."""
    body = json.dumps({"error": detail, "status": status}).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + list(extra_headers)})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Token check, body cap and cross-origin refusal in front of the app."""

    def __init__(self, app: ASGIApp, token: str | None, max_body_bytes: int, loopback_only: bool) -> None:
        self.app = app
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.loopback_only = loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await send_json(send, *refusal)
            return
        if self.token is not None and not tokens_match(presented_token(scope), self.token):
            if scope["path"] == "/" and scope["method"] == "GET":
                query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
                given = (query.get("token") or [None])[0]
                if tokens_match(given, self.token):
                    await self._set_cookie_and_redirect(send, given)  # type: ignore[arg-type]
                    return
            await send_json(
                send,
                401,
                "missing or wrong API token: send 'Authorization: Bearer TOKEN' (the UI: open /?token=TOKEN)",
                [(b"www-authenticate", b"Bearer")],
            )
            return
        length = headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await send_json(send, 400, f"bad Content-Length header {length!r}")
                return
            if declared > self.max_body_bytes:
                await send_json(send, 413, self._too_large())
                return
        await self._forward_capped(scope, receive, send)

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str] | None:
        host = headers.get("host", "")
        # DNS rebinding: a page on another site can point its own name at 127.0.0.1; only loopback names pass.
        if self.loopback_only and host and not is_loopback(_hostname(host)):
            return 403, f"Host {host!r} refused: this server only answers requests addressed to a loopback name"
        origin = headers.get("origin")
        # Cross-site requests from a browser (CSRF) carry a foreign Origin; the UI's own requests carry ours, with
        # the same scheme. "null" is what sandboxed iframes, data: URLs and some redirects send: a page anywhere.
        if origin is not None:
            if origin.strip().lower() == "null":
                return 403, "cross-origin request from an opaque origin ('null', e.g. a sandboxed frame) refused"
            parts = urlsplit(origin.strip())
            scheme = str(scope.get("scheme") or "http").lower()
            if parts.scheme.lower() != scheme or parts.netloc.lower() != host.lower():
                return 403, f"cross-origin request from {origin} refused"
        # Browsers also say where a request comes from; only top-level navigations (links, the address bar) may
        # come from another site, and they only read pages.
        if headers.get("sec-fetch-site") == "cross-site":
            navigation = headers.get("sec-fetch-mode") == "navigate" and scope.get("method") in ("GET", "HEAD")
            if not navigation:
                return 403, "cross-site request refused"
        return None

    def _too_large(self) -> str:
        return f"request body over the cap of {self.max_body_bytes} bytes"

    async def _set_cookie_and_redirect(self, send: Send, token: str) -> None:
        cookie = f"{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"
        await send(
            {
                "type": "http.response.start",
                "status": 303,
                "headers": [(b"location", b"/"), (b"set-cookie", cookie.encode()), (b"content-length", b"0")],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    async def _forward_capped(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = 0
        over = False
        started = False

        async def capped_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    over = True
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if over:  # whatever the app answers to a body cut short (a parse error), the answer is 413
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, capped_receive, tracking_send)
        except ClientDisconnect:
            return  # nobody to answer
        except Exception as e:
            # Starlette answers an unexpected error with a 500 and then raises it again; letting it reach uvicorn
            # would close a keep-alive connection whose next request is already on its way. The error is logged.
            if not over and not started:
                log.error("internal error: %s", type(e).__name__)
                await send_json(send, 500, "internal error: the server could not complete this request")
                return
        if over and not started:
            await send_json(send, 413, self._too_large())


def _hostname(host_header: str) -> str:
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header
