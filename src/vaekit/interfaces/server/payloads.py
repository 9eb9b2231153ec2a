"""Request bodies in and response bodies out: uploaded images, latents (safetensors or raw), PNG/JPEG/WebP.

Uploaded bytes are decoded in memory. A latent upload in safetensors form is parsed from memory too (the format's
header is JSON, its tensors are plain bytes: nothing in it can run code); vaekit's own latent files keep the
original image size and padding in their metadata, which ``/decode`` uses to crop back exactly.
"""

from __future__ import annotations

import base64
import io
import json
import math
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from vaekit.errors import BadInputError
from vaekit.formats import latent_file as codec
from vaekit.ops import images
from vaekit.ops.images import to_pil

IMAGE_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "TIFF"}
OUTPUT_FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}
RAW_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
SAFETENSORS_MEDIA = "application/vnd.safetensors"
RAW_MEDIA = "application/octet-stream"


class PayloadTooLargeError(BadInputError):
    """An upload over a size cap (413)."""


class UnsupportedFormatError(BadInputError):
    """A body in a format the server does not take or give (415)."""


# --- images ----------------------------------------------------------------------------------------------------
SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}


def read_image(data: bytes, max_pixels: int, tmpdir: Path, what: str = "image", multiple: int = 8) -> torch.Tensor:
    """Uploaded image bytes -> (3, H, W) float in [0, 1].

    The format and size are checked from the header first (no pixel is decoded for a refused upload), and the size
    that counts is the padded one: a VAE works on sides rounded up to its ``multiple``, so a 1-pixel-wide strip
    costs as much as an 8-pixel-wide one and is capped as such. Then the
    bytes go through vaekit's own reader (EXIF orientation, 16-bit PNGs at full precision) from a file in the
    server's private temporary folder, removed at once. Alpha is dropped: the workbench shows RGB.
    """
    if not data:
        raise BadInputError(f"{what}: empty upload")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (w, h) = im.format, im.size
    except Image.DecompressionBombError:
        raise PayloadTooLargeError(f"{what}: refused as a decompression bomb (far too many pixels)") from None
    except UnidentifiedImageError:
        raise UnsupportedFormatError(f"{what}: not an image Pillow can read (PNG, JPEG, WebP, BMP, TIFF)") from None
    except (OSError, SyntaxError, ValueError, struct.error) as e:
        raise BadInputError(f"{what}: damaged image ({_first_line(e)})") from None
    if fmt not in IMAGE_FORMATS:
        raise UnsupportedFormatError(f"{what}: unsupported image format {fmt}; send PNG, JPEG, WebP, BMP or TIFF")
    if w * h > max_pixels:
        raise PayloadTooLargeError(f"{what}: {w}x{h} is {w * h} pixels, over the server's cap of {max_pixels} pixels")
    pw, ph = -(-w // multiple) * multiple, -(-h // multiple) * multiple
    if pw * ph > max_pixels:
        raise PayloadTooLargeError(
            f"{what}: {w}x{h} is padded to {pw}x{ph} = {pw * ph} pixels for the VAE (sides are rounded up to a "
            f"multiple of {multiple}), over the server's cap of {max_pixels} pixels"
        )
    path = tmpdir / f"upload-{uuid.uuid4().hex}{SUFFIXES[str(fmt)]}"
    try:
        path.write_bytes(data)
        loaded = images.read_image(path)
    except BadInputError as e:
        raise BadInputError(f"{what}: {str(e).replace(str(path), 'upload').removeprefix('upload: ')}") from None
    except (OSError, SyntaxError, ValueError, struct.error) as e:
        raise BadInputError(f"{what}: damaged image ({_first_line(e)})") from None
    finally:
        path.unlink(missing_ok=True)
    return loaded.rgb.float().contiguous()


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0][:120] if str(e) else type(e).__name__


def output_format(name: str, allowed: tuple[str, ...]) -> str:
    """Validate an output format name (case-insensitive; ``jpg`` means ``jpeg``)."""
    fmt = name.lower().strip()
    fmt = "jpeg" if fmt == "jpg" else fmt
    if fmt not in allowed:
        raise UnsupportedFormatError(f"unsupported output format {name!r}; use one of {', '.join(allowed)}")
    return fmt


def image_bytes(image: torch.Tensor, fmt: str, quality: int = 95) -> tuple[bytes, str]:
    """(3, H, W) in [0, 1] -> encoded bytes and media type (fmt: png, jpeg, webp)."""
    pil_format, media = OUTPUT_FORMATS[fmt]
    buf = io.BytesIO()
    kwargs = {"quality": quality} if pil_format in ("JPEG", "WEBP") else {"compress_level": 3}
    to_pil(image).save(buf, format=pil_format, **kwargs)
    return buf.getvalue(), media


def image_data_url(image: torch.Tensor, fmt: str = "png") -> str:
    """An image as a ``data:`` URL for JSON answers (the UI shows them directly)."""
    data, media = image_bytes(image, fmt, quality=90)
    return f"data:{media};base64,{base64.b64encode(data).decode('ascii')}"


# --- latents in ------------------------------------------------------------------------------------------------
@dataclass
class LatentsIn:
    """Latents from a request: (N, C, h, w) float32 and, when the file says, each image's size and padding."""

    latents: torch.Tensor
    image_sizes: list[tuple[int, int] | None] = field(default_factory=list)
    paddings: list[tuple[int, int, int, int] | None] = field(default_factory=list)
    family: str | None = None
    vae_sha256: str | None = None


