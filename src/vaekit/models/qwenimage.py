"""The Qwen-Image VAE: Wan 2.1's causal 3-D convolution VAE (as fine-tuned for Qwen-Image), run on single frames.

Parameter names are those of the original Wan 2.1 release file as ComfyUI loads it (``qwen_image_vae.safetensors``,
``Wan2.1_VAE``): ``encoder.conv1``, ``encoder.downsamples.N.residual.M``, ``encoder.middle``, ``encoder.head``,
``conv1``/``conv2`` (quant / post-quant), ``decoder.upsamples.N``. Weights keep their original 5-D shapes.

Single frames: every causal 3-D conv pads ``2 * (kt // 2)`` zero frames before the input in time and none after,
so on one frame only the kernel's last time slice touches data; it runs here as a 2-D conv with
``weight[:, :, -1]``: 2.35x faster on CPU than ``Conv3d`` on the zero-padded T=3 input (which spends two thirds of
its work on zeros; real width, 128 px encode + decode, one thread), same result to 7e-7. The temporal resamplers
(``time_conv``) never act on the first frame (the reference skips them for it), so their weights are loaded and
kept but unused. Video (T > 1) is refused with BadInputError.

Facts for tiling and precision:
- Norms: RMS norm over channels at each position (``F.normalize`` over dim 1 times ``sqrt(C) * gamma``, no bias,
  in fp32 for 16-bit inputs): no statistics across positions, so halos are exact for every conv stage.
- Global parts: one single-head self-attention over all positions of the frame in each mid-block
  (``encoder.middle.1``, ``decoder.middle.1``), at latent resolution. Nothing else is global.
- Receptive fields per side, convolutions only (measured by gradient support): encoder, image -> attention input:
  77 px above/left and 84 px below/right of a latent cell's 8x8 block (the stride-2 downsamplers pad right/bottom
  only); attention output -> posterior: 3 latent cells. Decoder, latent -> attention input: 3 cells; attention
  output -> image: 15 latent cells (120 px; 14 or 15 depending on the pixel's phase).
- Precision (diffusers' model, real width, its default random init: no trained weights offline; astronaut at 256 px):
  peak |activation| 5.25 (an RMS-norm output); bf16 finite, decode 56.5 dB PSNR vs fp32; fp16 (weights and every
  module output rounded to fp16) finite, 75.9 dB. Trained weights may differ; ComfyUI lists bf16, fp16, fp32 as
  working dtypes for the Wan 2.1 VAE. fp16 convolutions are ~100x slower than fp32 on this CPU (no AVX512-FP16).
- Latent normalisation: per channel, ``(z - mean) / std`` with Qwen-Image's published statistics (below).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vaekit.errors import BadInputError, LoadError

# Per-channel latent statistics: the defaults of diffusers' AutoencoderKLQwenImage config (`latents_mean`,
# `latents_std`, diffusers 0.42.1); the same values are in Qwen/Qwen-Image's `vae/config.json` and are
# AutoencoderKLWan's defaults (Wan 2.1). QwenImagePipeline feeds the transformer `(z - mean) / std` and decodes
# `z * std + mean`.
QWENIMAGE_LATENTS_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
QWENIMAGE_LATENTS_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

LOGVAR_RANGE = (-30.0, 20.0)

# Latent -> RGB preview factors on normalised latents (RGB in [-1, 1]): ComfyUI comfy/latent_formats.py, class
# Wan21 (`latent_rgb_factors`, `latent_rgb_factors_bias`), the latent format ComfyUI uses for Qwen-Image.
PREVIEW_RGB_FACTORS: tuple[tuple[float, float, float], ...] = (
    (-0.1299, -0.1692, 0.2932), (0.0671, 0.0406, 0.0442), (0.3568, 0.2548, 0.1747), (0.0372, 0.2344, 0.1420),
    (0.0313, 0.0189, -0.0328), (0.0296, -0.0956, -0.0665), (-0.3477, -0.4059, -0.2925), (0.0166, 0.1902, 0.1975),
    (-0.0412, 0.0267, -0.1364), (-0.1293, 0.0740, 0.1636), (0.0680, 0.3019, 0.1128), (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699), (0.0060, -0.0633, 0.0005), (0.3477, 0.2275, 0.2950), (0.1984, 0.0913, 0.1861),
)  # fmt: skip
PREVIEW_RGB_BIAS: tuple[float, float, float] = (-0.1835, -0.0868, -0.3360)


@dataclass(frozen=True)
class QwenImageConfig:
    """Widths and depths of the Wan 2.1 / Qwen-Image VAE (diffusers: base_dim, z_dim, dim_mult, num_res_blocks)."""

    family: str = "qwenimage"
    kind: str = "qwenimage"
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    base_dim: int = 96
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Which encoder downsamplers also halve time (they carry a `time_conv`); the decoder mirrors it.
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = field(default=QWENIMAGE_LATENTS_MEAN)
    latents_std: tuple[float, ...] = field(default=QWENIMAGE_LATENTS_STD)

    def __post_init__(self) -> None:
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError("temporal_downsample needs one flag per downsampler (len(dim_mult) - 1)")
        if len(self.latents_mean) != self.latent_channels or len(self.latents_std) != self.latent_channels:
            raise ValueError(f"latents_mean/latents_std need {self.latent_channels} values (one per latent channel)")

    @property
    def downscale(self) -> int:
        """Pixels per latent cell along one side (8 for the release)."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def gaussian(self) -> bool:
        """The encoder outputs a diagonal-Gaussian posterior (mean, logvar)."""
        return True

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


