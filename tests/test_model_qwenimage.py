"""The Qwen-Image (Wan 2.1) VAE against diffusers' AutoencoderKLQwenImage with the same random weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vaekit.errors import BadInputError, LoadError
from vaekit.models import qwenimage as q

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4
SMALL = q.QwenImageConfig(base_dim=8)  # the release's depth and level structure at 1/12 of its width
TWO_LEVELS = q.QwenImageConfig(base_dim=4, dim_mult=(1, 2), num_res_blocks=1, temporal_downsample=(True,))


def diffusers_model(cfg: q.QwenImageConfig, seed: int = 0) -> torch.nn.Module:
    """Diffusers' model for ``cfg`` with random weights (PyTorch's default conv scale), gammas and biases perturbed.

    Built on the meta device and given the random tensors directly: initialising 127M parameters twice (diffusers',
    then ours) cost more than the forward passes at the real width.
    """
    kwargs = {k: v for k, v in q.diffusers_config(cfg).items() if not k.startswith("_")}
    with torch.device("meta"):
        model = diffusers.AutoencoderKLQwenImage(**kwargs).eval()
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in model.state_dict().items():
        if name.endswith("gamma"):
            sd[name] = 1 + 0.3 * torch.randn(p.shape, generator=gen)
        elif name.endswith("bias"):
            sd[name] = 0.1 * torch.randn(p.shape, generator=gen)
        else:
            bound = p[0].numel() ** -0.5  # 1 / sqrt(fan_in)
            sd[name] = (torch.rand(p.shape, generator=gen) * 2 - 1) * bound
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def ours_from(ref: torch.nn.Module, cfg: q.QwenImageConfig) -> q.QwenImageVAE:
    """Our model (built on meta), strictly loaded from the diffusers model's converted state dict."""
    with torch.device("meta"):
        model = q.QwenImageVAE(cfg).eval()
    model.load_state_dict(q.from_diffusers(ref.state_dict()), strict=True, assign=True)
    return model


