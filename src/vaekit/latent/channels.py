"""What a latent looks like: each channel as a normalised greyscale image, with its statistics."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from vaekit.errors import BadInputError
from vaekit.latent.render import grid, label, upscale_nearest


@dataclass(frozen=True)
class ChannelStats:
    """Statistics of one latent channel."""

    channel: int
    mean: float
    std: float
    min: float
    max: float

    def to_dict(self) -> dict[str, float]:
        """Plain numbers for JSON output."""
        return asdict(self)


def channel_stats(latent: torch.Tensor) -> list[ChannelStats]:
    """Mean, standard deviation, minimum and maximum of each channel of one latent (C, h, w)."""
    latent = _one(latent).double()
    flat = latent.flatten(1)
    return [
        ChannelStats(
            c,
            float(flat[c].mean()),
            float(flat[c].std(correction=0)),
            float(flat[c].min()),
            float(flat[c].max()),
        )
        for c in range(flat.shape[0])
    ]


def channel_images(latent: torch.Tensor) -> torch.Tensor:
    """Each channel of one latent (C, h, w) stretched from its own min..max to black..white: (C, 3, h, w)."""
    latent = _one(latent).float()
    lo = latent.flatten(1).min(1).values.view(-1, 1, 1)
    hi = latent.flatten(1).max(1).values.view(-1, 1, 1)
    norm = (latent - lo) / (hi - lo).clamp_min(1e-12)  # a constant channel shows as black
    return norm.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def channel_sheet(
    latent: torch.Tensor, cell: int | None = None, columns: int = 4, captions: bool = True
) -> torch.Tensor:
    """One picture of all channels, each enlarged with visible cells and captioned with its mean and std.

    ``cell`` (pixels per latent cell) defaults to what makes each tile about 128 pixels wide.
    """
    one = _one(latent)
    cell = cell or max(1, 128 // max(one.shape[1], one.shape[2]))
    tiles = upscale_nearest(channel_images(one), cell)
    if captions:
        stats = channel_stats(one)
        tiles = torch.stack(
            [label(t, f"c{s.channel} m{s.mean:+.2f} s{s.std:.2f}") for t, s in zip(tiles, stats, strict=True)]
        )
    return grid(tiles, columns=columns, pad=2)


def _one(latent: torch.Tensor) -> torch.Tensor:
    if latent.ndim == 4:
        if latent.shape[0] != 1:
            raise BadInputError(f"give one latent (C, h, w), got a batch of {latent.shape[0]}")
        latent = latent[0]
    if latent.ndim != 3 or latent.numel() == 0:
        raise BadInputError(f"a latent must be (C, h, w), got shape {tuple(latent.shape)}")
    return latent.detach().cpu()
