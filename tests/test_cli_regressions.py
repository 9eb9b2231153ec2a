"""Regression tests for issue 16's bugs and friction (bugs 1, 6, 10 and Ctrl-C: test_cli_bad_inputs.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_cli import make_env, vae_tensors, write_checkpoint, write_image, write_vae
from vaekit.interfaces.cli import main


def run(capsys: pytest.CaptureFixture[str], env: dict[str, str], *argv: str) -> tuple[int, str, str]:
    """Run in-process; returns (exit code, stdout, stderr)."""
    code = main(list(argv), env)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error(err: str) -> str:
    """The only stderr line, checked to be an error without a traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A private library folder and config dir."""
    return make_env(tmp_path)


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo pwned",))


# --- bug 2: a refused pickle in the library ------------------------------------------------------------------------


def test_refused_pickle_does_not_break_the_library(
    tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    lib = Path(env["VAEKIT_HOME"])
    write_vae(lib / "good.safetensors")
    torch.save({"x": _Evil()}, lib / "evil.ckpt")
    (lib / "random.bin").write_bytes(os.urandom(2000))
    code, out, err = run(capsys, env, "list", "--json")
    data = json.loads(out)
    assert code == 0 and [e["name"] for e in data["entries"]] == ["good"]
    assert any("evil.ckpt: skipped" in w and "needs code" in w for w in data["warnings"])
    assert any("random.bin: skipped" in w for w in data["warnings"])
    assert run(capsys, env, "use", "good")[0] == 0
    img = write_image(tmp_path / "a.png", 16, 16)
    code, _, err = run(capsys, env, "roundtrip", str(img), "-o", str(tmp_path / "rt"), "--vae", "good")
    assert code == 0, err


# --- bug 3: clearing a per-checkpoint selection given by library name ------------------------------------------------


def test_use_for_name_clear_removes_the_entry(
    tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    write_vae(tmp_path / "webui" / "models" / "VAE" / "pick.safetensors")
    write_checkpoint(tmp_path / "webui" / "models" / "Stable-diffusion" / "dreamshaper_8.safetensors")
    root_env = {**env, "VAEKIT_HOME": str(tmp_path / "webui")}
    config = Path(env["VAEKIT_CONFIG"]) / "config.toml"
    assert run(capsys, root_env, "use", "--for", "dreamshaper_8", "pick")[0] == 0
    assert "dreamshaper_8" in config.read_text()
    code, out, _ = run(capsys, root_env, "use", "--for", "dreamshaper_8", "--clear")
    assert code == 0 and "cleared" in out
    assert "dreamshaper_8" not in config.read_text()
    code, _, err = run(capsys, root_env, "use", "--for", "dreamshaper_8", "--clear")  # nothing left to clear
    assert code == 2 and "nothing to clear" in one_error(err)


# --- bug 4: selecting a file that is not a VAE -----------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"notes, not a model\n", b"", b"\x80\x02evil"])
def test_use_refuses_a_file_that_is_not_a_vae(
    content: bytes, tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_bytes(content)
    code, _, err = run(capsys, env, "use", str(bad))
    assert code == 2 and "notes.txt" in one_error(err)
    assert not (Path(env["VAEKIT_CONFIG"]) / "config.toml").exists()
    evil = tmp_path / "evil.ckpt"
    torch.save({"x": _Evil()}, evil)
    code, _, err = run(capsys, env, "use", str(evil))
    assert code == 2 and "refused" in one_error(err)
    assert not (Path(env["VAEKIT_CONFIG"]) / "config.toml").exists()


# --- bug 5: --device on a machine without it ------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cuda", "cuda:3", "gpu", "mps", "tpu"])
def test_unusable_device_is_one_line_exit_2(
    device: str, tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    if device.startswith(("cuda", "gpu")) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    vae = write_vae(tmp_path / "v.safetensors")
    img = write_image(tmp_path / "a.png", 16, 16)
    for argv in (
        ["encode", str(img), "-o", str(tmp_path / "o"), "--vae", str(vae), "--device", device],
        ["inspect", str(vae), "--device", device],
    ):
        code, _, err = run(capsys, env, *argv)
        assert code == 2 and "--device" in one_error(err)
    assert not (tmp_path / "o").exists()


# --- bug 7: inspect a good and a bad file together -------------------------------------------------------------------


def test_inspect_reports_the_good_file_and_names_the_bad_one(
    tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_vae(tmp_path / "good.safetensors")
    from safetensors.torch import save_file

    novae = tmp_path / "novae_checkpoint.safetensors"
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4)}, str(novae))
    code, out, err = run(capsys, env, "inspect", str(good), str(novae), "--no-probe")
    assert code == 2 and "good.safetensors" in out and "sd1" in out
    assert "novae_checkpoint" in one_error(err) and "1 of 2" in err
    code, out, err = run(capsys, env, "inspect", str(good), str(novae), "--no-probe", "--json")
    data = json.loads(out)
    assert code == 2 and data[0]["family"] == "sd1" and "error" in data[1] and data[1]["path"] == str(novae)


# --- bug 8 and friction: alpha, 16-bit and greyscale survive encode -> decode --------------------------------------


def _roundtrip_files(tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str], img: Path) -> Path:
    vae = write_vae(tmp_path / "v.safetensors")
    common = ["--vae", str(vae), "--precision", "fp32"]
    assert run(capsys, env, "encode", str(img), "-o", str(tmp_path / "lat"), *common)[0] == 0
    code, _, err = run(capsys, env, "decode", str(tmp_path / "lat"), "-o", str(tmp_path / "dec"), *common)
    assert code == 0, err
    return tmp_path / "dec" / (img.stem + ".png")


def test_decode_restores_alpha(tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    src = write_image(tmp_path / "rgba.png", 21, 13, alpha=True)
    out = _roundtrip_files(tmp_path, env, capsys, src)
    with Image.open(src) as a, Image.open(out) as b:
        assert b.mode == "RGBA" and b.size == a.size
        assert np.array_equal(np.asarray(a)[..., 3], np.asarray(b)[..., 3])  # alpha exact, not re-encoded


def test_sixteen_bit_and_grey_keep_their_depth_and_mode(
    tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    import png

    yy, xx = np.mgrid[0:16, 0:24]
    grey16 = ((xx * 2000 + yy * 700) % 65536).astype(np.uint16)
    path16 = tmp_path / "rgb16.png"
    rgb16 = np.stack([grey16, grey16[::-1], grey16[:, ::-1]], axis=2)
    png.Writer(24, 16, greyscale=False, bitdepth=16).write(path16.open("wb"), rgb16.reshape(16, -1).tolist())
    out = _roundtrip_files(tmp_path / "a", env, capsys, path16)
    info = png.Reader(filename=str(out)).asDirect()[3]
    assert info["bitdepth"] == 16 and not info["greyscale"]
    pathl = tmp_path / "grey.png"
    Image.fromarray((grey16 >> 8).astype(np.uint8), "L").save(pathl)
    out = _roundtrip_files(tmp_path / "b", env, capsys, pathl)
    with Image.open(out) as im:
        assert im.mode == "L" and im.size == (24, 16)
    vae = tmp_path / "b" / "v.safetensors"
    code, _, _ = run(capsys, env, "roundtrip", str(path16), str(pathl), "-o", str(tmp_path / "rt"), "--vae", str(vae))
    assert code == 0
    assert png.Reader(filename=str(tmp_path / "rt" / "rgb16.png")).asDirect()[3]["bitdepth"] == 16
    with Image.open(tmp_path / "rt" / "grey.png") as im:
        assert im.mode == "L"


# --- bug 9: refusal messages -----------------------------------------------------------------------------------------


def test_pickle_refusals_say_what_is_wrong_in_one_clean_line(
    tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    rand = tmp_path / "random.ckpt"
    rand.write_bytes(os.urandom(3000))
    evil = tmp_path / "evil.bin"
    torch.save({"x": _Evil()}, evil, _use_new_zipfile_serialization=False)
    code, _, err = run(capsys, env, "inspect", str(rand))
    line = one_error(err)
    assert code == 2 and "not a PyTorch file" in line and "needs code" not in line and "Re-running" not in line
    code, _, err = run(capsys, env, "inspect", str(evil))
    line = one_error(err)  # one line: no UserWarning from PyTorch either
    assert code == 2 and "needs code" in line and "system" in line and "\x1b" not in err


def test_error_lines_carry_no_ansi_codes() -> None:
    from vaekit.errors import one_line, reason

    assert one_line("\x1b[31mred\x1b[0m\nsecond  line") == "red second line"
    assert reason(RuntimeError("\x1b[1mfirst\x1b[0m\nsecond")) == "first"


# --- friction: start-up, --version, width ---------------------------------------------------------------------------


def test_version_and_help_do_not_import_torch() -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys; from vaekit.interfaces.cli import main; "
        "rc = main(['--version']); rc2 = main(['--help']); "
        "print('torch' in sys.modules, 'rich' in sys.modules, rc, rc2)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(root / "src")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[0] == "vaekit 0.1.0"
    assert "encode" in done.stdout and "--version" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "False False 0 0"


def test_command_registry_matches_the_modules() -> None:
    import typer

    from vaekit.interfaces.cli import commands
    from vaekit.interfaces.cli.core import app

    commands.load_all()
    group = typer.main.get_group(app)
    assert set(group.commands) == set(commands.COMMANDS)
    for name, entry in commands.COMMANDS.items():
        callback = group.commands[name].callback
        if callback is not None:
            assert callback.__module__ == entry.module, name


def test_piped_output_is_full_width(tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    lib = Path(env["VAEKIT_HOME"])
    write_vae(lib / ("a-very-long-vae-name-that-would-be-cut-at-eighty-columns-" * 2 + "end.safetensors"))
    env = {k: v for k, v in env.items() if k != "COLUMNS"}
    code, out, _ = run(capsys, env, "list")
    assert code == 0 and "end" in out and "…" not in out and "..." not in out


# --- friction: --family -------------------------------------------------------------------------------------------


def test_family_flag_on_codec_commands_and_its_message(
    tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"  # no metadata: sd1 or sdxl cannot be told apart
    save_file(vae_tensors(), str(bare))
    img = write_image(tmp_path / "a.png", 16, 16)
    code, _, err = run(capsys, env, "encode", str(img), "-o", str(tmp_path / "l1"), "--vae", str(bare))
    assert code == 0 and "--family" in err and "family=" not in err
    code, _, err = run(
        capsys, env, "encode", str(img), "-o", str(tmp_path / "l2"), "--vae", str(bare), "--family", "sdxl"
    )
    assert code == 0 and "uncertain" not in err and "assumed" not in err
    from vaekit.formats.latent_file import load_latents

    assert load_latents(tmp_path / "l2" / "a.safetensors").family == "sdxl"
    for command in ("decode", "roundtrip"):
        src = str(tmp_path / "l2") if command == "decode" else str(img)
        argv = [command, src, "-o", str(tmp_path / command), "--vae", str(bare), "--family", "sdxl"]
        assert run(capsys, env, *argv)[0] == 0
    code, _, err = run(capsys, env, "encode", str(img), "-o", str(tmp_path / "l3"), "--family", "sd9")
    assert code == 2 and "--family" in one_error(err)


# --- friction: library names for bake/extract, identical copies, stale selections ---


def test_bake_and_extract_take_library_checkpoint_names(
    tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "webui"
    write_vae(root / "models" / "VAE" / "pick.safetensors", seed=4)
    write_checkpoint(root / "models" / "Stable-diffusion" / "dreamshaper_8.safetensors")
    e = {**env, "VAEKIT_HOME": str(root)}
    code, _, err = run(capsys, e, "extract", "dreamshaper_8", "-o", str(tmp_path / "x.safetensors"))
    assert code == 0, err
    code, _, err = run(capsys, e, "bake", "dreamshaper_8", "--vae", "pick", "-o", str(tmp_path / "b.safetensors"))
    assert code == 0, err
    code, _, err = run(capsys, e, "extract", "nosuch", "-o", str(tmp_path / "y.safetensors"))
    assert code == 2 and "nosuch" in one_error(err)


def test_identical_copies_are_one_vae_and_stale_selection_says_clear(
    tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    lib = Path(env["VAEKIT_HOME"])
    one = write_vae(lib / "a" / "same.safetensors")
    (lib / "b").mkdir()
    shutil.copy(one, lib / "b" / "same.safetensors")
    code, _, err = run(capsys, env, "use", "same")
    assert code == 0, err
    img = write_image(tmp_path / "a.png", 16, 16)
    code, _, err = run(capsys, env, "roundtrip", str(img), "-o", str(tmp_path / "rt"))
    assert code == 0, err
    shutil.rmtree(lib / "a")
    shutil.rmtree(lib / "b")
    code, _, err = run(capsys, env, "roundtrip", str(img), "-o", str(tmp_path / "rt2"))
    assert code == 2 and "vaekit use --clear" in one_error(err)


# --- friction: "made by another VAE" compares weights -------------------------------------------------------------


def test_same_weights_in_another_container_is_not_another_vae(
    tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    vae = write_vae(tmp_path / "v.safetensors")
    img = write_image(tmp_path / "a.png", 16, 16)
    assert run(capsys, env, "encode", str(img), "-o", str(tmp_path / "lat"), "--vae", str(vae))[0] == 0
    assert run(capsys, env, "convert", str(vae), "-o", str(tmp_path / "v_diffusers"), "--layout", "diffusers")[0] == 0
    code, _, err = run(
        capsys, env, "decode", str(tmp_path / "lat"), "-o", str(tmp_path / "d1"), "--vae", str(tmp_path / "v_diffusers")
    )
    assert code == 0 and "made by" not in err
    other = write_vae(tmp_path / "other.safetensors", seed=5)
    code, _, err = run(capsys, env, "decode", str(tmp_path / "lat"), "-o", str(tmp_path / "d2"), "--vae", str(other))
    assert code == 0 and "made by v.safetensors" in err


# --- friction: ComfyUI latent files and A1111's VAE hash ---


def test_comfyui_latent_files_both_ways(
    tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from vaekit.formats.latent_file import load_latents
    from vaekit.vae import load_vae

    vae = write_vae(tmp_path / "v.safetensors")
    img = write_image(tmp_path / "a.png", 24, 16)
    common = ["--vae", str(vae), "--precision", "fp32"]
    assert run(capsys, env, "encode", str(img), "-o", str(tmp_path / "ours"), *common)[0] == 0
    code, _, err = run(capsys, env, "encode", str(img), "-o", str(tmp_path / "comfy"), *common, "--format", "comfyui")
    assert code == 0, err
    path = tmp_path / "comfy" / "a.latent"
    model = load_vae(vae)
    ours = load_latents(tmp_path / "ours" / "a.safetensors").latents
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == {"latent_tensor", "latent_format_version_0"}
        raw = f.get_tensor("latent_tensor")
        assert json.loads(f.metadata()["vaekit"])["vae_name"] == "v.safetensors"
    torch.testing.assert_close(raw, model.denormalise(ours))  # ComfyUI stores the raw, unscaled latents
    # A file as ComfyUI's SaveLatent writes it (no vaekit notes) decodes at the latent's size.
    bare = tmp_path / "in" / "ComfyUI_00001_.latent"
    bare.parent.mkdir()
    save_file({"latent_tensor": raw, "latent_format_version_0": torch.tensor([])}, str(bare), {"prompt": "{}"})
    v0 = tmp_path / "in" / "old.latent"  # the first version: latents times 0.18215, no version marker
    save_file({"latent_tensor": raw * 0.18215}, str(v0))
    code, _, err = run(capsys, env, "decode", str(path), str(bare), str(v0), "-o", str(tmp_path / "dec"), *common)
    assert code == 0, err
    a, b, c = (np.asarray(Image.open(tmp_path / "dec" / n)) for n in ("a.png", "ComfyUI_00001_.png", "old.png"))
    assert a.shape == (16, 24, 3) and b.shape == (16, 24, 3) and np.array_equal(b, c)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_output_pngs_carry_the_vae_hash_the_a1111_way(
    tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    from vaekit.formats.image_meta import read_a1111_parameters
    from vaekit.formats.io import file_sha256

    vae = write_vae(tmp_path / "v.safetensors")
    img = write_image(tmp_path / "a.png", 16, 16)
    assert run(capsys, env, "roundtrip", str(img), "-o", str(tmp_path / "rt"), "--vae", str(vae))[0] == 0
    with Image.open(tmp_path / "rt" / "a.png") as im:
        params = read_a1111_parameters(im.text["parameters"])
    assert params["VAE hash"] == file_sha256(vae)[:10] and params["VAE"] == "v.safetensors"
    assert params["Size"] == "16x16"


# --- friction: the fp16 probe says what it is doing ------------------------------------------------------------------


def test_fp16_probe_shows_progress(
    tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import rich.console

    seen: list[str] = []
    real = rich.console.Console.status

    def status(self: rich.console.Console, text: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(str(text))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(rich.console.Console, "status", status)
    vae = write_vae(tmp_path / "v.safetensors")
    assert run(capsys, env, "inspect", str(vae), "--probe-size", "32")[0] == 0
    assert run(capsys, env, "convert", str(vae), "-o", str(tmp_path / "h.safetensors"), "--dtype", "fp16")[0] == 0
    assert len(seen) == 2 and all("fp16" in s and " px photo through" in s for s in seen)
