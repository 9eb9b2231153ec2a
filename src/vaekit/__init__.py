"""vaekit: load, inspect, encode, decode, compare and train the VAEs of latent diffusion models."""

from vaekit.errors import BadInputError, LoadError, UnsafeFileError, VaekitError
from vaekit.families import FAMILIES, PRESETS, preset
from vaekit.inspection import Inspection, inspect
from vaekit.models.config import KLConfig, TinyConfig
from vaekit.vae import VAE, load_vae, save_vae

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "PRESETS",
    "VAE",
    "BadInputError",
    "Comparison",
    "Inspection",
    "KLConfig",
    "LoadError",
    "TinyConfig",
    "UnsafeFileError",
    "VaekitError",
    "compare",
    "inspect",
    "load_vae",
    "preset",
    "save_vae",
]

# Heavy parts of the API (metrics libraries, plotting) load on first use, keeping `import vaekit` fast.
_LAZY = {"compare": "vaekit.eval.compare", "Comparison": "vaekit.eval.compare"}


def __getattr__(name: str) -> object:
    """Import the lazily loaded parts of the public API on first access."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vaekit' has no attribute {name!r}")
