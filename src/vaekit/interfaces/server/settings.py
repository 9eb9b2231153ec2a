"""The server's settings: where it binds, what it serves, and the caps that keep it up under load and abuse."""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from vaekit.errors import BadInputError

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")
TOKEN_ENV = "VAEKIT_TOKEN"


def is_loopback(host: str) -> bool:
    """True for a host name or address that only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerSettings:
    """Everything ``create_app`` needs; ``vaekit serve`` fills it from its flags."""

    host: str = "127.0.0.1"
    port: int = 8000
    library: Path | None = None  # the VAE folder; None: the library's default folder
    default_vae: str | None = None  # a name in the library; None: the library's selection, else the bundled VAE
    include_bundled: bool = True  # offer the bundled default VAE beside the library's files
    token: str | None = None  # required on every request when set
    allow_remote: bool = False
    device: str = "auto"
    precision: str = "fp32"  # default per-request precision
    max_body_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 2048 * 2048  # per uploaded image and per decoded image, counted once padded for the VAE
    max_request_pixels: int | None = None  # padded pixels x forward passes of one request; None: 32 x max_pixels
    max_batch_items: int = 16  # latents per /decode request
    max_queue: int = 64  # requests waiting for the worker; more get 503 + Retry-After
    batch_window_ms: float = 10.0  # how long the worker waits for more requests of the same kind
    max_batch: int = 8  # items in one forward pass
    request_timeout_s: float = 120.0
    model_memory_bytes: int = 2 * 1024**3  # cap on the weights of the VAEs kept loaded (LRU)
    max_interpolation_steps: int = 32

    @property
    def request_pixels(self) -> int:
        """The cap on one request's work: padded pixels times forward passes, over all its items."""
        return self.max_request_pixels or 32 * self.max_pixels

    def replace(self, **changes: object) -> ServerSettings:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def validated(self) -> ServerSettings:
        """Check the combination of settings; remote binding needs ``allow_remote`` and a token."""
        if not is_loopback(self.host):
            if not self.allow_remote:
                raise BadInputError(
                    f"refusing to listen on {self.host}: it is reachable from other machines; "
                    "pass --allow-remote (and an API token) to do that on purpose"
                )
            if not self.token:
                raise BadInputError(f"listening on {self.host} needs an API token: pass --token or set {TOKEN_ENV}")
        if self.token is not None and len(self.token) < 8:
            raise BadInputError("the API token is too short: use at least 8 characters")
        for name in ("max_body_bytes", "max_pixels", "max_batch_items", "max_queue", "max_batch"):
            if getattr(self, name) < 1:
                raise BadInputError(f"{name} must be at least 1")
        if self.max_request_pixels is not None and self.max_request_pixels < 2 * self.max_pixels:
            raise BadInputError("max_request_pixels must allow a round trip of the largest image (2 x max_pixels)")
        if self.batch_window_ms < 0 or self.request_timeout_s <= 0:
            raise BadInputError("batch window must be >= 0 and the request timeout > 0")
        if not 0 <= self.port < 65536:
            raise BadInputError(f"port {self.port} is not a TCP port")
        return self
