"""Latent space tools: sampling, interpolation, previews, channel views, forward noise, augmentation, anomalies."""

from vaekit.latent.anomaly import (
    AnomalyModel,
    AnomalyScore,
    fit_anomaly,
    load_anomaly_model,
    save_anomaly_model,
    score_images,
    weights_sha256,
)
from vaekit.latent.augmentation import augment
from vaekit.latent.channels import ChannelStats, channel_images, channel_sheet, channel_stats
from vaekit.latent.interpolation import interpolate, interpolate_latents, lerp, slerp
from vaekit.latent.noise import add_noise, alphas_cumprod, noise_strip, signal_level
from vaekit.latent.preview import (
    PreviewFit,
    PreviewMap,
    family_preview_map,
    fit_preview_map,
    latent_to_rgb,
    preview_images,
    preview_map_for,
    published_factors,
    read_preview_map,
    store_preview_map,
)
from vaekit.latent.sampling import sample, sample_latents

__all__ = [
    "published_factors",
    "AnomalyModel",
    "AnomalyScore",
    "ChannelStats",
    "PreviewFit",
    "PreviewMap",
    "add_noise",
    "alphas_cumprod",
    "augment",
    "channel_images",
    "channel_sheet",
    "channel_stats",
    "family_preview_map",
    "fit_anomaly",
    "fit_preview_map",
    "interpolate",
    "interpolate_latents",
    "latent_to_rgb",
    "lerp",
    "load_anomaly_model",
    "noise_strip",
    "preview_images",
    "preview_map_for",
    "read_preview_map",
    "sample",
    "sample_latents",
    "save_anomaly_model",
    "score_images",
    "signal_level",
    "slerp",
    "store_preview_map",
    "weights_sha256",
]
