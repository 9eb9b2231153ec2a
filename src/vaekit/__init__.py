"""vaekit: load, inspect, encode, decode, compare and train the VAEs of latent diffusion models."""

from vaekit.errors import BadInputError, LoadError, UnsafeFileError, VaekitError
from vaekit.inspection import Inspection, inspect
from vaekit.models.config import PRESETS, KLConfig, TinyConfig, preset
from vaekit.vae import VAE, load_vae, save_vae

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "VAE",
    "BadInputError",
    "Inspection",
    "KLConfig",
    "LoadError",
    "TinyConfig",
    "UnsafeFileError",
    "VaekitError",
    "inspect",
    "load_vae",
    "preset",
    "save_vae",
]
