"""Detection from keys and shapes only, on synthetic state dicts of every layout, prefix and family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import vaekit
from tests.conftest import small_config
from vaekit.errors import LoadError
from vaekit.families import preset
from vaekit.formats import source as source_module
from vaekit.formats.convert import ldm_to_diffusers
from vaekit.formats.detect import detect
from vaekit.formats.io import file_sha256
from vaekit.models import build


def _shapes(name: str, full: bool = False) -> dict[str, tuple[int, ...]]:
    cfg = preset(name) if full else small_config(name)
    return {k: tuple(v.shape) for k, v in build(cfg, device="meta").state_dict().items()}


def _diffusers_shapes(name: str) -> dict[str, tuple[int, ...]]:
    cfg = small_config(name)
    sd = ldm_to_diffusers(build(cfg, device="meta").state_dict(), cfg.kind)
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize(
    ("name", "channels", "family", "certain"),
    [
        ("sd1", 4, "sd1", False),
        ("sdxl", 4, "sd1", False),  # same architecture: cannot be told from weights alone
        ("sd3", 16, "flux", False),
        ("flux", 16, "flux", False),
        ("taesd", 4, "sd1", False),
        ("taef1", 16, "flux", False),
    ],
)
def test_bare_files_of_every_family(name: str, channels: int, family: str, certain: bool) -> None:
    det = detect(_shapes(name))
    assert det.config.latent_channels == channels
    assert (det.family, det.family_certain, det.container, det.prefix) == (family, certain, "bare", "")
    assert det.layout == ("taesd" if name.startswith("tae") else "ldm")
    assert "cannot tell" in det.family_note
    assert detect(_shapes(name), family=name.replace("taesd", "sd1").replace("taef1", "flux")).family_certain


def test_architecture_is_recovered_exactly() -> None:
    for name in ("sd1", "sd3", "taesd"):
        cfg = preset(name)
        det = detect(_shapes(name, full=True))
        assert det.config.kind == cfg.kind
        if cfg.kind == "kl":
            c = det.config
            assert (c.base_channels, c.channel_mult, c.num_res_blocks) == (128, (1, 2, 4, 4), 2)
            assert det.config.use_quant_conv == cfg.use_quant_conv
        else:
            c = det.config
            assert (c.encoder_blocks, c.decoder_blocks, c.width) == ((1, 3, 3, 3), (3, 3, 3, 1), 64)


@pytest.mark.parametrize("name", ["sd1", "flux", "taesd", "taef1"])
def test_diffusers_layouts(name: str) -> None:
    det = detect(_diffusers_shapes(name))
    assert det.layout == ("taesd-diffusers" if name.startswith("tae") else "diffusers")
    assert det.config.latent_channels == small_config(name).latent_channels
    # the key map names every vaekit key
    assert set(det.key_map) == set(_shapes(name))


def test_legacy_diffusers_attention_names() -> None:
    shapes = _diffusers_shapes("sd1")
    old = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    legacy = {}
    for k, v in shapes.items():
        for new, name in old.items():
            k = k.replace(new, name)
        legacy[k] = v
    det = detect(legacy)
    assert det.layout == "diffusers" and set(det.key_map) == set(_shapes("sd1"))


def test_diffusers_config_decides_the_family() -> None:
    for scale, family in ((0.18215, "sd1"), (0.13025, "sdxl")):
        det = detect(_diffusers_shapes("sd1"), diffusers_config={"scaling_factor": scale, "norm_num_groups": 32})
        assert (det.family, det.family_certain) == (family, True)
        assert det.config.scaling_factor == scale
    det = detect(_diffusers_shapes("flux"), diffusers_config={"scaling_factor": 1.5305, "shift_factor": 0.0609})
    assert (det.family, det.config.shift_factor) == ("sd3", 0.0609)


@pytest.mark.parametrize(
    ("prefix", "unet_key", "family"),
    [
        ("first_stage_model.", "model.diffusion_model.input_blocks.0.0.weight", "sd1"),
        ("first_stage_model.", "model.diffusion_model.label_emb.0.0.weight", "sdxl"),
        ("first_stage_model.", "conditioner.embedders.1.model.ln_final.weight", "sdxl"),
        ("first_stage_model.", "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "sd3"),
        ("vae.", "double_blocks.0.img_attn.qkv.weight", "flux"),
        ("vae.", "model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "flux"),
    ],
)
def test_baked_checkpoints(prefix: str, unet_key: str, family: str) -> None:
    name = "sd1" if family in ("sd1", "sdxl") else "flux"
    shapes = {prefix + k: v for k, v in _shapes(name).items()} | {unet_key: (8, 8)}
    det = detect(shapes)
    assert (det.container, det.prefix, det.family, det.family_certain) == ("checkpoint", prefix, family, True)
    assert det.family_source == "checkpoint diffusion-model keys"
    assert all(v.startswith(prefix) for v in det.key_map.values())


def test_modelspec_metadata_names_the_family() -> None:
    meta = {"modelspec.architecture": "stable-diffusion-xl-v1-base/vae"}
    assert detect(_shapes("sd1"), metadata=meta).family == "sdxl"


def test_non_vae_keys_are_refused() -> None:
    with pytest.raises(LoadError, match="no VAE found"):
        detect({"model.diffusion_model.input_blocks.0.0.weight": (4, 4, 3, 3), "cond_stage_model.x": (3,)})


def test_known_hash_tells_sdxl_from_sd1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = small_config("sd1")
    torch.manual_seed(0)
    save_file(build(cfg).state_dict(), tmp_path / "vae.safetensors")
    assert vaekit.inspect(tmp_path / "vae.safetensors").family_certain is False
    sha = file_sha256(tmp_path / "vae.safetensors")
    monkeypatch.setitem(source_module.KNOWN_HASHES, sha, ("sdxl", "test entry"))
    info = vaekit.inspect(tmp_path / "vae.safetensors")
    assert (info.family, info.family_certain, info.family_source, info.normaliser_spec["scale"]) == (
        "sdxl",
        True,
        "known file hash",
        0.13025,
    )
    assert vaekit.load_vae(tmp_path / "vae.safetensors").family == "sdxl"


def test_inspect_reports_everything(tmp_path: Path) -> None:
    cfg = small_config("sd3")
    torch.manual_seed(0)
    model = build(cfg)
    unet = {"model.diffusion_model.joint_blocks.0.w": torch.zeros(2)}
    sd = {f"first_stage_model.{k}": v.half() for k, v in model.state_dict().items()} | unet
    save_file(sd, tmp_path / "ckpt.safetensors")
    info = vaekit.inspect(tmp_path / "ckpt.safetensors")
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    n_dec = sum(p.numel() for p in model.decoder.parameters())
    got = (info.family, info.container, info.layout, info.dtype, info.kind)
    assert got == ("sd3", "checkpoint", "ldm", "float16", "kl")
    assert (info.params_encoder, info.params_decoder, info.params_total) == (n_enc, n_dec, n_enc + n_dec)
    spec = info.normaliser_spec
    assert (spec["scale"], spec["shift"], info.latent_channels) == (1.5305, 0.0609, 16)
    assert info.sha256 == file_sha256(tmp_path / "ckpt.safetensors") and info.short_hash == info.sha256[:10]
    assert len(info.legacy_hash) == 8
    assert info.to_dict()["config"]["latent_channels"] == 16
