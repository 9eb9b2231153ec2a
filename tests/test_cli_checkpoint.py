"""extract, bake and convert in-process: bit-exact checkpoints, round trips, atomic writes on a full disk."""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.test_cli import cli, make_env, one_line_error, vae_tensors, write_checkpoint, write_vae
from vaekit.formats.checkpoint import read_header


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A private library folder and config dir for one test."""
    return make_env(tmp_path)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _raw_tensor_bytes(path: Path) -> dict[str, bytes]:
    """Each tensor's bytes exactly as stored in the file."""
    header, _, start = read_header(path)
    data = path.read_bytes()
    return {k: data[start + v["data_offsets"][0] : start + v["data_offsets"][1]] for k, v in header.items()}


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def test_extract_gives_the_baked_vae(tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = write_checkpoint(tmp_path / "model.safetensors", dtype=torch.float16)
    out = tmp_path / "vae.safetensors"
    code, stdout, _ = cli(capsys, env, "extract", str(ckpt), "-o", str(out), "--json")
    assert code == 0 and json.loads(stdout)["family"] == "sd1"
    got = load_file(str(out))
    want = vae_tensors()
    assert set(got) == set(want)
    assert all(got[k].dtype == torch.float16 and torch.equal(got[k], want[k].half()) for k in want)
    meta = _metadata(out)
    assert json.loads(meta["vaekit.config"])["family"] == "sd1" and meta["vaekit.extracted_from"] == ckpt.name
    # the extracted file is a loadable VAE
    from vaekit.vae import load_vae

    assert load_vae(out).family == "sd1"


def test_extract_bad_input(tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    novae = write_checkpoint(tmp_path / "novae.safetensors", with_vae=False)
    code, _, err = cli(capsys, env, "extract", str(novae), "-o", str(tmp_path / "x.safetensors"))
    assert code == 2 and "holds no VAE" in one_line_error(err)
    assert not (tmp_path / "x.safetensors").exists()
    ckpt = write_checkpoint(tmp_path / "model.safetensors")
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"keep me")
    code, _, err = cli(capsys, env, "extract", str(ckpt), "-o", str(existing))
    assert code == 2 and "--overwrite" in one_line_error(err) and existing.read_bytes() == b"keep me"
    bare = write_vae(tmp_path / "bare.safetensors")
    code, _, err = cli(capsys, env, "extract", str(bare), "-o", str(tmp_path / "y.safetensors"))
    assert code == 2 and "vaekit convert" in one_line_error(err)


def test_bake_then_extract_is_exact(tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = write_checkpoint(tmp_path / "model.safetensors", seed=0, dtype=torch.float16)
    original_sha = _sha(ckpt)
    new_vae = write_vae(tmp_path / "better.safetensors", seed=5)
    baked = tmp_path / "baked.safetensors"
    code, out, _ = cli(capsys, env, "bake", str(ckpt), "--vae", str(new_vae), "-o", str(baked), "--json")
    report = json.loads(out)
    assert code == 0 and report["written"] == 244 and report["replaced"] == 244 and report["dtype"] == "float16"
    assert _sha(ckpt) == original_sha  # the original is untouched
    before, after = _raw_tensor_bytes(ckpt), _raw_tensor_bytes(baked)
    others = [k for k in before if not k.startswith("first_stage_model.")]
    assert len(others) == 4 and all(after[k] == before[k] for k in others)  # bit-exact
    assert _metadata(baked) == _metadata(ckpt)
    new = load_file(str(baked))
    assert all(new[k].dtype == load_file(str(ckpt))[k].dtype for k in new)
    extracted = tmp_path / "back.safetensors"
    assert cli(capsys, env, "extract", str(baked), "-o", str(extracted))[0] == 0
    got, want = load_file(str(extracted)), vae_tensors(seed=5)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k].half()) for k in want)


