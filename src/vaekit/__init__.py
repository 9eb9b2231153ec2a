"""vaekit: load, inspect, encode, decode, compare and train the VAEs of latent diffusion models."""

from __future__ import annotations

from vaekit.errors import BadInputError, LoadError, UnsafeFileError, VaekitError

TYPE_CHECKING = False  # not typing's: importing typing would cost `vaekit --help` a tenth of its time budget
if TYPE_CHECKING:
    from vaekit.eval.compare import Comparison, compare
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

# The public API loads on first use: `import vaekit` (and so `vaekit --help`) does not import PyTorch.
_LAZY = {
    "compare": "vaekit.eval.compare",
    "Comparison": "vaekit.eval.compare",
    "inspect": "vaekit.inspection",
    "Inspection": "vaekit.inspection",
    "FAMILIES": "vaekit.families",
    "PRESETS": "vaekit.families",
    "KLConfig": "vaekit.models.config",
    "TinyConfig": "vaekit.models.config",
    "preset": "vaekit.families",
    "VAE": "vaekit.vae",
    "load_vae": "vaekit.vae",
    "save_vae": "vaekit.vae",
}


def __getattr__(name: str) -> object:
    """Import the lazily loaded parts of the public API on first access."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vaekit' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public API, loaded or not."""
    return sorted(set(globals()) | set(__all__))
