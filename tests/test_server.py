"""`vaekit serve` over real HTTP: a uvicorn server on a free loopback port (a subprocess running the CLI command, or
a thread for settings the tests vary), driven with httpx. Results are checked against the library itself."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import math
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save as st_save

from tests.conftest import small_config
from vaekit.formats.io import file_sha256
from vaekit.formats.latent_file import load_latents
from vaekit.models import build
from vaekit.ops import codec as pipeline
from vaekit.vae import VAE, VAEOrigin, load_vae, save_vae

MAX_PIXELS = 256 * 256
MAX_BODY = 1024 * 1024


# --- fixtures ----------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A library folder with two small VAEs (sd1 architecture and TAESD) and a file that is not a VAE."""
    lib = tmp_path_factory.mktemp("library")
    for name, seed in (("sd1", 0), ("taesd", 1)):
        cfg = small_config(name)
        if name == "sd1":  # narrower and shallower still: the server tests run many requests
            cfg = dataclasses.replace(cfg, num_res_blocks=1)
        torch.manual_seed(seed)
        save_vae(VAE(build(cfg), cfg, VAEOrigin(name=name)), lib / f"small-{name}.safetensors")
    (lib / "broken.safetensors").write_bytes(b"not a model")
    return lib


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty vaekit config folder, so no developer selection or scan cache leaks in."""
    return tmp_path_factory.mktemp("config")


@pytest.fixture(scope="module")
def isolated_env(config_dir: Path) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ("VAEKIT_CONFIG", "VAEKIT_HOME")}
    os.environ["VAEKIT_CONFIG"] = str(config_dir)
    os.environ["VAEKIT_HOME"] = ""
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def wait_healthy(url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become healthy")


@pytest.fixture(scope="module")
def server(library: Path, config_dir: Path) -> Iterator[str]:
    """`vaekit serve` as a subprocess on a free loopback port, with small caps for the tests."""
    port = free_port()
    # One compute thread: the test process computes its references at the same time on a small machine.
    env = dict(os.environ, VAEKIT_CONFIG=str(config_dir), VAEKIT_HOME="", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("VAEKIT_TOKEN", None)
    cmd = [
        sys.executable, "-m", "vaekit", "serve", "--library", str(library), "--port", str(port),
        "--vae", "small-sd1", "--max-body-mb", str(MAX_BODY / 1024 / 1024), "--max-pixels", str(MAX_PIXELS),
        "--batch-window-ms", "30", "--max-batch", "8", "--log-level", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


@contextmanager
def threaded_server(**changes: object) -> Iterator[tuple[str, object]]:
    """A uvicorn server in a thread with custom settings; yields (url, asgi app)."""
    from vaekit.interfaces.server import ServerSettings, create_app, make_server

    port = free_port()
    settings = ServerSettings(port=port, include_bundled=False, default_vae="small-sd1").replace(**changes)
    app = create_app(settings)
    server = make_server(app, "127.0.0.1", port, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server thread did not start"
            time.sleep(0.05)
        yield url, app
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# --- helpers -----------------------------------------------------------------------------------------------------
def photo(width: int, height: int, seed: int = 0) -> torch.Tensor:
    """A smooth colourful test image (3, H, W) in [0, 1], exactly representable in 8 bits."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 4, 4, generator=g)
    img = torch.nn.functional.interpolate(low, size=(height, width), mode="bicubic", align_corners=False)[0]
    return (img.clamp(0, 1) * 255).round() / 255


def png_bytes(img: torch.Tensor, fmt: str = "PNG") -> bytes:
    arr = (img * 255).round().byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def decode_png(data: bytes) -> torch.Tensor:
    arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(arr).permute(2, 0, 1)


@pytest.fixture(scope="module")
def reference(library: Path, isolated_env: None) -> dict[str, VAE]:
    """The library's VAEs loaded in-process: the oracle for what the server returns."""
    return {
        "small-sd1": load_vae(library / "small-sd1.safetensors"),
        "small-taesd": load_vae(library / "small-taesd.safetensors"),
    }


def expect_error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == status
    for w in words:
        assert w.lower() in body["error"].lower(), body["error"]


def assert_alive(client: httpx.Client) -> None:
    assert client.get("/health").json()["status"] == "ok"


