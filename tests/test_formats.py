"""Loading every supported layout and container, parity through each, and bit-exact round trips."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vaekit
from tests.conftest import diffusers_twin, small_config
from vaekit.errors import LoadError
from vaekit.formats.convert import diffusers_to_ldm, ldm_to_diffusers
from vaekit.formats.export import diffusers_config
from vaekit.formats.keymaps import DIFFUSERS_LEGACY_ALIASES


def _twin_and_ldm(name: str, seed: int = 0):
    cfg = small_config(name)
    twin = diffusers_twin(cfg, seed)
    return cfg, twin, diffusers_to_ldm(twin.state_dict(), cfg.kind)


def _assert_matches_twin(vae: vaekit.VAE, twin, cfg) -> None:
    torch.manual_seed(3)
    x = torch.rand(1, 3, 32, 40)
    with torch.no_grad():
        if cfg.kind == "kl":
            ref_mean = twin.encode(x * 2 - 1).latent_dist.mean
            mean, _ = vae.encode_posterior(x)
            torch.testing.assert_close(mean, ref_mean, atol=1e-4, rtol=0)
            lat = vae.encode(x)
            ref_img = (twin.decode(lat / cfg.scaling_factor + cfg.shift_factor).sample + 1) / 2
        else:
            lat = vae.encode(x)
            torch.testing.assert_close(lat, twin.encode(x * 2 - 1).latents, atol=1e-4, rtol=0)
            ref_img = twin.decode(lat).sample * 0.5 + 0.5
    torch.testing.assert_close(vae.decode(lat), ref_img.clamp(0, 1), atol=1e-4, rtol=0)


def _write_diffusers_folder(folder: Path, twin, cfg, legacy: bool = False) -> Path:
    folder.mkdir()
    sd = twin.state_dict()
    if legacy:
        inverse = [(new, old) for old, new in DIFFUSERS_LEGACY_ALIASES]
        sd = {next((k.replace(n, o) for n, o in inverse if n in k), k): v for k, v in sd.items()}
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps(diffusers_config(cfg)))
    return folder


@pytest.mark.parametrize("name", ["sd1", "sdxl", "sd3", "flux"])
def test_kl_loads_through_every_layout_with_parity(tmp_path: Path, name: str) -> None:
    cfg, twin, ldm = _twin_and_ldm(name)
    # 1. bare LDM safetensors (no vaekit metadata: detection from shapes only)
    save_file(ldm, tmp_path / "ldm.safetensors")
    # 2. diffusers folder, current and legacy attention names, and a pipeline folder with vae/
    _write_diffusers_folder(tmp_path / "diffusers", twin, cfg)
    _write_diffusers_folder(tmp_path / "legacy", twin, cfg, legacy=True)
    (tmp_path / "pipe").mkdir()
    _write_diffusers_folder(tmp_path / "pipe" / "vae", twin, cfg)
    # 3. full checkpoints: first_stage_model. (safetensors) and vae. prefixes, a state_dict-wrapped .ckpt
    unet = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}
    save_file({**{f"first_stage_model.{k}": v for k, v in ldm.items()}, **unet}, tmp_path / "ckpt.safetensors")
    save_file({f"vae.{k}": v for k, v in ldm.items()}, tmp_path / "vaeprefix.safetensors")
    wrapped = {"state_dict": {f"first_stage_model.{k}": v for k, v in ldm.items()}, "global_step": 7}
    torch.save(wrapped, tmp_path / "m.ckpt")
    # 4. fp16 file (loaded as fp32 by default)
    half = {k: v.half() for k, v in ldm.items()}
    save_file(half, tmp_path / "half.safetensors")

    sources = ["ldm.safetensors", "diffusers", "legacy", "pipe", "ckpt.safetensors", "vaeprefix.safetensors", "m.ckpt"]
    for src in sources:
        vae = vaekit.load_vae(tmp_path / src, family=cfg.family)
        assert vae.config.latent_channels == cfg.latent_channels, src
        _assert_matches_twin(vae, twin, cfg)
    info = vaekit.inspect(tmp_path / "half.safetensors")
    assert info.dtype == "float16"
    vae = vaekit.load_vae(tmp_path / "half.safetensors", family=cfg.family)
    assert vae.dtype == torch.float32
    torch.testing.assert_close(vae.state_dict()["decoder.conv_in.weight"], half["decoder.conv_in.weight"].float())


@pytest.mark.parametrize("name", ["taesd", "taef1"])
def test_tiny_loads_through_every_layout_with_parity(tmp_path: Path, name: str) -> None:
    cfg, twin, ldm = _twin_and_ldm(name)
    enc = {k.removeprefix("encoder."): v for k, v in ldm.items() if k.startswith("encoder.")}
    dec = {k.removeprefix("decoder."): v for k, v in ldm.items() if k.startswith("decoder.")}
    torch.save(enc, tmp_path / "taesd_encoder.pth")
    save_file(dec, tmp_path / "dec.safetensors")
    save_file(ldm, tmp_path / "combined.safetensors")
    comfy = {f"taesd_{k}": v for k, v in ldm.items()} | {"vae_scale": torch.tensor(1.0), "vae_shift": torch.tensor(0.0)}
    save_file(comfy, tmp_path / "comfy.safetensors")
    _write_diffusers_folder(tmp_path / "diffusers", twin, cfg)

    pair = [tmp_path / "dec.safetensors", tmp_path / "taesd_encoder.pth"]  # order does not matter
    for src in (pair, tmp_path / "combined.safetensors", tmp_path / "comfy.safetensors", tmp_path / "diffusers"):
        vae = vaekit.load_vae(src)
        assert vae.config.kind == "tiny" and vae.latent_channels == cfg.latent_channels
        _assert_matches_twin(vae, twin, cfg)

    # a lone decoder loads and decodes, but refuses to encode
    dec_only = vaekit.load_vae(tmp_path / "dec.safetensors")
    assert dec_only.origin.parts == ("decoder",)
    assert dec_only.decode(torch.randn(1, cfg.latent_channels, 4, 4)).shape == (1, 3, 32, 32)
    with pytest.raises(vaekit.BadInputError, match="no encoder"):
        dec_only.encode(torch.rand(1, 3, 32, 32))


@pytest.mark.parametrize("name", ["sd1", "sd3", "taesd"])
def test_round_trips_are_bit_exact(tmp_path: Path, name: str) -> None:
    cfg, twin, ldm = _twin_and_ldm(name)
    # LDM -> vaekit -> LDM
    save_file(ldm, tmp_path / "in.safetensors")
    vae = vaekit.load_vae(tmp_path / "in.safetensors")
    vaekit.save_vae(vae, tmp_path / "out.safetensors")
    out = load_file(tmp_path / "out.safetensors")
    assert out.keys() == ldm.keys()
    assert all(torch.equal(out[k], ldm[k]) for k in ldm)
    # diffusers -> vaekit -> diffusers
    _write_diffusers_folder(tmp_path / "d_in", twin, cfg)
    vae = vaekit.load_vae(tmp_path / "d_in")
    vaekit.save_vae(vae, tmp_path / "d_out", layout="diffusers")
    ref = twin.state_dict()
    got = load_file(tmp_path / "d_out" / "diffusion_pytorch_model.safetensors")
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    # the diffusers folder vaekit writes loads in diffusers itself, with the same outputs
    from diffusers import AutoencoderKL, AutoencoderTiny

    cls = AutoencoderTiny if cfg.kind == "tiny" else AutoencoderKL
    reloaded = cls.from_pretrained(tmp_path / "d_out")
    assert all(torch.equal(reloaded.state_dict()[k], ref[k]) for k in ref)
    assert reloaded.config.scaling_factor == pytest.approx(cfg.scaling_factor)


def test_fp16_export_and_metadata(tmp_path: Path) -> None:
    cfg, _twin, ldm = _twin_and_ldm("sdxl")
    save_file(ldm, tmp_path / "in.safetensors")
    vae = vaekit.load_vae(tmp_path / "in.safetensors", family="sdxl")
    vae.save(tmp_path / "half.safetensors", dtype=torch.float16)
    info = vaekit.inspect(tmp_path / "half.safetensors")
    assert (info.dtype, info.family, info.family_certain, info.family_source) == (
        "float16",
        "sdxl",
        True,
        "vaekit metadata",
    )
    with pytest.raises(vaekit.BadInputError, match="already exists"):
        vae.save(tmp_path / "half.safetensors")


def test_conversion_tables_invert_each_other() -> None:
    for name in ("sd1", "flux", "taesd"):
        cfg, twin, ldm = _twin_and_ldm(name)
        back = ldm_to_diffusers(ldm, cfg.kind)
        assert back.keys() == twin.state_dict().keys()
        again = diffusers_to_ldm(back, cfg.kind)
        assert all(torch.equal(again[k], ldm[k]) for k in ldm)


def test_strict_loading_names_the_bad_keys(tmp_path: Path) -> None:
    _cfg, _twin, ldm = _twin_and_ldm("sd1")
    missing = dict(ldm)
    del missing["decoder.mid.attn_1.q.bias"]
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(LoadError, match=r"missing \(decoder.mid.attn_1.q.bias\)"):
        vaekit.load_vae(tmp_path / "missing.safetensors")
    extra = dict(ldm, **{"decoder.mystery.weight": torch.zeros(3)})
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(LoadError, match="unexpected .*decoder.mystery.weight"):
        vaekit.load_vae(tmp_path / "extra.safetensors")
    wrong = dict(ldm, **{"decoder.conv_out.bias": torch.zeros(5)})
    save_file(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(LoadError, match="wrong shape .*decoder.conv_out.bias"):
        vaekit.load_vae(tmp_path / "wrong.safetensors")


def test_atomic_writes_leave_no_temp_file_and_normal_permissions(tmp_path: Path) -> None:
    from vaekit.formats.io import atomic_path

    dest = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert not dest.exists() and list(tmp_path.iterdir()) == []
    with atomic_path(dest) as tmp:
        tmp.write_text("whole")
    mask = os.umask(0)
    os.umask(mask)
    assert dest.read_text() == "whole" and (dest.stat().st_mode & 0o777) == (0o666 & ~mask)
    assert list(tmp_path.iterdir()) == [dest]
