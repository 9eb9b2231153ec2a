"""``vaekit serve``: an HTTP API (FastAPI) and a browser workbench for encoding and decoding with VAEs."""

from vaekit.interfaces.server.app import create_app, make_server, server_state
from vaekit.interfaces.server.settings import ServerSettings, is_loopback

__all__ = ["ServerSettings", "create_app", "is_loopback", "make_server", "server_state"]