def _safetensors_header(data: bytes) -> tuple[dict[str, object], int]:
    if len(data) < 8:
        raise BadInputError("latents: not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", data[:8])
    if n < 2 or 8 + n > len(data):
        raise BadInputError("latents: not a safetensors file (its header length does not fit the upload)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadInputError("latents: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise BadInputError("latents: not a safetensors file (its header is not a JSON object)")
    return header, 8 + n


def _tensor_from(data: bytes, start: int, spec: object, name: str) -> torch.Tensor:
    if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= spec.keys():
        raise BadInputError(f"latents: tensor {name!r} has a malformed entry in the safetensors header")
    dtype = SAFETENSORS_DTYPES.get(str(spec["dtype"]))
    if dtype is None:
        raise BadInputError(f"latents: tensor {name!r} is {spec['dtype']}; latents must be F32, F16 or BF16")
    shape, offsets = spec["shape"], spec["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise BadInputError(f"latents: tensor {name!r} has a malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise BadInputError(f"latents: tensor {name!r} has malformed data offsets")
    begin, end = start + offsets[0], start + offsets[1]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if not (start <= begin <= end <= len(data)) or end - begin != math.prod(shape) * itemsize:
        raise BadInputError(f"latents: tensor {name!r} does not fit in the uploaded bytes (truncated file?)")
    flat = torch.frombuffer(bytearray(data[begin:end]), dtype=dtype) if end > begin else torch.empty(0, dtype=dtype)
    return flat.reshape(shape).float()


def read_safetensors_latents(data: bytes) -> LatentsIn:
    """Latents from safetensors bytes: vaekit's latent files (with their metadata) or any file with one tensor
    or a tensor named ``latents``."""
    header, start = _safetensors_header(data)
    metadata = header.pop("__metadata__", None) or {}
    if not header:
        raise BadInputError("latents: the safetensors file holds no tensors")
    if "latents" in header:
        name = "latents"
    elif len(header) == 1:
        name = next(iter(header))
    else:
        raise BadInputError(
            f"latents: {len(header)} tensors and none named 'latents': {', '.join(sorted(header))[:200]}"
        )
    latents = _tensor_from(data, start, header[name], name)
    if latents.ndim == 3:
        latents = latents.unsqueeze(0)
    out = LatentsIn(latents=latents)
    n = latents.shape[0] if latents.ndim == 4 else 0
    out.image_sizes, out.paddings = [None] * n, [None] * n
    if isinstance(metadata, dict) and metadata.get("format") == codec.FORMAT_NAME and codec.METADATA_KEY in metadata:
        try:
            info = json.loads(str(metadata[codec.METADATA_KEY]))
            sizes = [(int(w), int(h)) for w, h in info["image_sizes"]]
            pads = [tuple(int(x) for x in p) for p in info["paddings"]]
            if len(sizes) != n or len(pads) != n or any(len(p) != 4 for p in pads):
                raise ValueError("image sizes or paddings do not match the number of latents")
            out.image_sizes, out.paddings = sizes, pads  # type: ignore[assignment]
            out.family = str(info.get("family") or "") or None
            out.vae_sha256 = str(info.get("vae_sha256") or "") or None
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
            raise BadInputError(f"latents: damaged vaekit metadata ({str(e)[:120]})") from None
    return out


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,4,64,64' or '4x64x64' -> a shape tuple."""
    parts = [p for p in text.replace("x", ",").replace(" ", "").split(",") if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise BadInputError(f"X-Latent-Shape {text!r}: give the shape as integers, e.g. 1,4,64,64") from None
    if len(shape) not in (3, 4) or any(d <= 0 for d in shape):
        raise BadInputError(f"X-Latent-Shape {text!r}: a latent shape is (N, C, h, w) or (C, h, w), all positive")
    return shape


def read_raw_latents(data: bytes, shape_text: str, dtype_name: str | None) -> LatentsIn:
    """Raw little-endian float16/float32/bfloat16 bytes with their shape (the headers) -> latents."""
    shape = parse_shape(shape_text)
    name = (dtype_name or "float32").lower().replace("fp", "float").replace("bf16", "bfloat16")
    dtype = RAW_DTYPES.get(name)
    if dtype is None:
        raise BadInputError(f"X-Latent-Dtype {dtype_name!r}: use float32, float16 or bfloat16")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if len(data) != expected:
        raise BadInputError(f"raw latents: {len(data)} bytes, but shape {shape} in {name} needs {expected} bytes")
    latents = torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape).float()
    latents = latents if latents.ndim == 4 else latents.unsqueeze(0)
    n = latents.shape[0]
    return LatentsIn(latents=latents, image_sizes=[None] * n, paddings=[None] * n)


# --- latents out -----------------------------------------------------------------------------------------------
def latents_file_bytes(
    tmpdir: Path,
    latents: torch.Tensor,
    vae: object,
    image_size: tuple[int, int],
    padding: tuple[int, int, int, int],
    stem: str,
) -> bytes:
    """A vaekit latent file (``vaekit.formats.latent_file`` layout) as bytes, built in the server's temp folder."""
    path = tmpdir / f"{stem}.safetensors"
    try:
        codec.save_latents(path, latents, vae, image_size=image_size, padding=padding)  # type: ignore[arg-type]
        return path.read_bytes()
    finally:
        path.unlink(missing_ok=True)


def tensor_b64(t: torch.Tensor) -> str:
    """Little-endian float32 bytes of ``t``, base64."""
    return base64.b64encode(t.detach().float().contiguous().cpu().numpy().astype("<f4").tobytes()).decode("ascii")
