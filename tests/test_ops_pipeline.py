"""The encode/decode pipeline: any size, mixed batches, alpha, sampling, tiling dispatch, bad input."""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import diffusers_twin, small_config
from vaekit.errors import BadInputError
from vaekit.formats.convert import diffusers_to_ldm
from vaekit.models import build
from vaekit.ops import codec as pipeline
from vaekit.ops.codec import CodecOptions, decode, encode, roundtrip
from vaekit.vae import VAE, VAEOrigin


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared, loaded CPU, OpenMP barriers make tiny models many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _micro(name: str = "sd1") -> VAE:
    """An even smaller KL model than conftest's (16 base channels): fast at full-size test images."""
    cfg = dataclasses.replace(small_config(name), base_channels=16, norm_groups=8)
    torch.manual_seed(0)
    return VAE(build(cfg), cfg, VAEOrigin(name=f"micro-{name}"))


@pytest.fixture(scope="module")
def micro() -> VAE:
    return _micro()


def test_odd_size_round_trips_to_exact_size(micro: VAE, small_tiny_vae: VAE) -> None:
    x = torch.rand(1, 3, 389, 517)
    for vae in (micro, small_tiny_vae):
        enc, dec = roundtrip(vae, x, CodecOptions(tiling="off"))
        assert enc.latents.shape == (1, vae.latent_channels, 49, 65)  # ceil(389 / 8), ceil(517 / 8)
        assert enc.image_sizes == [(517, 389)] and enc.paddings == [(0, 0, 3, 3)]
        assert dec.images.shape == (1, 3, 389, 517) and dec.images.dtype == torch.float32
        assert 0 <= float(dec.images.min()) and float(dec.images.max()) <= 1


