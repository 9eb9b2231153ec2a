"""TAESana: the tiny autoencoder for Sana's DC-AE f32c32 latents (madebyollin/taesd ``F32Encoder``/``F32Decoder``).

TAESD's blocks (three 3x3 convs with ReLUs and a residual) with 32x downscaling: the encoder opens with two
stride-2 3x3 convs with bias and ReLU (3 -> 32 -> 64 channels), then a block and three more levels of a stride-2
conv plus three blocks; the decoder opens with a wider (256-channel) level and narrows 256 -> 128 -> 64 over five
nearest-x2 upsamplings. Parameter names are those of the published split files, each under its part
(``encoder.0.weight`` for the encoder file's ``0.weight``), as vaekit reads every TAESD file.

Latent convention: like every TAESD, TAESana reads and writes the latent the diffusion model consumes, i.e. DC-AE's
raw latent times its scaling factor 0.41407 (no shift), so its own normaliser is the identity and
``dcae_raw = taesana_latent / 0.41407``. Measured with the published encoder on scikit-image photos: overall std
0.79-1.04, per-channel std 0.44-2.46 (mean 0.66-0.97), mean about 0: the scaled, about unit-variance latent (a raw
DC-AE latent would be about 1 / 0.41407 = 2.4x wider).
Images are in [0, 1] on both sides, with no remapping.

Facts (for tiling and precision): no norm and no attention anywhere (purely local ReLU convs), so halo tiling is
exact; receptive field per side 579 input pixels for the encoder (about 18 latent cells) and 625 output pixels
(about 20 latent cells) for the decoder (measured with forward-mode derivatives; equals the count of 3x3 convs
times their strides).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vaekit.errors import BadInputError, LoadError

FAMILY = "dcae"  # TAESana speaks Sana's DC-AE latent space, already normalised (as TAESD speaks SD1's)
DCAE_SCALING_FACTOR = 0.41407  # taesana latent = DC-AE raw latent * this


@dataclass(frozen=True)
class TAESanaConfig:
    """TAESana (f32c32 tiny autoencoder); ``has_encoder``/``has_decoder`` say which parts a file holds."""

    family: str = FAMILY
    kind: str = "taesana"
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 32
    stem_widths: tuple[int, ...] = (32, 64)  # stride-2 conv + ReLU each, before the first block
    width: int = 64  # encoder block width
    encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)  # blocks after the stem, then after each stride-2 conv
    decoder_widths: tuple[int, ...] = (256, 128, 64, 64, 64, 64)  # width of each decoder level, lowest first
    decoder_blocks: tuple[int, ...] = (3, 3, 3, 3, 3, 1)
    has_encoder: bool = True
    has_decoder: bool = True

    @property
    def downscale(self) -> int:
        """Pixels per latent cell per side (32)."""
        return 2 ** (len(self.stem_widths) + len(self.encoder_blocks) - 1)

    @property
    def gaussian(self) -> bool:
        """TAESana's encoder is deterministic."""
        return False

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


# The published release (taesana_encoder.pth + taesana_decoder.pth at madebyollin/taesd 5cccb12).
PRESETS: dict[str, TAESanaConfig] = {"taesana": TAESanaConfig()}

MARKER_KEYS: tuple[str, ...] = ("encoder.0.bias", "encoder.2.bias", "encoder.4.conv.0.weight")


# For ops/tiling's region tiles: nothing global, and the halo in latent cells covering the receptive field per side
# (encoder 579 input px, decoder 625 output px), so region tiles with this halo are exact.
GLOBAL_PART = ""
TILING_HALO: dict[str, int] = {"encode": 19, "decode": 20}


def normaliser_spec(cfg: TAESanaConfig) -> dict[str, Any]:
    """Identity: TAESana already reads and writes Sana's normalised latent (DC-AE raw x 0.41407)."""
    return {"kind": "scalar", "scale": 1.0, "shift": 0.0}