def test_bake_fp32_in_place_and_selection(
    tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = write_checkpoint(tmp_path / "model.safetensors", dtype=torch.float32)
    lib = Path(env["VAEKIT_HOME"])
    write_vae(lib / "chosen.safetensors", seed=7)
    assert cli(capsys, env, "use", "--for", str(ckpt), "chosen")[0] == 0
    others_before = {k: v for k, v in _raw_tensor_bytes(ckpt).items() if not k.startswith("first_stage_model.")}
    code, _, err = cli(capsys, env, "bake", str(ckpt), "--in-place")  # VAE from the per-checkpoint selection
    assert code == 0 and "chosen.safetensors" in err and "selected for model.safetensors" in err
    after = load_file(str(ckpt))
    want = vae_tensors(seed=7)
    assert all(torch.equal(after["first_stage_model." + k], want[k]) for k in want)
    assert all(_raw_tensor_bytes(ckpt)[k] == v for k, v in others_before.items())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_bake_bad_input(tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = write_checkpoint(tmp_path / "model.safetensors")
    flux = write_vae(tmp_path / "flux.safetensors", preset="flux")
    xl = write_vae(tmp_path / "xl.safetensors", preset="sdxl")
    code, _, err = cli(capsys, env, "bake", str(ckpt), "--vae", str(flux), "-o", str(tmp_path / "n.safetensors"))
    assert code == 2 and "16-channel" in one_line_error(err) and not (tmp_path / "n.safetensors").exists()
    code, _, err = cli(capsys, env, "bake", str(ckpt), "--vae", str(xl), "-o", str(tmp_path / "n.safetensors"))
    assert code == 2 and "sdxl VAE" in one_line_error(err)
    assert (
        cli(capsys, env, "bake", str(ckpt), "--vae", str(xl), "-o", str(tmp_path / "n.safetensors"), "--force")[0] == 0
    )
    code, _, err = cli(capsys, env, "bake", str(ckpt), "--vae", str(xl), "-o", str(ckpt))
    assert code == 2 and "--in-place" in one_line_error(err)
    code, _, err = cli(capsys, env, "bake", str(ckpt), "--vae", str(xl), "-o", str(tmp_path / "n.safetensors"))
    assert code == 2 and "--overwrite" in one_line_error(err)
    code, _, err = cli(capsys, env, "bake", str(ckpt), "--vae", str(xl))
    assert code == 2 and "-o NEW_CHECKPOINT" in one_line_error(err)
    novae = write_checkpoint(tmp_path / "novae.safetensors", with_vae=False)
    # a checkpoint without a VAE gets one, under the standard prefix
    sd1 = write_vae(tmp_path / "sd1.safetensors", seed=4)
    assert cli(capsys, env, "bake", str(novae), "--vae", str(sd1), "-o", str(tmp_path / "added.safetensors"))[0] == 0
    assert "first_stage_model.decoder.conv_out.weight" in load_file(str(tmp_path / "added.safetensors"))
    lora = tmp_path / "lora.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_down.alpha": torch.ones(1)}, str(lora))
    code, _, err = cli(capsys, env, "bake", str(lora), "--vae", str(sd1), "-o", str(tmp_path / "z.safetensors"))
    assert code == 2 and "a checkpoint?" in one_line_error(err)


@pytest.mark.parametrize("in_place", [False, True])
def test_full_disk_leaves_destination_untouched(
    tmp_path: Path,
    env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    in_place: bool,
) -> None:
    ckpt = write_checkpoint(tmp_path / "model.safetensors")
    vae = write_vae(tmp_path / "v.safetensors", seed=3)
    dest = ckpt if in_place else tmp_path / "out.safetensors"
    if not in_place:
        dest.write_bytes(b"the previous version")
    before = dest.read_bytes()

    def full_disk(src, out, begin, end):  # type: ignore[no-untyped-def]
        out.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("vaekit.formats.checkpoint.copy_range", full_disk)
    args = ["--in-place"] if in_place else ["-o", str(dest), "--overwrite"]
    code, _, err = cli(capsys, env, "bake", str(ckpt), "--vae", str(vae), *args)
    line = one_line_error(err)
    assert code == 1 and "no space left" in line and "nothing was written" in line
    assert dest.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted(
        ["model.safetensors", "v.safetensors"] + ([] if in_place else ["out.safetensors"])
    )


