"""Anomaly detection with a VAE: images the VAE cannot explain well score high.

Two scores per image, both in nats per pixel value (lower is more normal):

* ``recon``: ``-log p(x | z)`` per pixel value under a Gaussian decoder likelihood whose variance is fitted on the
  normal set. A VAE loses fine detail, so its error is larger in textured regions than in flat ones; the variance
  depends on the local variance of the reconstruction (5x5 pixels), in 8 bins with equal shares of the normal
  set's pixels, each with its own mean squared error. Noise in a flat region, or a hard edge where normal
  images have none, is then unlikely even though a textured normal photo has a larger raw error.
* ``elbo``: the negative evidence lower bound, ``-log p(x | z) + KL(q(z | x) || p(z))`` per pixel value. The
  prior p(z) is a Gaussian over latent cells (full covariance across channels) fitted to the normal set's
  posteriors rather than N(0, I): the VAEs of latent diffusion were trained with a KL weight near 1e-6, so their
  latents are nowhere near N(0, I) and a KL against it would measure mostly their scale. The tiny VAE has a
  deterministic encoder; its KL term is the cross-entropy -log p(z) of the latent instead.

The threshold of each score is its (1 - fpr) quantile on the normal set, so about a fraction ``fpr`` of normal
images is flagged. The fitted detector is a small JSON file that records the VAE's weights hash; scoring with
another VAE is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vaekit import validation
from vaekit.errors import BadInputError, LoadError
from vaekit.formats.io import write_json
from vaekit.latent.render import heat_colors
from vaekit.ops import codec as pipeline
from vaekit.vae import VAE

PathLike = str | os.PathLike[str]
FORMAT_NAME = "vaekit-anomaly"
FORMAT_VERSION = 1
SCORES = ("elbo", "recon")
CONTEXT_BINS = 8
_LOG_2PI = math.log(2 * math.pi)


def weights_sha256(vae: VAE) -> str:
    """SHA-256 of the VAE's weights (names and float32 values), independent of file layout, metadata and dtype."""
    h = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class AnomalyModel:
    """A fitted detector: the decoder noise variance, the latent prior, thresholds and the VAE it belongs to."""

    vae_name: str
    vae_weights_sha256: str
    family: str
    score: str  # the score that gives the verdict: "elbo" or "recon"
    fpr: float
    thresholds: dict[str, float]
    noise_var: float  # the mean squared reconstruction error of the normal set (all bins together)
    context_edges: list[float]  # bin edges of the reconstruction's local variance
    context_vars: list[float]  # the decoder noise variance of each bin
    prior_mean: list[float]
    prior_cov: list[list[float]]
    max_side: int | None
    normal_scores: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to disk."""
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, **asdict(self)}

    def check_vae(self, vae: VAE, sha: str | None = None) -> None:
        """Refuse a VAE other than the one this detector was fitted on."""
        sha = sha or weights_sha256(vae)
        if sha != self.vae_weights_sha256:
            raise BadInputError(
                f"this anomaly model was fitted on the VAE {self.vae_name!r} (weights {self.vae_weights_sha256[:10]}), "
                f"not on {vae.origin.name!r} (weights {sha[:10]}); fit it again with this VAE"
            )


@dataclass
class AnomalyScore:
    """One image's scores, verdict and heatmap."""

    recon: float  # nats per pixel value from the reconstruction error alone
    elbo: float  # negative ELBO, nats per pixel value
    mse: float  # plain mean squared reconstruction error, images in [0, 1]
    score: float  # the value of the model's chosen score
    threshold: float
    anomalous: bool
    heatmap: torch.Tensor = field(repr=False)  # (3, H, W) in [0, 1]: where the reconstruction fails

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers for JSON output."""
        return {k: v for k, v in asdict(self).items() if k != "heatmap"}


@dataclass
class _Measured:
    """What the VAE says about one image, before any fitted quantity is applied."""

    image: torch.Tensor  # (3, H, W) as scored (after any resize)
    error: torch.Tensor  # (H, W) squared error averaged over RGB
    mean: torch.Tensor  # (cells, C) raw posterior means
    var: torch.Tensor | None  # (cells, C) raw posterior variances (None: deterministic encoder)
    context: torch.Tensor | None = None  # (H, W) local variance of the reconstruction's luminance


def _fit_size(image: torch.Tensor, max_side: int | None) -> torch.Tensor:
    h, w = image.shape[-2:]
    if max_side is None or max(h, w) <= max_side:
        return image
    s = max_side / max(h, w)
    size = (max(1, round(h * s)), max(1, round(w * s)))
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def _measure_batch(vae: VAE, images: list[torch.Tensor]) -> list[_Measured]:
    """Encode and decode a batch of same-size images (3, H, W) once; per image its error map and posterior."""
    h, w = images[0].shape[-2:]
    batch = torch.stack(images)
    enc = pipeline.encode(vae, batch)
    latents, mean, logvar = enc.latents, enc.mean, enc.logvar
    assert isinstance(latents, torch.Tensor)  # a batch tensor in, batch tensors out
    if not isinstance(mean, torch.Tensor):
        mean = latents  # the tiny VAE: a deterministic encoder, whose latent is its scaled "mean"
    recon = vae.decode(latents, image_size=(w, h)).float().cpu()
    errors = ((recon - batch) ** 2).mean(1)
    contexts = _local_variance(recon)
    c = mean.shape[1]
    cells = mean.float().cpu().permute(0, 2, 3, 1).reshape(len(images), -1, c).double()
    var = None
    if isinstance(logvar, torch.Tensor):
        var = logvar.float().cpu().exp().permute(0, 2, 3, 1).reshape(len(images), -1, c).double()
    return [
        _Measured(img, errors[i], cells[i], None if var is None else var[i], contexts[i])
        for i, img in enumerate(images)
    ]


def _local_variance(images: torch.Tensor) -> torch.Tensor:
    """Variance of the luminance over each pixel's 5x5 neighbourhood: (N, 3, H, W) -> (N, H, W)."""
    grey = images.mean(1, keepdim=True).double()
    mean = F.avg_pool2d(grey, 5, stride=1, padding=2, count_include_pad=False)
    mean_sq = F.avg_pool2d(grey * grey, 5, stride=1, padding=2, count_include_pad=False)
    return (mean_sq - mean * mean).clamp_min(0)[:, 0]