# --- library -----------------------------------------------------------------------------------------------------
def test_health_and_vae_list(client: httpx.Client, library: Path) -> None:
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["selected"] == "small-sd1"
    data = client.get("/vaes").json()
    by_id = {v["id"]: v for v in data["vaes"]}
    assert {"small-sd1", "small-taesd"} <= set(by_id)
    assert "broken" not in by_id and any("broken" in w for w in data["warnings"])
    assert by_id["small-sd1"]["family"] == "sd1" and by_id["small-sd1"]["kind"] == "kl"
    assert by_id["small-taesd"]["kind"] == "tiny"
    assert by_id["small-sd1"]["sha256"] == file_sha256(library / "small-sd1.safetensors")
    assert all("path" not in v for v in data["vaes"])  # server paths are never shown


def test_select_then_requests_without_vae_use_it(client: httpx.Client) -> None:
    img = png_bytes(photo(64, 48))
    try:
        r = client.post("/vaes/select", json={"vae": "small-taesd"})
        assert r.status_code == 200 and r.json()["selected"] == "small-taesd"
        r = client.post("/roundtrip", content=img, headers={"Content-Type": "image/png"})
        assert r.status_code == 200 and r.headers["x-vaekit-vae"] == "small-taesd"
        # a hash prefix names a VAE too
        sha = next(v["sha256"] for v in client.get("/vaes").json()["vaes"] if v["id"] == "small-sd1")
        assert client.post("/vaes/select", json={"vae": sha[:8]}).json()["selected"] == "small-sd1"
    finally:
        client.post("/vaes/select", json={"vae": "small-sd1"})


@pytest.mark.parametrize(
    "name", ["nope", "../small-sd1.safetensors", "/etc/passwd", "..%2F..%2Fetc%2Fpasswd", "sd1", "taesd"]
)
def test_names_resolve_only_inside_the_library(client: httpx.Client, library: Path, name: str) -> None:
    expect_error(client.post("/vaes/select", json={"vae": name}), 404, "unknown VAE")
    outside = library.parent / "outside.safetensors"
    expect_error(client.post("/vaes/select", json={"vae": str(outside)}), 404, "unknown VAE")
    r = client.post("/encode", params={"vae": name}, content=png_bytes(photo(16, 16)))
    expect_error(r, 404, "unknown VAE")
    assert_alive(client)


# --- encode / decode / round trip --------------------------------------------------------------------------------
def test_encode_formats_match_the_library(client: httpx.Client, reference: dict[str, VAE], tmp_path: Path) -> None:
    img = photo(44, 30, seed=3)  # not a multiple of 8: padded, and the padding recorded
    ref = pipeline.encode(reference["small-sd1"], [img])
    want = ref.latents[0]
    r = client.post("/encode", files={"file": ("a.png", png_bytes(img), "image/png")})
    assert r.status_code == 200 and r.headers["content-type"] == "application/vnd.safetensors"
    (tmp_path / "z.safetensors").write_bytes(r.content)
    lat = load_latents(tmp_path / "z.safetensors")  # a real vaekit latent file
    assert lat.family == "sd1" and lat.image_size == (44, 30) and lat.padding == ref.paddings[0]
    torch.testing.assert_close(lat.latents[0], want, atol=1e-5, rtol=1e-5)
    j = client.post("/encode", params={"format": "json"}, content=png_bytes(img)).json()
    got = torch.from_numpy(np.frombuffer(base64.b64decode(j["latents"]), dtype="<f4").copy()).reshape(j["shape"])
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)
    assert j["image_size"] == [44, 30] and j["family"] == "sd1"
    raw = client.post("/encode", params={"format": "raw"}, content=png_bytes(img))
    shape = [int(d) for d in raw.headers["x-latent-shape"].split(",")]
    got = torch.from_numpy(np.frombuffer(raw.content, dtype="<f4").copy()).reshape(shape)
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)


def test_sixteen_bit_png_keeps_full_precision(client: httpx.Client, reference: dict[str, VAE], tmp_path: Path) -> None:
    import png  # pypng, what vaekit reads 16-bit colour PNGs with

    from vaekit.ops.images import read_image

    values = (photo(24, 16, seed=12) * 65535).round().to(torch.int64) + torch.arange(16).view(1, 16, 1)
    path = tmp_path / "deep.png"
    rows = values.clamp(0, 65535).permute(1, 2, 0).reshape(16, -1).numpy().astype(np.uint16)
    png.Writer(width=24, height=16, bitdepth=16, greyscale=False).write(path.open("wb"), rows.tolist())
    img = read_image(path).rgb
    assert img.unique().numel() > 256  # really more than 8 bits of precision
    want = pipeline.encode(reference["small-sd1"], [img]).latents[0]
    j = client.post("/encode", params={"format": "json"}, content=path.read_bytes()).json()
    got = torch.from_numpy(np.frombuffer(base64.b64decode(j["latents"]), dtype="<f4").copy()).reshape(j["shape"])
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)


