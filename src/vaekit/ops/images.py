"""Image files in and out (PNG/JPEG/WebP, alpha, 16-bit, EXIF), padding to the model's multiple, builtin photos."""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from vaekit.errors import BadInputError

PathLike = str | os.PathLike[str]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# Refuse decompression bombs: far above any image a VAE is run on (a 16k x 16k image is 268 Mpx).
MAX_PIXELS = 16384 * 16384
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

# Colour photographs shipped in scikit-image's data folder: the "builtin" image set, no download needed.
BUILTIN_NAMES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "retina.jpg")


@dataclass
class LoadedImage:
    """An RGB image as a float tensor (3, H, W) in [0, 1], with its alpha kept aside."""

    rgb: torch.Tensor
    alpha: torch.Tensor | None = None  # (1, H, W) in [0, 1]
    path: Path | None = None
    bits: int = 8
    grey: bool = False  # a greyscale file (its three channels are equal)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.rgb.shape[2], self.rgb.shape[1]


def load_image(path: PathLike) -> LoadedImage:
    """Read an image file: EXIF orientation applied, alpha split off, 8- or 16-bit to float [0, 1]."""
    path = Path(path)
    if _is_png16_colour(path):
        return _png16(path)
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return _from_pil(im, path)
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such file") from None
    except Image.DecompressionBombError:
        raise BadInputError(f"{path}: refused: more than {MAX_PIXELS} pixels (decompression bomb?)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise BadInputError(f"{path}: not a readable image ({_first_line(e)})") from None
    except (zlib.error, struct.error, MemoryError, OverflowError) as e:  # damaged compressed data or sizes
        raise BadInputError(f"{path}: not a readable image (damaged: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:120]


def _from_pil(im: Image.Image, path: Path | None) -> LoadedImage:
    if im.width == 0 or im.height == 0:
        raise BadInputError(f"{path}: zero-size image")
    bits = 8
    alpha = None
    grey = im.mode in ("1", "L", "LA", "La", "I;16", "I;16B", "I;16L", "I", "F")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale (PNG, TIFF): Pillow's "I" mode holds the same 0..65535 values in 32-bit integers.
        arr = np.clip(np.asarray(im, dtype=np.float32) / 65535.0, 0.0, 1.0)
        rgb = np.repeat(arr[..., None], 3, axis=2)
        bits = 16
    elif im.mode == "F":
        rgb = np.repeat(np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)[..., None], 3, axis=2)
        bits = 32
    else:
        if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            alpha = torch.from_numpy(np.asarray(rgba, dtype=np.float32)[..., 3] / 255.0).unsqueeze(0)
            im = rgba
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()
    return LoadedImage(tensor, alpha, path, bits, grey)


# EXIF orientation -> the numpy operation that shows the image upright (what ImageOps.exif_transpose does).
_ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: np.swapaxes(a, 0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, -1)[::-1],
    8: lambda a: np.rot90(a, 1),
}


def _png16(path: Path) -> LoadedImage:
    """16-bit colour PNGs: Pillow reduces them to 8 bits, so decode them with pypng at full precision."""
    import png  # pypng: pure Python, reads every PNG colour type and bit depth exactly

    try:
        reader = png.Reader(filename=str(path))
        width, height, rows, info = reader.asDirect()
        if width * height > MAX_PIXELS:
            raise BadInputError(f"{path}: refused: more than {MAX_PIXELS} pixels (decompression bomb?)")
        if width == 0 or height == 0:
            raise BadInputError(f"{path}: zero-size image")
        planes = int(info["planes"])
        arr = np.vstack([np.asarray(row, dtype=np.uint16) for row in rows]).reshape(height, width, planes)
    except (png.Error, OSError, ValueError, EOFError, zlib.error, struct.error, MemoryError, IndexError) as e:
        raise BadInputError(f"{path}: not a readable PNG ({_first_line(e)})") from None
    try:
        with Image.open(path) as im:  # Pillow reads the EXIF orientation without decoding pixels
            orientation = im.getexif().get(0x0112, 1)
    except (OSError, ValueError, SyntaxError, struct.error, zlib.error):
        orientation = 1  # pixels pypng could read, EXIF Pillow could not: shown as stored
    arr = _ORIENT.get(int(orientation), lambda a: a)(arr)
    scaled = arr.astype(np.float32) / float((1 << int(info["bitdepth"])) - 1)
    colour = scaled[..., : planes - 1] if info["alpha"] else scaled
    grey = colour.shape[2] == 1
    if grey:
        colour = np.repeat(colour, 3, axis=2)
    rgb = torch.from_numpy(np.ascontiguousarray(colour)).permute(2, 0, 1).contiguous()
    alpha = torch.from_numpy(np.ascontiguousarray(scaled[..., -1])).unsqueeze(0) if info["alpha"] else None
    return LoadedImage(rgb, alpha, path, int(info["bitdepth"]), grey)


