"""Sana's deep-compression autoencoder DC-AE f32c32 (mit-han-lab efficientvit ``dc-ae-f32c32-sana-1.0``/``1.1``).

Deterministic encoder: image -> 32-channel latent at 1/32 of the size; decoder back. Parameter names are those of
the efficientvit release (``encoder.project_in.conv.weight``, ``encoder.stages.N.op_list.M...``), so its
``model.safetensors`` loads without renaming; :data:`DIFFUSERS_KEYS` plus the listed reshapes give diffusers'
``AutoencoderDC`` layout.

Facts (for tiling and precision):
- Norms: RMSNorm over the channels of each position (efficientvit ``trms2d``, eps 1e-5, weight and bias) after the
  second conv of every ResBlock, after the attention projection and after the GLU point conv, and before the
  decoder's last conv. All per position: no statistic crosses positions.
- Global parts: every EfficientViT block (stages 3-5, at 1/8, 1/16 and 1/32 of the image, 3 blocks each in the
  encoder and the decoder) holds a ReLU linear attention over ALL positions of the feature map (per 32-channel head
  the sums of v k^T over every position), so both encoder and decoder are global: tiling cannot be exact with halos
  (it could be with one statistics pass per attention layer, since the global state is a small (33, 32) matrix per
  head). Below 33 positions the same maths runs in its quadratic form, as the reference does.
- Local receptive field per side, attention aside (measured; = the sum of kernel reach x stride): encoder 596 input
  pixels (18.6 latent cells), decoder 610 output pixels (19.1 latent cells); each EfficientViT block adds a 5x5
  depthwise branch on q/k/v and a 3x3 depthwise conv.
- Precision: the linear attention's sums run in fp32 (as in diffusers). Diffusers' model at the real width with
  RANDOM weights (normal, 1/sqrt(fan-in); no trained DC-AE here) on astronaut: no inf/NaN in fp16 or bf16; peak
  activation 348 (encoder) and 2.3e3 (decoder) at 256 px, far below fp16's 65504; decode vs fp32: bf16 47.6 dB at
  256 px, fp16 57.0 dB and bf16 48.1 dB at 64 px. Trained weights need inspect's probe.
- Images in [0, 1] map to the network's [-1, 1] inside :meth:`DCAE.encode` / :meth:`DCAE.decode`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vaekit.errors import LoadError

SCALING_FACTOR = 0.41407  # dc-ae-f32c32-sana-1.0 config (efficientvit dc_ae.py, diffusers convert_dcae_to_diffusers.py)


@dataclass(frozen=True)
class DCAEConfig:
    """DC-AE with Sana's blocks: ResBlocks in the first stages, EfficientViT (linear attention + GLU) after."""

    family: str = "dcae"
    kind: str = "dcae"
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 32
    encoder_widths: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    encoder_depths: tuple[int, ...] = (2, 2, 2, 3, 3, 3)
    encoder_attention: tuple[bool, ...] = (False, False, False, True, True, True)
    decoder_widths: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    decoder_depths: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
    decoder_attention: tuple[bool, ...] = (False, False, False, True, True, True)
    head_dim: int = 32  # channels per linear-attention head
    attention_kernel: int = 5  # the one multi-scale branch: depthwise k x k on q/k/v
    mlp_ratio: int = 4  # GLUMBConv hidden width = mlp_ratio * width
    norm_eps: float = 1e-5
    scaling_factor: float = SCALING_FACTOR

    @property
    def downscale(self) -> int:
        """Pixels per latent cell per side (32 for f32c32)."""
        return 2 ** (len(self.encoder_widths) - 1)

    @property
    def gaussian(self) -> bool:
        """DC-AE's encoder is deterministic: one latent, no posterior."""
        return False

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


PRESETS: dict[str, DCAEConfig] = {"dcae": DCAEConfig()}