def test_decode_safetensors_and_raw(client: httpx.Client, reference: dict[str, VAE]) -> None:
    vae = reference["small-sd1"]
    img = photo(44, 30, seed=4)
    st = client.post("/encode", content=png_bytes(img)).content
    r = client.post("/decode", content=st)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    got = decode_png(r.content)
    enc = pipeline.encode(vae, [img])
    want = pipeline.decode(vae, enc.latents, image_size=enc.image_sizes, padding=enc.paddings).images[0]
    assert got.shape == (3, 30, 44)  # cropped back to the original size from the file's metadata
    assert (got - want).abs().max() <= 1 / 255 + 1e-6
    for fmt, magic in (("jpeg", b"\xff\xd8"), ("webp", b"RIFF")):
        r = client.post("/decode", params={"format": fmt}, content=st)
        assert r.status_code == 200 and r.content.startswith(magic) and r.headers["content-type"] == f"image/{fmt}"
    # raw float16 latents with shape headers, two at once, back as a raw float32 tensor
    z = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(0)).half()
    headers = {"X-Latent-Shape": "2,4,6,5", "X-Latent-Dtype": "float16", "Content-Type": "application/octet-stream"}
    r = client.post("/decode", params={"format": "raw"}, content=z.numpy().tobytes(), headers=headers)
    assert r.status_code == 200 and r.headers["x-image-shape"] == "2,3,48,40"
    got = torch.from_numpy(np.frombuffer(r.content, dtype="<f4").copy()).reshape(2, 3, 48, 40)
    want = pipeline.decode(vae, z.float()).images
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_roundtrip_png_and_json(client: httpx.Client, reference: dict[str, VAE]) -> None:
    from skimage.metrics import peak_signal_noise_ratio

    img = photo(48, 40, seed=5)
    _, dec = pipeline.roundtrip(reference["small-taesd"], [img])
    want = dec.images[0]
    r = client.post("/roundtrip", params={"vae": "small-taesd"}, content=png_bytes(img))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert (decode_png(r.content) - want).abs().max() <= 1 / 255 + 1e-6
    oracle = peak_signal_noise_ratio(img.numpy(), want.numpy(), data_range=1.0)
    assert float(r.headers["x-vaekit-psnr"]) == pytest.approx(oracle, abs=1e-3)
    j = client.post("/roundtrip", params={"vae": "small-taesd", "format": "json"}, content=png_bytes(img)).json()
    assert j["metrics"]["psnr"] == pytest.approx(oracle, abs=1e-3)
    assert 0 < j["metrics"]["ssim"] <= 1 and j["latent_shape"] == [4, 5, 6]
    for key in ("reconstruction", "difference"):
        head, b64 = j["images"][key].split(",", 1)
        assert head == "data:image/png;base64" and Image.open(io.BytesIO(base64.b64decode(b64))).size == (48, 40)
    recon = decode_png(base64.b64decode(j["images"]["reconstruction"].split(",", 1)[1]))
    assert (recon - want).abs().max() <= 1 / 255 + 1e-6


def test_precision_option(client: httpx.Client) -> None:
    img = png_bytes(photo(32, 32, seed=6))
    r32 = client.post("/roundtrip", params={"precision": "fp32"}, content=img)
    r16 = client.post("/roundtrip", params={"precision": "bf16"}, content=img)
    assert r32.headers["x-vaekit-dtype"] == "float32" and r16.headers["x-vaekit-dtype"] == "bfloat16"
    a, b = decode_png(r32.content), decode_png(r16.content)
    assert 0 < (a - b).abs().mean() < 0.05  # close, but really computed in another dtype


