"""LPIPS and rFID from weights the user already has on disk; nothing is ever downloaded.

LPIPS (Zhang et al. 2018, v0.1): the library implementations (``lpips``, torchmetrics) fetch their ImageNet
backbone through torchvision's downloader, so vaekit runs the same computation on a backbone file the user gives:

- the backbone: torchvision's AlexNet (``alexnet-owt-7be5be79.pth``) or VGG16 (``vgg16-397923af.pth``) state dict
  (``features.N.weight`` / ``features.N.bias``), or an ``lpips.LPIPS`` state dict (``net.sliceK.N.weight``);
- the linear heads (``linK.model.1.weight``): taken from the same file(s) when present, else from the v0.1 files
  torchmetrics ships inside its package (``torchmetrics/functional/image/lpips_models/{alex,vgg}.pth``).

Input in [0, 1] -> [-1, 1] -> LPIPS' scaling layer -> backbone taps after each ReLU stage -> unit-normalised over
channels -> squared difference -> 1x1 linear head -> spatial mean -> sum over the five taps.

rFID: the Frechet distance between Inception-v3 pool features (2048-d) of the inputs and of the reconstructions.
The feature extractor is torch-fidelity's TensorFlow-compatible Inception-v3 (the network of the FID paper),
which needs the optional packages ``torch-fidelity`` and ``torchvision`` (``pip install 'vaekit[fid]'``) and the
weights file ``pt_inception-2015-12-05-6726825d.pth``. The file is read safely (tensors only) before torch-fidelity
sees a re-saved copy of those tensors. FID over a handful of images is strongly biased upwards: compare rows
against each other on the same images, never against published numbers.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vaekit.errors import BadInputError, LoadError
from vaekit.formats.io import TensorFile

PathLike = str | os.PathLike[str]

# LPIPS' scaling layer: ImageNet statistics expressed for inputs in [-1, 1].
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
# torchvision layouts of ``features``: ("C", in, out, kernel, stride, padding), "R" ReLU, "M" max-pool 3/2 or 2/2.
_ALEX = [("C", 3, 64, 11, 4, 2), "R", "M3", ("C", 64, 192, 5, 1, 2), "R", "M3"]
_ALEX += [("C", 192, 384, 3, 1, 1), "R", ("C", 384, 256, 3, 1, 1), "R", ("C", 256, 256, 3, 1, 1), "R"]
_VGG_CHANNELS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
BACKBONES = {
    # name: (layers, indices of the ReLU outputs LPIPS taps, channels of the taps)
    "alex": (_ALEX, (1, 4, 7, 9, 11), (64, 192, 384, 256, 256)),
    "vgg": (None, (3, 8, 15, 22, 29), (64, 128, 256, 512, 512)),
}


def _vgg_layers() -> list[object]:
    layers: list[object] = []
    c_in = 3
    for v in _VGG_CHANNELS:
        if v == "M":
            layers.append("M2")
        else:
            layers += [("C", c_in, v, 3, 1, 1), "R"]
            c_in = int(v)
    return layers


def _features(name: str) -> nn.Sequential:
    spec = BACKBONES[name][0] or _vgg_layers()
    mods: list[nn.Module] = []
    for layer in spec:
        if layer == "R":
            mods.append(nn.ReLU())
        elif layer == "M3":
            mods.append(nn.MaxPool2d(3, 2))
        elif layer == "M2":
            mods.append(nn.MaxPool2d(2, 2))
        else:
            _, cin, cout, k, s, p = layer  # type: ignore[misc]
            mods.append(nn.Conv2d(cin, cout, k, s, p))
    return nn.Sequential(*mods)


class LPIPS(nn.Module):
    """LPIPS v0.1 with a local AlexNet or VGG16 backbone (``net``: "alex" or "vgg")."""

    def __init__(self, net: str) -> None:
        super().__init__()
        if net not in BACKBONES:
            raise BadInputError(f"unknown LPIPS backbone {net!r}; use alex or vgg")
        self.net = net
        self.features = _features(net)
        _, self.taps, chns = BACKBONES[net]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in chns)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
                if i == self.taps[-1]:
                    break
        return out

    @torch.inference_mode()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Distance per image of two batches (N, 3, H, W) in [0, 1]; shape (N,)."""
        fa = self._taps(((a * 2 - 1) - self.shift) / self.scale)
        fb = self._taps(((b * 2 - 1) - self.shift) / self.scale)
        total = torch.zeros(a.shape[0], device=a.device)
        for lin, x, y in zip(self.lins, fa, fb, strict=True):
            x = x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            y = y / (y.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total += lin((x - y) ** 2).mean(dim=(1, 2, 3))
        return total


def _read(path: PathLike) -> dict[str, torch.Tensor]:
    try:
        return TensorFile(path).load()
    except LoadError as e:
        raise BadInputError(f"--lpips-weights: {e}") from None


def _backbone_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision ``features.N.*`` keys, from a torchvision file or an ``lpips.LPIPS`` one (``net.sliceK.N.*``)."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "features" and len(parts) == 3:
            out[k] = v
        elif len(parts) == 4 and parts[0] == "net" and parts[1].startswith("slice"):
            out[f"features.{parts[2]}.{parts[3]}"] = v
    return out


def _lin_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``linK.model.1.weight`` (lpips and torchmetrics) -> ``lins.K.weight``."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if len(parts) == 4 and parts[0].startswith("lin") and parts[0][3:].isdigit() and parts[3] == "weight":
            out[f"lins.{parts[0][3:]}.weight"] = v
    return out


def shipped_lin_weights(net: str) -> Path | None:
    """The LPIPS v0.1 linear-head file shipped inside torchmetrics, if that package is installed."""
    import importlib.util

    spec = importlib.util.find_spec("torchmetrics")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "functional" / "image" / "lpips_models" / f"{net}.pth"
    return path if path.is_file() else None


def load_lpips(paths: Sequence[PathLike] | PathLike, device: torch.device | str = "cpu") -> LPIPS:
    """An :class:`LPIPS` from local files: a torchvision AlexNet/VGG16 backbone (+ optional linear heads)."""
    files = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    backbone: dict[str, torch.Tensor] = {}
    lins: dict[str, torch.Tensor] = {}
    for f in files:
        sd = _read(f)
        backbone.update(_backbone_keys(sd))
        lins.update(_lin_keys(sd))
    if not backbone:
        raise BadInputError(
            f"--lpips-weights {', '.join(map(str, files))}: no backbone found (expected a torchvision AlexNet or "
            "VGG16 state dict with features.N.weight keys, e.g. alexnet-owt-7be5be79.pth)"
        )
    first = backbone.get("features.0.weight")
    net = "alex" if first is not None and tuple(first.shape) == (64, 3, 11, 11) else "vgg"
    model = LPIPS(net)
    if not lins:
        shipped = shipped_lin_weights(net)
        if shipped is None:
            raise BadInputError(f"--lpips-weights: no LPIPS linear heads given and none shipped for {net}")
        lins = _lin_keys(_read(shipped))
    try:
        model.load_state_dict({**backbone, **lins}, strict=True)
    except RuntimeError as e:
        first_line = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first_line[:3])[:300]
        raise BadInputError(f"--lpips-weights: not LPIPS {net} weights ({detail})") from None
    return model.eval().requires_grad_(False).to(device)


