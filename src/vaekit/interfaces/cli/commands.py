"""Import every command module so each registers its commands on the shared Typer ``app``."""
# ruff: noqa: I001  (one import line per command module, so parallel additions never collide)

from vaekit.interfaces.cli import inspect_cmd  # noqa: F401
from vaekit.interfaces.cli import library_cmd  # noqa: F401
from vaekit.interfaces.cli import checkpoint_cmd  # noqa: F401
from vaekit.interfaces.cli import convert_cmd  # noqa: F401
from vaekit.interfaces.cli import codec_cmd  # noqa: F401
from vaekit.interfaces.cli import serve_cmd  # noqa: F401
from vaekit.interfaces.cli import compare_cmd  # noqa: F401
from vaekit.interfaces.cli import cache_cmd  # noqa: F401
from vaekit.interfaces.cli import latent_cmd  # noqa: F401
from vaekit.interfaces.cli import train_cmd  # noqa: F401