def test_compare_reports_metrics_per_vae(client: httpx.Client, reference: dict[str, VAE]) -> None:
    from skimage.metrics import peak_signal_noise_ratio

    from vaekit.eval import metrics as eval_metrics

    img = photo(32, 32, seed=7)
    r = client.post("/compare", params={"vaes": "small-sd1,small-taesd"}, files={"file": ("x.png", png_bytes(img))})
    assert r.status_code == 200, r.text
    data = r.json()
    rows = {row["vae"]: row for row in data["results"]}
    assert set(rows) == {"small-sd1", "small-taesd"}
    for name, vae in reference.items():
        _, dec = pipeline.roundtrip(vae, [img])
        out = dec.images[0]
        assert rows[name]["psnr"] == pytest.approx(
            peak_signal_noise_ratio(img.numpy(), out.numpy(), data_range=1), abs=1e-3
        )
        library_metrics = eval_metrics.image_metrics(img, out)  # what `vaekit compare` reports for this pair
        for key in ("ssim", "ms_ssim", "saturation_ratio", "colourfulness_change", "delta_e"):
            want = library_metrics[key]
            got = rows[name][key]
            assert (got is None) if math.isnan(want) else got == pytest.approx(want, rel=1e-4, abs=1e-5), (
                name,
                key,
                got,
                want,
            )
        assert rows[name]["saturation_ratio"] > 0 and rows[name]["delta_e"] >= 0
    assert data["best"] == max(rows.values(), key=lambda row: row["psnr"])["vae"]


def test_latent_channels(client: httpx.Client, reference: dict[str, VAE]) -> None:
    img = photo(64, 48, seed=8)
    data = client.post("/latents/channels", content=png_bytes(img)).json()
    z = pipeline.encode(reference["small-sd1"], [img]).latents[0]
    assert data["shape"] == [4, 6, 8] and len(data["channels"]) == 4
    for c, ch in enumerate(data["channels"]):
        assert ch["mean"] == pytest.approx(float(z[c].mean()), abs=1e-4)
        assert ch["min"] == pytest.approx(float(z[c].min()), abs=1e-4)
        pic = Image.open(io.BytesIO(base64.b64decode(ch["image"].split(",", 1)[1])))
        assert pic.size == (32, 24)  # each latent cell enlarged 4 times
        arr = np.asarray(pic.convert("L"))
        assert arr.min() == 0 and arr.max() == 255  # normalised to its own range


def test_interpolate_streams_frames(client: httpx.Client, reference: dict[str, VAE]) -> None:
    a, b = photo(40, 32, seed=9), photo(40, 32, seed=10)
    files = {"a": ("a.png", png_bytes(a)), "b": ("b.png", png_bytes(b))}
    r = client.post("/interpolate", params={"steps": 5}, files=files)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    events = [json.loads(line) for line in r.text.splitlines()]
    assert events[0] == {"event": "start", "total": 5, "vae": "small-sd1", "latent_shape": [4, 4, 5]}
    frames = {e["index"]: e for e in events if e["event"] == "frame"}
    assert sorted(frames) == list(range(5)) and sorted(e["done"] for e in frames.values()) == [1, 2, 3, 4, 5]
    assert events[-1]["event"] == "done"
    _, dec = pipeline.roundtrip(reference["small-sd1"], [a, b])
    for index, want in ((0, dec.images[0]), (4, dec.images[1])):  # the ends are the plain round trips
        got = decode_png(base64.b64decode(frames[index]["image"].split(",", 1)[1]))
        assert (got - want).abs().max() <= 1 / 255 + 1e-6
    r = client.post("/interpolate", files={"a": ("a.png", png_bytes(a)), "b": ("b.png", png_bytes(photo(24, 24)))})
    expect_error(r, 400, "differ in size")
    r = client.post("/interpolate", params={"resize": "true", "steps": 2},
                    files={"a": ("a.png", png_bytes(a)), "b": ("b.png", png_bytes(photo(24, 24)))})  # fmt: skip
    assert r.status_code == 200 and r.text.splitlines()[-1].startswith('{"event": "done"')


# --- bad input ---------------------------------------------------------------------------------------------------
def _st_latents(z: torch.Tensor, metadata: dict[str, str] | None = None, name: str = "latents") -> bytes:
    return st_save({name: z.contiguous()}, metadata=metadata)