MARKER_KEYS: tuple[str, ...] = (
    "encoder.project_in.conv.weight",
    "encoder.project_out.main.op_list.0.conv.weight",
    "decoder.project_in.main.conv.weight",
    "decoder.project_out.op_list.2.conv.weight",
)


# For ops/tiling's region tiles: the part that reads the whole image (exact tiling refused), and the halo in latent
# cells that covers the local receptive field per side (encoder 596 input px, decoder 610 output px; measured with
# forward-mode derivatives on the real depths, attention replaced by a local stand-in).
GLOBAL_PART = "linear attention"
TILING_HALO: dict[str, int] = {"encode": 19, "decode": 20}


def normaliser_spec(cfg: DCAEConfig) -> dict[str, Any]:
    """Sana's transformer consumes ``raw * 0.41407`` (diffusers AutoencoderDC config ``scaling_factor``, no shift)."""
    return {"kind": "scalar", "scale": cfg.scaling_factor, "shift": 0.0}


# ----------------------------------------------------------------------------------------------------- blocks


class RMSNorm2d(nn.Module):
    """RMS norm over the channels of each position, computed in fp32, then ``* weight + bias``."""

    def __init__(self, channels: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = (xf * torch.rsqrt(xf.square().mean(1, keepdim=True) + self.eps)).to(self.weight.dtype)
        return y * self.weight[:, None, None] + self.bias[:, None, None]


class ConvLayer(nn.Module):
    """efficientvit ``ConvLayer``: conv (``.conv``), then an optional norm (``.norm``) and activation."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int,
        *,
        stride: int = 1,
        groups: int = 1,
        bias: bool = True,
        norm_eps: float | None = None,
        act: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=bias)
        if norm_eps is not None:
            self.norm = RMSNorm2d(c_out, norm_eps)
        self.act = act() if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if hasattr(self, "norm"):
            x = self.norm(x)
        return self.act(x)


class OpList(nn.Module):
    """efficientvit ``OpSequential``: modules in ``op_list`` applied in order."""

    def __init__(self, ops: list[nn.Module]) -> None:
        super().__init__()
        self.op_list = nn.ModuleList(ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.op_list:
            x = op(x)
        return x


class Residual(nn.Module):
    """``x + main(x)`` (efficientvit ``ResidualBlock`` with an identity shortcut)."""

    def __init__(self, main: nn.Module) -> None:
        super().__init__()
        self.main = main

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.main(x)


class ResBlockMain(nn.Module):
    """conv3x3 + bias, SiLU, conv3x3 without bias, RMSNorm."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.conv1 = ConvLayer(width, width, 3, act=nn.SiLU)
        self.conv2 = ConvLayer(width, width, 3, bias=False, norm_eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class LiteMLA(nn.Module):
    """Multi-scale ReLU linear attention over all positions (efficientvit ``LiteMLA``), then proj + RMSNorm."""

    def __init__(self, width: int, head_dim: int, kernel: int, eps: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        inner = (width // head_dim) * head_dim
        self.qkv = ConvLayer(width, 3 * inner, 1, bias=False)
        heads = inner // head_dim
        self.aggreg = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(3 * inner, 3 * inner, kernel, padding=kernel // 2, groups=3 * inner, bias=False),
                    nn.Conv2d(3 * inner, 3 * inner, 1, groups=3 * heads, bias=False),
                )
            ]
        )
        self.proj = ConvLayer(2 * inner, width, 1, bias=False, norm_eps=eps)

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Heads of ``[q k v]`` (B, C, H, W) -> (B, C/3, H, W); the global sums run in fp32."""
        b, _, h, w = qkv.shape
        n = h * w
        dtype = qkv.dtype
        linear = n > self.head_dim
        if linear:
            qkv = qkv.float()
        q, k, v = qkv.reshape(b, -1, 3 * self.head_dim, n).chunk(3, dim=2)
        q, k = F.relu(q), F.relu(k)
        if linear:
            # (v; 1) k^T summed over all positions: a (d+1, d) matrix per head, then applied to each query.
            v1 = F.pad(v, (0, 0, 0, 1), value=1.0)
            out = (v1 @ k.transpose(-1, -2)) @ q
            out = (out[:, :, :-1] / (out[:, :, -1:] + 1e-15)).to(dtype)
        else:
            # Few positions: the same attention in its (n, n) form, normalised in fp32.
            scores = (k.transpose(-1, -2) @ q).float()
            scores = scores / (scores.sum(dim=2, keepdim=True) + 1e-15)
            out = v @ scores.to(dtype)
        return out.reshape(b, -1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        qkv = torch.cat([qkv] + [agg(qkv) for agg in self.aggreg], dim=1)
        return self.proj(self.attend(qkv))


class GLUMBConv(nn.Module):
    """1x1 expand + SiLU, 3x3 depthwise, gate ``x * silu(g)``, 1x1 project + RMSNorm."""

    def __init__(self, width: int, ratio: int, eps: float) -> None:
        super().__init__()
        hidden = width * ratio
        self.inverted_conv = ConvLayer(width, 2 * hidden, 1, act=nn.SiLU)
        self.depth_conv = ConvLayer(2 * hidden, 2 * hidden, 3, groups=2 * hidden)
        self.point_conv = ConvLayer(hidden, width, 1, bias=False, norm_eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.depth_conv(self.inverted_conv(x)).chunk(2, dim=1)
        return self.point_conv(x * F.silu(gate))


class EfficientViTBlock(nn.Module):
    """Global linear attention (``context_module``) then a local GLU conv (``local_module``), both residual."""

    def __init__(self, width: int, cfg: DCAEConfig) -> None:
        super().__init__()
        self.context_module = Residual(LiteMLA(width, cfg.head_dim, cfg.attention_kernel, cfg.norm_eps))
        self.local_module = Residual(GLUMBConv(width, cfg.mlp_ratio, cfg.norm_eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_module(self.context_module(x))


class DownBlock(nn.Module):
    """Stride-2 3x3 conv plus a shortcut: space-to-channel (2x2) then mean over channel groups."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.group = c_in * 4 // c_out
        self.main = ConvLayer(c_in, c_out, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.pixel_unshuffle(x, 2)
        return self.main(x) + y.unflatten(1, (-1, self.group)).mean(2)


class InterpolateConv(nn.Module):
    """Nearest x2 then a 3x3 conv (``.conv``)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = ConvLayer(c_in, c_out, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UpBlock(nn.Module):
    """Nearest x2 + conv plus a shortcut: channels repeated, then channel-to-space (2x2)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.repeats = c_out * 4 // c_in
        self.main = InterpolateConv(c_in, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + F.pixel_shuffle(x.repeat_interleave(self.repeats, dim=1), 2)


class EncoderOut(nn.Module):
    """3x3 conv to the latent plus the mean of each group of channels (``project_out``)."""

    def __init__(self, width: int, latent: int) -> None:
        super().__init__()
        self.group = width // latent
        self.main = OpList([ConvLayer(width, latent, 3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + x.unflatten(1, (-1, self.group)).mean(2)


class DecoderIn(nn.Module):
    """3x3 conv from the latent plus the latent's channels repeated (``project_in``)."""

    def __init__(self, latent: int, width: int) -> None:
        super().__init__()
        self.repeats = width // latent
        self.main = ConvLayer(latent, width, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z) + z.repeat_interleave(self.repeats, dim=1)


def _block(width: int, attention: bool, cfg: DCAEConfig) -> nn.Module:
    return EfficientViTBlock(width, cfg) if attention else Residual(ResBlockMain(width, cfg.norm_eps))


class Encoder(nn.Module):
    """project_in (3x3), stages of blocks each closed by a stride-2 down block, project_out."""

    def __init__(self, cfg: DCAEConfig) -> None:
        super().__init__()
        widths = cfg.encoder_widths
        self.project_in = ConvLayer(cfg.in_channels, widths[0], 3)
        stages = []
        for i, (width, depth) in enumerate(zip(widths, cfg.encoder_depths, strict=True)):
            ops = [_block(width, cfg.encoder_attention[i], cfg) for _ in range(depth)]
            if i < len(widths) - 1:
                ops.append(DownBlock(width, widths[i + 1]))
            stages.append(OpList(ops))
        self.stages = nn.ModuleList(stages)
        self.project_out = EncoderOut(widths[-1], cfg.latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project_in(x)
        for stage in self.stages:
            x = stage(x)
        return self.project_out(x)


class Decoder(nn.Module):
    """project_in, stages from the lowest resolution each opened by an up block, RMSNorm-ReLU-conv out."""

    def __init__(self, cfg: DCAEConfig) -> None:
        super().__init__()
        widths = cfg.decoder_widths
        self.project_in = DecoderIn(cfg.latent_channels, widths[-1])
        stages = []
        for i, (width, depth) in enumerate(zip(widths, cfg.decoder_depths, strict=True)):
            ops: list[nn.Module] = [UpBlock(widths[i + 1], width)] if i < len(widths) - 1 else []
            ops.extend(_block(width, cfg.decoder_attention[i], cfg) for _ in range(depth))
            stages.append(OpList(ops))
        self.stages = nn.ModuleList(stages)
        norm = RMSNorm2d(widths[0], cfg.norm_eps)
        self.project_out = OpList([norm, nn.ReLU(), ConvLayer(widths[0], cfg.out_channels, 3)])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project_in(z)
        for stage in reversed(self.stages):
            x = stage(x)
        return self.project_out(x)


class DCAE(nn.Module):
    """DC-AE: ``encode`` images in [0, 1] -> raw latent; ``decode`` raw latent -> images in [0, 1] (unclamped)."""

    def __init__(self, cfg: DCAEConfig) -> None:
        super().__init__()
        _check(cfg)
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1], H and W multiples of 32 -> raw latent (N, 32, H/32, W/32)."""
        return self.encoder(images * 2 - 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent -> images in [0, 1] (not clamped)."""
        return self.decoder(z) / 2 + 0.5


DCAEVAE = DCAE


def _check(cfg: DCAEConfig) -> None:
    n = len(cfg.encoder_widths)
    lists = (cfg.encoder_depths, cfg.encoder_attention, cfg.decoder_widths, cfg.decoder_depths, cfg.decoder_attention)
    if any(len(v) != n for v in lists):
        raise ValueError("DC-AE config: every per-stage tuple needs one entry per stage")
    for widths in (cfg.encoder_widths, cfg.decoder_widths):
        if widths[-1] % cfg.latent_channels:
            raise ValueError("DC-AE config: the last width must be a multiple of latent_channels")
        if any((a * 4) % b for a, b in zip(widths, widths[1:], strict=False)):
            raise ValueError("DC-AE config: 4 x each width must be a multiple of the next width")
    for widths, attention in ((cfg.encoder_widths, cfg.encoder_attention), (cfg.decoder_widths, cfg.decoder_attention)):
        if any(a and w % cfg.head_dim for w, a in zip(widths, attention, strict=True)):
            raise ValueError("DC-AE config: attention widths must be multiples of head_dim")


# ----------------------------------------------------------------------------------------------- recognition

Shapes = dict[str, tuple[int, ...]]


def _stage_blocks(shapes: Shapes, part: str, stage: int) -> dict[int, str]:
    """Kinds of the ops of one stage: {index: "res" | "vit" | "down" | "up"}."""
    kinds: dict[int, str] = {}
    pat = re.compile(
        rf"{part}\.stages\.{stage}\.op_list\.(\d+)\.(main\.conv1|context_module|main\.conv\.conv|main\.conv)\."
    )
    for k in shapes:
        m = pat.match(k)
        if m:
            j, what = int(m.group(1)), m.group(2)
            kinds[j] = {"main.conv1": "res", "context_module": "vit", "main.conv.conv": "up", "main.conv": "down"}[what]
    return kinds


def config_from_shapes(shapes: Shapes) -> DCAEConfig | None:
    """Recognise a DC-AE (Sana f32c32 blocks) from original-name keys and shapes; None when it is not one."""
    if not any(k.startswith(("encoder.stages.", "decoder.stages.")) and ".op_list." in k for k in shapes):
        return None
    if "encoder.project_in.conv.conv.weight" in shapes or "decoder.project_out.op_list.2.conv.conv.weight" in shapes:
        raise LoadError("a DC-AE of the pixel-unshuffle kind (dc-ae in/mix releases); only Sana's DC-AE is supported")
    missing = [k for k in MARKER_KEYS if k not in shapes]
    if missing:
        raise LoadError(f"an incomplete DC-AE file: missing {', '.join(missing)}")
    try:
        n = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.stages\.(\d+)\.", k)))
        enc_widths, enc_depths, enc_attn, dec_widths, dec_depths, dec_attn = [], [], [], [], [], []
        head_dim, kernel, ratio = 32, 5, 4
        for i in range(n):
            kinds = _stage_blocks(shapes, "encoder", i)
            blocks = [kinds[j] for j in sorted(kinds) if kinds[j] in ("res", "vit")]
            enc_depths.append(len(blocks))
            enc_attn.append(bool(blocks) and blocks[0] == "vit")
            if len(set(blocks)) > 1 or (i < n - 1 and kinds.get(len(blocks)) != "down"):
                raise LoadError(f"DC-AE encoder stage {i} has an unexpected layout")
            if i < n - 1:
                enc_widths.append(shapes[f"encoder.stages.{i}.op_list.{len(blocks)}.main.conv.weight"][1])
            kinds = _stage_blocks(shapes, "decoder", i)
            offset = 1 if i < n - 1 else 0
            blocks = [kinds[j] for j in sorted(kinds) if kinds[j] in ("res", "vit")]
            dec_depths.append(len(blocks))
            dec_attn.append(bool(blocks) and blocks[0] == "vit")
            if len(set(blocks)) > 1 or (offset and kinds.get(0) != "up"):
                raise LoadError(f"DC-AE decoder stage {i} has an unexpected layout")
            if i < n - 1:
                dec_widths.append(shapes[f"decoder.stages.{i}.op_list.0.main.conv.conv.weight"][0])
            if blocks and blocks[0] == "vit":
                base = f"encoder.stages.{i}.op_list.0.context_module.main"
                base = base if base + ".qkv.conv.weight" in shapes else base.replace("encoder", "decoder")
                agg = shapes[f"{base}.aggreg.0.1.weight"]
                head_dim = agg[1]
                kernel = shapes[f"{base}.aggreg.0.0.weight"][-1]
                glu = base.replace("context_module", "local_module")
                ratio = shapes[f"{glu}.point_conv.conv.weight"][1] // shapes[f"{glu}.point_conv.conv.weight"][0]
        enc_widths.append(shapes["encoder.project_out.main.op_list.0.conv.weight"][1])
        dec_widths.append(shapes["decoder.project_in.main.conv.weight"][0])
        cfg = DCAEConfig(
            in_channels=shapes["encoder.project_in.conv.weight"][1],
            out_channels=shapes["decoder.project_out.op_list.2.conv.weight"][0],
            latent_channels=shapes["encoder.project_out.main.op_list.0.conv.weight"][0],
            encoder_widths=tuple(enc_widths),
            encoder_depths=tuple(enc_depths),
            encoder_attention=tuple(enc_attn),
            decoder_widths=tuple(dec_widths),
            decoder_depths=tuple(dec_depths),
            decoder_attention=tuple(dec_attn),
            head_dim=head_dim,
            attention_kernel=kernel,
            mlp_ratio=ratio,
        )
        _check(cfg)
    except (KeyError, IndexError, ValueError) as err:
        raise LoadError(f"an inconsistent DC-AE file ({err})") from None
    expected = _expected_shapes(cfg)
    if set(expected) != set(shapes) or any(tuple(shapes[k]) != v for k, v in expected.items()):
        bad = sorted(set(expected) ^ set(shapes)) or [k for k, v in expected.items() if tuple(shapes[k]) != v]
        raise LoadError(f"an inconsistent DC-AE file: {len(bad)} keys differ from the architecture (e.g. {bad[0]})")
    return cfg


def _expected_shapes(cfg: DCAEConfig) -> Shapes:
    with torch.device("meta"):
        model = DCAE(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------- diffusers

# Our (efficientvit) prefix -> diffusers AutoencoderDC prefix, the placeholder syntax of formats/keymaps.py
# ({i} stage, {j} op index, copied). Two tensors change shape, and one splits (see QKV below):
#   ``...context_module.main.qkv.conv.weight`` (3T, C, 1, 1) -> ``attn.to_q/to_k/to_v.weight`` (T, C) each, the
#   three row blocks in order; ``...context_module.main.proj.conv.weight`` (C, 2T, 1, 1) -> ``attn.to_out.weight``
#   (C, 2T). Diffusers concatenates [to_q, to_k, to_v] back into the same channel order, so the split is exact.
DIFFUSERS_KEYS: list[tuple[str, str]] = [
    ("encoder.project_in.conv.", "encoder.conv_in."),
    ("encoder.project_out.main.op_list.0.conv.", "encoder.conv_out."),
    ("decoder.project_in.main.conv.", "decoder.conv_in."),
    ("decoder.project_out.op_list.0.", "decoder.norm_out."),
    ("decoder.project_out.op_list.2.conv.", "decoder.conv_out."),
]
for _ours, _theirs in (("encoder.stages", "encoder.down_blocks"), ("decoder.stages", "decoder.up_blocks")):
    _b = f"{_ours}.{{i}}.op_list.{{j}}."
    _d = f"{_theirs}.{{i}}.{{j}}."
    DIFFUSERS_KEYS += [
        (_b + "main.conv1.conv.", _d + "conv1."),
        (_b + "main.conv2.conv.", _d + "conv2."),
        (_b + "main.conv2.norm.", _d + "norm."),
        (_b + "context_module.main.aggreg.0.0.", _d + "attn.to_qkv_multiscale.0.proj_in."),
        (_b + "context_module.main.aggreg.0.1.", _d + "attn.to_qkv_multiscale.0.proj_out."),
        (_b + "context_module.main.proj.conv.", _d + "attn.to_out."),
        (_b + "context_module.main.proj.norm.", _d + "attn.norm_out."),
        (_b + "local_module.main.inverted_conv.conv.", _d + "conv_out.conv_inverted."),
        (_b + "local_module.main.depth_conv.conv.", _d + "conv_out.conv_depth."),
        (_b + "local_module.main.point_conv.conv.", _d + "conv_out.conv_point."),
        (_b + "local_module.main.point_conv.norm.", _d + "conv_out.norm."),
        # encoder: the stride-2 conv of a down block; decoder: the conv of an up block (nearest x2 + conv)
        (_b + ("main.conv." if _ours.startswith("encoder") else "main.conv.conv."), _d + "conv."),
    ]
DIFFUSERS_CLASS: str | None = "AutoencoderDC"
QKV = ("context_module.main.qkv.conv.weight", ("attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight"))
PROJ = ("context_module.main.proj.conv.weight", "attn.to_out.weight")


def _pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(
        re.escape(prefix).replace(re.escape("{i}"), r"(?P<i>\d+)").replace(re.escape("{j}"), r"(?P<j>\d+)")
    )


def _rename(sd: dict[str, torch.Tensor], reverse: bool) -> dict[str, torch.Tensor]:
    rules = [(_pattern(b if reverse else a), a if reverse else b) for a, b in DIFFUSERS_KEYS]
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        for pattern, dst in rules:
            m = pattern.match(key)
            if m:
                out[dst.format(**m.groupdict()) + key[m.end() :]] = value
                break
        else:
            raise LoadError(f"unexpected key {key!r} for the DC-AE {'diffusers' if reverse else 'original'} layout")
    return out


def to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original (efficientvit) names -> diffusers AutoencoderDC names: qkv split into to_q/to_k/to_v, 1x1 -> linear."""
    rest: dict[str, torch.Tensor] = {}
    split: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.endswith(QKV[0]):
            head = key[: -len(QKV[0])]
            for name, part in zip(QKV[1], value.flatten(1).chunk(3, dim=0), strict=True):
                split[head + name] = part
        elif key.endswith(PROJ[0]):
            rest[key] = value.flatten(1)
        else:
            rest[key] = value
    renamed = _rename(rest, reverse=False)
    for key, value in split.items():  # qkv heads: ``{part}.stages.I.op_list.J.`` -> diffusers block prefix
        m = re.match(r"(encoder|decoder)\.stages\.(\d+)\.op_list\.(\d+)\.(.*)", key)
        assert m is not None
        blocks = "down_blocks" if m.group(1) == "encoder" else "up_blocks"
        renamed[f"{m.group(1)}.{blocks}.{m.group(2)}.{m.group(3)}.{m.group(4)}"] = value
    return renamed


def from_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers AutoencoderDC names -> original names: to_q/to_k/to_v joined into one (3T, C, 1, 1) qkv conv."""
    rest: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        name = next((n for n in QKV[1] if key.endswith(n)), None)
        if name is not None:
            groups.setdefault(key[: -len(name)], {})[name] = value
        else:
            rest[key] = value
    out = _rename(rest, reverse=True)
    for key in [k for k in out if k.endswith(PROJ[0])]:
        out[key] = out[key].reshape(*out[key].shape, 1, 1)
    for head, parts in groups.items():
        if set(parts) != set(QKV[1]):
            raise LoadError(f"DC-AE diffusers file: {head} lacks one of to_q/to_k/to_v")
        m = re.match(r"(encoder|decoder)\.(?:down_blocks|up_blocks)\.(\d+)\.(\d+)\.$", head)
        if m is None:
            raise LoadError(f"unexpected key {head + QKV[1][0]!r} for the DC-AE diffusers layout")
        qkv = torch.cat([parts[n] for n in QKV[1]], dim=0)
        out[f"{m.group(1)}.stages.{m.group(2)}.op_list.{m.group(3)}.{QKV[0]}"] = qkv.reshape(*qkv.shape, 1, 1)
    return out


def diffusers_config(cfg: DCAEConfig) -> dict[str, Any]:
    """The config.json diffusers' AutoencoderDC expects for this config."""
    if cfg.out_channels != cfg.in_channels:
        raise ValueError("diffusers AutoencoderDC has one in_channels for the image in and out")

    def types(attention: tuple[bool, ...]) -> list[str]:
        return ["EfficientViTBlock" if a else "ResBlock" for a in attention]

    def scales(attention: tuple[bool, ...]) -> list[list[int]]:
        return [[cfg.attention_kernel] if a else [] for a in attention]

    return {
        "_class_name": "AutoencoderDC",
        "in_channels": cfg.in_channels,
        "latent_channels": cfg.latent_channels,
        "attention_head_dim": cfg.head_dim,
        "encoder_block_types": types(cfg.encoder_attention),
        "decoder_block_types": types(cfg.decoder_attention),
        "encoder_block_out_channels": list(cfg.encoder_widths),
        "decoder_block_out_channels": list(cfg.decoder_widths),
        "encoder_layers_per_block": list(cfg.encoder_depths),
        "decoder_layers_per_block": list(cfg.decoder_depths),
        "encoder_qkv_multiscales": scales(cfg.encoder_attention),
        "decoder_qkv_multiscales": scales(cfg.decoder_attention),
        "upsample_block_type": "interpolate",
        "downsample_block_type": "conv",
        "decoder_norm_types": "rms_norm",
        "decoder_act_fns": "silu",
        "encoder_out_shortcut": True,
        "decoder_in_shortcut": True,
        "decoder_conv_act_fn": "relu",
        "scaling_factor": cfg.scaling_factor,
    }


# AutoencoderDC.__init__ defaults (diffusers 0.42), used where a config.json leaves a key out.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "encoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "decoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "encoder_layers_per_block": (2, 2, 2, 3, 3, 3),
    "decoder_layers_per_block": (3, 3, 3, 3, 3, 3),
    "encoder_block_types": "ResBlock",
    "decoder_block_types": "ResBlock",
    "encoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "decoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
}


def config_from_diffusers(dc: dict[str, Any]) -> DCAEConfig:
    """A DCAEConfig from an AutoencoderDC config.json; LoadError for the variants this module does not build."""
    need = {
        "upsample_block_type": "interpolate",
        "downsample_block_type": "conv",
        "decoder_norm_types": "rms_norm",
        "decoder_act_fns": "silu",
        "encoder_out_shortcut": True,
        "decoder_in_shortcut": True,
        "decoder_conv_act_fn": "relu",
    }
    for key, value in need.items():
        got = dc.get(key, value)
        if got != value and not (isinstance(got, list | tuple) and all(g == value for g in got)):
            raise LoadError(f"AutoencoderDC with {key}={got!r}: only Sana's DC-AE ({key}={value!r}) is supported")
    n = len(dc.get("encoder_block_out_channels", DIFFUSERS_DEFAULTS["encoder_block_out_channels"]))

    def per_stage(key: str) -> tuple[Any, ...]:
        v = dc.get(key, DIFFUSERS_DEFAULTS[key])
        return tuple(v) if isinstance(v, list | tuple) else (v,) * n

    def attention(prefix: str) -> tuple[bool, ...]:
        kinds = per_stage(f"{prefix}_block_types")
        scales = per_stage(f"{prefix}_qkv_multiscales")
        for kind, s in zip(kinds, scales, strict=True):
            if kind == "EfficientViTBlock" and len(s) != 1:
                raise LoadError(f"AutoencoderDC with qkv multiscales {list(s)}: one scale per attention is supported")
        return tuple(k == "EfficientViTBlock" for k in kinds)

    enc, dec = attention("encoder"), attention("decoder")
    scales = zip(enc + dec, per_stage("encoder_qkv_multiscales") + per_stage("decoder_qkv_multiscales"), strict=True)
    kernels = {s[0] for a, s in scales if a}
    if len(kernels) > 1:
        raise LoadError(f"AutoencoderDC with several attention kernels {sorted(kernels)}: one is supported")
    return DCAEConfig(
        in_channels=dc.get("in_channels", 3),
        out_channels=dc.get("in_channels", 3),
        latent_channels=dc.get("latent_channels", 32),
        encoder_widths=per_stage("encoder_block_out_channels"),
        encoder_depths=per_stage("encoder_layers_per_block"),
        encoder_attention=enc,
        decoder_widths=per_stage("decoder_block_out_channels"),
        decoder_depths=per_stage("decoder_layers_per_block"),
        decoder_attention=dec,
        head_dim=dc.get("attention_head_dim", 32),
        attention_kernel=next(iter(kernels), 5),
        scaling_factor=float(dc.get("scaling_factor", 1.0)),
    )
