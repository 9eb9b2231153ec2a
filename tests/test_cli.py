"""The command line in-process: inspect, list, use, encode/decode/roundtrip and their bad-input cases.

Helpers here (tiny VAE files, synthetic checkpoints, images, ``cli``) are shared with test_cli_checkpoint.py and
test_library.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.conftest import small_config
from vaekit.interfaces.cli import main
from vaekit.models import build
from vaekit.vae import VAE, save_vae

# --- helpers -----------------------------------------------------------------------------------------------------


def write_vae(path: Path, preset: str = "sd1", seed: int = 0, scale_decoder_in: float = 1.0) -> Path:
    """A small random VAE of ``preset`` saved as LDM safetensors (with vaekit metadata)."""
    cfg = small_config(preset)
    torch.manual_seed(seed)
    model = build(cfg)
    if scale_decoder_in != 1.0:
        with torch.no_grad():
            model.decoder.conv_in.weight.mul_(scale_decoder_in)
            model.decoder.conv_in.bias.mul_(scale_decoder_in)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_vae(VAE(model, cfg), path, overwrite=True)
    return path


def vae_tensors(preset: str = "sd1", seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of the VAE :func:`write_vae` makes with the same arguments."""
    torch.manual_seed(seed)
    return build(small_config(preset)).state_dict()


def write_checkpoint(
    path: Path,
    preset: str = "sd1",
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    with_vae: bool = True,
    metadata: dict[str, str] | None = None,
) -> Path:
    """A synthetic full checkpoint: ``first_stage_model.*`` VAE keys plus fake diffusion/text tensors."""
    sd: dict[str, torch.Tensor] = {}
    if with_vae:
        sd = {"first_stage_model." + k: v.to(dtype) for k, v in vae_tensors(preset, seed).items()}
    g = torch.Generator().manual_seed(123)
    channels = 16 if preset in ("sd3", "flux") else 4
    marker = {
        "sd3": "model.diffusion_model.joint_blocks.0.w",
        "flux": "model.diffusion_model.double_blocks.0.w",
        "sdxl": "model.diffusion_model.label_emb.0.0.weight",
    }.get(preset, "model.diffusion_model.input_blocks.0.0.weight")
    sd[marker] = torch.randn(8, channels, 3, 3, generator=g).to(dtype)
    sd["model.diffusion_model.out.2.bias"] = torch.randn(4, generator=g).to(dtype)
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    sd["alphas_cumprod"] = torch.rand(1000, generator=g, dtype=torch.float64)
    meta = {"modelspec.title": "synthetic", "note": "kept bit-exact"} if metadata is None else metadata
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata=meta)
    return path


def write_image(path: Path, w: int = 40, h: int = 24, seed: int = 0, alpha: bool = False) -> Path:
    """A smooth random colour image (a blurred gradient plus noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx / w, yy / h, 0.5 + 0.3 * np.sin(xx / 5.0)], axis=2) + rng.normal(0, 0.05, (h, w, 3))
    arr = (np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr, "RGB")
    if alpha:
        im.putalpha(Image.fromarray((xx * 255 // max(w - 1, 1)).astype(np.uint8), "L"))
    im.save(path)
    return path


def make_env(tmp_path: Path) -> dict[str, str]:
    """A private library folder and config dir for one test (the environment ``main`` runs with)."""
    (tmp_path / "lib").mkdir(exist_ok=True)
    return {
        "VAEKIT_HOME": str(tmp_path / "lib"),
        "VAEKIT_CONFIG": str(tmp_path / "config"),
        "HOME": str(tmp_path),
        "PATH": os.environ.get("PATH", ""),
    }


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A private library folder and config dir for one test."""
    return make_env(tmp_path)


@pytest.fixture
def bundled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for the bundled default VAE file."""
    path = write_vae(tmp_path / "bundled" / "vaekit-small.safetensors", seed=9)
    monkeypatch.setattr("vaekit.weights.DEFAULT_VAE_PATH", path)
    return path


def cli(capsys: pytest.CaptureFixture[str], env: dict[str, str], *argv: str) -> tuple[int, str, str]:
    """Run ``vaekit argv`` in-process; returns (exit code, stdout, stderr)."""
    code = main(list(argv), env)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str) -> str:
    """The error line (exactly one) the command printed."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# --- inspect -----------------------------------------------------------------------------------------------------