BAD_DECODES = [
    ("garbage", b"this is not safetensors at all", {}, 400, "not a safetensors"),
    ("truncated", _st_latents(torch.zeros(1, 4, 4, 4))[:-7], {}, 400, "does not fit"),
    ("huge header length", struct.pack("<Q", 1 << 40) + b"{}", {}, 400, "header length"),
    ("16 channels", _st_latents(torch.zeros(1, 16, 4, 4)), {}, 400, "16 channels"),
    ("rank 2", _st_latents(torch.zeros(4, 4)), {}, 400, "(n, c, h, w)"),
    ("nan", _st_latents(torch.full((1, 4, 4, 4), float("nan"))), {}, 400, "nan"),
    ("int tensor", st_save({"latents": torch.zeros(1, 4, 4, 4, dtype=torch.int32)}), {}, 400, "f32, f16 or bf16"),
    ("two tensors", st_save({"a": torch.zeros(1), "b": torch.zeros(1)}), {}, 400, "none named 'latents'"),
    ("raw wrong size", b"\0" * 10, {"X-Latent-Shape": "1,4,4,4"}, 400, "needs 256 bytes"),
    ("raw bad shape", b"\0" * 16, {"X-Latent-Shape": "two,by,two"}, 400, "x-latent-shape"),
    ("raw bad dtype", b"\0" * 64, {"X-Latent-Shape": "4,2,2", "X-Latent-Dtype": "int8"}, 400, "x-latent-dtype"),
    ("raw inf", torch.full((4, 2, 2), float("inf")).numpy().tobytes(), {"X-Latent-Shape": "4,2,2"}, 400, "infinite"),
    (
        "other family",
        _st_latents(
            torch.zeros(1, 4, 4, 4),
            {"format": "vaekit-latents", "vaekit.latents": json.dumps(
                {"family": "sdxl", "image_sizes": [[32, 32]], "paddings": [[0, 0, 0, 0]], "vae_sha256": "x"})},
        ),
        {},
        400,
        "sdxl",
    ),
    ("empty", b"", {}, 400, "empty"),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_DECODES, ids=[c[0] for c in BAD_DECODES])
def test_bad_latents_get_a_clear_4xx(client: httpx.Client, case: tuple) -> None:
    _, body, headers, status, words = case
    expect_error(client.post("/decode", content=body, headers=headers), status, words)
    assert_alive(client)


def test_bad_images_options_and_names(client: httpx.Client) -> None:
    img = photo(16, 16)
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    cases = [
        (client.post("/encode", content=gif.getvalue()), 415, "unsupported image format gif"),
        (client.post("/encode", content=b"\x89PNG\r\n\x1a\n-damaged-"), 400, "damaged image"),
        (client.post("/encode", content=b"plain text, not a picture"), 415, "not an image"),
        (client.post("/roundtrip", content=b""), 400, "empty upload"),
        (client.post("/encode", params={"format": "npy"}, content=png_bytes(img)), 415, "unsupported output format"),
        (client.post("/roundtrip", params={"format": "gif"}, content=png_bytes(img)), 415, "png, jpeg, webp"),
        (client.post("/encode", params={"precision": "fp8"}, content=png_bytes(img)), 400, "unknown precision"),
        (client.post("/encode", params={"tiling": "sideways"}, content=png_bytes(img)), 400, "unknown tiling"),
        (client.post("/encode", params={"vae": "missing"}, content=png_bytes(img)), 404, "unknown vae 'missing'"),
        (client.post("/vaes/select", json={}), 422, "vae"),
        (client.post("/interpolate", params={"steps": 1}, files={"a": png_bytes(img), "b": png_bytes(img)}), 422,
         "steps"),
        (client.post("/interpolate", files={"a": ("a.png", png_bytes(img))}), 400, "missing file field 'b'"),
        (client.post("/compare", params={"vaes": "small-sd1,nope"}, content=png_bytes(img)), 404, "nope"),
        (client.get("/no-such-route"), 404, "not found"),
    ]  # fmt: skip
    for response, status, words in cases:
        expect_error(response, status, words)
    assert_alive(client)


# --- caps --------------------------------------------------------------------------------------------------------
def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels but carries almost no data (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_size_caps(client: httpx.Client) -> None:
    big = os.urandom(MAX_BODY + 10)
    expect_error(client.post("/encode", content=big), 413, "over the cap")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap is enforced while the body streams in
        for _ in range(40):
            yield b"\0" * 65536

    expect_error(client.post("/decode", content=chunks()), 413, "over the cap")
    files = {"file": ("big.png", big, "image/png")}
    expect_error(client.post("/roundtrip", files=files), 413, "over the cap")
    expect_error(client.post("/encode", content=png_bytes(photo(300, 300))), 413, "pixels")
    expect_error(client.post("/encode", content=_png_header_only(50000, 50000)), 413, "pixels")
    expect_error(client.post("/encode", content=_png_header_only(200000, 200000)), 413, "decompression bomb")
    z = torch.zeros(1, 4, 40, 40)  # decodes to 320 x 320 > the cap
    expect_error(client.post("/decode", content=_st_latents(z)), 413, "pixels")
    headers = {"X-Latent-Shape": "17,4,1,1", "Content-Type": "application/octet-stream"}
    expect_error(client.post("/decode", params={"format": "raw"}, content=b"\0" * 17 * 16, headers=headers), 413, "17")
    assert_alive(client)


# --- concurrency -------------------------------------------------------------------------------------------------
def test_sixteen_concurrent_requests_are_batched_and_correct(server: str, reference: dict[str, VAE]) -> None:
    images = [photo(48 if i % 2 else 32, 32, seed=100 + i) for i in range(16)]  # two sizes, interleaved
    wants = pipeline.encode(reference["small-sd1"], images).latents  # a list in: grouped by size, two passes
    before = httpx.get(f"{server}/health").json()["stats"]

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server, timeout=120) as c:
            return await asyncio.gather(
                *(c.post("/encode", params={"format": "raw", "vae": "small-sd1"}, content=png_bytes(img))
                  for img in images)
            )  # fmt: skip

    responses = asyncio.run(main())
    for r, want in zip(responses, wants, strict=True):
        assert r.status_code == 200, r.text
        shape = [int(d) for d in r.headers["x-latent-shape"].split(",")]
        got = torch.from_numpy(np.frombuffer(r.content, dtype="<f4").copy()).reshape(shape)[0]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    after = httpx.get(f"{server}/health").json()["stats"]
    assert after["completed"] - before["completed"] == 16
    assert after["batches"] - before["batches"] < 16  # some requests shared a forward pass
    assert after["largest_batch"] > 1