def check_parity(cfg: q.QwenImageConfig, size: tuple[int, int], batch: int = 1) -> None:
    """Raw posterior (mean, logvar) and decode (raw and clamped) within TOL of diffusers."""
    ref = diffusers_model(cfg)
    ours = ours_from(ref, cfg)
    torch.manual_seed(1)
    images = torch.rand(batch, 3, *size)
    z = torch.randn(batch, cfg.latent_channels, size[0] // cfg.downscale, size[1] // cfg.downscale)
    with torch.no_grad():
        mean, logvar = ours.encode(images)
        post = ref.encode((images * 2 - 1).unsqueeze(2)).latent_dist
        decoded = ours.decode(z)
        raw = ref.decoder(ref.post_quant_conv(z.unsqueeze(2)))[:, :, 0]  # before diffusers' clamp
        clamped = ref.decode(z.unsqueeze(2)).sample[:, :, 0]
    assert mean.shape == (batch, cfg.latent_channels, size[0] // cfg.downscale, size[1] // cfg.downscale)
    assert (mean - post.mean[:, :, 0]).abs().max() <= TOL
    assert (logvar - post.logvar[:, :, 0]).abs().max() <= TOL
    assert decoded.shape == (batch, 3, *size)
    assert ((decoded * 2 - 1) - raw).abs().max() <= 2 * TOL  # [0, 1] here is [-1, 1] there: errors double
    assert (decoded.clamp(0, 1) - (clamped + 1) / 2).abs().max() <= TOL


def test_parity_small_width_non_square() -> None:
    check_parity(SMALL, (32, 48), batch=2)


def test_parity_two_levels() -> None:
    check_parity(TWO_LEVELS, (16, 12))


def test_parity_real_width() -> None:
    check_parity(q.PRESETS["qwenimage"], (64, 64))


def test_original_names_and_table_round_trip() -> None:
    ref = diffusers_model(SMALL)
    dsd = ref.state_dict()
    sd = q.from_diffusers(dsd)
    assert "encoder.conv1.weight" in sd and "decoder.middle.1.to_qkv.weight" in sd and "conv2.bias" in sd
    assert sd["encoder.conv1.weight"].shape == (8, 3, 3, 3, 3)  # 5-D causal conv weights kept
    assert sd["decoder.upsamples.4.shortcut.weight"].shape == (32, 16, 1, 1, 1)  # first block after an upsampler
    assert "decoder.upsamples.3.time_conv.weight" in sd and "encoder.downsamples.5.time_conv.weight" in sd
    back = q.to_diffusers(sd)
    assert list(back) == list(dsd) and all(torch.equal(back[k], dsd[k]) for k in dsd)
    ours = q.QwenImageVAE(SMALL).state_dict()
    assert q.from_diffusers(q.to_diffusers(ours)).keys() == ours.keys()
    with pytest.raises(LoadError, match="unexpected key"):
        q.from_diffusers({**dsd, "encoder.extra.weight": torch.zeros(1)})


def test_release_table_is_the_preset_table() -> None:
    with torch.device("meta"):
        ours = q.QwenImageVAE(q.PRESETS["qwenimage"]).state_dict()
        theirs = diffusers.AutoencoderKLQwenImage().state_dict()
    renamed = q.to_diffusers(ours)
    assert renamed.keys() == theirs.keys()
    assert all(tuple(renamed[k].shape) == tuple(theirs[k].shape) for k in theirs)
    assert q.diffusers_keys(q.PRESETS["qwenimage"]) == q.DIFFUSERS_KEYS


def test_config_from_shapes() -> None:
    for cfg in (SMALL, TWO_LEVELS, q.PRESETS["qwenimage"]):
        with torch.device("meta"):
            sd = q.QwenImageVAE(cfg).state_dict()
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        assert q.config_from_shapes(shapes) == cfg
        for prefix in ("vae.", "first_stage_model."):
            baked = {prefix + k: s for k, s in shapes.items()}
            stripped = {k.removeprefix(prefix): s for k, s in baked.items()}
            assert q.config_from_shapes(stripped) == cfg
            assert q.config_from_shapes(baked) is None  # prefixes are the caller's to strip
    assert all(k in shapes for k in q.MARKER_KEYS)


def test_config_from_shapes_refuses() -> None:
    shapes = {k: tuple(v.shape) for k, v in q.QwenImageVAE(SMALL).state_dict().items()}
    kl = {"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.mid.block_1.norm1.weight": (512,)}
    assert q.config_from_shapes(kl) is None
    assert q.config_from_shapes({**shapes, "decoder.upsamples.0.upsamples.0.residual.2.weight": (1,)}) is None
    missing = dict(shapes)
    del missing["decoder.upsamples.7.resample.1.weight"]
    with pytest.raises(LoadError, match="1 missing"):
        q.config_from_shapes(missing)
    with pytest.raises(LoadError, match="wrongly shaped"):
        q.config_from_shapes({**shapes, "decoder.middle.1.norm.gamma": (32, 1, 1, 1)})
    with pytest.raises(LoadError, match="5-D"):
        q.config_from_shapes({k: s for k, s in shapes.items() if k != "encoder.conv1.weight"})
    four = {**shapes, "encoder.head.2.weight": (8, 32, 3, 3, 3)}
    with pytest.raises(LoadError, match="4 latent channels"):
        q.config_from_shapes(four)


def test_meta_build_allocates_nothing() -> None:
    with torch.device("meta"):
        model = q.QwenImageVAE(q.PRESETS["qwenimage"])
        ref = diffusers.AutoencoderKLQwenImage()
    assert all(t.is_meta for t in model.state_dict().values())
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in ref.parameters())
    assert 126_000_000 < count < 128_000_000


def test_frames() -> None:
    model = q.QwenImageVAE(TWO_LEVELS).eval()
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        mean, _ = model.encode(x.unsqueeze(2))  # a video of one frame is one image
        assert torch.equal(mean, model.encode(x)[0])
        assert model.decode(mean.unsqueeze(2)).shape == (1, 3, 8, 8)
        with pytest.raises(BadInputError, match="3 frames.*single frames"):
            model.encode(x.unsqueeze(2).expand(1, 3, 3, 8, 8))
        with pytest.raises(BadInputError, match="2 frames"):
            model.decode(torch.zeros(1, 16, 2, 4, 4))
        with pytest.raises(BadInputError, match="3-D"):
            model.encode(x[0])


def test_configs_and_normaliser() -> None:
    cfg = q.PRESETS["qwenimage"]
    assert (cfg.downscale, cfg.gaussian, cfg.latent_channels, TWO_LEVELS.downscale) == (8, True, 16, 2)
    assert cfg.to_dict()["dim_mult"] == [1, 2, 4, 4] and cfg.to_dict()["kind"] == "qwenimage"
    for c in (cfg, TWO_LEVELS):  # to_dict round-trips the way vaekit.models.config_from_dict rebuilds configs
        assert q.QwenImageConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in c.to_dict().items()}) == c
    dc = q.diffusers_config(cfg)
    assert dc["_class_name"] == "AutoencoderKLQwenImage"
    assert q.config_from_diffusers(dc) == cfg == q.config_from_diffusers({"_class_name": "AutoencoderKLQwenImage"})
    assert q.config_from_diffusers(q.diffusers_config(TWO_LEVELS)) == dataclasses.replace(TWO_LEVELS)
    with pytest.raises(LoadError, match="attn_scales"):
        q.config_from_diffusers({**dc, "attn_scales": [0.5]})
    with pytest.raises(LoadError, match="16 values"):
        q.config_from_diffusers({**dc, "latents_mean": [0.0] * 4})
    spec = q.normaliser_spec(cfg)
    with torch.device("meta"):
        defaults = diffusers.AutoencoderKLQwenImage().config  # the published values are diffusers' defaults
    assert spec == {"kind": "per_channel", "mean": defaults.latents_mean, "std": defaults.latents_std}
    assert spec["mean"][:2] == [-0.7571, -0.7089] and spec["std"][-1] == 1.916


def test_receptive_field_is_the_tiling_halo() -> None:
    torch.manual_seed(0)
    model = q.QwenImageVAE(q.QwenImageConfig(base_dim=2)).double()
    with torch.no_grad():
        for attn in (model.encoder.middle[1], model.decoder.middle[1]):  # attention -> identity: convolutions only
            attn.proj.weight.zero_()
            attn.proj.bias.zero_()
    x = torch.rand(1, 3, 256, 256, dtype=torch.double, requires_grad=True)
    model.encode(x)[0][0, :, 16, 16].sum().backward()  # latent cell 16 covers pixels 128..135
    rows = x.grad.abs().sum(dim=(0, 1, 3)).nonzero().flatten()
    assert (128 - rows.min().item(), rows.max().item() - 135) == (101, 108)
    assert q.TILING_HALO["encode"] == -(-108 // 8)
    z = torch.randn(1, 16, 40, 40, dtype=torch.double, requires_grad=True)
    reach = 0
    for p in (160, 167):  # the first and last output pixel of latent cell 20
        z.grad = None
        model.decode(z)[0, :, p, p].sum().backward()
        rows = z.grad.abs().sum(dim=(0, 1, 3)).nonzero().flatten()
        reach = max(reach, 20 - rows.min().item(), rows.max().item() - 20)
    assert reach == q.TILING_HALO["decode"] == 18
