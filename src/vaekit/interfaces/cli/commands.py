"""Every command of the ``vaekit`` command line: its name, the module that defines it, and its one-line help.

The root command lists these without importing the modules, so ``vaekit --help`` and ``vaekit --version`` answer
without loading PyTorch; a command's module is imported (and registers itself on the shared Typer ``app``) only
when that command runs or shows its own help. A test checks this table against the modules.
"""

from __future__ import annotations

import importlib

_PKG = "vaekit.interfaces.cli."


class CommandEntry:
    """Where a command lives and what ``vaekit --help`` says about it (no NamedTuple: typing costs start-up)."""

    __slots__ = ("help", "module")

    def __init__(self, module: str, help: str) -> None:
        self.module = module
        self.help = help


COMMANDS: dict[str, CommandEntry] = {
    "inspect": CommandEntry(_PKG + "inspect_cmd", "Family, layout, channels, dtype, parameters, hashes, fp16 safety."),
    "list": CommandEntry(_PKG + "library_cmd", "The VAE library: every VAE under the library folder."),
    "use": CommandEntry(_PKG + "library_cmd", "Select the VAE every command uses, globally or per checkpoint."),
    "extract": CommandEntry(_PKG + "checkpoint_cmd", "Write the VAE baked into a checkpoint as its own file."),
    "bake": CommandEntry(_PKG + "checkpoint_cmd", "Replace the VAE baked into a checkpoint."),
    "convert": CommandEntry(_PKG + "convert_cmd", "Convert a VAE between formats, layouts and dtypes."),
    "encode": CommandEntry(_PKG + "codec_cmd", "Encode images to latent files."),
    "decode": CommandEntry(_PKG + "codec_cmd", "Decode latent files (vaekit's or ComfyUI's) to PNG images."),
    "roundtrip": CommandEntry(_PKG + "codec_cmd", "Encode and decode each image and report its PSNR."),
    "serve": CommandEntry(_PKG + "serve_cmd", "Serve encode/decode over HTTP and the browser workbench."),
    "compare": CommandEntry(_PKG + "compare_cmd", "Compare VAEs on your images: quality, colour, speed, memory."),
    "cache": CommandEntry(_PKG + "cache_cmd", "Encode a whole dataset into sharded latent files."),
    "sample": CommandEntry(_PKG + "latent_cmd", "Decode latents drawn from the prior into a grid."),
    "interpolate": CommandEntry(_PKG + "latent_cmd", "Walk between two images' latents and decode every step."),
    "preview": CommandEntry(_PKG + "latent_cmd", "A fast approximate RGB preview of latents without the decoder."),
    "fit-preview": CommandEntry(_PKG + "latent_cmd", "Fit a VAE's latent -> RGB preview map."),
    "show-latent": CommandEntry(_PKG + "latent_cmd", "Each latent channel as a greyscale image, with statistics."),
    "noise": CommandEntry(_PKG + "latent_cmd", "Forward diffusion in latent space, decoded at each step."),
    "augment": CommandEntry(_PKG + "latent_cmd", "Data augmentation in latent space."),
    "anomaly": CommandEntry(_PKG + "latent_cmd", "Anomaly detection: fit on normal images, then score new ones."),
    "train": CommandEntry(_PKG + "train_cmd", "Train a VAE from scratch or fine-tune one."),
    "calibrate": CommandEntry(_PKG + "train_cmd", "Estimate a VAE's latent scaling and shift over images."),
}


ROOT_HELP = "Load, inspect, encode, decode, compare and train the VAEs of latent diffusion models."


def root_help() -> str:
    """The text of ``vaekit --help`` (made from the table above, without importing Typer or any command)."""
    width = max(len(name) for name in COMMANDS) + 2
    lines = [
        "Usage: vaekit [OPTIONS] COMMAND [ARGS]...",
        "",
        f"  {ROOT_HELP}",
        "",
        "Options:",
        f"  {'--version':{width}}Print vaekit's version and exit.",
        f"  {'--help':{width}}Show this message and exit.",
        "",
        "Commands:",
        *(f"  {name:{width}}{entry.help}" for name, entry in COMMANDS.items()),
        "",
        "  Run `vaekit COMMAND --help` for a command's options. Docs: docs/cli.md",
    ]
    return "\n".join(lines) + "\n"


def load(name: str) -> None:
    """Import the module that defines command ``name`` (it registers its commands on the shared ``app``)."""
    importlib.import_module(COMMANDS[name].module)


def load_all() -> None:
    """Import every command module (docs, tests and shell completion need the whole tree)."""
    for entry in dict.fromkeys(e.module for e in COMMANDS.values()):
        importlib.import_module(entry)