PRESETS: dict[str, QwenImageConfig] = {"qwenimage": QwenImageConfig()}

MARKER_KEYS: tuple[str, ...] = ("decoder.middle.0.residual.0.gamma", "encoder.conv1.weight", "decoder.head.2.weight")

# For vaekit.ops.tiling: the mid-block attention is global, so tiles cannot be exact; fast tiling gives each tile a
# halo (latent cells) covering the convolutions' receptive field with the attention taken as local: encoder 101 px
# above/left and 108 px below/right of a cell's block (ceil(108 / 8) = 14 cells), decoder 18 cells. Measured by
# gradient support in tests/test_model_qwenimage.py.
GLOBAL_PART = "mid-block self-attention"
TILING_HALO: dict[str, int] = {"encode": 14, "decode": 18}

# Wan 2.2's VAE (48 channels, downscale 16) nests its decoder levels; the same mid-block names, another architecture.
_WAN22_KEY = "decoder.upsamples.0.upsamples.0.residual.2.weight"


def single_frame(x: torch.Tensor, what: str) -> torch.Tensor:
    """A 4-D batch of frames as is; a 5-D (N, C, 1, H, W) video of one frame squeezed; anything else refused."""
    if x.ndim == 5:
        if x.shape[2] != 1:
            raise BadInputError(
                f"{what}: a video of {x.shape[2]} frames; the Qwen-Image VAE runs on single frames only "
                "(video is not supported)"
            )
        return x[:, :, 0]
    if x.ndim != 4:
        raise BadInputError(f"{what}: expected (N, C, H, W), got a {x.ndim}-D tensor of shape {tuple(x.shape)}")
    return x


class CausalConv3d(nn.Conv3d):
    """A causal 3-D conv with the original 5-D weight, applied to one frame: a 2-D conv with the last time tap."""

    def __init__(self, n_in: int, n_out: int, kernel: int | tuple[int, int, int], padding: int = 0) -> None:
        k = (kernel, kernel, kernel) if isinstance(kernel, int) else kernel
        super().__init__(n_in, n_out, k, padding=(0, padding, padding))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C', H, W): causal zero padding leaves only ``weight[:, :, -1]`` on a lone frame."""
        return F.conv2d(x, self.weight[:, :, -1], self.bias, padding=self.padding[1:])


