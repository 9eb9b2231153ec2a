"""DC-AE f32c32 (Sana): parity with diffusers' AutoencoderDC, key tables, recognition, meta build, shapes."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from vaekit.errors import LoadError
from vaekit.models import dcae

diffusers = pytest.importorskip("diffusers")

SMALL = dataclasses.replace(
    dcae.PRESETS["dcae"],
    latent_channels=8,
    encoder_widths=(8, 16, 16, 32, 32, 32),
    encoder_depths=(1, 2, 1, 2, 1, 1),
    decoder_widths=(8, 16, 32, 32, 32, 32),
    decoder_depths=(2, 1, 1, 1, 2, 1),
    head_dim=8,
)

# The dict diffusers' scripts/convert_dcae_to_diffusers.py writes for dc-ae-f32c32-sana-1.0 (as JSON).
SANA_DIFFUSERS_CONFIG = {
    "_class_name": "AutoencoderDC",
    "latent_channels": 32,
    "encoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "decoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "encoder_layers_per_block": [2, 2, 2, 3, 3, 3],
    "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
    "downsample_block_type": "conv",
    "upsample_block_type": "interpolate",
    "decoder_norm_types": "rms_norm",
    "decoder_act_fns": "silu",
    "scaling_factor": 0.41407,
}


@pytest.fixture(autouse=True)
def one_thread():
    """Run on one thread: the real-width model on two busy shared cores runs 2-3x slower with two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def twin(cfg: dcae.DCAEConfig, seed: int = 0) -> torch.nn.Module:
    """diffusers' AutoencoderDC of ``cfg``, random weights with every norm's weight and bias perturbed (fast fill)."""
    kwargs = dcae.diffusers_config(cfg)
    del kwargs["_class_name"]
    with torch.device("meta"):
        model = diffusers.AutoencoderDC(**kwargs)
    model = model.to_empty(device="cpu").eval()
    # Drawing 300 M normal numbers takes 15 s on this CPU: tile one draw of a prime length instead, from a different
    # start per tensor (no tensor dimension is a multiple of the period, so q/k/v rows etc. all differ).
    period = 1_000_003
    noise = torch.randn(2 * period, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for index, (name, p) in enumerate(model.named_parameters()):
            start = (index * 7919) % period
            flat = noise[start : start + period].repeat(p.numel() // period + 1)[: p.numel()].view(p.shape)
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * flat)
            elif p.ndim == 1:
                p.copy_(0.02 * flat)
            else:
                p.copy_(flat / math.sqrt(math.prod(p.shape[1:])))
    return model


def ours_from(ref: torch.nn.Module, cfg: dcae.DCAEConfig) -> dcae.DCAE:
    """Our model holding the twin's weights, loaded strictly through from_diffusers."""
    with torch.device("meta"):
        model = dcae.DCAE(cfg)
    model.load_state_dict(dcae.from_diffusers(ref.state_dict()), strict=True, assign=True)
    return model.eval()


def check_parity(cfg: dcae.DCAEConfig, height: int, width: int) -> None:
    ref = twin(cfg)
    ours = ours_from(ref, cfg)
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(1, 3, height, width, generator=gen)
    with torch.no_grad():
        z = ours.encode(images)
        assert z.shape == (1, cfg.latent_channels, height // 32, width // 32)
        assert (z - ref.encode(images * 2 - 1).latent).abs().max().item() <= 1e-4
        z = torch.randn(z.shape, generator=gen)
        out = ours.decode(z)
        assert out.shape == (1, 3, height, width)
        assert (out - (ref.decode(z).sample / 2 + 0.5)).abs().max().item() <= 1e-4


def test_parity_small_widths_non_square() -> None:
    check_parity(SMALL, 64, 96)


def test_parity_real_width_64px() -> None:
    check_parity(dcae.PRESETS["dcae"], 64, 64)


def test_diffusers_round_trip_bit_exact() -> None:
    sd = twin(SMALL).state_dict()
    ours = dcae.from_diffusers(sd)
    assert any(k.endswith("context_module.main.qkv.conv.weight") for k in ours)
    back = dcae.to_diffusers(ours)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(LoadError):
        dcae.from_diffusers({**sd, "encoder.mystery.weight": torch.zeros(1)})


def test_original_names() -> None:
    with torch.device("meta"):
        model = dcae.DCAE(dcae.PRESETS["dcae"])
    keys = set(model.state_dict())
    for key in (
        "encoder.project_in.conv.weight",
        "encoder.project_in.conv.bias",
        "encoder.stages.0.op_list.0.main.conv1.conv.weight",
        "encoder.stages.0.op_list.0.main.conv2.norm.weight",
        "encoder.stages.0.op_list.2.main.conv.weight",
        "encoder.stages.3.op_list.0.context_module.main.qkv.conv.weight",
        "encoder.stages.3.op_list.0.context_module.main.aggreg.0.0.weight",
        "encoder.stages.3.op_list.0.context_module.main.proj.norm.bias",
        "encoder.stages.5.op_list.2.local_module.main.point_conv.norm.weight",
        "encoder.project_out.main.op_list.0.conv.weight",
        "decoder.project_in.main.conv.weight",
        "decoder.stages.1.op_list.0.main.conv.conv.bias",  # diffusers' single-file marker key for DC-AE
        "decoder.project_out.op_list.0.weight",
        "decoder.project_out.op_list.2.conv.weight",
    ):
        assert key in keys, key
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.encoder.parameters()) > 1e8


def test_config_from_shapes() -> None:
    for cfg in (SMALL, dcae.PRESETS["dcae"]):
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in dcae.DCAE(cfg).state_dict().items()}
        assert dcae.config_from_shapes(shapes) == cfg
        for prefix in ("vae.", "first_stage_model."):
            wrapped = {prefix + k: s for k, s in shapes.items()}
            stripped = {k[len(prefix) :]: s for k, s in wrapped.items()}
            assert dcae.config_from_shapes(stripped) == cfg
    assert all(k in shapes for k in dcae.MARKER_KEYS)
    assert dcae.config_from_shapes({"encoder.conv_in.weight": (128, 3, 3, 3)}) is None
    assert dcae.config_from_shapes({"encoder.0.weight": (64, 3, 3, 3)}) is None
    incomplete = dict(shapes)
    del incomplete["decoder.stages.2.op_list.1.main.conv2.norm.weight"]
    with pytest.raises(LoadError, match="DC-AE"):
        dcae.config_from_shapes(incomplete)
    wrong = {**shapes, "encoder.project_in.conv.weight": (64, 3, 3, 3)}
    with pytest.raises(LoadError, match="DC-AE"):
        dcae.config_from_shapes(wrong)
    without_marker = {k: s for k, s in shapes.items() if k != "decoder.project_in.main.conv.weight"}
    with pytest.raises(LoadError, match="incomplete"):
        dcae.config_from_shapes(without_marker)
    unshuffle = {**shapes, "encoder.project_in.conv.conv.weight": (64, 3, 3, 3)}
    with pytest.raises(LoadError, match="pixel-unshuffle"):
        dcae.config_from_shapes(unshuffle)


