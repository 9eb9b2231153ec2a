"""What travels with an image through a latent file and back: its alpha, bit depth and colour mode; and the text
chunk the web UIs read from an output PNG.

Alpha is stored in the latent file as a PNG (lossless, 8 or 16 bits, small for typical masks) in a uint8 tensor
``alpha_png.<i>``, one per item. The image's depth and mode go into the latent file's ``extra`` strings.

AUTOMATIC1111 records generation settings in a PNG ``tEXt`` chunk named ``parameters`` whose last line is
``Key: value, Key: value, ...``; it reads the VAE from ``VAE hash`` (the first 10 hex digits of the VAE file's
SHA-256) and ``VAE`` (its file name). Its parser takes a last line as settings only when it holds three or more
pairs, so vaekit writes ``Size``, ``VAE hash`` and ``VAE``.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from vaekit.errors import LoadError

if TYPE_CHECKING:
    import torch

ALPHA_PREFIX = "alpha_png."
EXTRA_BITS = "image_bits"
EXTRA_MODE = "image_mode"  # "rgb" or "grey"


def pack_alpha(alpha: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Alpha (1, H, W) in [0, 1] -> the bytes of a greyscale PNG (8 or 16 bits) as a uint8 tensor."""
    import numpy as np
    import torch

    a = alpha.detach().float().clamp(0, 1).cpu().numpy()[0]
    buf = io.BytesIO()
    if bits > 8:
        import png

        rows = np.round(a * 65535).astype(np.uint16)
        png.Writer(rows.shape[1], rows.shape[0], greyscale=True, bitdepth=16).write(buf, rows.tolist())
    else:
        from PIL import Image

        Image.fromarray(np.round(a * 255).astype(np.uint8), "L").save(buf, format="PNG", optimize=True)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def unpack_alpha(data: torch.Tensor, what: str = "alpha") -> torch.Tensor:
    """The PNG bytes of :func:`pack_alpha` -> alpha (1, H, W) in [0, 1]."""
    import numpy as np
    import png
    import torch

    try:
        reader = png.Reader(bytes=data.cpu().numpy().tobytes())
        width, height, rows, info = reader.asDirect()
        if info["planes"] != 1 or width * height > 16384 * 16384:
            raise ValueError("not a one-channel image")
        arr = np.vstack([np.asarray(r, dtype=np.float32) for r in rows]).reshape(height, width)
    except (png.Error, ValueError, EOFError, OSError) as e:
        raise LoadError(f"{what}: damaged alpha channel ({e})") from None
    return torch.from_numpy(arr / float((1 << int(info["bitdepth"])) - 1)).unsqueeze(0)


def a1111_parameters(vae_name: str, vae_sha256: str, size: tuple[int, int]) -> str:
    """The ``parameters`` text an output PNG carries, as AUTOMATIC1111 writes it (``VAE hash`` and ``VAE``)."""
    clean = vae_name.replace(",", " ").replace("\n", " ")
    short = vae_sha256[:10] if not vae_sha256.startswith("random-init:") else vae_sha256
    return f"Size: {size[0]}x{size[1]}, VAE hash: {short}, VAE: {clean}"


def read_a1111_parameters(text: str) -> dict[str, str]:
    """The ``Key: value`` pairs of the last line of an A1111 ``parameters`` text."""
    last = text.strip().splitlines()[-1] if text.strip() else ""
    pairs: dict[str, str] = {}
    for part in last.split(", "):
        key, sep, value = part.partition(": ")
        if sep:
            pairs[key.strip()] = value.strip()
    return pairs