def _pixel_vars(m: _Measured, edges: torch.Tensor, bin_vars: torch.Tensor) -> torch.Tensor:
    """The fitted decoder noise variance at each pixel of ``m``: its bin of local variance."""
    assert m.context is not None
    return bin_vars[torch.bucketize(m.context, edges)]


def _measure(vae: VAE, images: Iterable[torch.Tensor], max_side: int | None, batch_size: int = 8) -> list[_Measured]:
    """Measure every image, batching consecutive images of one size (after the ``max_side`` resize)."""
    out: list[_Measured] = []
    pending: list[torch.Tensor] = []
    for image in images:
        image = _fit_size(validation.image_batch(image, vae.config.in_channels)[0].float().cpu(), max_side)
        if pending and (image.shape != pending[0].shape or len(pending) == batch_size):
            out.extend(_measure_batch(vae, pending))
            pending = []
        pending.append(image)
    if pending:
        out.extend(_measure_batch(vae, pending))
    return out


def _latent_nats(m: _Measured, prior_mean: torch.Tensor, prior_cov: torch.Tensor) -> float:
    """KL(q || prior) summed over cells (or the cross-entropy -log prior(mean) for a deterministic encoder)."""
    c = prior_mean.numel()
    chol = torch.linalg.cholesky(prior_cov)
    logdet_p = 2 * torch.log(torch.diagonal(chol)).sum()
    diff = (m.mean - prior_mean).T  # (C, cells)
    maha = (torch.cholesky_solve(diff, chol) * diff).sum(0)  # (cells,)
    if m.var is None:
        return float(0.5 * (maha + logdet_p + c * _LOG_2PI).sum())
    inv_diag = torch.cholesky_inverse(chol).diagonal()
    trace = (m.var * inv_diag).sum(1)
    logdet_q = torch.log(m.var).sum(1)
    return float(0.5 * (trace + maha - c + logdet_p - logdet_q).sum())


def _scores(
    m: _Measured, edges: torch.Tensor, bin_vars: torch.Tensor, prior_mean: torch.Tensor, prior_cov: torch.Tensor
) -> dict[str, float]:
    dims = 3 * m.error.numel()
    v = _pixel_vars(m, edges, bin_vars)
    # m.error is the mean over RGB, so this is the Gaussian NLL averaged over every pixel value.
    recon = float((0.5 * m.error.double() / v + 0.5 * torch.log(2 * math.pi * v)).mean())
    elbo = recon + _latent_nats(m, prior_mean, prior_cov) / dims
    return {"recon": recon, "elbo": elbo, "mse": float(m.error.double().mean())}