def test_diffusers_config_round_trip() -> None:
    for cfg in (SMALL, dcae.PRESETS["dcae"]):
        assert dcae.config_from_diffusers(dcae.diffusers_config(cfg)) == cfg
    assert dcae.config_from_diffusers(SANA_DIFFUSERS_CONFIG) == dcae.PRESETS["dcae"]
    with pytest.raises(LoadError, match="upsample_block_type"):
        dcae.config_from_diffusers({**SANA_DIFFUSERS_CONFIG, "upsample_block_type": "pixel_shuffle"})
    with pytest.raises(LoadError, match="batch_norm"):
        dcae.config_from_diffusers({**SANA_DIFFUSERS_CONFIG, "decoder_norm_types": ["batch_norm"] * 6})


def test_preset_facts() -> None:
    cfg = dcae.PRESETS["dcae"]
    assert (cfg.downscale, cfg.gaussian, cfg.latent_channels, cfg.family, cfg.kind) == (32, False, 32, "dcae", "dcae")
    assert dcae.normaliser_spec(cfg) == {"kind": "scalar", "scale": 0.41407, "shift": 0.0}
    assert cfg.to_dict()["encoder_widths"] == [128, 256, 512, 512, 1024, 1024]
    with pytest.raises(ValueError):
        dcae.DCAE(dataclasses.replace(SMALL, head_dim=12))
