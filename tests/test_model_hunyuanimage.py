"""HunyuanImage 2.1 VAE: parity with diffusers' AutoencoderKLHunyuanImage (same random weights), layouts, detection."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from vaekit.errors import LoadError
from vaekit.models.hunyuanimage import (
    DIFFUSERS_KEYS,
    MARKER_KEYS,
    PRESETS,
    TILING_HALO,
    HunyuanImageConfig,
    HunyuanImageVAE,
    config_from_diffusers,
    config_from_shapes,
    diffusers_config,
    expected_shapes,
    from_diffusers,
    normaliser_spec,
    parameter_count,
    to_diffusers,
)

diffusers = pytest.importorskip("diffusers")

# Downscale 32 like the release (6 levels, one resnet per level) and a shallow 3-level one with 2 resnets.
SMALL = {
    "deep": HunyuanImageConfig(latent_channels=16, block_channels=(32, 32, 32, 64, 64, 64), num_res_blocks=1),
    "shallow": HunyuanImageConfig(latent_channels=32, block_channels=(32, 64, 128), num_res_blocks=2),
}
REAL = PRESETS["hunyuanimage"]


def _twin(cfg: HunyuanImageConfig, seed: int = 0) -> torch.nn.Module:
    """diffusers' model for ``cfg`` with its own random init, GroupNorm weights and biases perturbed."""
    kwargs = diffusers_config(cfg)
    assert kwargs.pop("_class_name") == "AutoencoderKLHunyuanImage"
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKLHunyuanImage(**kwargs).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.add_(torch.randn_like(m.weight) * 0.1)
                m.bias.add_(torch.randn_like(m.bias) * 0.1)
    return model