def conv(c_in: int, c_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    """3x3 conv with same padding."""
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of latents to about [-3, 3]: ``tanh(x / 3) * 3``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """``relu(convs(x) + skip(x))``; convs = conv-ReLU-conv-ReLU-conv; skip a bias-free 1x1 when widths differ."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(conv(c_in, c_out), nn.ReLU(), conv(c_out, c_out), nn.ReLU(), conv(c_out, c_out))
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x) + self.skip(x))


def encoder(cfg: TAESanaConfig) -> nn.Sequential:
    """Images in [0, 1] -> Sana's normalised latent at 1/32 of the size."""
    layers: list[nn.Module] = []
    c = cfg.in_channels
    for w in cfg.stem_widths:
        layers += [conv(c, w, stride=2), nn.ReLU()]
        c = w
    for i, n in enumerate(cfg.encoder_blocks):
        if i > 0:
            layers.append(conv(c, cfg.width, stride=2, bias=False))
            c = cfg.width
        for _ in range(n):
            layers.append(Block(c, cfg.width))
            c = cfg.width
    layers.append(conv(c, cfg.latent_channels))
    return nn.Sequential(*layers)


def decoder(cfg: TAESanaConfig) -> nn.Sequential:
    """Sana's normalised latent -> images in [0, 1] (not clamped)."""
    widths = cfg.decoder_widths
    layers: list[nn.Module] = [Clamp(), conv(cfg.latent_channels, widths[0]), nn.ReLU()]
    for level, n in enumerate(cfg.decoder_blocks):
        layers.extend(Block(widths[level], widths[level]) for _ in range(n))
        if level < len(widths) - 1:
            layers += [nn.Upsample(scale_factor=2), conv(widths[level], widths[level + 1], bias=False)]
    layers.append(conv(widths[-1], cfg.out_channels))
    return nn.Sequential(*layers)


class TAESana(nn.Module):
    """TAESana: ``encoder.N`` / ``decoder.N`` as in the published split files; a part may be absent."""

    def __init__(self, cfg: TAESanaConfig) -> None:
        super().__init__()
        if len(cfg.decoder_widths) != len(cfg.decoder_blocks):
            raise ValueError("TAESana config: one decoder width per decoder level")
        if cfg.has_decoder and 2 ** (len(cfg.decoder_blocks) - 1) != cfg.downscale:
            raise ValueError("TAESana config: the decoder must upsample as much as the encoder downsamples")
        self.config = cfg
        if cfg.has_encoder:
            self.encoder = encoder(cfg)
        if cfg.has_decoder:
            self.decoder = decoder(cfg)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1], H and W multiples of 32 -> Sana's normalised latent (N, 32, H/32, W/32)."""
        if not self.config.has_encoder:
            raise BadInputError("this TAESana file holds no encoder; encoding needs an encoder")
        return self.encoder(images)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Sana's normalised latent -> images in [0, 1] (not clamped)."""
        if not self.config.has_decoder:
            raise BadInputError("this TAESana file holds no decoder; decoding needs a decoder")
        return self.decoder(z)


TAESanaVAE = TAESana

# ----------------------------------------------------------------------------------------------- recognition

Shapes = dict[str, tuple[int, ...]]


def _layers(shapes: Shapes, part: str) -> dict[int, str]:
    """{index: "conv" | "conv_nobias" | "block"} for the layers of ``part`` that hold parameters."""
    found: dict[int, str] = {}
    for key in shapes:
        m = re.match(rf"{part}\.(\d+)\.(.+)$", key)
        if m is None:
            continue
        i, rest = int(m.group(1)), m.group(2)
        if rest.startswith(("conv.", "skip.")):
            found[i] = "block"
        elif rest in ("weight", "bias") and found.get(i) != "block":
            found[i] = "conv" if f"{part}.{i}.bias" in shapes else "conv_nobias"
    return found


def _encoder_config(shapes: Shapes) -> dict[str, Any] | None:
    layers = _layers(shapes, "encoder")
    if not layers or layers.get(0) != "conv" or 1 in layers:
        return None  # TAESD-like encoders have a block at index 1; TAESana a parameter-free ReLU
    stem: list[int] = []
    i = 0
    while layers.get(i) == "conv" and i + 1 not in layers:
        stem.append(shapes[f"encoder.{i}.weight"][0])
        i += 2
    runs: list[int] = []
    for j in range(i, max(layers) + 1):
        kind = layers.get(j)
        if kind == "block":
            if not runs:
                runs.append(0)
            runs[-1] += 1
        elif kind == "conv_nobias":
            runs.append(0)
        elif kind == "conv" and j == max(layers):
            break
        else:
            raise LoadError(f"a TAESana-like encoder with an unexpected layer at encoder.{j}")
    last = max(layers)
    return {
        "in_channels": shapes["encoder.0.weight"][1],
        "stem_widths": tuple(stem),
        "width": shapes[f"encoder.{last}.weight"][1],
        "encoder_blocks": tuple(runs),
        "latent_channels": shapes[f"encoder.{last}.weight"][0],
    }