class RMSNorm(nn.Module):
    """Per-position RMS norm over channels: ``x / ||x||_2 * sqrt(C) * gamma`` (computed in fp32 for 16-bit)."""

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        # The original stores (C, 1, 1, 1) for video-shaped norms and (C, 1, 1) for the attention's image norm.
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))
        self.scale = dim**0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise each position's channel vector."""
        y = F.normalize(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, dim=1).to(x.dtype)
        return y * self.scale * self.gamma.reshape(-1, 1, 1)


class ResidualBlock(nn.Module):
    """``residual`` = norm, SiLU, conv 3, norm, SiLU, (dropout), conv 3; ``shortcut`` 1x1 when widths differ."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(n_in),
            nn.SiLU(),
            CausalConv3d(n_in, n_out, 3, padding=1),
            RMSNorm(n_out),
            nn.SiLU(),
            nn.Identity(),  # dropout in training; kept so the conv stays at index 6 as in the original
            CausalConv3d(n_out, n_out, 3, padding=1),
        )
        self.shortcut = CausalConv3d(n_in, n_out, 1) if n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block."""
        return self.residual(x) + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all positions of a frame, RMS-normed input, residual output."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attention with channels split q | k | v along the 3C output of ``to_qkv``."""
        n, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(n, 3, c, h * w).transpose(-1, -2)  # (n, 3, hw, c)
        q, k, v = qkv.unbind(1)
        y = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(n, c, h, w)
        return x + self.proj(y)


