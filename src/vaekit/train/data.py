"""Training images: collect a folder or list file, skip what cannot be used, split off validation, draw crops."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from vaekit.errors import BadInputError
from vaekit.ops.images import IMAGE_SUFFIXES, list_images, load_image

PathLike = str | os.PathLike[str]
LIST_SUFFIXES = (".txt", ".lst", ".list")
# The real photographs (colour and greyscale) in scikit-image's data folder: ``skimage`` as a data input.
# Left out: synthetic images (chessboards, color, phantom, logo, horse silhouette) and the tiny ones.
SKIMAGE_PHOTOS = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "cell.png",
    "chelsea.png",
    "clock_motion.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "moon.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "page.png",
    "retina.jpg",
    "rocket.jpg",
    "text.png",
)


def skimage_data_folder() -> Path:
    """scikit-image's data folder (installed with the package)."""
    import skimage

    return Path(skimage.__file__).parent / "data"


def _keyword(item: str) -> list[Path] | None:
    """``skimage`` (its real photos), ``skimage:NAME`` (one file of its data folder), ``builtin`` (vaekit's set)."""
    from vaekit.ops.images import builtin_image_paths

    if item == "builtin":
        return builtin_image_paths()
    if item == "skimage":
        return [skimage_data_folder() / n for n in SKIMAGE_PHOTOS if (skimage_data_folder() / n).is_file()]
    if item.startswith("skimage:"):
        path = skimage_data_folder() / item.split(":", 1)[1]
        if not path.is_file():
            raise BadInputError(f"{item}: no such file in scikit-image's data folder {skimage_data_folder()}")
        return [path]
    return None


def expand_inputs(inputs: list[PathLike] | tuple[PathLike, ...]) -> list[Path]:
    """Folders (recursive), image files, globs, list files (one path a line, ``#`` comments) and the keywords
    ``skimage``, ``skimage:NAME`` and ``builtin`` -> image paths.
    """
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        keyword = _keyword(str(item)) if not p.exists() else None
        if keyword is not None:
            paths.extend(keyword)
        elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
            base = p.parent
            lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
            entries = [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]
            for entry in entries:
                q = Path(entry).expanduser()
                q = q if q.is_absolute() else base / q
                paths.extend(list_images([q]) if q.is_dir() else [q])
        else:
            paths.extend(list_images([p], recursive=True))
    seen: set[Path] = set()
    unique = []
    for q in paths:
        if q not in seen:
            seen.add(q)
            unique.append(q)
    return unique


@dataclass
class ImageSet:
    """Decoded RGB images kept in memory as uint8 (3, H, W) tensors, with what was skipped and why."""

    images: list[torch.Tensor]
    paths: list[Path]
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def skipped_total(self) -> int:
        """How many inputs were skipped."""
        return sum(self.skipped.values())

    def skipped_text(self) -> str:
        """One line saying how many inputs were skipped and why ('' when none)."""
        if not self.skipped:
            return ""
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        return f"skipped {self.skipped_total} input(s): {reasons}"


def _short_side_resize(img: torch.Tensor, short: int) -> torch.Tensor:
    h, w = img.shape[-2:]
    s = short / min(h, w)
    size = (max(short, round(h * s)), max(short, round(w * s)))
    return F.interpolate(img[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def load_image_set(paths: list[Path], min_size: int, resize_short: int | None = None) -> ImageSet:
    """Decode ``paths`` to RGB; undecodable files and images smaller than ``min_size`` are counted, not fatal."""
    images, kept, skipped = [], [], {}
    for path in paths:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped["not an image file"] = skipped.get("not an image file", 0) + 1
            continue
        try:
            rgb = load_image(path).rgb
        except BadInputError:
            skipped["undecodable"] = skipped.get("undecodable", 0) + 1
            continue
        if resize_short is not None:
            rgb = _short_side_resize(rgb, resize_short).clamp(0, 1)
        if min(rgb.shape[-2:]) < min_size:
            skipped[f"smaller than {min_size} px"] = skipped.get(f"smaller than {min_size} px", 0) + 1
            continue
        images.append((rgb * 255).round().to(torch.uint8))
        kept.append(path)
    return ImageSet(images, kept, skipped)


def split_validation(paths: list[Path], val_count: int, val_paths: list[Path] | None = None) -> tuple[list, list]:
    """(train, val): the given validation files are removed from training; else the last ``val_count`` files."""
    if val_paths:
        held = {p.resolve() for p in val_paths}
        return [p for p in paths if p.resolve() not in held], list(val_paths)
    if val_count == 0:
        return list(paths), []
    if len(paths) <= val_count:
        raise BadInputError(
            f"{len(paths)} image(s) cannot leave {val_count} for validation and some for training; "
            "pass --val-count 0 or more images"
        )
    return list(paths[:-val_count]), list(paths[-val_count:])


class CropSampler:
    """Random crops, optional random down-scaling and horizontal flips, drawn from a generator whose state
    is saved with each checkpoint, so a resumed run sees exactly the batches the uninterrupted one would.
    """

    def __init__(self, images: ImageSet, crop: int, min_scale: float = 1.0, flip: bool = True, seed: int = 0) -> None:
        if not len(images):
            raise BadInputError("no usable training images")
        self.images = images
        self.crop = crop
        self.min_scale = min_scale
        self.flip = flip
        self.generator = torch.Generator().manual_seed(seed)

    def _one(self) -> torch.Tensor:
        g = self.generator
        img = self.images.images[int(torch.randint(len(self.images), (1,), generator=g))]
        h, w = img.shape[-2:]
        # Source window side: crop / scale, at most the image; scale < 1 shows more content per crop (zoomed out).
        scale = self.min_scale + (1 - self.min_scale) * float(torch.rand((), generator=g))
        side = min(h, w, max(self.crop, round(self.crop / scale)))
        top = int(torch.randint(h - side + 1, (1,), generator=g))
        left = int(torch.randint(w - side + 1, (1,), generator=g))
        flip = bool(torch.rand((), generator=g) < 0.5)
        patch = img[:, top : top + side, left : left + side].float() / 255
        if side != self.crop:
            patch = F.interpolate(patch[None], size=(self.crop, self.crop), mode="bilinear", antialias=True)[0]
        if self.flip and flip:
            patch = patch.flip(-1)
        return patch.clamp(0, 1)

    def batch(self, size: int) -> torch.Tensor:
        """Next batch (size, 3, crop, crop) in [0, 1]."""
        return torch.stack([self._one() for _ in range(size)])

    def state(self) -> torch.Tensor:
        """The generator state (for checkpoints)."""
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        """Restore a state from :meth:`state`."""
        self.generator.set_state(state)


def prepare_data(
    inputs: tuple[str, ...],
    val_inputs: tuple[str, ...],
    val_count: int,
    crop: int,
    resize_short: int | None,
) -> tuple[ImageSet, ImageSet]:
    """Collect, split and decode the training and validation images, with clear errors when nothing is usable."""
    paths = expand_inputs(list(inputs))
    if not paths:
        raise BadInputError(f"no image files found in {', '.join(inputs)}")
    val_paths = expand_inputs(list(val_inputs)) if val_inputs else None
    train_paths, held = split_validation(paths, val_count, val_paths)
    train = load_image_set(train_paths, crop, resize_short)
    if not len(train):
        if train.skipped.get(f"smaller than {crop} px") == train.skipped_total:
            raise BadInputError(f"--crop {crop} is larger than every training image; use a smaller crop")
        raise BadInputError(f"no usable training images among {len(train_paths)} file(s) ({train.skipped_text()})")
    val = load_image_set(held, 8, None)
    return train, val