def _ours(cfg: HunyuanImageConfig, sd: dict[str, torch.Tensor]) -> HunyuanImageVAE:
    with torch.device("meta"):
        model = HunyuanImageVAE(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def _assert_parity(model: HunyuanImageVAE, twin: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        post = twin.encode(x * 2 - 1).latent_dist
        mean, logvar = model.encode(x)
        torch.testing.assert_close(mean, post.mean, atol=1e-4, rtol=0)
        torch.testing.assert_close(logvar, post.logvar, atol=1e-4, rtol=0)
        z = torch.randn(mean.shape, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(model.decode(z), twin.decode(z).sample * 0.5 + 0.5, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_parity_with_diffusers_small_width(name: str) -> None:
    cfg = SMALL[name]
    twin = _twin(cfg)
    model = _ours(cfg, from_diffusers(twin.state_dict()))
    torch.manual_seed(1)
    _assert_parity(model, twin, torch.rand(2, 3, 2 * cfg.downscale, 3 * cfg.downscale))


def _fast_random_state(cfg: HunyuanImageConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for 400M parameters in about a second: scaled windows of one Gaussian buffer.

    Convs get std 1/sqrt(fan_in) so activations stay O(1); GroupNorm weights 1 + 0.1 N, biases 0.1 N.
    """
    gen = torch.Generator().manual_seed(seed)
    shapes = expected_shapes(cfg)
    pad = 4096
    longest: dict[int, int] = {}  # fan-in -> largest weight with it (1-D tensors: fan-in 0)
    for shape in shapes.values():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 0
        longest[fan_in] = max(longest.get(fan_in, 0), math.prod(shape) + pad)
    base = torch.randn(max(longest.values()), generator=gen)
    scaled = {f: base[:n] * (0.1 if f == 0 else 1 / math.sqrt(f)) for f, n in longest.items()}
    sd = {}
    for key, shape in shapes.items():
        n, fan_in = math.prod(shape), (math.prod(shape[1:]) if len(shape) > 1 else 0)
        off = int(torch.randint(0, longest[fan_in] - n + 1, (1,), generator=gen))
        sd[key] = scaled[fan_in][off : off + n].view(shape)
        if fan_in == 0 and ".norm" in key and key.endswith(".weight"):
            sd[key] = sd[key] + 1.0
    return sd


def test_parity_with_diffusers_real_width() -> None:
    sd = _fast_random_state(REAL)
    model = _ours(REAL, sd)
    kwargs = diffusers_config(REAL)
    kwargs.pop("_class_name")
    with torch.device("meta"):
        twin = diffusers.AutoencoderKLHunyuanImage(**kwargs)
    twin.load_state_dict(to_diffusers(sd), strict=True, assign=True)
    torch.manual_seed(1)
    _assert_parity(model, twin.eval(), torch.rand(1, 3, 64, 64))


def test_real_width_parameter_count_matches_diffusers() -> None:
    kwargs = diffusers_config(REAL)
    kwargs.pop("_class_name")
    with torch.device("meta"):
        twin = diffusers.AutoencoderKLHunyuanImage(**kwargs)
        model = HunyuanImageVAE(REAL)
    assert all(p.is_meta for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    assert n == sum(p.numel() for p in twin.parameters()) == parameter_count(REAL) == 405_575_491
    # The release's table gives exactly diffusers' keys, and every row of it is used.
    names = expected_shapes(REAL)
    assert set(to_diffusers({k: torch.empty(0) for k in names})) == set(twin.state_dict())
    assert all(any(k.startswith(src) for k in names) for src, _ in DIFFUSERS_KEYS)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_diffusers_round_trip_is_bit_exact(name: str) -> None:
    twin_sd = _twin(SMALL[name]).state_dict()
    back = to_diffusers(from_diffusers(twin_sd))
    assert list(back) == list(twin_sd)
    assert all(torch.equal(back[k], twin_sd[k]) for k in twin_sd)
    ours = from_diffusers(twin_sd)
    assert list(from_diffusers(to_diffusers(ours))) == list(ours)


def test_diffusers_keys_of_the_release() -> None:
    table = dict(DIFFUSERS_KEYS)
    # diffusers numbers resnets and resamplers in one list: 2 resnets + 1 downsample per level, 3 + 1 in the decoder
    assert table["encoder.down.1.block.0."] == "encoder.down_blocks.3."
    assert table["encoder.down.4.downsample.conv."] == "encoder.down_blocks.14.conv."
    assert table["encoder.down.5.block.1."] == "encoder.down_blocks.16."
    assert table["decoder.up.1.upsample.conv."] == "decoder.up_blocks.7.conv."
    assert table["decoder.up.5.block.2."] == "decoder.up_blocks.22."
    assert table["decoder.mid.attn_1.proj_out."] == "decoder.mid_block.attentions.0.proj."


def test_unexpected_keys_are_refused() -> None:
    with pytest.raises(LoadError, match="unexpected key"):
        to_diffusers({**{k: torch.zeros(1) for k in expected_shapes(SMALL["shallow"])}, "quant_conv.weight": 0})
    with pytest.raises(LoadError):
        from_diffusers({"encoder.conv_in.weight": torch.zeros(1)})


def test_config_from_shapes_bare_and_prefixed() -> None:
    for cfg in (*SMALL.values(), REAL):
        shapes = expected_shapes(cfg)
        assert config_from_shapes(shapes) == cfg
        for prefix in ("vae.", "first_stage_model."):
            baked = {prefix + k: s for k, s in shapes.items()}
            stripped = {k[len(prefix) :]: s for k, s in baked.items() if k.startswith(prefix)}
            assert config_from_shapes(stripped) == cfg
        assert all(k in shapes for k in MARKER_KEYS)
    # Tencent's loader also takes conv weights with a length-1 time axis
    five_d = {k: (s[:2] + (1,) + s[2:] if len(s) == 4 else s) for k, s in expected_shapes(REAL).items()}
    assert config_from_shapes(five_d) == REAL


def test_config_from_shapes_rejects_other_layouts_and_bad_files() -> None:
    from vaekit.models import KLConfig, build

    for kl_cfg in (KLConfig(), KLConfig(latent_channels=16, use_quant_conv=False)):  # SD1 and FLUX.1 shapes
        kl = {k: tuple(v.shape) for k, v in build(kl_cfg, device="meta").state_dict().items()}
        assert config_from_shapes(kl) is None
    assert config_from_shapes({"decoder.conv_in.weight": (1024, 64, 3, 3)}) is None
    shapes = expected_shapes(SMALL["deep"])
    missing = {k: s for k, s in shapes.items() if k != "decoder.up.2.block.0.conv2.bias"}
    with pytest.raises(LoadError, match="1 missing"):
        config_from_shapes(missing)
    with pytest.raises(LoadError, match="unexpected"):
        config_from_shapes({**shapes, "decoder.up.9.block.0.conv1.weight": (32, 32, 3, 3)})
    with pytest.raises(LoadError, match="wrong shape"):
        config_from_shapes({**shapes, "encoder.mid.attn_1.q.weight": (64, 64)})
    with pytest.raises(LoadError, match="incomplete"):
        config_from_shapes({k: s for k, s in shapes.items() if not k.startswith("decoder.conv_in")})


def test_non_square_shapes_and_range() -> None:
    cfg = SMALL["deep"]
    torch.manual_seed(0)
    model = HunyuanImageVAE(cfg).eval()
    with torch.no_grad():
        mean, logvar = model.encode(torch.rand(1, 3, 64, 96))
        assert mean.shape == logvar.shape == (1, 16, 2, 3)
        assert logvar.min() >= -30 and logvar.max() <= 20
        assert model.decode(mean).shape == (1, 3, 64, 96)


def test_config_dict_diffusers_config_and_normaliser() -> None:
    assert (REAL.downscale, REAL.latent_channels, REAL.gaussian, REAL.family) == (32, 64, True, "hunyuanimage")
    assert json.loads(json.dumps(REAL.to_dict()))["block_channels"] == [128, 256, 512, 512, 1024, 1024]
    dc = diffusers_config(REAL)
    assert (dc["spatial_compression_ratio"], dc["scaling_factor"], dc["layers_per_block"]) == (32, 0.75289, 2)
    for cfg in (*SMALL.values(), REAL):
        assert config_from_diffusers(diffusers_config(cfg)) == cfg
    assert normaliser_spec(REAL) == {"kind": "scalar", "scale": 0.75289, "shift": 0.0}
    with pytest.raises(LoadError, match="AutoencoderKL,"):
        config_from_diffusers({**dc, "_class_name": "AutoencoderKL"})
    with pytest.raises(LoadError, match="match_channel"):
        config_from_diffusers({**dc, "upsample_match_channel": False})
    with pytest.raises(LoadError, match="spatial_compression_ratio 16"):
        config_from_diffusers({**dc, "spatial_compression_ratio": 16})
    with pytest.raises(LoadError, match="lacks"):
        config_from_diffusers({k: v for k, v in dc.items() if k != "latent_channels"})


@pytest.mark.parametrize(
    "change",
    [
        {"block_channels": (48, 96)},
        {"latent_channels": 48},
        {"block_channels": (32, 256)},
        {"block_channels": (128,)},
        {"num_res_blocks": 0},
    ],
)
def test_invalid_configs_are_refused(change: dict) -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(SMALL["shallow"], **change)


def test_receptive_fields_match_tiling_halos() -> None:
    """Gradients of the conv path (norms and attention, which are global, replaced by identities) at the real depth."""
    cfg = HunyuanImageConfig(latent_channels=16, block_channels=(32,) * 6, num_res_blocks=2)
    torch.manual_seed(0)
    model = HunyuanImageVAE(cfg)

    def local_only(module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, torch.nn.GroupNorm) or name == "attn_1":
                setattr(module, name, torch.nn.Identity())
            else:
                local_only(child)

    local_only(model)
    x = torch.randn(1, 3, 32, 32 * 31, requires_grad=True)
    model.encode(x)[0][0, :, 0, 15].sum().backward()
    cols = x.grad.abs().sum(dim=(0, 1, 2)).nonzero().flatten()
    left, right = 32 * 15 - int(cols.min()), int(cols.max()) - (32 * 16 - 1)
    assert left == right == 444 and math.ceil(444 / 32) == TILING_HALO["encode"]
    z = torch.randn(1, 16, 1, 41, requires_grad=True)
    model.decode(z)[0, :, :, 32 * 20 : 32 * 21].sum().backward()
    cells = z.grad.abs().sum(dim=(0, 1, 2)).nonzero().flatten()
    assert 20 - int(cells.min()) == int(cells.max()) - 20 == TILING_HALO["decode"] == 19