def _decoder_config(shapes: Shapes) -> dict[str, Any] | None:
    layers = _layers(shapes, "decoder")
    if not layers or 0 in layers or layers.get(1) != "conv":
        return None
    widths = [shapes["decoder.1.weight"][0]]
    runs = [0]
    last = max(layers)
    for j in range(3, last):
        kind = layers.get(j)
        if kind == "block":
            runs[-1] += 1
        elif kind == "conv_nobias":
            widths.append(shapes[f"decoder.{j}.weight"][0])
            runs.append(0)
        elif kind is not None:
            raise LoadError(f"a TAESana-like decoder with an unexpected layer at decoder.{j}")
    return {
        "latent_channels": shapes["decoder.1.weight"][1],
        "out_channels": shapes[f"decoder.{last}.weight"][0],
        "decoder_widths": tuple(widths),
        "decoder_blocks": tuple(runs),
    }


def config_from_shapes(shapes: Shapes) -> TAESanaConfig | None:
    """Recognise a TAESana encoder and/or decoder (``encoder.N``/``decoder.N`` keys); None when it is not one."""
    if not shapes or any(not re.match(r"(encoder|decoder)\.\d+\.", k) for k in shapes):
        return None
    if any(".pool." in k for k in shapes):
        return None  # TAEF2's GroupNorm pooling branch
    enc = _encoder_config(shapes) if any(k.startswith("encoder.") for k in shapes) else {}
    dec = _decoder_config(shapes) if any(k.startswith("decoder.") for k in shapes) else {}
    if enc is None or dec is None:
        return None
    if dec and 2 ** (len(dec["decoder_blocks"]) - 1) != 32:
        return None  # a tiny decoder of another downscale (TAESD's is 8)
    if enc and 2 ** (len(enc["stem_widths"]) + len(enc["encoder_blocks"]) - 1) != 32:
        return None
    if enc and dec and enc["latent_channels"] != dec["latent_channels"]:
        raise LoadError("a TAESana file whose encoder and decoder disagree on the latent channels")
    try:
        cfg = TAESanaConfig(**enc, **{k: v for k, v in dec.items() if k != "latent_channels" or not enc})
        cfg = dataclasses.replace(cfg, has_encoder=bool(enc), has_decoder=bool(dec))
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in TAESana(cfg).state_dict().items()}
    except (ValueError, RuntimeError) as err:
        raise LoadError(f"an inconsistent TAESana file ({err})") from None
    if set(expected) != set(shapes) or any(tuple(shapes[k]) != v for k, v in expected.items()):
        bad = sorted(set(expected) ^ set(shapes)) or [k for k, v in expected.items() if tuple(shapes[k]) != v]
        raise LoadError(f"an inconsistent TAESana file: {len(bad)} keys differ from the architecture (e.g. {bad[0]})")
    return cfg


def with_part_prefix(sd: dict[str, Any], part: str) -> dict[str, Any]:
    """A published split file's keys (``0.weight``) under their part (``encoder.0.weight``), as vaekit names them."""
    if part not in ("encoder", "decoder"):
        raise ValueError("part is 'encoder' or 'decoder'")
    return {f"{part}.{k}": v for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------- diffusers

# diffusers has no TAESana: its AutoencoderTiny cannot express the stride-2 stem (nor the 256-channel decoder level).
DIFFUSERS_KEYS: list[tuple[str, str]] = []
DIFFUSERS_CLASS: str | None = None
_NO_DIFFUSERS = "TAESana has no diffusers layout (diffusers' AutoencoderTiny cannot express its stride-2 stem)"


def to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """No diffusers layout exists for TAESana: always a LoadError."""
    raise LoadError(_NO_DIFFUSERS)


def from_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """No diffusers layout exists for TAESana: always a LoadError."""
    raise LoadError(_NO_DIFFUSERS)


def diffusers_config(cfg: TAESanaConfig) -> dict[str, Any]:
    """No diffusers layout exists for TAESana: always a LoadError."""
    raise LoadError(_NO_DIFFUSERS)


def config_from_diffusers(dc: dict[str, Any]) -> TAESanaConfig:
    """No diffusers layout exists for TAESana: always a LoadError."""
    raise LoadError(_NO_DIFFUSERS)
