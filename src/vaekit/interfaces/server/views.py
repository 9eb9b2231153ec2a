"""What the UI shows beside a round trip: the compare feature's metrics, a difference heat map, latent channels."""

from __future__ import annotations

import math
from typing import Any

import torch

from vaekit.eval import metrics as eval_metrics
from vaekit.latent.channels import channel_images as latent_channel_images
from vaekit.latent.channels import channel_stats
from vaekit.latent.render import heat_colors, upscale_nearest

DIFF_GAIN = 4.0  # the difference image is amplified so small errors are visible


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN: "not measurable" is null


def _ssim(original: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """SSIM, or nan for an image too small for its Gaussian window (the window is padded by reflection, which
    needs more pixels than half the window on each side)."""
    if min(original.shape[-2:]) <= getattr(eval_metrics, "SSIM_KERNEL", 11) // 2:
        return math.nan
    return eval_metrics.ssim(original, reconstruction)


def image_metrics(original: torch.Tensor, reconstruction: torch.Tensor) -> dict[str, Any]:
    """The metrics ``vaekit compare`` reports for one image (PSNR, SSIM, MS-SSIM, colour fidelity), the mean
    absolute error, and the compare feature's plain-words colour warnings; null where an image is too small."""
    ms, scales = eval_metrics.ms_ssim(original, reconstruction)
    values = {
        "psnr": eval_metrics.psnr(original, reconstruction),
        "ssim": _ssim(original, reconstruction),
        "ms_ssim": ms,
        **eval_metrics.colour_fidelity(original, reconstruction),
    }
    out: dict[str, Any] = {k: _finite(float(v)) for k, v in values.items()}
    out["ms_ssim_scales"] = int(scales)
    out["mae"] = float(torch.mean(torch.abs(original.float() - reconstruction.float())))
    nan = math.nan
    out["flags"] = eval_metrics.colour_flags(
        values.get("saturation_ratio", nan), values.get("colourfulness_change", nan), values.get("delta_e", nan)
    )
    return out


def headline_metrics(original: torch.Tensor, reconstruction: torch.Tensor) -> tuple[float, float | None]:
    """PSNR (dB) and SSIM alone, as ``vaekit compare`` computes them (SSIM None for a too-small image)."""
    return eval_metrics.psnr(original, reconstruction), _finite(_ssim(original, reconstruction))


def difference_image(original: torch.Tensor, reconstruction: torch.Tensor, gain: float = DIFF_GAIN) -> torch.Tensor:
    """Per-pixel error as a heat map (3, H, W): mean absolute difference over the channels, amplified."""
    diff = (original.float() - reconstruction.float()).abs().mean(dim=0)
    return heat_colors((diff * gain).clamp(0, 1))


def channel_images(latent: torch.Tensor, scale: int) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Each channel of a latent (C, h, w) as a greyscale image stretched to its own min..max and enlarged ``scale``
    times (nearest), with its statistics (``vaekit.latent.channels``)."""
    images = upscale_nearest(latent_channel_images(latent), scale)
    return [(img, stats.to_dict()) for img, stats in zip(images, channel_stats(latent), strict=True)]
