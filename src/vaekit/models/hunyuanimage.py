"""HunyuanImage 2.1's VAE: 64 latent channels, downscale 32, diagonal-Gaussian posterior.

A KL autoencoder of the LDM shape whose resamplers are pixel (un)shuffles with a parameter-free shortcut: down is a
3x3 conv to C_next/4 channels then 2x2 space-to-depth, plus the space-to-depth input averaged over channel groups;
up is a 3x3 conv to 4*C_next channels then depth-to-space, plus the input's channels repeated then depth-to-space.
The encoder head adds its input averaged down to 2*z channels; the decoder stem adds z repeated up to its width.
Resnets never change width (the resamplers do), so there is no ``nin_shortcut`` in the release.

Parameter names are those of Tencent's ``vae/vae_2_1/pytorch_model.ckpt`` after its ``vae.`` prefix (Tencent's
``hyimage/models/vae``; ComfyUI's ``comfy/ldm/hunyuan_video/vae.py`` uses the same names; diffusers'
``scripts/convert_hunyuan_image_to_diffusers.py`` maps them): ``encoder.down.{i}.block.{j}``,
``encoder.down.{i}.downsample.conv``, ``{encoder,decoder}.mid.{block_1,attn_1,block_2}``,
``decoder.up.{i}.block.{j}``, ``decoder.up.{i}.upsample.conv``. Unlike LDM, ``decoder.up.0`` is the LOWEST
resolution (the levels are numbered in the order they run).

Facts for tiling and precision:
- Norms: GroupNorm(32 groups, eps 1e-6) before each resnet conv, in the attention and before each conv_out; its
  statistics are over the whole image (global), never per position. No other norm.
- Global: one single-head self-attention in each mid block, at 1/32 resolution (encoder and decoder).
- Receptive field of the convolutions (GroupNorm and attention aside), per side: the encoder's latent cell sees
  444 px beyond the 32x32 block it covers; an output pixel of the decoder sees 601 px = 19 latent cells around it.
- Precision: Tencent decodes under CUDA fp16 autocast; ComfyUI lists fp16, bf16 and fp32 as working dtypes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vaekit.errors import LoadError
from vaekit.models.blocks import MidBlock, ResnetBlock, group_norm

NORM_GROUPS = 32
NORM_EPS = 1e-6

# diffusers' HunyuanImage 2.1 VAE config (scripts/convert_hunyuan_image_to_diffusers.py, `vae_config_diffusers`,
# as published in hunyuanvideo-community/HunyuanImage-2.1-Diffusers vae/config.json): scaling_factor 0.75289 and no
# shift_factor; pipeline_hunyuanimage.py decodes `latents / vae.config.scaling_factor` (Tencent's pipeline adds a
# shift only when the config has one).
SCALING_FACTOR = 0.75289
SHIFT_FACTOR = 0.0
SAMPLE_SIZE = 384  # diffusers' `sample_size` (its tiling tile size), kept only for diffusers_config

DIFFUSERS_CLASS = "AutoencoderKLHunyuanImage"

# Read by vaekit's region tiling. Every GroupNorm takes whole-image statistics and each mid block attends over the
# whole latent, so no halo makes a tile exact (Tencent's own code refuses spatial tiling for this checkpoint: "severe
# reconstruction artifacts"). The halos cover the convolutions' receptive field, in latent cells per side: the
# encoder's 444 px (13.9 cells), the decoder's 601 px (18.8 cells); measured by gradients in the tests.
GLOBAL_PART = "GroupNorm statistics and mid-block attention"
TILING_HALO: dict[str, int] = {"encode": 14, "decode": 19}


@dataclass(frozen=True)
class HunyuanImageConfig:
    """The HunyuanImage 2.1 VAE's shape; the decoder mirrors ``block_channels`` (diffusers' block_out_channels)."""

    family: str = "hunyuanimage"
    kind: str = "hunyuanimage"
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 64
    block_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    num_res_blocks: int = 2

    def __post_init__(self) -> None:
        problem = _config_problem(self)
        if problem:
            raise ValueError(problem)

    @property
    def downscale(self) -> int:
        """Pixels per latent cell along one side: every level but the last ends with a 2x resampler."""
        return 2**self.num_down

    @property
    def gaussian(self) -> bool:
        """The encoder outputs a diagonal-Gaussian posterior (mean, logvar)."""
        return True

    @property
    def num_down(self) -> int:
        """Number of resolution halvings; every encoder level but the last ends with a downsample."""
        return len(self.block_channels) - 1

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _config_problem(cfg: HunyuanImageConfig) -> str | None:
    ch, z = cfg.block_channels, cfg.latent_channels
    if len(ch) < 2 or cfg.num_res_blocks < 1 or z < 1 or cfg.in_channels < 1 or cfg.out_channels < 1:
        return "needs at least two levels, one resnet per level and positive channel counts"
    if any(c % NORM_GROUPS for c in ch):
        return f"every block width must be a multiple of {NORM_GROUPS} (GroupNorm groups), got {list(ch)}"
    if ch[-1] % (2 * z):
        return f"the last width {ch[-1]} must be a multiple of 2 * latent_channels ({2 * z})"
    for a, b in zip(ch[:-1], ch[1:], strict=True):
        if b % 4 or (4 * a) % b or (4 * b) % a:
            return f"a resampler from {a} to {b} channels needs {b} % 4 == 0 and each of 4*{a}, 4*{b} divisible"
    return None


PRESETS: dict[str, HunyuanImageConfig] = {"hunyuanimage": HunyuanImageConfig()}


def _space_to_depth(x: torch.Tensor) -> torch.Tensor:
    """(B, C, 2H, 2W) -> (B, 4C, H, W), channels ordered (row phase, column phase, C) as the release expects."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4)
    return x.reshape(b, 4 * c, h // 2, w // 2)


def _depth_to_space(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_space_to_depth`: (B, 4C, H, W) -> (B, C, 2H, 2W)."""
    b, c4, h, w = x.shape
    x = x.reshape(b, 2, 2, c4 // 4, h, w).permute(0, 3, 4, 1, 5, 2)
    return x.reshape(b, c4 // 4, 2 * h, 2 * w)


class Downsample(nn.Module):
    """3x3 conv to C_out/4 channels, space-to-depth; plus the space-to-depth input averaged in channel groups."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels // 4, 3, padding=1)
        self.group = 4 * in_channels // out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = _space_to_depth(x)
        skip = skip.reshape(skip.shape[0], -1, self.group, *skip.shape[2:]).mean(dim=2)
        return _space_to_depth(self.conv(x)) + skip


class Upsample(nn.Module):
    """3x3 conv to 4*C_out channels, depth-to-space; plus the input's channels repeated, depth-to-space."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4 * out_channels, 3, padding=1)
        self.repeats = 4 * out_channels // in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _depth_to_space(self.conv(x)) + _depth_to_space(x.repeat_interleave(self.repeats, dim=1))


class Level(nn.Module):
    """One resolution level: resnet blocks (``block``) and an optional ``downsample``/``upsample``."""

    def __init__(self, width: int, blocks: int) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(width, width, NORM_GROUPS, NORM_EPS) for _ in range(blocks))


class Encoder(nn.Module):
    """Image in [-1, 1] -> 2*z moments (mean then logvar), plus the head's channel-averaged shortcut."""

    def __init__(self, cfg: HunyuanImageConfig) -> None:
        super().__init__()
        ch = cfg.block_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        for i, width in enumerate(ch):
            level = Level(width, cfg.num_res_blocks)
            if i < cfg.num_down:
                level.downsample = Downsample(width, ch[i + 1])
            self.down.append(level)
        self.mid = MidBlock(ch[-1], NORM_GROUPS, NORM_EPS, attention=True)
        self.norm_out = group_norm(ch[-1], NORM_GROUPS, NORM_EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)
        self.head_group = ch[-1] // (2 * cfg.latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        skip = h.reshape(h.shape[0], -1, self.head_group, *h.shape[2:]).mean(dim=2)
        return self.conv_out(F.silu(self.norm_out(h))) + skip


class Decoder(nn.Module):
    """Latent z -> image in [-1, 1]; ``up.0`` is the lowest resolution (the order the levels run in)."""

    def __init__(self, cfg: HunyuanImageConfig) -> None:
        super().__init__()
        ch = tuple(reversed(cfg.block_channels))
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.stem_repeats = ch[0] // cfg.latent_channels
        self.mid = MidBlock(ch[0], NORM_GROUPS, NORM_EPS, attention=True)
        self.up = nn.ModuleList()
        for i, width in enumerate(ch):
            level = Level(width, cfg.num_res_blocks + 1)
            if i < cfg.num_down:
                level.upsample = Upsample(width, ch[i + 1])
            self.up.append(level)
        self.norm_out = group_norm(ch[-1], NORM_GROUPS, NORM_EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z) + z.repeat_interleave(self.stem_repeats, dim=1))
        for level in self.up:
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class HunyuanImageVAE(nn.Module):
    """The HunyuanImage 2.1 VAE, taking and returning images in [0, 1]."""

    def __init__(self, cfg: HunyuanImageConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [0, 1] (N, 3, H, W), H and W multiples of 32 -> raw posterior (mean, logvar clamped)."""
        mean, logvar = self.encoder(images * 2 - 1).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent -> images in [0, 1], not clamped."""
        return self.decoder(z) * 0.5 + 0.5


def normaliser_spec(cfg: HunyuanImageConfig) -> dict[str, Any]:
    """The scalar latent normalisation HunyuanImage 2.1's DiT consumes: latent = (z - shift) * scale."""
    return {"kind": "scalar", "scale": SCALING_FACTOR, "shift": SHIFT_FACTOR}


# ---------------------------------------------------------------------------------------------------------------
# Recognition from keys and shapes (original names, checkpoint prefix already stripped).

# Shared with the LDM KL layout (they locate a VAE inside a checkpoint); config_from_shapes tells the two apart by
# the downsample conv: here it outputs a quarter of the next level's width, in LDM its own width.
MARKER_KEYS: tuple[str, ...] = (
    "encoder.down.0.downsample.conv.weight",
    "decoder.up.0.upsample.conv.weight",
    "decoder.conv_in.weight",
)


def _plain(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Tencent's loader accepts 5-D conv weights with a time axis of 1; compare them as 4-D."""
    return tuple(shape[:2]) + tuple(shape[3:]) if len(shape) == 5 and shape[2] == 1 else tuple(shape)


def squeeze_time_axis(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the length-1 time axis of 5-D conv weights (Tencent's and diffusers' loaders accept such files)."""
    return {k: v.squeeze(2) if v.ndim == 5 and v.shape[2] == 1 else v for k, v in sd.items()}


def _count(keys: Any, prefix: str) -> int:
    """How many consecutive ``prefix{n}.`` indices (from 0) the keys hold."""
    found = {int(k[len(prefix) :].split(".", 1)[0]) for k in keys if k.startswith(prefix)}
    n = 0
    while n in found:
        n += 1
    return n


def expected_shapes(cfg: HunyuanImageConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a model built from ``cfg`` (on the meta device)."""
    with torch.device("meta"):
        model = HunyuanImageVAE(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> HunyuanImageConfig | None:
    """Recognise the architecture from original keys and shapes; None if it is not this one."""
    ds, nxt = shapes.get("encoder.down.0.downsample.conv.weight"), shapes.get("encoder.down.1.block.0.conv1.weight")
    if ds is None or nxt is None:
        return None
    ds, nxt = _plain(ds), _plain(nxt)
    if len(ds) != 4 or len(nxt) != 4 or nxt[1] != 4 * ds[0]:
        return None  # LDM's stride-2 downsample keeps the width; ours outputs a quarter of the next level's
    try:
        levels = _count(shapes, "encoder.down.")
        blocks = _count(shapes, "encoder.down.0.block.")
        cfg = HunyuanImageConfig(
            in_channels=_plain(shapes["encoder.conv_in.weight"])[1],
            out_channels=_plain(shapes["decoder.conv_out.weight"])[0],
            latent_channels=_plain(shapes["decoder.conv_in.weight"])[1],
            block_channels=tuple(_plain(shapes[f"encoder.down.{i}.block.0.conv1.weight"])[0] for i in range(levels)),
            num_res_blocks=blocks,
        )
    except KeyError as e:
        raise LoadError(f"HunyuanImage VAE weights are incomplete: no {e.args[0]}") from None
    except ValueError as e:
        raise LoadError(f"HunyuanImage VAE weights are inconsistent: {e}") from None
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(shapes))
    extra = sorted(set(shapes) - set(want))
    wrong = sorted(k for k in set(want) & set(shapes) if _plain(shapes[k]) != want[k])
    if missing or extra or wrong:
        parts = [f"{len(v)} {name} (first {v[0]})" for name, v in (("missing", missing), ("unexpected", extra)) if v]
        if wrong:
            parts.append(
                f"{len(wrong)} with wrong shape (first {wrong[0]}: {_plain(shapes[wrong[0]])} vs {want[wrong[0]]})"
            )
        raise LoadError("HunyuanImage VAE weights are inconsistent: " + "; ".join(parts))
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# The diffusers layout (AutoencoderKLHunyuanImage): same tensors and shapes, flat block lists.


def diffusers_keys(cfg: HunyuanImageConfig) -> list[tuple[str, str]]:
    """Prefix table our name -> diffusers name for ``cfg`` (diffusers numbers resnets and resamplers in one list)."""
    rows: list[tuple[str, str]] = []
    for part, ours, theirs, blocks, sampler in (
        ("encoder", "down", "down_blocks", cfg.num_res_blocks, "downsample"),
        ("decoder", "up", "up_blocks", cfg.num_res_blocks + 1, "upsample"),
    ):
        k = 0
        for i in range(len(cfg.block_channels)):
            for j in range(blocks):
                rows.append((f"{part}.{ours}.{i}.block.{j}.", f"{part}.{theirs}.{k}."))
                k += 1
            if i < cfg.num_down:
                rows.append((f"{part}.{ours}.{i}.{sampler}.conv.", f"{part}.{theirs}.{k}.conv."))
                k += 1
        rows += [
            (f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0."),
            (f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1."),
            (f"{part}.mid.attn_1.norm.", f"{part}.mid_block.attentions.0.norm."),
            (f"{part}.mid.attn_1.q.", f"{part}.mid_block.attentions.0.to_q."),
            (f"{part}.mid.attn_1.k.", f"{part}.mid_block.attentions.0.to_k."),
            (f"{part}.mid.attn_1.v.", f"{part}.mid_block.attentions.0.to_v."),
            (f"{part}.mid.attn_1.proj_out.", f"{part}.mid_block.attentions.0.proj."),
            (f"{part}.conv_in.", f"{part}.conv_in."),
            (f"{part}.norm_out.", f"{part}.norm_out."),
            (f"{part}.conv_out.", f"{part}.conv_out."),
        ]
    return rows


# The table for the released model (concrete indices: diffusers' flat numbering depends on the depth).
DIFFUSERS_KEYS: list[tuple[str, str]] = diffusers_keys(PRESETS["hunyuanimage"])


def _rename(sd: dict[str, Any], rows: list[tuple[str, str]], what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in sd.items():
        for src, dst in rows:
            if key.startswith(src):
                out[dst + key[len(src) :]] = value
                break
        else:
            raise LoadError(f"unexpected key {key!r} for the HunyuanImage VAE {what} layout")
    return out


def _depth_from_diffusers(keys: Any) -> tuple[int, int]:
    """(levels, resnets per encoder level) from diffusers keys (resamplers have no norm1)."""
    enc = _count(keys, "encoder.down_blocks.")
    dec = _count(keys, "decoder.up_blocks.")
    down = sum(f"encoder.down_blocks.{k}.norm1.weight" not in keys for k in range(enc))
    levels = dec - enc  # the decoder has one more resnet per level
    if levels < 1 or down != levels - 1 or (enc - down) % levels:
        raise LoadError("HunyuanImage VAE diffusers weights have an inconsistent block count")
    return levels, (enc - down) // levels


def _table_config(levels: int, blocks: int) -> HunyuanImageConfig:
    # Only the depth matters for the key table; widths that satisfy every constraint stand in for the real ones.
    if levels < 1 or blocks < 1:
        raise LoadError("not a HunyuanImage VAE state dict: no encoder levels or resnet blocks")
    return HunyuanImageConfig(latent_channels=1, block_channels=(128,) * levels, num_res_blocks=blocks)


def to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original-layout state dict to diffusers names (no tensor changes shape)."""
    table = diffusers_keys(_table_config(_count(sd, "encoder.down."), _count(sd, "encoder.down.0.block.")))
    return _rename(sd, table, "original")


def from_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers AutoencoderKLHunyuanImage state dict to the original names (no reshapes needed)."""
    table = diffusers_keys(_table_config(*_depth_from_diffusers(set(sd))))
    return _rename(sd, [(b, a) for a, b in table], "diffusers")


def diffusers_config(cfg: HunyuanImageConfig) -> dict[str, Any]:
    """The config.json diffusers' AutoencoderKLHunyuanImage expects for ``cfg``."""
    norm = normaliser_spec(cfg)
    return {
        "_class_name": DIFFUSERS_CLASS,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "latent_channels": cfg.latent_channels,
        "block_out_channels": list(cfg.block_channels),
        "layers_per_block": cfg.num_res_blocks,
        "spatial_compression_ratio": cfg.downscale,
        "sample_size": SAMPLE_SIZE,
        "scaling_factor": norm["scale"],
        "downsample_match_channel": True,
        "upsample_match_channel": True,
    }


def config_from_diffusers(dc: dict[str, Any]) -> HunyuanImageConfig:
    """Our config from a diffusers AutoencoderKLHunyuanImage config.json (LoadError when it cannot be one)."""
    name = dc.get("_class_name", DIFFUSERS_CLASS)
    if name != DIFFUSERS_CLASS:
        raise LoadError(f"diffusers config is for {name}, not {DIFFUSERS_CLASS}")
    if not dc.get("downsample_match_channel", True) or not dc.get("upsample_match_channel", True):
        raise LoadError("HunyuanImage VAE configs without downsample/upsample_match_channel are not supported")
    try:
        ratio = int(dc["spatial_compression_ratio"])
        blocks = tuple(int(c) for c in dc["block_out_channels"])
        if ratio != 2 ** (len(blocks) - 1):
            raise LoadError(
                f"spatial_compression_ratio {ratio} with {len(blocks)} levels is not supported (want 2**(levels-1))"
            )
        return HunyuanImageConfig(
            in_channels=int(dc.get("in_channels", 3)),
            out_channels=int(dc.get("out_channels", 3)),
            latent_channels=int(dc["latent_channels"]),
            block_channels=blocks,
            num_res_blocks=int(dc["layers_per_block"]),
        )
    except KeyError as e:
        raise LoadError(f"diffusers HunyuanImage VAE config lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise LoadError(f"diffusers HunyuanImage VAE config is invalid: {e}") from None


def parameter_count(cfg: HunyuanImageConfig) -> int:
    """Number of parameters of a model built from ``cfg``."""
    return sum(math.prod(s) for s in expected_shapes(cfg).values())