def test_inspect_table_and_json(tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    vae = write_vae(tmp_path / "a.safetensors")
    code, out, _ = cli(capsys, env, "inspect", str(vae), "--probe-size", "32")
    assert code == 0
    for text in ("sd1", "kl / ldm", "bare", "0.18215", "ok (244 tensors finite", "safe: max |activation|"):
        assert text in out
    code, out, _ = cli(capsys, env, "inspect", str(vae), "--probe-size", "32", "--json")
    data = json.loads(out)[0]
    assert code == 0 and data["family"] == "sd1" and data["latent_channels"] == 4
    assert data["weights"] == {"tensors": 244, "nonfinite": [], "all_zero": [], "ok": True}
    assert data["fp16"]["verdict"] == "safe" and 0 < data["fp16"]["max_abs"] < 1000
    assert data["fp16"]["module"].startswith(("encoder.", "decoder.", "quant_conv", "post_quant_conv"))


def test_inspect_finds_broken_weights_and_fp16_overflow(
    tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.safetensors"
    sd = vae_tensors()
    sd["decoder.conv_out.weight"][0, 0, 0, 0] = float("nan")
    sd["encoder.conv_in.weight"].zero_()
    cfg = small_config("sd1")
    from vaekit.formats.export import metadata_for

    save_file(sd, str(broken), metadata_for(cfg))
    hot = write_vae(tmp_path / "hot.safetensors", scale_decoder_in=3e5)
    code, out, _ = cli(capsys, env, "inspect", str(broken), str(hot), "--probe-size", "32", "--json")
    assert code == 0
    b, h = json.loads(out)
    assert b["weights"]["nonfinite"] == ["decoder.conv_out.weight"]
    assert b["weights"]["all_zero"] == ["encoder.conv_in.weight"] and b["weights"]["ok"] is False
    assert b["fp16"] is None  # not probed: the weights are not finite
    assert h["fp16"]["fp16_overflows"] is True and h["fp16"]["max_abs"] > 65504
    code, out, _ = cli(capsys, env, "inspect", str(hot), "--probe-size", "32")
    assert "overflows" in out and "use bf16 or fp32" in out


def test_inspect_unknown_file_is_bad_input(
    tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "notes.bin"
    junk.write_bytes(b"definitely not weights")
    code, _, err = cli(capsys, env, "inspect", str(junk))
    assert code == 2 and str(junk) in one_line_error(err)
    code, _, err = cli(capsys, env, "inspect", str(tmp_path / "missing.safetensors"))
    assert code == 2 and "no such file" in one_line_error(err)


# --- list and use ------------------------------------------------------------------------------------------------


def test_list_table_json_and_cache_hit(
    tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    lib = Path(env["VAEKIT_HOME"])
    write_vae(lib / "anime.safetensors", seed=1)
    write_vae(lib / "sub" / "wide.safetensors", preset="sd3", seed=2)
    code, out, err = cli(capsys, env, "list")
    assert code == 0 and "anime" in out and "wide" in out and "sd3" in out
    assert "2 read and hashed, 0 from the cache" in err
    # The second listing is served from the cache: hashing again would fail here.
    monkeypatch.setattr("vaekit.library.file_sha256", lambda *a, **k: pytest.fail("re-hashed a cached file"))
    monkeypatch.setattr("vaekit.library.describe_file", lambda *a, **k: pytest.fail("re-read a cached file"))
    code, out, err = cli(capsys, env, "list", "--json")
    data = json.loads(out)
    assert code == 0 and data["hashed"] == 0 and data["cached"] == 2
    assert {e["name"]: e["family"] for e in data["entries"]} == {"anime": "sd1", "wide": "sd3"}
    assert all(len(e["short_hash"]) == 10 for e in data["entries"])


def test_list_skips_unreadable_entries_and_refuses_missing_folder(
    tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    lib = Path(env["VAEKIT_HOME"])
    write_vae(lib / "good.safetensors")
    (lib / "truncated.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    (lib / "dangling.safetensors").symlink_to(tmp_path / "gone.safetensors")
    code, out, err = cli(capsys, env, "list", "--json")
    data = json.loads(out)
    assert code == 0 and [e["name"] for e in data["entries"]] == ["good"]
    assert any("truncated.safetensors: skipped" in w for w in data["warnings"])
    assert any("dangling.safetensors: skipped" in w for w in data["warnings"])
    assert "warning:" in err
    code, _, err = cli(capsys, env, "list", "--home", str(tmp_path / "nowhere"))
    assert code == 2 and "VAEKIT_HOME" in one_line_error(err)


def test_list_recognises_a1111_and_comfyui_roots(
    tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    a1111, comfy = tmp_path / "webui", tmp_path / "ComfyUI"
    write_vae(a1111 / "models" / "VAE" / "a1111-vae.safetensors")
    write_checkpoint(a1111 / "models" / "Stable-diffusion" / "model.safetensors")
    write_vae(comfy / "models" / "vae" / "comfy-vae.safetensors", seed=3)
    code, out, _ = cli(capsys, env, "list", "--home", str(a1111), "--json")
    data = json.loads(out)
    assert code == 0 and data["layout"] == "a1111" and [e["name"] for e in data["entries"]] == ["a1111-vae"]
    code, out, _ = cli(capsys, env, "list", "--home", str(a1111), "--checkpoints", "--json")
    entries = json.loads(out)["entries"]
    assert [(e["name"], e["container"]) for e in entries] == [("model", "checkpoint")]
    code, out, _ = cli(capsys, env, "list", "--home", str(comfy), "--json")
    data = json.loads(out)
    assert data["layout"] == "comfyui" and [e["name"] for e in data["entries"]] == ["comfy-vae"]


def test_selection_precedence_flag_checkpoint_global_default(
    tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str], bundled: Path
) -> None:
    lib = Path(env["VAEKIT_HOME"])
    glob_vae = write_vae(lib / "global-pick.safetensors", seed=1)
    ckpt_vae = write_vae(lib / "ckpt-pick.safetensors", seed=2)
    flag_vae = write_vae(tmp_path / "flag.safetensors", seed=3)
    ckpt = write_checkpoint(tmp_path / "model.safetensors")

    def effective(*extra: str) -> dict[str, str]:
        code, out, _ = cli(capsys, env, "use", *extra, "--json")
        assert code == 0
        return json.loads(out)["effective"]

    assert effective()["path"] == str(bundled) and effective()["reason"] == "bundled default"
    assert cli(capsys, env, "use", "global-pick")[0] == 0
    assert effective()["path"] == str(glob_vae)
    assert effective("--for", str(ckpt))["path"] == str(glob_vae)  # no per-checkpoint choice yet
    assert cli(capsys, env, "use", "--for", str(ckpt), "ckpt-pick")[0] == 0
    assert effective("--for", str(ckpt))["path"] == str(ckpt_vae)
    assert effective()["path"] == str(glob_vae)  # other checkpoints keep the global choice
    config = (Path(env["VAEKIT_CONFIG"]) / "config.toml").read_text()
    assert 'vae = "global-pick"' in config and "ckpt-pick" in config
    # Commands print which VAE they use and why; the flag beats everything.
    img = write_image(tmp_path / "img.png", 16, 16)
    code, _, err = cli(capsys, env, "encode", str(img), "-o", str(tmp_path / "o1"), "--precision", "fp32")
    assert code == 0 and f"VAE: {glob_vae}" in err and "global selection" in err
    code, _, err = cli(capsys, env, "encode", str(img), "-o", str(tmp_path / "o2"), "--vae", str(flag_vae))
    assert code == 0 and f"VAE: {flag_vae} (--vae)" in err
    # Clearing falls back: checkpoint -> global -> bundled default.
    assert cli(capsys, env, "use", "--for", str(ckpt), "--clear")[0] == 0
    assert effective("--for", str(ckpt))["path"] == str(glob_vae)
    assert cli(capsys, env, "use", "--clear")[0] == 0
    assert effective()["path"] == str(bundled)
    code, _, err = cli(capsys, env, "encode", str(img), "-o", str(tmp_path / "o3"))
    assert code == 0 and f"VAE: {bundled} (bundled default)" in err


def test_use_refuses_ambiguous_unknown_and_mismatched(
    tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    lib = Path(env["VAEKIT_HOME"])
    one = write_vae(lib / "a" / "twin.safetensors", seed=1)
    two = write_vae(lib / "b" / "twin.safetensors", seed=2)
    write_vae(lib / "flux-vae.safetensors", preset="flux", seed=3)
    write_vae(lib / "xl.safetensors", preset="sdxl", seed=4)
    ckpt = write_checkpoint(tmp_path / "sd15.safetensors")
    code, _, err = cli(capsys, env, "use", "twin")
    line = one_line_error(err)
    assert code == 2 and str(one) in line and str(two) in line and "matches 2 VAEs" in line
    code, _, err = cli(capsys, env, "use", "nosuchvae")
    assert code == 2 and "vaekit list" in one_line_error(err)
    code, _, err = cli(capsys, env, "use", "--for", str(ckpt), "flux-vae")
    assert code == 2 and "16-channel latents" in one_line_error(err) and "--force" in err
    code, _, err = cli(capsys, env, "use", "--for", str(ckpt), "xl")
    assert code == 2 and "sdxl VAE" in one_line_error(err)
    code, _, _ = cli(capsys, env, "use", "--for", str(ckpt), "xl", "--force")
    assert code == 0
    assert not (Path(env["VAEKIT_CONFIG"]) / "config.toml").read_text().count("flux-vae")


# --- encode, decode, roundtrip -----------------------------------------------------------------------------------


def test_encode_decode_roundtrip_files(tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    vae = write_vae(tmp_path / "v.safetensors")
    images = tmp_path / "imgs"
    write_image(images / "a.png", 40, 24, seed=1)
    write_image(images / "nested" / "b.png", 19, 13, seed=2, alpha=True)
    (images / "broken.png").write_bytes(b"not a png")
    common = ["--vae", str(vae), "--precision", "fp32"]
    code, out, err = cli(capsys, env, "encode", str(images), "-o", str(tmp_path / "lat"), *common, "--json")
    data = json.loads(out)
    assert code == 0 and "broken.png" in err and "skipped" in err
    assert sorted(Path(r["output"]).name for r in data["items"]) == ["a.safetensors", "b.safetensors"]
    from vaekit.formats.latent_file import load_latents

    lf = load_latents(tmp_path / "lat" / "b.safetensors")
    assert lf.latents.shape == (1, 4, 2, 3) and lf.image_sizes == [(19, 13)] and lf.family == "sd1"
    code, out, err = cli(capsys, env, "decode", str(tmp_path / "lat"), "-o", str(tmp_path / "dec"), *common)
    assert code == 0 and "decoded 2 images in" in out and "s/image" in out
    assert Image.open(tmp_path / "dec" / "a.png").size == (40, 24)
    assert Image.open(tmp_path / "dec" / "b.png").size == (19, 13)
    # The CLI's decode gives exactly what the API gives.
    from vaekit.ops import codec as pipeline
    from vaekit.vae import load_vae

    model = load_vae(vae)
    lat = load_latents(tmp_path / "lat" / "a.safetensors")
    ref = pipeline.decode(model, lat.latents, pipeline.CodecOptions(), image_size=lat.image_size, padding=lat.padding)
    got = torch.from_numpy(np.asarray(Image.open(tmp_path / "dec" / "a.png"), dtype=np.float32) / 255).permute(2, 0, 1)
    assert (got - ref.images[0]).abs().max() <= 1 / 255 + 1e-6

    code, out, err = cli(capsys, env, "roundtrip", str(images / "a.png"), str(images / "nested"), "-o",
                         str(tmp_path / "rt"), *common, "--json")  # fmt: skip
    data = json.loads(out)
    assert code == 0 and len(data["items"]) == 2
    for item in data["items"]:
        written = Image.open(item["output"])
        assert written.size == tuple(item["size"]) and item["output"].endswith(".png")
        assert 0 < item["psnr"] < 100
    assert Image.open(tmp_path / "rt" / "b.png").mode == "RGBA"  # alpha carried through
    # psnr is the reconstruction's, recomputed from the API
    _, dec = pipeline.roundtrip(model, torch.from_numpy(np.asarray(Image.open(images / "a.png"), dtype=np.float32)
                                                        / 255).permute(2, 0, 1).unsqueeze(0))  # fmt: skip
    src = torch.from_numpy(np.asarray(Image.open(images / "a.png"), dtype=np.float32) / 255).permute(2, 0, 1)
    mse = float(((dec.images[0] - src) ** 2).mean())
    a_item = next(i for i in data["items"] if i["input"].endswith("a.png"))
    assert a_item["psnr"] == pytest.approx(10 * np.log10(1 / mse), abs=1e-3)
    code, out, _ = cli(capsys, env, "roundtrip", str(images / "a.png"), "-o", str(tmp_path / "rt2"), *common)
    assert code == 0 and "PSNR" in out and "reconstructed 1 image in" in out and "rt2" in out


def test_codec_bad_input(tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    vae = write_vae(tmp_path / "v.safetensors")
    img = write_image(tmp_path / "x.png", 16, 16)
    common = ["--vae", str(vae), "--precision", "fp32"]
    assert cli(capsys, env, "encode", str(img), "-o", str(tmp_path / "out"), *common)[0] == 0
    before = (tmp_path / "out" / "x.safetensors").read_bytes()
    code, _, err = cli(capsys, env, "encode", str(img), "-o", str(tmp_path / "out"), *common)
    assert code == 2 and "--overwrite" in one_line_error(err)
    assert (tmp_path / "out" / "x.safetensors").read_bytes() == before
    assert cli(capsys, env, "encode", str(img), "-o", str(tmp_path / "out"), *common, "--overwrite")[0] == 0
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_bytes(b"nope")
    code, _, err = cli(capsys, env, "encode", str(junk), "-o", str(tmp_path / "o2"), *common)
    assert code == 2 and "readable image" in one_line_error(err)
    code, _, err = cli(capsys, env, "encode", str(tmp_path / "nothing*.png"), "-o", str(tmp_path / "o3"), *common)
    assert code == 2 and "no such file" in one_line_error(err)
    code, _, err = cli(capsys, env, "encode", str(img), "-o", str(tmp_path / "o4"), *common, "--max-memory", "lots")
    assert code == 2 and "3GB" in one_line_error(err)
    code, _, err = cli(capsys, env, "decode", str(img), "-o", str(tmp_path / "o5"), *common)
    assert code == 2 and "not a vaekit latent file" in one_line_error(err)
    code, _, err = cli(capsys, env, "roundtrip", str(img), "-o", str(tmp_path / "o6"), "--vae", "nosuch")
    assert code == 2 and "nosuch" in one_line_error(err)
    # latents of a 16-channel VAE refused by a 4-channel one
    flux = write_vae(tmp_path / "flux.safetensors", preset="flux")
    assert cli(capsys, env, "encode", str(img), "-o", str(tmp_path / "fl"), "--vae", str(flux))[0] == 0
    code, _, err = cli(capsys, env, "decode", str(tmp_path / "fl"), "-o", str(tmp_path / "o7"), *common)
    assert code == 2 and "16 channels" in one_line_error(err)
    assert not (tmp_path / "o7").exists() or not any((tmp_path / "o7").iterdir())


def test_parse_memory_and_builtin_inputs() -> None:
    from vaekit.errors import BadInputError
    from vaekit.interfaces.cli.common import expand_images, parse_memory
    from vaekit.ops.images import builtin_image_paths

    assert parse_memory("3GB") == 3 * 10**9
    assert parse_memory("512MiB") == 512 * 2**20
    assert parse_memory("1.5 GiB") == int(1.5 * 2**30)
    assert parse_memory("2G") == 2 * 2**30 and parse_memory("4096") == 4096 and parse_memory(None) is None
    for bad in ("", "3 parsecs", "-1GB", "0"):
        with pytest.raises(BadInputError):
            parse_memory(bad)
    photos = expand_images(["builtin"])
    assert photos == builtin_image_paths() and len(photos) >= 3 and all(p.is_file() for p in photos)


def test_unknown_command_and_option_are_usage_errors(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(capsys, env, "frobnicate")[0] == 2
    assert cli(capsys, env, "list", "--no-such-flag")[0] == 2
    code, out, _ = cli(capsys, env, "--help")
    assert code == 0
    for command in ("inspect", "list", "use", "encode", "decode", "roundtrip", "extract", "bake", "convert"):
        assert command in out


def test_decoded_latent_file_has_same_tensors_as_api(tmp_path: Path, env: dict[str, str], capsys) -> None:
    """encode --posterior stores the posterior mean/logvar the API computes."""
    vae = write_vae(tmp_path / "v.safetensors")
    img = write_image(tmp_path / "p.png", 24, 16)
    code, _, _ = cli(capsys, env, "encode", str(img), "-o", str(tmp_path / "l"), "--vae", str(vae), "--posterior",
                     "--precision", "fp32")  # fmt: skip
    assert code == 0
    stored = load_file(str(tmp_path / "l" / "p.safetensors"))
    from vaekit.ops import codec as pipeline
    from vaekit.ops.images import read_image
    from vaekit.vae import load_vae

    enc = pipeline.encode(load_vae(vae), read_image(img).rgb.unsqueeze(0), pipeline.CodecOptions())
    torch.testing.assert_close(stored["latents"], enc.latents)
    torch.testing.assert_close(stored["mean"], enc.mean)
    torch.testing.assert_close(stored["logvar"], enc.logvar)
