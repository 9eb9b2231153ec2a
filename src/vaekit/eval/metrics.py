"""Per-image quality metrics of a reconstruction against its input: PSNR, SSIM, MS-SSIM and colour fidelity.

PSNR, SSIM and MS-SSIM come from torchmetrics (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data range 1).
Colour fidelity catches the "foggy, desaturated" look of a wrong or missing VAE, which PSNR barely registers:

- saturation ratio: mean HSV saturation of the output over that of the input (1.0 = unchanged);
- colourfulness change: Hasler and Suesstrunk's colourfulness M = sqrt(sd_rg^2 + sd_yb^2) + 0.3 sqrt(mu_rg^2 +
  mu_yb^2) (2003, on 0-255 values) of the output relative to the input, in percent (0 = unchanged);
- colour shift: mean CIEDE2000 difference (Delta E 00) between input and output in CIELAB (D65); 1 is about the
  smallest difference a viewer notices side by side, 2-3 is visible at a glance.

Images are float tensors (3, H, W) in [0, 1]; every function returns plain Python floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from skimage import color
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from vaekit.errors import BadInputError

# Wang, Simoncelli and Bovik (2003): the weights of the five MS-SSIM scales, finest first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_KERNEL = 11
# Identical images have infinite PSNR; capping the MSE keeps means and intervals finite (100 dB = MSE 1e-10).
PSNR_CAP_DB = 100.0

# Thresholds of the plain-words colour flags (see docs/compare.md). A faithful VAE at SD quality stays well inside
# them on photographs: saturation within 5 %, colourfulness within 10 %, Delta E 00 around 1-3.
DESATURATED_BELOW = 0.85
OVERSATURATED_ABOVE = 1.20
WASHED_OUT_CHANGE = -20.0
COLOUR_SHIFT_ABOVE = 6.0


@dataclass(frozen=True)
class MetricInfo:
    """How to read a metric: its label, unit and which direction is better (``target`` means closest to it)."""

    key: str
    label: str
    unit: str
    better: str  # "higher", "lower" or "target"
    target: float = 0.0
    fmt: str = ".3f"
    short: str = ""  # column header in narrow tables (default: the label)
    # fmt: a format spec, or "auto" for about three significant digits (timings span 0.01 to 1000 s/Mpx)

    def loss(self, value: float) -> float:
        """The value turned into "lower is better" (used to rank rows and call winners)."""
        if self.better == "higher":
            return -value
        if self.better == "lower":
            return value
        return abs(value - self.target)


METRICS: dict[str, MetricInfo] = {
    m.key: m
    for m in (
        MetricInfo("psnr", "PSNR", "dB", "higher", fmt=".2f"),
        MetricInfo("ssim", "SSIM", "", "higher", fmt=".4f"),
        MetricInfo("ms_ssim", "MS-SSIM", "", "higher", fmt=".4f"),
        MetricInfo("lpips", "LPIPS", "", "lower", fmt=".4f"),
        MetricInfo("rfid", "rFID", "", "lower", fmt=".2f"),
        MetricInfo("saturation_ratio", "saturation ratio", "x", "target", 1.0, ".3f", "satur."),
        MetricInfo("colourfulness_change", "colourfulness change", "%", "target", 0.0, "+.1f", "colourf."),
        MetricInfo("delta_e", "colour shift (dE00)", "", "lower", fmt=".2f", short="dE00"),
        MetricInfo("encode_s_per_mpx", "encode time", "s/Mpx", "lower", fmt="auto", short="encode"),
        MetricInfo("decode_s_per_mpx", "decode time", "s/Mpx", "lower", fmt="auto", short="decode"),
        MetricInfo("peak_mib", "peak memory", "MiB", "lower", fmt=".0f", short="peak mem"),
    )
}
QUALITY_METRICS = ("psnr", "ssim", "ms_ssim", "lpips", "saturation_ratio", "colourfulness_change", "delta_e")


def _check_pair(ref: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if ref.shape != out.shape or ref.ndim != 3 or ref.shape[0] != 3:
        shapes = f"{tuple(ref.shape)} and {tuple(out.shape)}"
        raise BadInputError(f"metrics take two (3, H, W) images of one size, got {shapes}")
    return ref.detach().float().cpu().unsqueeze(0), out.detach().float().cpu().unsqueeze(0)


def psnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB (data range 1), capped at 100 dB for identical images."""
    a, b = _check_pair(ref, out)
    if torch.equal(a, b):
        return PSNR_CAP_DB
    return min(float(peak_signal_noise_ratio(b, a, data_range=1.0)), PSNR_CAP_DB)