def test_convert_round_trips(tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    src = write_vae(tmp_path / "v.safetensors", seed=2)
    want = vae_tensors(seed=2)
    diff = tmp_path / "diffusers-vae"
    assert cli(capsys, env, "convert", str(src), "-o", str(diff), "--layout", "diffusers")[0] == 0
    assert (diff / "config.json").is_file()
    weights = load_file(str(diff / "diffusion_pytorch_model.safetensors"))
    assert "decoder.up_blocks.0.resnets.0.conv1.weight" in weights
    back = tmp_path / "back.safetensors"
    assert cli(capsys, env, "convert", str(diff), "-o", str(back), "--layout", "ldm")[0] == 0
    got = load_file(str(back))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    half = tmp_path / "half.safetensors"
    code, out, err = cli(
        capsys, env, "convert", str(src), "-o", str(half), "--dtype", "fp16", "--probe-size", "32", "--json"
    )
    assert code == 0 and json.loads(out)["fp16"]["verdict"] == "safe" and "warning" not in err
    got = load_file(str(half))
    assert all(got[k].dtype == torch.float16 and torch.equal(got[k], want[k].half()) for k in want)
    bf = tmp_path / "bf.safetensors"
    assert cli(capsys, env, "convert", str(half), "-o", str(bf), "--dtype", "bf16")[0] == 0
    assert all(v.dtype == torch.bfloat16 for v in load_file(str(bf)).values())
    # .ckpt (a plain pickle of tensors) to .safetensors, tensors unchanged
    ckpt = tmp_path / "old.ckpt"
    torch.save({"state_dict": {k: v.clone() for k, v in want.items()}, "global_step": 1234}, ckpt)
    converted = tmp_path / "from-ckpt.safetensors"
    assert cli(capsys, env, "convert", str(ckpt), "-o", str(converted))[0] == 0
    got = load_file(str(converted))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_convert_matches_diffusers(tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """The diffusers folder convert writes loads in diffusers and decodes like vaekit does."""
    diffusers = pytest.importorskip("diffusers")
    src = write_vae(tmp_path / "v.safetensors", seed=1)
    out = tmp_path / "d"
    assert cli(capsys, env, "convert", str(src), "-o", str(out), "--layout", "diffusers")[0] == 0
    theirs = diffusers.AutoencoderKL.from_pretrained(str(out)).eval()
    from vaekit.vae import load_vae

    ours = load_vae(src)
    z = torch.randn(1, 4, 3, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = theirs.decode(z).sample * 0.5 + 0.5
        got = ours.model.decode(z)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_convert_warns_when_fp16_overflows(
    tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    hot = write_vae(tmp_path / "hot.safetensors", scale_decoder_in=3e5)
    code, _, err = cli(
        capsys,
        env,
        "convert",
        str(hot),
        "-o",
        str(tmp_path / "h16.safetensors"),
        "--dtype",
        "fp16",
        "--probe-size",
        "32",
    )
    assert code == 0 and "warning:" in err and "overflows fp16" in err and "bf16" in err
    assert (tmp_path / "h16.safetensors").is_file()


def test_convert_bad_input(tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    src = write_vae(tmp_path / "v.safetensors")
    code, _, err = cli(capsys, env, "convert", str(src), "-o", str(tmp_path / "o.safetensors"), "--dtype", "fp8")
    assert code == 2 and "fp16, bf16 or fp32" in one_line_error(err)
    code, _, err = cli(capsys, env, "convert", str(src), "-o", str(tmp_path / "o.safetensors"), "--layout", "onnx")
    assert code == 2 and "ldm or diffusers" in one_line_error(err)
    code, _, err = cli(capsys, env, "convert", str(src), "-o", str(src))
    assert code == 2 and "that is the input" in one_line_error(err)
    unsafe = tmp_path / "evil.ckpt"
    import pickle

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("pwned",))

    with unsafe.open("wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    code, out, err = cli(capsys, env, "convert", str(unsafe), "-o", str(tmp_path / "e.safetensors"))
    assert code == 2 and "refused" in one_line_error(err) and "pwned" not in out
