"""The bundled default VAE trained by vaekit (see MODEL_CARD.md beside this file)."""

from __future__ import annotations

from pathlib import Path

from vaekit.errors import VaekitError

DEFAULT_VAE_NAME = "vaekit-small.safetensors"
DEFAULT_VAE_PATH = Path(__file__).parent / DEFAULT_VAE_NAME


def default_vae_path() -> Path:
    """Path of the bundled default VAE file."""
    if not DEFAULT_VAE_PATH.is_file():
        raise VaekitError(f"the bundled default VAE is missing from the installation ({DEFAULT_VAE_PATH})")
    return DEFAULT_VAE_PATH