# --- the server's own guards -------------------------------------------------------------------------------------
def test_token_required_on_every_request(library: Path, isolated_env: None) -> None:
    token = "s3cret-token-for-tests"
    with threaded_server(library=library, token=token) as (url, _):
        with httpx.Client(base_url=url) as c:
            for path in ("/health", "/vaes", "/", "/docs"):
                expect_error(c.get(path), 401, "token")
            expect_error(c.post("/encode", content=png_bytes(photo(16, 16))), 401, "token")
            expect_error(c.get("/health", headers={"Authorization": "Bearer wrong"}), 401, "token")
            expect_error(c.get("/health", headers={"Authorization": f"Bearer {token}x"}), 401, "token")
            good = {"Authorization": f"Bearer {token}"}
            assert c.get("/health", headers=good).status_code == 200
            r = c.post("/encode", content=png_bytes(photo(16, 16)), headers=good)
            assert r.status_code == 200
            assert c.get("/health", headers={"X-API-Token": token}).status_code == 200
            # the UI: /?token= sets a same-site cookie and drops the token from the address
            r = c.get("/", params={"token": token})
            assert r.status_code == 303 and r.headers["location"] == "/"
            assert "HttpOnly" in r.headers["set-cookie"] and "SameSite=Strict" in r.headers["set-cookie"]
            assert c.get("/").status_code == 200 and c.get("/vaes").status_code == 200  # the cookie now
            expect_error(httpx.get(f"{url}/", params={"token": "wrong"}), 401, "token")


def test_remote_binding_needs_a_flag_and_a_token(library: Path, isolated_env: None) -> None:
    from vaekit.errors import BadInputError
    from vaekit.interfaces.cli import main
    from vaekit.interfaces.server import ServerSettings, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.com")
    env = dict(os.environ)
    env.pop("VAEKIT_TOKEN", None)
    assert main(["serve", "--host", "0.0.0.0", "--library", str(library)], env=env) == 2
    assert main(["serve", "--host", "0.0.0.0", "--allow-remote", "--library", str(library)], env=env) == 2
    with pytest.raises(BadInputError, match="allow-remote"):
        ServerSettings(host="0.0.0.0").validated()
    with pytest.raises(BadInputError, match="token"):
        ServerSettings(host="0.0.0.0", allow_remote=True).validated()
    with pytest.raises(BadInputError, match="too short"):
        ServerSettings(host="0.0.0.0", allow_remote=True, token="abc").validated()
    ServerSettings(host="0.0.0.0", allow_remote=True, token="long-enough-token").validated()


