"""The stage description of a network: the one description that tiling, its memory model and fast mode read.

A KL autoencoder describes itself as a list of :class:`Stage` (``AutoencoderKL.stages``), built from its own modules
next to its forward pass; the exactness tests in ``tests/test_tiling.py`` run the stages against the forward pass, so a
change to a block that the stage list does not follow fails there, not silently in tiling.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Stage:
    """One step between two synchronisation points: [GroupNorm+SiLU | 1x1] -> [up|down] -> 3x3 conv -> [+skip]."""

    name: str
    src: str
    dst: str
    conv: nn.Conv2d
    norm: nn.GroupNorm | None = None
    resample: str = ""  # "" | "up" (nearest x2 before the conv) | "down" (LDM pad right/bottom, stride 2)
    pre: nn.Conv2d | None = None  # 1x1 conv applied to the input before the 3x3 conv (post_quant_conv)
    post: nn.Conv2d | None = None  # 1x1 conv applied after it (quant_conv)
    skip: str | None = None  # store added to the output (resnet residual)
    shortcut: nn.Conv2d | None = None  # 1x1 applied to the residual when the width changes
    attn: nn.Module | None = None  # an AttnBlock: the stage is the whole attention block instead of a conv

    @property
    def out_channels(self) -> int:
        """Channels of the output store."""
        if self.attn is not None:
            return int(self.attn.proj_out.out_channels)  # type: ignore[union-attr]
        return int((self.post or self.conv).out_channels)

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        """Output spatial size for an input of ``h`` x ``w``."""
        if self.resample == "up":
            return 2 * h, 2 * w
        if self.resample == "down":
            return h // 2, w // 2
        return h, w