def ssim(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Structural similarity (Wang et al. 2004), mean over the image and its three channels."""
    a, b = _check_pair(ref, out)
    return float(structural_similarity_index_measure(b, a, data_range=1.0, kernel_size=SSIM_KERNEL, sigma=1.5))


def ms_ssim_scales(height: int, width: int) -> int:
    """How many MS-SSIM scales an image of this size allows (5 is standard; 0 means too small to measure).

    torchmetrics needs each side >= 2**scales and side // (scales - 1)**2 > kernel - 1, so 5 scales need a short
    side of at least 176 px, 4 scales 99 px, 3 scales 44 px and 2 scales 11 px.
    """
    side = min(height, width)
    for n in range(len(MS_SSIM_WEIGHTS), 1, -1):
        if side >= 2**n and side // max(1, n - 1) ** 2 > SSIM_KERNEL - 1:
            return n
    return 0


def ms_ssim(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, int]:
    """Multi-scale SSIM and the number of scales used; (nan, 0) for images too small to measure.

    Images too small for five scales use the first (finest) scales with their weights renormalised to sum to 1.
    """
    a, b = _check_pair(ref, out)
    n = ms_ssim_scales(a.shape[2], a.shape[3])
    if n == 0:
        return math.nan, 0
    weights = MS_SSIM_WEIGHTS[:n]
    betas = tuple(w / sum(weights) for w in weights) if n < len(MS_SSIM_WEIGHTS) else MS_SSIM_WEIGHTS
    value = multiscale_structural_similarity_index_measure(
        b, a, data_range=1.0, kernel_size=SSIM_KERNEL, sigma=1.5, betas=betas, normalize="relu"
    )
    return float(value), n


def _hwc(image: torch.Tensor) -> np.ndarray:
    return image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy().astype(np.float64)


def mean_saturation(image: torch.Tensor) -> float:
    """Mean HSV saturation of an image (3, H, W) in [0, 1]."""
    return float(color.rgb2hsv(_hwc(image))[..., 1].mean())


def colourfulness(image: torch.Tensor) -> float:
    """Hasler and Suesstrunk's colourfulness metric M (0 = grey; 0-255 value scale as in the paper)."""
    rgb = _hwc(image) * 255.0
    rg = rgb[..., 0] - rgb[..., 1]
    yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    return float(math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean()))


def delta_e(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Mean CIEDE2000 colour difference between two images (sRGB, D65)."""
    a, b = _check_pair(ref, out)
    return float(color.deltaE_ciede2000(color.rgb2lab(_hwc(a[0])), color.rgb2lab(_hwc(b[0]))).mean())


def colour_fidelity(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """Saturation ratio, colourfulness change (%) and mean Delta E 00 of ``out`` against ``ref``.

    A ratio or change is nan where the input has (almost) no colour to compare with (a grey image).
    """
    sat_in, sat_out = mean_saturation(ref), mean_saturation(out)
    col_in, col_out = colourfulness(ref), colourfulness(out)
    return {
        "saturation_ratio": sat_out / sat_in if sat_in > 1e-3 else math.nan,
        "colourfulness_change": 100.0 * (col_out / col_in - 1.0) if col_in > 1.0 else math.nan,
        "delta_e": delta_e(ref, out),
    }


def image_metrics(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """Every built-in quality metric of ``out`` against ``ref`` (plus ``ms_ssim_scales``)."""
    ms, scales = ms_ssim(ref, out)
    return {
        "psnr": psnr(ref, out),
        "ssim": ssim(ref, out),
        "ms_ssim": ms,
        "ms_ssim_scales": float(scales),
        **colour_fidelity(ref, out),
    }


def colour_flags(saturation_ratio: float, colourfulness_change: float, delta_e_mean: float) -> list[str]:
    """Plain-words warnings for the mean colour metrics of a VAE (empty when colours are faithful)."""
    flags = []
    if saturation_ratio < DESATURATED_BELOW:
        flags.append(
            f"foggy/desaturated: colours keep only {saturation_ratio:.0%} of their saturation "
            "(wrong or missing VAE, or wrong latent scaling?)"
        )
    elif saturation_ratio > OVERSATURATED_ABOVE:
        flags.append(f"oversaturated: saturation is {saturation_ratio:.0%} of the input's")
    if colourfulness_change < WASHED_OUT_CHANGE:
        flags.append(f"washed out: colourfulness drops by {-colourfulness_change:.0f}%")
    if delta_e_mean > COLOUR_SHIFT_ABOVE:
        flags.append(f"colour shift: mean dE00 {delta_e_mean:.1f} (visible at a glance above ~3)")
    return flags