def test_cross_site_requests_refused(client: httpx.Client, server: str) -> None:
    img = png_bytes(photo(16, 16))
    expect_error(client.post("/encode", content=img, headers={"Origin": "http://evil.example"}), 403, "cross-origin")
    expect_error(client.get("/health", headers={"Host": "evil.example"}), 403, "loopback")
    same = server.removeprefix("http://")
    assert client.post("/encode", content=img, headers={"Origin": f"http://{same}"}).status_code == 200
    # a sandboxed iframe on any site sends "Origin: null"; another scheme or port is another origin
    for origin in ("null", "NULL", f"https://{same}", f"ws://{same}", f"http://{same}0", "http://localhost"):
        for method, path in (("POST", "/roundtrip"), ("POST", "/vaes/select"), ("GET", "/vaes")):
            r = client.request(method, path, content=img, headers={"Origin": origin})
            expect_error(r, 403, "refused")
    # without an Origin, the browser's own word: cross-site fetches are refused, navigations to the page are not
    expect_error(client.post("/roundtrip", content=img, headers={"Sec-Fetch-Site": "cross-site"}), 403, "cross-site")
    nav = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
    assert client.get("/", headers=nav).status_code == 200
    assert client.post("/encode", content=img, headers={"Sec-Fetch-Site": "same-origin"}).status_code == 200
    assert client.post("/vaes/select", json={"vae": "small-sd1"}, headers={"Sec-Fetch-Site": "none"}).status_code == 200


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (5, 5), (5, 40), (40, 4), (6, 6), (11, 9)])
def test_tiny_images_round_trip(client: httpx.Client, reference: dict[str, VAE], size: tuple[int, int]) -> None:
    w, h = size
    img = photo(w, h, seed=w * 100 + h)
    _, dec = pipeline.roundtrip(reference["small-sd1"], [img])
    r = client.post("/roundtrip", content=png_bytes(img))
    assert r.status_code == 200, r.text
    got = decode_png(r.content)
    assert got.shape == (3, h, w) and (got - dec.images[0]).abs().max() <= 1 / 255 + 1e-6
    small = min(w, h) <= 5  # smaller than half the SSIM window: SSIM is not measurable, the rest is
    assert r.headers["x-vaekit-ssim"] == "n/a" if small else 0 < float(r.headers["x-vaekit-ssim"]) <= 1
    j = client.post("/roundtrip", params={"format": "json"}, content=png_bytes(img)).json()
    assert math.isfinite(j["metrics"]["psnr"]) and (j["metrics"]["ssim"] is None) == small
    assert j["image_size"] == [w, h]
    rows = client.post("/compare", params={"vaes": "small-sd1,small-taesd"}, content=png_bytes(img)).json()
    assert len(rows["results"]) == 2 and all(math.isfinite(row["psnr"]) for row in rows["results"])
    channels = client.post("/latents/channels", content=png_bytes(img))
    assert channels.status_code == 200 and channels.json()["shape"][1:] == [-(-h // 8), -(-w // 8)]
    files = {"a": ("a.png", png_bytes(img)), "b": ("b.png", png_bytes(photo(w, h, seed=1)))}
    stream = client.post("/interpolate", params={"steps": 3}, files=files)
    assert stream.status_code == 200 and json.loads(stream.text.splitlines()[-1])["event"] == "done"


def test_thin_images_are_capped_by_their_padded_size(client: httpx.Client) -> None:
    # 1 x 60,000 is under the cap of 256 x 256 pixels, but the VAE works on 8 x 60,000
    thin = io.BytesIO()
    Image.new("RGB", (1, 60_000), (10, 200, 30)).save(thin, format="PNG")
    before = client.get("/health").json()["stats"]["submitted"]
    for path in ("/encode", "/roundtrip", "/latents/channels", "/compare"):
        expect_error(client.post(path, content=thin.getvalue()), 413, "padded to 8x60000")
    assert client.get("/health").json()["stats"]["submitted"] == before  # refused before any work was queued
    assert_alive(client)


def test_empty_names_and_cli_words_are_refused(client: httpx.Client) -> None:
    for body in ({"vae": ""}, {"vae": "   "}, {"vae": None}, {"vae": 3}):
        expect_error(client.post("/vaes/select", json=body), 422, "vae")
    assert client.get("/health").json()["selected"] == "small-sd1"
    files = {"a": ("a.png", png_bytes(photo(40, 32))), "b": ("b.png", png_bytes(photo(24, 24)))}
    r = client.post("/interpolate", files=files)
    expect_error(r, 400, "resize=true")
    assert "--" not in r.json()["error"]


def test_compare_reports_compute_time_ties_and_images(client: httpx.Client, library: Path, tmp_path: Path) -> None:
    img = png_bytes(photo(32, 32, seed=13))
    r = client.post("/compare", params={"vaes": "small-sd1,small-taesd", "images": "true"}, content=img)
    data = r.json()
    assert data["best"] == data["results"][0]["vae"] and data["tied"] == []
    for row in data["results"]:
        assert 0 < row["seconds"] < 30
        pic = Image.open(io.BytesIO(base64.b64decode(row["image"].split(",", 1)[1])))
        assert pic.size == (32, 32)
    # the same VAE twice (a hash prefix and the name) is one row; a tie is no winner
    sha = next(v["sha256"] for v in client.get("/vaes").json()["vaes"] if v["id"] == "small-sd1")
    one = client.post("/compare", params={"vaes": f"small-sd1,{sha[:10]}"}, content=img).json()
    assert len(one["results"]) == 1 and one["best"] == "small-sd1"


def test_full_queue_gets_503_and_slow_requests_504(library: Path, isolated_env: None) -> None:
    img = png_bytes(photo(16, 16))
    # A long batching window keeps the first request queued: the second finds the queue full.
    with threaded_server(library=library, max_queue=1, batch_window_ms=1500, request_timeout_s=0.6) as (url, _):

        async def main() -> tuple[httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                first = asyncio.ensure_future(c.post("/encode", content=img))
                await asyncio.sleep(0.3)
                second = await c.post("/encode", content=img)
                return await first, second

        first, second = asyncio.run(main())
        expect_error(second, 503, "busy")
        assert int(second.headers["retry-after"]) >= 1
        expect_error(first, 504, "timeout")
        time.sleep(1.5)
        assert httpx.get(f"{url}/health").json()["stats"]["timed_out"] == 1


def test_uploads_stay_in_a_private_temp_folder_removed_at_exit(library: Path, isolated_env: None) -> None:
    from vaekit.interfaces.server import server_state

    saved = tempfile.tempdir
    with threaded_server(library=library, max_body_bytes=8 * 1024 * 1024) as (url, app):
        tmpdir = server_state(app).tmpdir  # type: ignore[arg-type]
        assert tmpdir.is_dir() and tmpdir.name.startswith("vaekit-serve-")
        assert tempfile.gettempdir() == str(tmpdir)
        # a multipart upload over 1 MB spills to a temporary file: it must go to the private folder
        img = photo(256, 256, seed=11)
        noisy = (img + torch.rand(img.shape, generator=torch.Generator().manual_seed(0)) * 0.5).clamp(0, 1)
        data = png_bytes((noisy * 255).round() / 255)
        padding = b"\0" * (2 * 1024 * 1024)
        files = {"file": ("x.png", data, "image/png"), "padding": ("pad.bin", padding, "application/octet-stream")}
        r = httpx.post(f"{url}/encode", params={"format": "raw"}, files=files, timeout=60)
        assert r.status_code == 200, r.text
        assert list(tmpdir.iterdir()) == []  # nothing left behind after the request
    assert not tmpdir.exists()
    assert tempfile.tempdir == saved


# --- library-level units -----------------------------------------------------------------------------------------
def test_model_cache_keeps_under_its_cap(library: Path, isolated_env: None) -> None:
    from vaekit.interfaces.server.catalog import Catalog
    from vaekit.interfaces.server.model_cache import ModelCache, weight_bytes

    catalog = Catalog(library, include_bundled=False)
    big = ModelCache(catalog, device="cpu")
    sd1 = big.get("small-sd1", torch.float32)
    assert big.get("small-sd1", torch.float32) is sd1 and big.loads == 1  # loaded once, then kept
    cap = weight_bytes(sd1) + 1000
    cache = ModelCache(catalog, device="cpu", max_bytes=cap)
    cache.get("small-sd1", torch.float32)
    cache.get("small-taesd", torch.float32)  # 0.6 MB more: over the cap, the least recently used goes
    assert [m.name for m in cache.loaded()] == ["small-taesd"] and cache.evictions == 1
    cache.get("small-taesd", torch.bfloat16)
    assert {(m.name, m.dtype) for m in cache.loaded()} == {("small-taesd", "float32"), ("small-taesd", "bfloat16")}


def test_ui_page_and_docs_are_served(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and '<select id="vae"' in page.text and "/ui/app.js" in page.text
    assert "http" not in page.text.replace('href="/docs"', "")  # no CDN or other outside address
    js = client.get("/ui/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert client.get("/ui/style.css").status_code == 200
    for path in ("/docs", "/redoc"):  # the API pages load their scripts and styles from this server only
        docs = client.get(path)
        assert docs.status_code == 200
        assets = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
        assert assets and all(a.startswith("/") for a in assets), assets
        for asset in assets:
            assert client.get(asset).status_code == 200, asset
    paths = client.get("/openapi.json").json()["paths"]
    want = ["/vaes", "/vaes/select", "/encode", "/decode", "/roundtrip", "/compare", "/health", "/interpolate"]
    assert set(want) <= set(paths)
