"""The KL autoencoder of latent diffusion; parameter names follow the original LDM checkpoints."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vaekit.models.blocks import Downsample, MidBlock, ResnetBlock, Upsample, group_norm
from vaekit.models.config import KLConfig
from vaekit.models.stages import Stage


class Level(nn.Module):
    """One resolution level: a list of resnet blocks and an optional resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()


class Encoder(nn.Module):
    """Image in [-1, 1] -> posterior moments (mean and log-variance stacked on channels)."""

    def __init__(self, cfg: KLConfig) -> None:
        super().__init__()
        ch = cfg.block_channels
        g, eps = cfg.norm_groups, cfg.norm_eps
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        prev = ch[0]
        for i, width in enumerate(ch):
            level = Level()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(prev, width, g, eps))
                prev = width
            if i != len(ch) - 1:
                level.downsample = Downsample(width)
            self.down.append(level)
        self.mid = MidBlock(prev, g, eps, cfg.mid_attention)
        self.norm_out = group_norm(prev, g, eps)
        self.conv_out = nn.Conv2d(prev, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent z -> image in [-1, 1]. ``up`` is indexed from the highest resolution, as in LDM files."""

    def __init__(self, cfg: KLConfig) -> None:
        super().__init__()
        ch = cfg.block_channels
        g, eps = cfg.norm_groups, cfg.norm_eps
        prev = ch[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, prev, 3, padding=1)
        self.mid = MidBlock(prev, g, eps, cfg.mid_attention)
        levels: list[Level] = []
        for i in reversed(range(len(ch))):
            level = Level()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(prev, ch[i], g, eps))
                prev = ch[i]
            if i != 0:
                level.upsample = Upsample(prev)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(prev, g, eps)
        self.conv_out = nn.Conv2d(prev, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """Encoder, decoder, the optional 1x1 quant/post-quant convs around the latent and (FLUX.2) the latent
    BatchNorm. Takes and returns images in [0, 1]; the network itself runs on [-1, 1].

    SD1/SDXL files name the quant convs ``quant_conv``/``post_quant_conv`` at the top level, FLUX.2's original
    files nest them as ``encoder.quant_conv``/``decoder.post_quant_conv`` (``nested_quant``). FLUX.2's ``bn`` is
    a ``BatchNorm2d`` over 2x2-patched latents that only stores the latent statistics: the model never runs it, the
    family's normaliser (:mod:`vaekit.normalisers`) reads it.
    """

    def __init__(self, cfg: KLConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.use_quant_conv:
            z2 = 2 * cfg.latent_channels
            owner_in, owner_out = (self.encoder, self.decoder) if cfg.nested_quant else (self, self)
            owner_in.quant_conv = nn.Conv2d(z2, z2, 1)
            owner_out.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        if cfg.patch_batchnorm:
            self.bn = nn.BatchNorm2d(4 * cfg.latent_channels, eps=cfg.batchnorm_eps, affine=False)

    @property
    def quant(self) -> nn.Conv2d | None:
        """The 1x1 conv after the encoder, wherever the file names it."""
        return getattr(self.encoder if self.config.nested_quant else self, "quant_conv", None)

    @property
    def post_quant(self) -> nn.Conv2d | None:
        """The 1x1 conv before the decoder, wherever the file names it."""
        return getattr(self.decoder if self.config.nested_quant else self, "post_quant_conv", None)

    @staticmethod
    def net_input(images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the network's input range [-1, 1]."""
        return images * 2 - 1

    @staticmethod
    def net_output(y: torch.Tensor) -> torch.Tensor:
        """The decoder network's output in [-1, 1] -> images in [0, 1] (not clamped)."""
        return (y + 1) / 2

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [0, 1] -> (mean, logvar) of the diagonal Gaussian posterior, raw (not normalised)."""
        moments = self.encoder(self.net_input(images))
        if self.quant is not None:
            moments = self.quant(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent -> images in [0, 1] (not clamped)."""
        if self.post_quant is not None:
            z = self.post_quant(z)
        return self.net_output(self.decoder(z))

    def stages(self, op: str) -> list[Stage]:
        """This network as stages (``op`` "encode" or "decode"): store ``in`` is the network input ([-1, 1] images
        or the raw latent), store ``out`` the moments or the [-1, 1] image."""
        return encoder_stages(self) if op == "encode" else decoder_stages(self)


# --- the stage description (read by vaekit.ops.tiling) ----------------------------------------------------------
def _resnet(stages: list[Stage], name: str, block: nn.Module, src: str) -> str:
    stages.append(Stage(f"{name}.conv1", src, f"{name}.h", block.conv1, block.norm1))
    shortcut = getattr(block, "nin_shortcut", None)
    stages.append(Stage(f"{name}.conv2", f"{name}.h", name, block.conv2, block.norm2, skip=src, shortcut=shortcut))
    return name


def _mid(stages: list[Stage], prefix: str, mid: nn.Module, src: str) -> str:
    cur = _resnet(stages, f"{prefix}.mid.block_1", mid.block_1, src)
    if hasattr(mid, "attn_1"):
        name = f"{prefix}.mid.attn_1"
        stages.append(Stage(name, cur, name, mid.attn_1.q, mid.attn_1.norm, attn=mid.attn_1))
        cur = name
    return _resnet(stages, f"{prefix}.mid.block_2", mid.block_2, cur)


def decoder_stages(model: AutoencoderKL) -> list[Stage]:
    """The KL decoder (with post_quant_conv) as a list of stages from store ``in`` (raw z) to store ``out``."""
    dec = model.decoder
    pre = model.post_quant
    stages = [Stage("decoder.conv_in", "in", "decoder.conv_in", dec.conv_in, pre=pre)]
    cur = _mid(stages, "decoder", dec.mid, "decoder.conv_in")
    for i in reversed(range(len(dec.up))):
        level = dec.up[i]
        for j, block in enumerate(level.block):
            cur = _resnet(stages, f"decoder.up.{i}.block.{j}", block, cur)
        if hasattr(level, "upsample"):
            name = f"decoder.up.{i}.upsample"
            stages.append(Stage(name, cur, name, level.upsample.conv, resample="up"))
            cur = name
    stages.append(Stage("decoder.conv_out", cur, "out", dec.conv_out, dec.norm_out))
    return stages


def encoder_stages(model: AutoencoderKL) -> list[Stage]:
    """The KL encoder (with quant_conv) as stages from store ``in`` (network input in [-1, 1]) to ``out`` (moments)."""
    enc = model.encoder
    stages = [Stage("encoder.conv_in", "in", "encoder.conv_in", enc.conv_in)]
    cur = "encoder.conv_in"
    for i, level in enumerate(enc.down):
        for j, block in enumerate(level.block):
            cur = _resnet(stages, f"encoder.down.{i}.block.{j}", block, cur)
        if hasattr(level, "downsample"):
            name = f"encoder.down.{i}.downsample"
            stages.append(Stage(name, cur, name, level.downsample.conv, resample="down"))
            cur = name
    cur = _mid(stages, "encoder", enc.mid, cur)
    post = model.quant
    stages.append(Stage("encoder.conv_out", cur, "out", enc.conv_out, enc.norm_out, post=post))
    return stages