def fit_anomaly(
    vae: VAE,
    images: Iterable[torch.Tensor],
    fpr: float = 0.05,
    score: str = "elbo",
    max_side: int | None = 512,
) -> AnomalyModel:
    """Fit a detector on normal images (each (3, H, W) in [0, 1]): noise variance, latent prior, thresholds."""
    if score not in SCORES:
        raise BadInputError(f"unknown score {score!r}: use elbo or recon")
    if not 0 < fpr < 1:
        raise BadInputError(f"the false-positive rate must be between 0 and 1, got {fpr}")
    measured = _measure(vae, images, max_side)
    if len(measured) < 2:
        raise BadInputError("fitting an anomaly model needs at least 2 normal images")
    errors = torch.cat([m.error.double().flatten() for m in measured])
    contexts = torch.cat([m.context.flatten() for m in measured if m.context is not None])
    noise_var = max(float(errors.mean()), 1e-8)
    step = max(1, len(contexts) // 1_000_000)  # torch.quantile takes at most 16M values; 1M is plenty
    edges = torch.quantile(contexts[::step], torch.linspace(0, 1, CONTEXT_BINS + 1, dtype=torch.float64)[1:-1])
    bins = torch.bucketize(contexts, edges)
    bin_vars = torch.tensor(
        [float(errors[bins == k].mean()) if bool((bins == k).any()) else noise_var for k in range(CONTEXT_BINS)],
        dtype=torch.float64,
    ).clamp_min(1e-8)
    means = torch.cat([m.mean for m in measured])
    prior_mean = means.mean(0)
    # The aggregate posterior's covariance: the spread of the means plus the average posterior variance.
    cov = torch.cov(means.T).reshape(means.shape[1], means.shape[1])
    if measured[0].var is not None:
        cov = cov + torch.diag(torch.cat([m.var for m in measured]).mean(0))
    cov = cov + torch.eye(len(prior_mean), dtype=cov.dtype) * 1e-6 * float(cov.diagonal().mean().clamp_min(1e-12))
    per_image = [_scores(m, edges, bin_vars, prior_mean, cov) for m in measured]
    normal = {k: [s[k] for s in per_image] for k in SCORES}
    # "higher": a threshold that is an observed score, so at most a fraction fpr of the normal set lies above it.
    thresholds = {k: float(np.quantile(np.array(v), 1 - fpr, method="higher")) for k, v in normal.items()}
    return AnomalyModel(
        vae_name=vae.origin.name,
        vae_weights_sha256=weights_sha256(vae),
        family=vae.family,
        score=score,
        fpr=fpr,
        thresholds=thresholds,
        noise_var=noise_var,
        context_edges=edges.tolist(),
        context_vars=bin_vars.tolist(),
        prior_mean=prior_mean.tolist(),
        prior_cov=cov.tolist(),
        max_side=max_side,
        normal_scores=normal,
    )


def heatmap(image: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """Heat colours over a grey copy of ``image`` from ``ratio``, the squared error over its expected value:
    the normal level (1) is dark, 100 times that is bright yellow.
    """
    smooth = F.avg_pool2d(ratio[None, None].float(), 5, stride=1, padding=2, count_include_pad=False)[0, 0]
    level = (torch.log10(smooth + 1e-12) / 2).clamp(0, 1)
    grey = image.float().mean(0, keepdim=True).expand(3, -1, -1)
    return (0.35 * grey + 0.65 * heat_colors(level)).clamp(0, 1)


def score_images(model: AnomalyModel, vae: VAE, images: Iterable[torch.Tensor]) -> list[AnomalyScore]:
    """Score images with a fitted detector (refused for a VAE other than the one it was fitted on)."""
    model.check_vae(vae)
    prior_mean = torch.tensor(model.prior_mean, dtype=torch.float64)
    prior_cov = torch.tensor(model.prior_cov, dtype=torch.float64)
    if prior_mean.numel() != vae.latent_channels:
        raise BadInputError(
            f"the anomaly model's prior has {prior_mean.numel()} channels, the VAE {vae.latent_channels}"
        )
    threshold = model.thresholds[model.score]
    edges = torch.tensor(model.context_edges, dtype=torch.float64)
    bin_vars = torch.tensor(model.context_vars, dtype=torch.float64)
    results = []
    for m in _measure(vae, images, model.max_side):
        s = _scores(m, edges, bin_vars, prior_mean, prior_cov)
        value = s[model.score]
        results.append(
            AnomalyScore(
                recon=s["recon"],
                elbo=s["elbo"],
                mse=s["mse"],
                score=value,
                threshold=threshold,
                anomalous=value > threshold,
                heatmap=heatmap(m.image, m.error.double() / _pixel_vars(m, edges, bin_vars)),
            )
        )
    return results


def save_anomaly_model(model: AnomalyModel, path: PathLike, overwrite: bool = False) -> Path:
    """Write the detector as JSON, atomically."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        raise BadInputError(f"{path}: anomaly models are saved as .json")
    if path.exists() and not overwrite:
        raise BadInputError(f"{path}: already exists (pass --overwrite to replace it)")
    write_json(model.to_dict(), path)
    return path


def load_anomaly_model(path: PathLike) -> AnomalyModel:
    """Read a detector written by :func:`save_anomaly_model`; a one-line error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"{path}: not a vaekit anomaly model (not JSON: {e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise LoadError(f'{path}: not a vaekit anomaly model (no "format": "{FORMAT_NAME}")')
    if int(data.get("version", 0)) > FORMAT_VERSION:
        raise LoadError(f"{path}: anomaly model version {data['version']} is newer than this vaekit reads")
    fields = {k: v for k, v in data.items() if k not in ("format", "version")}
    try:
        model = AnomalyModel(**fields)
        c = len(model.prior_mean)
        if len(model.prior_cov) != c or any(len(row) != c for row in model.prior_cov) or model.score not in SCORES:
            raise ValueError("prior or score malformed")
        if model.score not in model.thresholds or not model.noise_var > 0:
            raise ValueError("thresholds or noise variance malformed")
        if len(model.context_vars) != len(model.context_edges) + 1 or min(model.context_vars) <= 0:
            raise ValueError("decoder noise bins malformed")
    except (TypeError, ValueError) as e:
        raise LoadError(f"{path}: damaged anomaly model ({e})") from None
    return model
