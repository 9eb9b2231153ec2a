"""Image files and sizes: alpha, 16-bit PNG, EXIF orientation, reflect padding and cropping back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import png
import pytest
import torch
from PIL import Image

from vaekit.errors import BadInputError
from vaekit.ops.images import crop_padding, load_image, pad_to_multiple, read_image, save_image


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared, loaded CPU, OpenMP barriers make tiny models many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gradient(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], axis=2).astype(np.uint8)


def test_alpha_is_kept_aside_and_restored(tmp_path: Path) -> None:
    rgb = _gradient(13, 17)
    alpha = np.linspace(0, 255, 13 * 17).reshape(13, 17).astype(np.uint8)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "in.png")
    loaded = load_image(tmp_path / "in.png")
    assert loaded.rgb.shape == (3, 13, 17) and loaded.alpha is not None and loaded.alpha.shape == (1, 13, 17)
    assert torch.equal((loaded.rgb * 255).round().byte().permute(1, 2, 0), torch.from_numpy(rgb))
    assert torch.equal((loaded.alpha[0] * 255).round().byte(), torch.from_numpy(alpha))
    save_image(loaded.rgb, tmp_path / "out.png", loaded.alpha)
    back = np.asarray(Image.open(tmp_path / "out.png"))
    assert back.shape == (13, 17, 4)
    assert np.array_equal(back[..., :3], rgb) and np.array_equal(back[..., 3], alpha)


def test_opaque_image_has_no_alpha(tmp_path: Path) -> None:
    Image.fromarray(_gradient(8, 9)).save(tmp_path / "a.jpg", quality=95)
    loaded = load_image(tmp_path / "a.jpg")
    assert loaded.alpha is None and loaded.bits == 8 and loaded.size == (9, 8)


# EXIF orientation tag -> how the stored pixels are shown (the EXIF 2.3 table).
ORIENT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),  # rotate 90 degrees clockwise to display
    7: lambda a: np.rot90(a, -1)[::-1],
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int) -> None:
    raw = _gradient(6, 10)  # stored landscape; orientations 5-8 show it portrait
    im = Image.fromarray(raw)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(tmp_path / "o.png", exif=exif.tobytes())
    expected = ORIENT[orientation](raw)
    got = (load_image(tmp_path / "o.png").rgb * 255).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(got, expected)


def _write_png16(path: Path, arr: np.ndarray, orientation: int | None = None) -> None:
    h, w, c = arr.shape
    writer = png.Writer(w, h, greyscale=c in (1, 2), alpha=c in (2, 4), bitdepth=16)
    with open(path, "wb") as f:
        writer.write(f, arr.reshape(h, w * c).tolist())
    if orientation is not None:  # splice an eXIf chunk before IDAT, as cameras and editors write it
        im = Image.new("RGB", (1, 1))
        exif = im.getexif()
        exif[0x0112] = orientation
        data = exif.tobytes()[6:]  # drop the "Exif\0\0" header: the PNG chunk holds the TIFF bytes
        import struct
        import zlib

        chunk = struct.pack(">I", len(data)) + b"eXIf" + data + struct.pack(">I", zlib.crc32(b"eXIf" + data))
        raw = path.read_bytes()
        idat = raw.index(b"IDAT") - 4
        path.write_bytes(raw[:idat] + chunk + raw[idat:])


def test_16bit_rgb_png_keeps_full_precision(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 65536, size=(7, 11, 3), dtype=np.uint16)
    arr[0, 0] = (1, 2, 3)  # values 8-bit reading would flatten to 0
    _write_png16(tmp_path / "d.png", arr)
    loaded = read_image(tmp_path / "d.png")
    assert loaded.bits == 16 and loaded.alpha is None
    assert torch.equal(
        (loaded.rgb * 65535).round().to(torch.int64), torch.from_numpy(arr.astype(np.int64)).permute(2, 0, 1)
    )


def test_16bit_rgba_and_grey_alpha_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 65536, size=(5, 4, 4), dtype=np.uint16)
    _write_png16(tmp_path / "rgba.png", rgba)
    loaded = load_image(tmp_path / "rgba.png")
    assert loaded.bits == 16 and loaded.alpha is not None
    assert np.allclose(loaded.alpha[0].numpy(), rgba[..., 3] / 65535, atol=1e-7)
    assert np.allclose(loaded.rgb.permute(1, 2, 0).numpy(), rgba[..., :3] / 65535, atol=1e-7)
    la = rng.integers(0, 65536, size=(5, 4, 2), dtype=np.uint16)
    _write_png16(tmp_path / "la.png", la)
    grey = load_image(tmp_path / "la.png")
    assert grey.rgb.shape == (3, 5, 4) and torch.equal(grey.rgb[0], grey.rgb[2])
    assert np.allclose(grey.rgb[1].numpy(), la[..., 0] / 65535, atol=1e-7)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_16bit_png_exif_orientation(tmp_path: Path, orientation: int) -> None:
    arr = np.arange(2 * 3 * 3, dtype=np.uint16).reshape(2, 3, 3) * 3000
    _write_png16(tmp_path / "r.png", arr, orientation=orientation)
    loaded = load_image(tmp_path / "r.png")
    expected = ORIENT[orientation](arr) / 65535
    assert loaded.size == (expected.shape[1], expected.shape[0])
    assert np.allclose(loaded.rgb.permute(1, 2, 0).numpy(), expected, atol=1e-7)


def test_16bit_grey_png(tmp_path: Path) -> None:
    arr = np.array([[0, 1, 300], [65535, 40000, 7]], dtype=np.uint16)
    _write_png16(tmp_path / "g.png", arr[..., None])
    loaded = load_image(tmp_path / "g.png")
    assert loaded.bits == 16
    assert np.allclose(loaded.rgb[1].numpy(), arr / 65535, atol=1e-7)


def test_pad_reflect_and_crop_back_odd_size() -> None:
    x = torch.rand(2, 3, 389, 517)
    padded, pad = pad_to_multiple(x, 8)
    assert padded.shape == (2, 3, 392, 520) and pad == (0, 0, 3, 3)
    ref = np.pad(x.numpy(), ((0, 0), (0, 0), (0, 3), (0, 3)), mode="reflect")
    assert np.array_equal(padded.numpy(), ref)
    assert torch.equal(crop_padding(padded, pad), x)
    same, nopad = pad_to_multiple(x[..., :384, :512], 8)
    assert nopad == (0, 0, 0, 0) and same.shape[-2:] == (384, 512)


def test_pad_tiny_image_falls_back_to_replicate() -> None:
    x = torch.rand(1, 3, 3, 2)
    padded, pad = pad_to_multiple(x, 8)
    assert padded.shape == (1, 3, 8, 8) and pad == (0, 0, 6, 5)
    assert torch.equal(padded[..., -1, -1], x[..., -1, -1])
    assert torch.equal(crop_padding(padded, pad), x)


def test_not_an_image_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"this is not a png")
    with pytest.raises(BadInputError, match="not a readable image"):
        load_image(tmp_path / "x.png")
    with pytest.raises(BadInputError, match="no such file"):
        load_image(tmp_path / "missing.png")
    bad16 = tmp_path / "t.png"
    _write_png16(bad16, np.zeros((4, 4, 3), dtype=np.uint16))
    bad16.write_bytes(bad16.read_bytes()[:60])  # truncated inside the pixel data
    with pytest.raises(BadInputError, match="not a readable PNG"):
        load_image(bad16)


def test_save_is_atomic_and_refuses_overwrite(tmp_path: Path) -> None:
    dest = tmp_path / "o.png"
    save_image(torch.rand(3, 4, 4), dest)
    before = dest.read_bytes()
    with pytest.raises(BadInputError, match="already exists"):
        save_image(torch.rand(3, 4, 4), dest, overwrite=False)
    with pytest.raises(BadInputError):
        save_image(torch.rand(4, 4), dest)  # not an image: nothing written
    assert dest.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png"]
