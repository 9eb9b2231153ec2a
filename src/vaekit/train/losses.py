"""Objectives of VAE training: reconstruction (L1/MSE), SSIM/MS-SSIM, KL, PatchGAN hinge loss, optional LPIPS.

SSIM and MS-SSIM are torchmetrics' (differentiable); LPIPS is vaekit's local-weights network
(:mod:`vaekit.eval.perceptual`), used only when the user gives a backbone file: nothing is downloaded.

Every term is a per-pixel mean. The LDM recipe sums the reconstruction over pixels and the KL over latent
elements and weights the KL by 1e-6; here the KL sum is divided by the pixel count, so ``kl_weight=1e-6``
keeps exactly its meaning in that recipe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    structural_similarity_index_measure,
)

from vaekit.eval.metrics import MS_SSIM_WEIGHTS, ms_ssim_scales

PathLike = str | os.PathLike[str]


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over latent elements, averaged over the batch."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean()


def ssim_similarity(x: torch.Tensor, y: torch.Tensor, kind: str = "ssim") -> torch.Tensor:
    """SSIM or MS-SSIM of images in [0, 1] (differentiable), averaged over the batch.

    MS-SSIM on crops too small for five scales uses the finest scales that fit, weights renormalised.
    """
    x, y = x.float(), y.float()
    if kind == "ssim" or ms_ssim_scales(*x.shape[-2:]) < 2:
        return structural_similarity_index_measure(y, x, data_range=1.0, kernel_size=11, sigma=1.5)
    weights = MS_SSIM_WEIGHTS[: ms_ssim_scales(*x.shape[-2:])]
    betas = tuple(w / sum(weights) for w in weights)
    return multiscale_structural_similarity_index_measure(
        y, x, data_range=1.0, kernel_size=11, sigma=1.5, betas=betas, normalize="relu"
    )


class PatchDiscriminator(nn.Module):
    """The PatchGAN discriminator of pix2pix and LDM: strided 4x4 convs, one real/fake logit per patch."""

    def __init__(self, in_channels: int = 3, width: int = 64, layers: int = 3) -> None:
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = width
        for i in range(1, layers + 1):
            out = width * min(2**i, 8)
            stride = 2 if i < layers else 1
            seq += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2, True)]
            ch = out
        seq.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.main = nn.Sequential(*seq)
        for m in self.modules():  # the pix2pix initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 * (mean relu(1 - real) + mean relu(1 + fake))."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, scale: float
) -> torch.Tensor:
    """LDM's balance of the GAN term: |grad rec| / |grad gan| at the decoder's last layer, clamped, times scale."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, 1e4).detach() * scale


def lpips_distance(net: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Differentiable LPIPS of batches in [0, 1] with a :class:`vaekit.eval.perceptual.LPIPS` network; shape (N,).

    Same computation as that network's forward, which runs under inference mode and so cannot train.
    """

    def taps(x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        x = ((x * 2 - 1) - net.shift) / net.scale
        for i, layer in enumerate(net.features):
            x = layer(x)
            if i in net.taps:
                out.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
                if i == net.taps[-1]:
                    break
        return out

    total = torch.zeros(a.shape[0], device=a.device)
    for lin, fa, fb in zip(net.lins, taps(a), taps(b), strict=True):
        total = total + lin((fa - fb) ** 2).mean(dim=(1, 2, 3))
    return total


def load_lpips(weights: PathLike) -> nn.Module:
    """LPIPS from a local torchvision AlexNet/VGG16 (or lpips) state-dict file; nothing is downloaded."""
    from vaekit.eval.perceptual import load_lpips as load

    return load(weights)


@dataclass
class LossTerms:
    """The parts of one generator step's loss (floats for logging) and the total to back-propagate."""

    total: torch.Tensor
    parts: dict[str, float]


class VAELoss(nn.Module):
    """Reconstruction + SSIM + KL (+ LPIPS, + adaptive-weighted GAN after ``disc_start``) for the autoencoder;
    optionally the learned log-variance of LDM's ``LPIPSWithDiscriminator`` (rec / exp(s) + s).
    """

    def __init__(
        self,
        reconstruction: str = "l1",
        ssim_weight: float = 0.0,
        ssim_kind: str = "ssim",
        kl_weight: float = 1e-6,
        learned_logvar: bool = False,
        disc_weight: float = 0.0,
        disc_start: int = 0,
        lpips_net: nn.Module | None = None,
        lpips_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.reconstruction = reconstruction
        self.ssim_weight = ssim_weight
        self.ssim_kind = ssim_kind
        self.kl_weight = kl_weight
        self.disc_weight = disc_weight
        self.disc_start = disc_start
        self.lpips_net = lpips_net
        self.lpips_weight = lpips_weight
        self.logvar = nn.Parameter(torch.zeros(())) if learned_logvar else None
        self.discriminator = PatchDiscriminator() if disc_weight > 0 else None

    def gan_active(self, step: int) -> bool:
        """Whether the discriminator takes part at this step."""
        return self.discriminator is not None and step >= self.disc_start

    def generator_loss(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        mean: torch.Tensor | None,
        logvar: torch.Tensor | None,
        step: int,
        last_layer: torch.Tensor | None,
    ) -> LossTerms:
        """Loss of the autoencoder on target ``x`` and reconstruction ``y`` (both [0, 1], float32)."""
        per_pixel = (y - x).abs() if self.reconstruction == "l1" else (y - x).pow(2)
        rec = per_pixel.mean()
        parts = {self.reconstruction: float(rec.detach())}
        if self.lpips_net is not None and self.lpips_weight > 0:
            lp = lpips_distance(self.lpips_net, y, x).mean()
            rec = rec + self.lpips_weight * lp
            parts["lpips"] = float(lp.detach())
        if self.logvar is not None:
            rec = rec / self.logvar.exp() + self.logvar
            parts["logvar"] = float(self.logvar.detach())
        total = rec
        if self.ssim_weight > 0:
            sim = ssim_similarity(x, y, self.ssim_kind)
            total = total + self.ssim_weight * (1 - sim)
            parts[self.ssim_kind] = float(sim.detach())
        if mean is not None and logvar is not None and self.kl_weight > 0:
            kl = kl_divergence(mean.float(), logvar.float()) / x[0].numel()
            total = total + self.kl_weight * kl
            parts["kl"] = float(kl.detach())
        if self.gan_active(step) and self.discriminator is not None:
            g_loss = -self.discriminator(y * 2 - 1).mean()
            if last_layer is not None and torch.is_grad_enabled():
                weight = adaptive_weight(total, g_loss, last_layer, self.disc_weight)
            else:
                weight = torch.tensor(self.disc_weight)
            total = total + weight * g_loss
            parts["g_loss"], parts["d_weight"] = float(g_loss.detach()), float(weight)
        parts["loss"] = float(total.detach())
        return LossTerms(total, parts)

    def discriminator_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Hinge loss of the discriminator on real ``x`` and detached reconstructions ``y``."""
        assert self.discriminator is not None
        return hinge_d_loss(self.discriminator(x * 2 - 1), self.discriminator(y.detach() * 2 - 1))
