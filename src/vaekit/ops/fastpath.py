"""Inference rewrites of the KL autoencoder's blocks, applied to the pipeline's execution copy of a model.

Same maths, fewer operations and copies; the user's model and its state dict are never touched:

- nearest x2 upsampling followed by a 3x3 conv equals four 2x2 convs on the low-resolution input (one per output
  phase, with summed taps): 16 instead of 36 multiply-adds per input pixel and channel pair, and no 4x larger
  upsampled tensor;
- GroupNorm then SiLU in place, and the residual added in place, in every resnet block;
- attention with q, k and v from one 1x1 conv, read by SDPA through views of the channels-last output (no copy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vaekit.models.blocks import AttnBlock, ResnetBlock, Upsample


class FastResnetBlock(ResnetBlock):
    """ResnetBlock with in-place SiLU and residual (inference only: no autograd through it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x)


class FastAttnBlock(AttnBlock):
    """AttnBlock computing q, k, v with one conv (weights concatenated once when the copy is made)."""

    qkv: nn.Conv2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        qkv = self.qkv(self.norm(x))
        if qkv.is_contiguous(memory_format=torch.channels_last):
            seq = qkv.permute(0, 2, 3, 1).reshape(b, 1, height * width, 3, c)  # a view: NHWC memory
        else:
            seq = qkv.reshape(b, 3, c, height * width).permute(0, 3, 1, 2).unsqueeze(1)
        q, k, v = seq.unbind(dim=3)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, 1, hw, c)
        out = out.reshape(b, height, width, c).permute(0, 3, 1, 2)
        if not qkv.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous()
        return x + self.proj_out(out)


def upsample_phase_weights(w: torch.Tensor) -> torch.Tensor:
    """The 3x3 kernel ``w`` (O, I, 3, 3) of a conv after nearest x2 as four 2x2 kernels (4 O, I, 2, 2), one per
    output phase (row a, column b) in the order (0,0) (0,1) (1,0) (1,1); summed in float32, returned in w's dtype.

    Output row 2i + a reads upsampled rows 2i + a - 1 .. 2i + a + 1, i.e. input rows (i-1, i) for a = 0 with taps
    (w0, w1 + w2), and input rows (i, i+1) for a = 1 with taps (w0 + w1, w2). Same for columns.
    """
    w32 = w.float()
    rows = (
        torch.stack([w32[:, :, 0], w32[:, :, 1] + w32[:, :, 2]], 2),
        torch.stack([w32[:, :, 0] + w32[:, :, 1], w32[:, :, 2]], 2),
    )
    kernels = []
    for a in range(2):
        for b in range(2):
            r = rows[a]  # (O, I, 2, 3)
            cols = (
                torch.stack([r[..., 0], r[..., 1] + r[..., 2]], -1),
                torch.stack([r[..., 0] + r[..., 1], r[..., 2]], -1),
            )
            kernels.append(cols[b])
    return torch.cat(kernels, 0).to(w.dtype)


class FastUpsample(nn.Module):
    """Nearest x2 + 3x3 conv computed as one 2x2 conv with 4x the output channels, then interleaved."""

    def __init__(self, up: Upsample) -> None:
        super().__init__()
        w = up.conv.weight.detach()
        weight = upsample_phase_weights(w)
        bias = up.conv.bias.detach().repeat(4) if up.conv.bias is not None else None
        self.conv = nn.Conv2d(w.shape[1], 4 * w.shape[0], 2, padding=1, bias=bias is not None, device=weight.device)
        with torch.no_grad():
            self.conv.weight.copy_(weight)
            if bias is not None:
                self.conv.bias.copy_(bias)
        self.out_channels = w.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        o = self.out_channels
        y = self.conv(x)  # (n, 4 o, h + 1, w + 1): padding 1 gives output p the input rows (p - 1, p)
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        out = torch.empty((n, o, 2 * h, 2 * w), dtype=y.dtype, device=y.device, memory_format=fmt)
        for k in range(4):  # phase (a, b): out[2i + a, 2j + b] = y_ab[i + a, j + b]; four strided copies
            a, b = divmod(k, 2)
            out[:, :, a::2, b::2] = y[:, k * o : (k + 1) * o, a : a + h, b : b + w]
        return out


def optimize_for_inference(model: nn.Module) -> nn.Module:
    """Rewrite the blocks of ``model`` (an execution copy, changed in place) into their fast forms; returns it.

    Apply it to the fp32 copy, before any cast: the summed upsampling taps are computed in the weights' dtype.
    """
    for name, module in list(model.named_modules()):
        if type(module) is ResnetBlock:
            module.__class__ = FastResnetBlock
        elif type(module) is AttnBlock:
            w = module.q.weight
            qkv = nn.Conv2d(module.q.in_channels, 3 * module.q.out_channels, 1, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                qkv.weight.copy_(torch.cat([module.q.weight, module.k.weight, module.v.weight], 0))
                qkv.bias.copy_(torch.cat([module.q.bias, module.k.bias, module.v.bias], 0))
            module.qkv = qkv
            del module.q, module.k, module.v
            module.__class__ = FastAttnBlock
        elif type(module) is Upsample:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, FastUpsample(module))
    return model