def test_padding_is_reflect_and_crop_matches_model(micro: VAE) -> None:
    x = torch.rand(2, 3, 21, 37)
    enc = encode(micro, x)
    padded = F.pad(x, (0, 3, 0, 3), mode="reflect")
    with torch.no_grad():
        mean, logvar = micro.model.encode(padded)
        ref_img = micro.model.decode(mean)
    torch.testing.assert_close(enc.mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(enc.logvar, logvar, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(enc.latents, micro.normalise(mean), rtol=1e-4, atol=1e-5)
    dec = decode(micro, enc.latents, image_size=(37, 21))
    torch.testing.assert_close(dec.images, ref_img.clamp(0, 1)[..., :21, :37], rtol=1e-4, atol=1e-5)
    # the same crop expressed as padding
    torch.testing.assert_close(decode(micro, enc.latents, padding=enc.paddings[0]).images, dec.images)


def test_matches_diffusers() -> None:
    """Oracle: diffusers' AutoencoderKL with the same weights gives the same posterior and images."""
    cfg = dataclasses.replace(small_config("sdxl"), base_channels=16, norm_groups=8)
    twin = diffusers_twin(cfg)
    model = build(cfg)
    model.load_state_dict(diffusers_to_ldm(twin.state_dict(), "kl"))
    vae = VAE(model, cfg, VAEOrigin(name="twin"))
    x = torch.rand(2, 3, 40, 48)
    enc = encode(vae, x)
    with torch.no_grad():
        dist = twin.encode(x * 2 - 1).latent_dist
        ref = (twin.decode(dist.mean).sample + 1) / 2
    torch.testing.assert_close(enc.mean, dist.mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(enc.logvar, dist.logvar, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(enc.latents, dist.mean * cfg.scaling_factor, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(decode(vae, enc.latents).images, ref.clamp(0, 1), rtol=1e-4, atol=1e-4)
    # VAE.encode / VAE.decode are the same pipeline
    torch.testing.assert_close(vae.encode(x), enc.latents)
    torch.testing.assert_close(vae.decode(enc.latents), ref.clamp(0, 1), rtol=1e-4, atol=1e-4)


def test_mixed_size_batch_equals_one_by_one(micro: VAE) -> None:
    imgs = [torch.rand(3, 24, 40), torch.rand(3, 19, 13), torch.rand(3, 24, 40)]
    enc = encode(micro, imgs)
    assert isinstance(enc.latents, list) and [tuple(z.shape) for z in enc.latents] == [
        (4, 3, 5),
        (4, 3, 2),
        (4, 3, 5),
    ]
    assert enc.image_sizes == [(40, 24), (13, 19), (40, 24)]
    assert enc.paddings == [(0, 0, 0, 0), (0, 0, 3, 5), (0, 0, 0, 0)]
    for img, z in zip(imgs, enc.latents, strict=True):
        alone = encode(micro, img.unsqueeze(0)).latents[0]
        torch.testing.assert_close(z, alone, rtol=1e-5, atol=1e-6)
    dec = decode(micro, enc.latents, image_size=enc.image_sizes, padding=enc.paddings)
    assert isinstance(dec.images, list) and [tuple(i.shape) for i in dec.images] == [
        (3, 24, 40),
        (3, 19, 13),
        (3, 24, 40),
    ]
    alone = decode(micro, enc.latents[1].unsqueeze(0), image_size=(13, 19)).images[0]
    torch.testing.assert_close(dec.images[1], alone, rtol=1e-5, atol=1e-6)


def test_tensor_batch_with_different_crops_needs_a_list(micro: VAE) -> None:
    z = torch.randn(2, 4, 3, 3)
    with pytest.raises(BadInputError, match="pass the latents as a list"):
        decode(micro, z, image_size=[(24, 24), (20, 24)])
    out = decode(micro, list(z), image_size=[(24, 24), (20, 24)]).images
    assert [tuple(i.shape) for i in out] == [(3, 24, 24), (3, 24, 20)]


def test_rgba_roundtrip_keeps_alpha(small_tiny_vae: VAE) -> None:
    x = torch.rand(1, 4, 20, 28)
    enc, dec = roundtrip(small_tiny_vae, x)
    assert enc.alphas[0] is not None and dec.images.shape == (1, 4, 20, 28)
    assert torch.equal(dec.images[0, 3], x[0, 3])
    listed = roundtrip(small_tiny_vae, [x[0], torch.rand(3, 16, 16)])[1].images
    assert listed[0].shape == (4, 20, 28) and listed[1].shape == (3, 16, 16)


def test_sampling_is_seeded_and_follows_the_posterior(micro: VAE) -> None:
    x = torch.rand(2, 3, 16, 24)
    a = encode(micro, x, CodecOptions(sample=True, seed=3))
    b = encode(micro, x, CodecOptions(sample=True, seed=3))
    mode = encode(micro, x)
    assert a.sampled and not mode.sampled
    assert torch.equal(a.latents, b.latents) and not torch.equal(a.latents, mode.latents)
    noise = torch.randn(mode.mean[0].shape, generator=torch.Generator().manual_seed(3))
    expected = micro.normalise(mode.mean[0] + torch.exp(0.5 * mode.logvar[0]) * noise)
    torch.testing.assert_close(a.latents[0], expected, rtol=1e-5, atol=1e-6)
    g = torch.Generator().manual_seed(3)
    torch.testing.assert_close(micro.encode(x, sample=True, generator=g), a.latents)


def test_results_are_ordinary_tensors_and_model_untouched(micro: VAE) -> None:
    before = {k: v.clone() for k, v in micro.model.state_dict().items()}
    enc, dec = roundtrip(micro, torch.rand(1, 3, 16, 16), CodecOptions(precision="bf16"))
    assert not enc.latents.is_inference() and not dec.images.is_inference()
    assert micro.dtype == torch.float32 and not micro.model.training
    for k, v in micro.model.state_dict().items():
        assert torch.equal(v, before[k]) and v.is_contiguous()


def test_vae_methods_keep_their_signatures(micro: VAE) -> None:
    x = torch.rand(1, 3, 20, 20)
    z = micro.encode(x, precision="fp32", tiling="off")
    assert z.shape == (1, 4, 3, 3)
    assert micro.decode(z).shape == (1, 3, 24, 24)
    assert micro.decode(z, image_size=(20, 20)).shape == (1, 3, 20, 20)
    with pytest.raises(BadInputError, match="unknown codec option"):
        micro.decode(z, precisoin="bf16")
    with pytest.raises(BadInputError, match="different sizes"):
        micro.encode([torch.rand(3, 8, 8), torch.rand(3, 16, 8)])


# --- tiling dispatch, against the tiling module's contract -----------------------------------------------------
def _fake_tiling(estimate: int, calls: list[tuple]) -> types.SimpleNamespace:
    def estimate_memory(cfg, op, shape, dtype):  # noqa: ANN001, ANN202
        calls.append(("estimate", op, tuple(shape)))
        return estimate * shape[0]

    def tiled_encode(model, x, mode, max_memory, tile_size, fp32_fallback=True):  # noqa: ANN001, ANN202
        calls.append(("tiled_encode", mode, max_memory, tile_size, tuple(x.shape)))
        mean, logvar = model.encode(x)
        return (mean, logvar), types.SimpleNamespace(notes=["tile 0 recomputed in fp32"])

    def tiled_decode(model, z, mode, max_memory, tile_size, fp32_fallback=True):  # noqa: ANN001, ANN202
        calls.append(("tiled_decode", mode, max_memory, tile_size, tuple(z.shape)))
        return model.decode(z), {"notes": []}

    return types.SimpleNamespace(
        estimate_memory=estimate_memory,
        tiled_encode=tiled_encode,
        tiled_decode=tiled_decode,
        auto_mode=lambda cfg: "exact",
    )


def test_auto_tiling_switches_on_over_budget(micro: VAE, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []
    monkeypatch.setattr(pipeline, "_tiling_module", lambda: _fake_tiling(1000, calls))
    x = torch.rand(3, 3, 16, 16)
    under = encode(micro, x, CodecOptions(max_memory=10_000))
    assert not under.tiled and not any(c[0] == "tiled_encode" for c in calls)
    calls.clear()
    over = encode(micro, x, CodecOptions(max_memory=500))
    assert (
        over.tiled
        and [c for c in calls if c[0] == "tiled_encode"] == [("tiled_encode", "exact", 500, None, (1, 3, 16, 16))] * 3
    )
    assert over.notes == ["tile 0 recomputed in fp32"] * 3
    torch.testing.assert_close(over.latents, under.latents)
    calls.clear()
    dec = decode(micro, under.latents, CodecOptions(tiling="fast", tile_size=64, max_memory=123))
    assert dec.tiled and ("tiled_decode", "fast", 123, 64, (1, 4, 2, 2)) in calls
    assert not decode(micro, under.latents, CodecOptions(tiling="off", max_memory=1)).tiled


def test_auto_splits_batches_to_fit_the_budget(micro: VAE, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []
    fake = _fake_tiling(1000, calls)
    seen: list[int] = []
    real = micro.model.decode
    monkeypatch.setattr(pipeline, "_tiling_module", lambda: fake)
    monkeypatch.setattr(micro.model, "decode", lambda z: (seen.append(z.shape[0]), real(z))[1])
    z = torch.randn(5, 4, 2, 2)
    out = decode(micro, z, CodecOptions(max_memory=2500, channels_last=False))
    assert seen == [2, 2, 1] and not out.tiled and out.images.shape == (5, 3, 16, 16)


def test_forced_tiling_without_module_is_a_clear_error(micro: VAE, monkeypatch: pytest.MonkeyPatch) -> None:
    from vaekit.errors import VaekitError

    monkeypatch.setattr(pipeline, "_tiling_module", lambda: None)
    with pytest.raises(VaekitError, match="tiling"):
        encode(micro, torch.rand(1, 3, 8, 8), CodecOptions(tiling="exact"))
    assert not encode(micro, torch.rand(1, 3, 8, 8), CodecOptions(max_memory=1)).tiled


# --- bad input: one clear error each ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("images", "message"),
    [
        ("cat.png", "must be a torch.Tensor or a list"),
        ([torch.rand(3, 8, 8), "x"], "item 1 is a str"),
        (torch.rand(2, 1, 3, 8, 8), r"must be \(N, C, H, W\)"),
        (torch.rand(8, 8), r"must be \(N, C, H, W\)"),
        (torch.randint(0, 255, (1, 3, 8, 8), dtype=torch.uint8), "divide 8-bit data by 255"),
        (torch.rand(1, 3, 8, 8) * 255, r"must be in \[0, 1\]"),
        (torch.rand(1, 3, 8, 8) * 2 - 1, r"must be in \[0, 1\]"),
        (torch.full((1, 3, 8, 8), float("nan")), "NaN"),
        (torch.rand(1, 2, 8, 8), "has 2 channels"),
        (torch.rand(1, 3, 0, 8), "zero size"),
        (torch.rand(0, 3, 8, 8), "empty"),
        ([], "empty list"),
    ],
)
def test_bad_images(micro: VAE, images: object, message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        encode(micro, images)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("latents", "message"),
    [
        (torch.randn(1, 16, 4, 4), "16 channels but this sd1 VAE takes 4"),
        (torch.randn(4, 4), r"must be \(N, C, H, W\)"),
        (torch.randn(1, 1, 4, 4, 4), r"must be \(N, C, H, W\)"),
        (torch.full((1, 4, 4, 4), float("nan")), "NaN"),
        (torch.tensor([[[[1.0, float("inf")]]] * 4]), "NaN or infinite"),
        (torch.randn(1, 4, 0, 4), "zero size"),
        (torch.ones(1, 4, 4, 4, dtype=torch.int64), "floating point"),
    ],
)
def test_bad_latents(micro: VAE, latents: torch.Tensor, message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        decode(micro, latents)


def test_bad_crop_and_options(micro: VAE) -> None:
    z = torch.randn(1, 4, 2, 2)
    with pytest.raises(BadInputError, match="does not fit"):
        decode(micro, z, image_size=(17, 16))
    with pytest.raises(BadInputError, match="does not fit"):
        decode(micro, z, padding=(0, 0, 16, 0))
    with pytest.raises(BadInputError, match="image_size must be"):
        decode(micro, z, image_size=(1, 2, 3))
    with pytest.raises(BadInputError, match="unknown precision"):
        CodecOptions(precision="fp8")
    with pytest.raises(BadInputError, match="unknown tiling"):
        CodecOptions(tiling="yes")
    with pytest.raises(BadInputError, match="max_memory"):
        CodecOptions(max_memory=0)


@pytest.mark.parametrize("channels_last", [True, False])
def test_fast_blocks_match_the_plain_model(micro: VAE, channels_last: bool) -> None:
    """The rewritten inference blocks (fused qkv, 2x2 phase upsampling, in-place SiLU) compute the same maths."""
    x = torch.rand(2, 3, 27, 45)
    plain = CodecOptions(fast=False, channels_last=False)
    fast = CodecOptions(fast=True, channels_last=channels_last)
    e_plain, d_plain = roundtrip(micro, x, plain)
    e_fast, d_fast = roundtrip(micro, x, fast)
    torch.testing.assert_close(e_fast.latents, e_plain.latents, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d_fast.images, d_plain.images, rtol=1e-4, atol=1e-5)
    from vaekit.ops.fastpath import FastAttnBlock, FastUpsample
    from vaekit.ops.precision import execution_model

    copy = execution_model(micro.model, torch.float32, torch.device("cpu"), channels_last, fast=True)
    kinds = {type(m) for m in copy.modules()}
    assert FastUpsample in kinds and FastAttnBlock in kinds
    assert {type(m) for m in micro.model.modules()}.isdisjoint({FastUpsample, FastAttnBlock})


def test_auto_tiling_with_the_tiling_module(small_vae: VAE) -> None:
    """With the real vaekit.ops.tiling: over the budget, auto tiles (exactly); within it, it does not."""
    tiling = pytest.importorskip("vaekit.ops.tiling")
    x = torch.rand(1, 3, 96, 80)
    need = tiling.estimate_memory(small_vae.config, "encode", (1, 3, 96, 80), torch.float32)
    untiled = encode(small_vae, x, CodecOptions(tiling="off"))
    assert not encode(small_vae, x, CodecOptions(max_memory=need * 2)).tiled
    tiled = encode(small_vae, x, CodecOptions(max_memory=need // 3))
    assert tiled.tiled and not untiled.tiled
    torch.testing.assert_close(tiled.latents, untiled.latents, rtol=1e-4, atol=1e-4)
    need_d = tiling.estimate_memory(small_vae.config, "decode", (1, 4, 12, 10), torch.float32)
    dec = decode(small_vae, untiled.latents, CodecOptions(max_memory=need_d // 3), image_size=(80, 96))
    ref = decode(small_vae, untiled.latents, CodecOptions(tiling="off"), image_size=(80, 96))
    assert dec.tiled and dec.images.shape == (1, 3, 96, 80)
    torch.testing.assert_close(dec.images, ref.images, rtol=1e-4, atol=1e-4)