class Resample(nn.Module):
    """2x spatial down- or upsampler (``resample``) plus the temporal ``time_conv`` of '3d' modes (unused here)."""

    def __init__(self, dim: int, up: bool, temporal: bool) -> None:
        super().__init__()
        if up:
            # Nearest-exact at an exact factor 2 is plain pixel repetition; the conv halves the width.
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=2.0, mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3, padding=1)
            )
        else:
            # Pad right and bottom by one, 3x3 stride 2 without padding (asymmetric, as the original).
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if temporal:
            self.time_conv = CausalConv3d(dim, dim * 2 if up else dim, (3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Spatial resampling of one frame (the first frame never passes through ``time_conv``)."""
        return self.resample(x)


def _mid(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def _head(dim: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim), nn.SiLU(), CausalConv3d(dim, n_out, 3, padding=1))


class Encoder(nn.Module):
    """conv1, ``downsamples`` (residual blocks, then a downsampler per level but the last), ``middle``, ``head``."""

    def __init__(self, cfg: QwenImageConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(cfg.in_channels, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(n_in, n_out))
                n_in = n_out
            if i != len(cfg.dim_mult) - 1:
                layers.append(Resample(n_out, up=False, temporal=cfg.temporal_downsample[i]))
        self.downsamples = nn.Sequential(*layers)
        self.middle = _mid(dims[-1])
        self.head = _head(dims[-1], 2 * cfg.latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> (mean | logvar) before the quant conv."""
        return self.head(self.middle(self.downsamples(self.conv1(x))))


class Decoder(nn.Module):
    """conv1, ``middle``, ``upsamples`` (num_res_blocks + 1 residual blocks, then an upsampler, per level), ``head``."""

    def __init__(self, cfg: QwenImageConfig) -> None:
        super().__init__()
        top = cfg.dim_mult[-1]
        dims = [cfg.base_dim * m for m in (top, *cfg.dim_mult[::-1])]
        temporal = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.latent_channels, dims[0], 3, padding=1)
        self.middle = _mid(dims[0])
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i > 0:
                n_in //= 2  # the previous upsampler's conv halved the width
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(n_in, n_out))
                n_in = n_out
            if i != len(cfg.dim_mult) - 1:
                layers.append(Resample(n_out, up=True, temporal=temporal[i]))
        self.upsamples = nn.Sequential(*layers)
        self.head = _head(dims[-1], cfg.out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (after the post-quant conv) -> image in [-1, 1] (not clamped)."""
        return self.head(self.upsamples(self.middle(self.conv1(z))))


class QwenImageVAE(nn.Module):
    """The Qwen-Image (Wan 2.1) VAE on single frames: images in [0, 1], raw Gaussian posterior, 16 channels."""

    def __init__(self, cfg: QwenImageConfig) -> None:
        super().__init__()
        self.config = cfg
        z = cfg.latent_channels
        self.encoder = Encoder(cfg)
        self.conv1 = CausalConv3d(2 * z, 2 * z, 1)
        self.conv2 = CausalConv3d(z, z, 1)
        self.decoder = Decoder(cfg)

    @property
    def quant(self) -> nn.Module:
        """The 1x1 conv after the encoder (``conv1`` in the original file, diffusers' ``quant_conv``)."""
        return self.conv1

    @property
    def post_quant(self) -> nn.Module:
        """The 1x1 conv before the decoder (``conv2`` in the original file, diffusers' ``post_quant_conv``)."""
        return self.conv2

    @staticmethod
    def net_input(images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the network's input range [-1, 1]."""
        return images * 2 - 1

    @staticmethod
    def net_output(y: torch.Tensor) -> torch.Tensor:
        """The decoder network's output in [-1, 1] -> images in [0, 1] (not clamped)."""
        return (y + 1) / 2

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [0, 1], (N, 3, H, W) (or one-frame (N, 3, 1, H, W)) -> raw posterior (mean, logvar)."""
        moments = self.conv1(self.encoder(self.net_input(single_frame(images, "encode"))))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent (N, 16, h, w) (or one-frame 5-D) -> images in [0, 1], not clamped."""
        return self.net_output(self.decoder(self.conv2(single_frame(z, "decode"))))


# ---------------------------------------------------------------------------------------------- recognition


def _index_set(keys: object, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})  # type: ignore[attr-defined]


def config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> QwenImageConfig | None:
    """Recognise the Wan 2.1 / Qwen-Image VAE from original-layout keys and shapes; None when it is not one."""
    if MARKER_KEYS[0] not in shapes or _WAN22_KEY in shapes:
        return None
    for key in ("encoder.conv1.weight", "encoder.head.2.weight", "decoder.head.2.weight"):
        if key not in shapes or len(shapes[key]) != 5:
            raise LoadError(f"Wan 2.1 / Qwen-Image VAE without a 5-D {key!r}: incomplete or not the original layout")
    base, n_in = shapes["encoder.conv1.weight"][:2]
    latent = shapes["encoder.head.2.weight"][0] // 2
    # Walk the encoder's flat list: residual blocks, a downsampler closing each level but the last.
    entries = _index_set(shapes, r"encoder\.downsamples\.(\d+)\.")
    levels: list[int] = []  # output width of each level
    depth: list[int] = []
    temporal: list[bool] = []
    count = 0
    for n in entries:
        p = f"encoder.downsamples.{n}."
        if p + "residual.2.weight" in shapes:
            width = shapes[p + "residual.2.weight"][0]
            if count == 0:
                levels.append(width)
            count += 1
        elif p + "resample.1.weight" in shapes:
            if count == 0:
                raise LoadError(f"Wan 2.1 / Qwen-Image VAE: downsampler {n} closes an empty level")
            depth.append(count)
            temporal.append(p + "time_conv.weight" in shapes)
            count = 0
        else:
            raise LoadError(
                f"Wan 2.1 / Qwen-Image VAE: encoder.downsamples.{n} is neither a residual block nor a downsampler "
                "(attention inside levels is not supported)"
            )
    depth.append(count)
    if not levels or count == 0 or len(set(depth)) != 1 or entries != list(range(len(entries))):
        raise LoadError(f"Wan 2.1 / Qwen-Image VAE: inconsistent encoder levels (blocks per level {depth})")
    if any(w % base for w in levels):
        raise LoadError(f"Wan 2.1 / Qwen-Image VAE: level widths {levels} are not multiples of the base {base}")
    if latent != 16:
        raise LoadError(
            f"Wan-family VAE with {latent} latent channels: only the 16-channel Qwen-Image / Wan 2.1 VAE is known "
            "(no published latent statistics for it)"
        )
    cfg = QwenImageConfig(
        in_channels=n_in,
        out_channels=shapes["decoder.head.2.weight"][0],
        latent_channels=latent,
        base_dim=base,
        dim_mult=tuple(w // base for w in levels),
        num_res_blocks=depth[0],
        temporal_downsample=tuple(temporal),
    )
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in QwenImageVAE(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if tuple(shapes[k]) != expected[k])
    if missing or unexpected or wrong:
        few = (missing or unexpected or wrong)[:3]
        raise LoadError(
            f"Wan 2.1 / Qwen-Image VAE, but {len(missing)} missing, {len(unexpected)} unexpected and "
            f"{len(wrong)} wrongly shaped tensors (e.g. {', '.join(few)})"
        )
    return cfg


# ------------------------------------------------------------------------------------------ diffusers layout

_RESIDUAL = (
    ("residual.0.", "norm1."),
    ("residual.2.", "conv1."),
    ("residual.3.", "norm2."),
    ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
)


def _table(levels: int, num_res_blocks: int) -> list[tuple[str, str]]:
    rows = [("conv1.", "quant_conv."), ("conv2.", "post_quant_conv.")]
    for p in ("encoder", "decoder"):
        rows += [
            (f"{p}.conv1.", f"{p}.conv_in."),
            (f"{p}.head.0.", f"{p}.norm_out."),
            (f"{p}.head.2.", f"{p}.conv_out."),
        ]
        for ours, theirs in (("middle.0.", "mid_block.resnets.0."), ("middle.2.", "mid_block.resnets.1.")):
            rows += [(f"{p}.{ours}{a}", f"{p}.{theirs}{b}") for a, b in _RESIDUAL]
        rows.append((f"{p}.middle.1.", f"{p}.mid_block.attentions.0."))
    # The encoder's flat list keeps its indices; resample.1 and time_conv keep their names.
    rows += [(f"encoder.downsamples.{{i}}.{a}", f"encoder.down_blocks.{{i}}.{b}") for a, b in _RESIDUAL]
    rows.append(("encoder.downsamples.{i}.", "encoder.down_blocks.{i}."))
    # The decoder's flat list is grouped per level in diffusers: num_res_blocks + 1 resnets, then one upsampler.
    n = 0
    for level in range(levels):
        for j in range(num_res_blocks + 1):
            dst = f"decoder.up_blocks.{level}.resnets.{j}."
            rows += [(f"decoder.upsamples.{n}.{a}", dst + b) for a, b in _RESIDUAL]
            n += 1
        if level != levels - 1:
            rows.append((f"decoder.upsamples.{n}.", f"decoder.up_blocks.{level}.upsamplers.0."))
            n += 1
    return rows


def diffusers_keys(cfg: QwenImageConfig) -> list[tuple[str, str]]:
    """The (our prefix, diffusers prefix) table for ``cfg`` (the decoder rows depend on its depth)."""
    return _table(len(cfg.dim_mult), cfg.num_res_blocks)


# The table of the release (placeholders {i} as in vaekit.formats.keymaps; rows tried in order).
DIFFUSERS_KEYS: list[tuple[str, str]] = diffusers_keys(PRESETS["qwenimage"])

# No tensor changes shape between the layouts: diffusers keeps the 5-D causal conv weights, the (C, 1, 1, 1) and
# (C, 1, 1) RMS gammas and the attention's 1x1 Conv2d weights.
RESHAPED_KEYS: tuple[str, ...] = ()


def _compile(src: str) -> re.Pattern[str]:
    return re.compile(re.escape(src).replace(re.escape("{i}"), r"(?P<i>\d+)"))


def _rename(sd: dict[str, Any], table: list[tuple[str, str]], reverse: bool, what: str) -> dict[str, Any]:
    rules = [(_compile(b if reverse else a), a if reverse else b) for a, b in table]
    out: dict[str, Any] = {}
    for key, value in sd.items():
        for pattern, dst in rules:
            if m := pattern.match(key):
                out[dst.format(**m.groupdict()) + key[m.end() :]] = value
                break
        else:
            raise LoadError(f"unexpected key {key!r} for the {what} layout of the Qwen-Image VAE")
    return out


def to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original (Wan / ComfyUI) names -> diffusers AutoencoderKLQwenImage names; tensors untouched."""
    levels = len(_index_set(sd, r"encoder\.downsamples\.(\d+)\.resample\.")) + 1
    blocks = _index_set(sd, r"decoder\.upsamples\.(\d+)\.residual\.")
    return _rename(sd, _table(levels, len(blocks) // levels - 1), reverse=False, what="original")


def from_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers AutoencoderKLQwenImage names -> original (Wan / ComfyUI) names; tensors untouched."""
    levels = len(_index_set(sd, r"decoder\.up_blocks\.(\d+)\."))
    resnets = len(_index_set(sd, r"decoder\.up_blocks\.0\.resnets\.(\d+)\."))
    return _rename(sd, _table(levels, resnets - 1), reverse=True, what="diffusers")


def diffusers_config(cfg: QwenImageConfig) -> dict[str, Any]:
    """The config.json of diffusers' AutoencoderKLQwenImage for ``cfg``."""
    if cfg.in_channels != cfg.out_channels:
        raise BadInputError("diffusers' AutoencoderKLQwenImage needs as many output as input channels")
    return {
        "_class_name": "AutoencoderKLQwenImage",
        "_diffusers_version": "0.42.1",
        "base_dim": cfg.base_dim,
        "z_dim": cfg.latent_channels,
        "dim_mult": list(cfg.dim_mult),
        "num_res_blocks": cfg.num_res_blocks,
        "attn_scales": [],
        "temperal_downsample": list(cfg.temporal_downsample),
        "dropout": 0.0,
        "input_channels": cfg.in_channels,
        "latents_mean": list(cfg.latents_mean),
        "latents_std": list(cfg.latents_std),
    }


def config_from_diffusers(dc: dict[str, Any]) -> QwenImageConfig:
    """Our config from a diffusers AutoencoderKLQwenImage config.json (its defaults where a field is absent)."""
    if dc.get("attn_scales"):
        raise LoadError("AutoencoderKLQwenImage with attention inside levels (attn_scales) is not supported")
    base = PRESETS["qwenimage"]
    z = int(dc.get("z_dim", base.latent_channels))
    channels = int(dc.get("input_channels", base.in_channels))
    try:
        return QwenImageConfig(
            in_channels=channels,
            out_channels=channels,
            latent_channels=z,
            base_dim=int(dc.get("base_dim", base.base_dim)),
            dim_mult=tuple(int(m) for m in dc.get("dim_mult", base.dim_mult)),
            num_res_blocks=int(dc.get("num_res_blocks", base.num_res_blocks)),
            temporal_downsample=tuple(bool(t) for t in dc.get("temperal_downsample", base.temporal_downsample)),
            latents_mean=tuple(float(v) for v in dc.get("latents_mean", base.latents_mean)),
            latents_std=tuple(float(v) for v in dc.get("latents_std", base.latents_std)),
        )
    except ValueError as e:
        raise LoadError(f"AutoencoderKLQwenImage config: {e}") from None


def normaliser_spec(cfg: QwenImageConfig) -> dict[str, Any]:
    """The latent convention of Qwen-Image's transformer: per channel ``(z - mean) / std``."""
    return {"kind": "per_channel", "mean": list(cfg.latents_mean), "std": list(cfg.latents_std)}
