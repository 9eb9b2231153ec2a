"""A head start for a tiny autoencoder trained from scratch: start from a box-filter codec, learn the rest.

Trained from random weights, a small autoencoder spends its first thousands of steps learning what a plain
8x downscale and upscale already does (each latent cell's mean colour). ``box_codec_init`` sets the weights of a
:class:`~vaekit.models.tiny.TinyAutoencoder` so that, before any step, latent channels 0-2 hold each cell's mean
colour (mapped to [-1, 1]) and the decoder upsamples them with a tent filter: a working codec at step 0. The
other channels start random, and every residual block starts as the identity (its last conv is zero, as in
zero-initialised ResNets), so training adds detail on top of the box codec instead of discovering it.
"""

from __future__ import annotations

import torch
from torch import nn

from vaekit.models.tiny import Block, Clamp, TinyAutoencoder

RGB = 3


def _only_rgb_path(conv: nn.Conv2d, kernel: torch.Tensor, scale: float = 1.0, bias: float = 0.0) -> None:
    """Output channels 0-2 read only input channels 0-2 (channel c from c, through ``kernel``)."""
    with torch.no_grad():
        conv.weight[:RGB].zero_()
        for c in range(RGB):
            conv.weight[c, c] = kernel * scale
        if conv.bias is not None:
            conv.bias[:RGB] = bias


def box_codec_init(model: TinyAutoencoder) -> TinyAutoencoder:
    """Set ``model``'s weights to a box-average encoder and tent-filter decoder on channels 0-2 (see module)."""
    centre = torch.zeros(3, 3)
    centre[1, 1] = 1.0
    box = torch.zeros(3, 3)
    box[1:, 1:] = 0.25  # stride 2, padding 1: taps 1-2 cover input pixels 2i and 2i+1
    tent = torch.tensor([0.25, 0.5, 0.25])
    tent = tent[:, None] * tent[None, :]
    if model.config.latent_channels < RGB:
        raise ValueError("box_codec_init needs at least 3 latent channels")
    for part in (model.encoder, model.decoder):
        for layer in part:
            if isinstance(layer, Block):
                last = layer.conv[-1]
                assert isinstance(last, nn.Conv2d)
                with torch.no_grad():
                    last.weight.zero_()
                    if last.bias is not None:
                        last.bias.zero_()
    enc = [m for m in model.encoder if isinstance(m, nn.Conv2d)]
    _only_rgb_path(enc[0], centre)
    for conv in enc[1:-1]:
        _only_rgb_path(conv, box)
    _only_rgb_path(enc[-1], centre, scale=2.0, bias=-1.0)  # colour [0, 1] -> latent [-1, 1]
    dec_layers = list(model.decoder)
    assert isinstance(dec_layers[0], Clamp)
    dec = [m for m in dec_layers if isinstance(m, nn.Conv2d)]
    _only_rgb_path(dec[0], centre, scale=0.5, bias=0.5)  # latent [-1, 1] -> colour [0, 1]
    with torch.no_grad():
        dec[0].weight[:RGB, RGB:].zero_()
    for conv in dec[1:-1]:
        _only_rgb_path(conv, tent)
    _only_rgb_path(dec[-1], centre)
    with torch.no_grad():
        dec[-1].weight[:, RGB:].zero_()
    return model