def _is_png16_colour(path: Path) -> bool:
    """True for a 16-bit PNG with colour or alpha (which Pillow would reduce to 8 bits)."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError:
        return False
    # PNG IHDR: bit depth at byte 24, colour type at byte 25 (2 = RGB, 4 = grey + alpha, 6 = RGBA).
    return len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[24] == 16 and head[25] in (2, 4, 6)


def read_image(path: PathLike) -> LoadedImage:
    """Same as :func:`load_image` (kept for callers of the earlier name)."""
    return load_image(path)


def to_pil(rgb: torch.Tensor, alpha: torch.Tensor | None = None) -> Image.Image:
    """Float (3, H, W) in [0, 1] (and optional alpha) -> 8-bit PIL image."""
    if rgb.ndim != 3 or rgb.shape[0] != 3:
        raise BadInputError(f"expected an image tensor (3, H, W), got {tuple(rgb.shape)}")
    arr = (rgb.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    im = Image.fromarray(arr, "RGB")
    if alpha is not None:
        a = (alpha.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)[0].cpu().numpy()
        if a.shape != arr.shape[:2]:
            a = np.asarray(Image.fromarray(a, "L").resize(im.size, Image.Resampling.BILINEAR))
        im.putalpha(Image.fromarray(a, "L"))
    return im


def save_image(
    rgb: torch.Tensor,
    path: PathLike,
    alpha: torch.Tensor | None = None,
    quality: int = 95,
    overwrite: bool = True,
    bits: int = 8,
    grey: bool = False,
    text: dict[str, str] | None = None,
) -> Path:
    """Write (3, H, W) in [0, 1] as PNG/JPEG/WebP by suffix, atomically; alpha is kept where the format can.

    PNG only: ``bits=16`` writes 16 bits per channel, ``grey=True`` one grey channel (the mean of the three, as
    a greyscale input comes back), ``text`` adds ``tEXt`` chunks (e.g. A1111's ``parameters``).
    """
    import io

    path = Path(path)
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower())
    if fmt is None:
        raise BadInputError(f"{path}: unsupported output format (use .png, .jpg or .webp)")
    if path.exists() and not overwrite:
        raise BadInputError(f"{path}: already exists (use --overwrite)")
    buf = io.BytesIO()
    if fmt == "PNG" and (bits > 8 or grey):
        _write_png(buf, rgb, alpha, 16 if bits > 8 else 8, grey)
    else:
        im = to_pil(rgb, alpha if fmt != "JPEG" else None)
        kwargs = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
        im.save(buf, format=fmt, **kwargs)
    data = buf.getvalue()
    if fmt == "PNG" and text:
        data = _png_with_text(data, text)
    from vaekit.formats.io import write_bytes

    write_bytes(data, path)
    return path


def _write_png(buf: object, rgb: torch.Tensor, alpha: torch.Tensor | None, bits: int, grey: bool) -> None:
    """PNG through pypng: 8 or 16 bits, RGB or grey, with or without alpha."""
    import png

    top = (1 << bits) - 1
    planes = rgb.detach().float().clamp(0, 1).cpu()
    if grey:
        planes = planes.mean(0, keepdim=True)
    if alpha is not None:
        a = alpha.detach().float().clamp(0, 1).cpu()
        if a.shape[-2:] != planes.shape[-2:]:
            a = F.interpolate(a.unsqueeze(0), size=planes.shape[-2:], mode="bilinear", align_corners=False)[0]
        planes = torch.cat([planes, a], 0)
    arr = (planes * top).round().to(torch.int32).permute(1, 2, 0).numpy().astype(np.uint16 if bits > 8 else np.uint8)
    h, w, c = arr.shape
    writer = png.Writer(w, h, greyscale=grey, alpha=alpha is not None, bitdepth=bits)
    writer.write(buf, arr.reshape(h, w * c))


def _png_with_text(data: bytes, text: dict[str, str]) -> bytes:
    """Insert ``tEXt`` chunks right after a PNG's IHDR chunk (Latin-1, as the PNG standard wants)."""
    import struct
    import zlib

    end_of_ihdr = 8 + 8 + struct.unpack(">I", data[8:12])[0] + 4
    chunks = b""
    for key, value in text.items():
        body = key.encode("latin-1", "replace")[:79] + b"\0" + value.encode("latin-1", "replace")
        chunks += struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    return data[:end_of_ihdr] + chunks + data[end_of_ihdr:]


def pad_to_multiple(images: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Reflect-pad (N, C, H, W) on the right and bottom to a multiple; returns (padded, (left, top, right, bottom)).

    Falls back to replicate padding where the image is too small to reflect.
    """
    h, w = images.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if not pad_h and not pad_w:
        return images, (0, 0, 0, 0)
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    padded = F.pad(images, (0, pad_w, 0, pad_h), mode=mode)
    return padded, (0, 0, pad_w, pad_h)


def crop_padding(images: torch.Tensor, padding: tuple[int, int, int, int], scale: int = 1) -> torch.Tensor:
    """Undo :func:`pad_to_multiple` (``scale`` converts latent-space padding to pixels or back)."""
    left, top, right, bottom = (p * scale for p in padding)
    h, w = images.shape[-2:]
    return images[..., top : h - bottom, left : w - right]


def list_images(inputs: list[PathLike], recursive: bool = True) -> list[Path]:
    """Expand files, folders (recursively) and globs into a sorted list of image paths."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            pattern = "**/*" if recursive else "*"
            out.extend(sorted(q for q in p.glob(pattern) if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES))
        elif p.exists():
            out.append(p)
        else:
            matches = sorted(Path().glob(str(item))) if any(c in str(item) for c in "*?[") else []
            if not matches:
                raise BadInputError(f"{item}: no such file, folder or matching glob")
            out.extend(m for m in matches if m.is_file())
    return out


def builtin_image_paths() -> list[Path]:
    """Paths of the real colour photographs shipped with scikit-image (the ``builtin`` image set)."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    paths = [folder / name for name in BUILTIN_NAMES if (folder / name).is_file()]
    if not paths:
        raise BadInputError(f"scikit-image's data folder {folder} has none of the builtin photographs")
    return paths