def lpips(model: LPIPS, ref: torch.Tensor, out: torch.Tensor) -> float:
    """LPIPS distance of two images (3, H, W) in [0, 1] (0 = identical; lower is better)."""
    dev = next(model.parameters()).device
    return float(model(ref[None].float().to(dev), out[None].float().to(dev))[0])


# --- rFID ----------------------------------------------------------------------------------------------------------
class InceptionFeatures:
    """torch-fidelity's FID Inception-v3 with local weights: images in [0, 1] -> 2048-d pool features."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device

    @torch.inference_mode()
    def __call__(self, images: Sequence[torch.Tensor]) -> np.ndarray:
        """Features (N, 2048) as float64 NumPy."""
        feats = []
        for img in images:
            x = (img.clamp(0, 1) * 255).round().to(torch.uint8)[None].to(self.device)
            feats.append(self.model(x)[0].reshape(1, -1).double().cpu())
        return torch.cat(feats).numpy()


def load_inception(path: PathLike, device: torch.device | str = "cpu") -> InceptionFeatures:
    """torch-fidelity's Inception-v3 feature extractor with the weights at ``path`` (read safely first)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise BadInputError(
            "--inception-weights: rFID needs the optional packages torch-fidelity and torchvision "
            "(pip install 'vaekit[fid]'); nothing was downloaded"
        ) from None
    try:
        sd = TensorFile(path).load()
    except LoadError as e:
        raise BadInputError(f"--inception-weights: {e}") from None
    with tempfile.TemporaryDirectory() as tmp:
        # torch-fidelity unpickles its file without weights_only; give it a file we wrote that holds only tensors.
        clean = Path(tmp) / "inception.pth"
        torch.save(sd, clean)
        try:
            model = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(clean)
            )
        except RuntimeError as e:
            detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise BadInputError(f"--inception-weights {path}: not the FID Inception-v3 weights ({detail})") from None
    dev = torch.device(device)
    return InceptionFeatures(model.eval().to(dev), dev)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D): |mu_a - mu_b|^2 +
    Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), as in the FID paper (Heusel et al. 2017) and pytorch-fid."""
    from scipy import linalg

    if a.shape[0] < 2 or b.shape[0] < 2:
        return math.nan
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():  # few samples make the product singular; handled just below
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(s_a @ s_b)
        if not np.isfinite(covmean).all():  # offset the diagonals as pytorch-fid does
            offset = np.eye(s_a.shape[0]) * 1e-6
            covmean = linalg.sqrtm((s_a + offset) @ (s_b + offset))
    covmean = np.real(covmean)
    diff = mu_a - mu_b
    return float(max(0.0, diff @ diff + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean)))


def rfid(features: InceptionFeatures, real: Sequence[torch.Tensor], fake: Sequence[torch.Tensor]) -> float:
    """Reconstruction FID between inputs and reconstructions (nan with fewer than two images)."""
    return frechet_distance(features(real), features(fake))
