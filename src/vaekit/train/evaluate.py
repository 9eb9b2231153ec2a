"""Held-out figures of a trained VAE, as its model card reports them: PSNR/SSIM of round trips through the public
API (posterior mode, clamped decode) at full size and on central crops.

    python -m vaekit.train.evaluate src/vaekit/weights/vaekit-small.safetensors skimage:chelsea.png skimage:coffee.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

import torch

from vaekit.eval.metrics import psnr, ssim
from vaekit.ops.images import crop_padding, load_image, pad_to_multiple
from vaekit.train.data import expand_inputs
from vaekit.vae import VAE, load_vae

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class ImageScore:
    """PSNR (dB) and SSIM of one image's round trip."""

    name: str
    size: str
    psnr: float
    ssim: float


def round_trip(vae: VAE, rgb: torch.Tensor) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> its reconstruction, reflect-padded to the VAE's multiple and cropped back."""
    padded, pad = pad_to_multiple(rgb[None], vae.downscale)
    out = vae.decode(vae.encode(padded))
    return crop_padding(out, pad)[0]


def score_images(vae: VAE, inputs: list[str], crop: int | None = None) -> list[ImageScore]:
    """Round-trip scores of every input image at full size, or of its central ``crop`` square."""
    scores = []
    for path in expand_inputs(inputs):
        rgb = load_image(path).rgb
        h, w = rgb.shape[-2:]
        if crop is not None:
            if min(h, w) < crop:
                continue
            top, left = (h - crop) // 2, (w - crop) // 2
            rgb = rgb[:, top : top + crop, left : left + crop]
        out = round_trip(vae, rgb)
        scores.append(ImageScore(path.name, f"{rgb.shape[2]}x{rgb.shape[1]}", psnr(rgb, out), ssim(rgb, out)))
    return scores


def summary(vae: VAE, inputs: list[str], crop: int = 256) -> dict[str, object]:
    """Per-image and mean PSNR/SSIM at full size and on central ``crop`` crops."""
    result: dict[str, object] = {}
    for label, size in (("full", None), (f"crop{crop}", crop)):
        rows = score_images(vae, inputs, size)
        result[label] = {
            "images": [r.__dict__ for r in rows],
            "mean_psnr": sum(r.psnr for r in rows) / max(len(rows), 1),
            "mean_ssim": sum(r.ssim for r in rows) / max(len(rows), 1),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    """Print the JSON summary for a VAE file (default: the bundled one) and images."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vae", nargs="?", default=None, help="VAE file (default: the bundled vaekit-small)")
    parser.add_argument("images", nargs="*", default=["skimage:chelsea.png", "skimage:coffee.png"])
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    vae = load_vae(args.vae, device="cpu")
    print(json.dumps(summary(vae, args.images, args.crop), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
