"""TAESana: the published encoder loads strictly and encodes photos; recognition; shapes; the missing decoder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from vaekit.errors import BadInputError, LoadError
from vaekit.models import taesana

WEIGHTS = Path(__file__).resolve().parents[1] / ".." / "shared" / "weights"
ENCODER_FILE = WEIGHTS / "taesana_encoder.pth"
needs_weights = pytest.mark.skipif(not ENCODER_FILE.is_file(), reason=f"published weights absent ({ENCODER_FILE})")

SMALL = dataclasses.replace(
    taesana.PRESETS["taesana"], stem_widths=(8, 16), width=16, decoder_widths=(32, 16, 16, 8, 8, 8)
)


@pytest.fixture(autouse=True)
def one_thread():
    """Run on one thread (this machine's two cores are shared and busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def shapes_of(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def photo(name: str) -> torch.Tensor:
    """A scikit-image photo in [0, 1], cropped to multiples of 32."""
    skimage_data = pytest.importorskip("skimage.data")
    image = torch.from_numpy(getattr(skimage_data, name)()).permute(2, 0, 1).float() / 255
    h, w = image.shape[1] // 32 * 32, image.shape[2] // 32 * 32
    return image[None, :, :h, :w]


@pytest.fixture(scope="module")
def published() -> taesana.TAESana:
    """The published TAESana encoder, loaded strictly into our module."""
    sd = taesana.with_part_prefix(torch.load(ENCODER_FILE, map_location="cpu", weights_only=True), "encoder")
    cfg = taesana.config_from_shapes(shapes_of(sd))
    assert cfg is not None
    model = taesana.TAESana(cfg).eval()
    result = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model


@needs_weights
def test_published_encoder_recognised_and_strict(published: taesana.TAESana) -> None:
    cfg = published.config
    assert cfg == dataclasses.replace(taesana.PRESETS["taesana"], has_decoder=False)
    assert (cfg.downscale, cfg.latent_channels, cfg.family, cfg.kind) == (32, 32, "dcae", "taesana")
    assert not hasattr(published, "decoder")


@needs_weights
@pytest.mark.parametrize(("name", "latent_hw"), [("astronaut", (16, 16)), ("chelsea", (9, 14))])
def test_published_encoder_on_photos(published: taesana.TAESana, name: str, latent_hw: tuple[int, int]) -> None:
    with torch.no_grad():
        z = published.encode(photo(name))
    assert z.shape == (1, 32, *latent_hw)
    assert torch.isfinite(z).all()
    # Sana's normalised latent (DC-AE raw x 0.41407): about unit variance, about zero mean; a raw DC-AE latent
    # would be about 2.4x wider. Measured: std 1.04 (astronaut), 0.79 (chelsea).
    assert 0.6 < z.std().item() < 1.3
    assert abs(z.mean().item()) < 0.2
    assert z.abs().max().item() < 10


@needs_weights
def test_published_encoder_cannot_decode(published: taesana.TAESana) -> None:
    with pytest.raises(BadInputError, match="^this TAESana file holds no decoder; decoding needs a decoder$"):
        published.decode(torch.zeros(1, 32, 2, 2))


def test_small_shapes_non_square() -> None:
    torch.manual_seed(0)
    model = taesana.TAESana(SMALL).eval()
    with torch.no_grad():
        z = model.encode(torch.rand(2, 3, 64, 96))
        assert z.shape == (2, 32, 2, 3)
        assert model.decode(z).shape == (2, 3, 64, 96)


def test_config_from_shapes() -> None:
    full = shapes_of(taesana.TAESana(SMALL).state_dict())
    assert taesana.config_from_shapes(full) == SMALL
    enc = {k: s for k, s in full.items() if k.startswith("encoder.")}
    dec = {k: s for k, s in full.items() if k.startswith("decoder.")}
    # The absent part's fields keep the release's values; only the present part is read from the file.
    preset = taesana.PRESETS["taesana"]
    enc_fields = {f: getattr(SMALL, f) for f in ("stem_widths", "width", "encoder_blocks")}
    dec_fields = {f: getattr(SMALL, f) for f in ("decoder_widths", "decoder_blocks")}
    assert taesana.config_from_shapes(enc) == dataclasses.replace(preset, has_decoder=False, **enc_fields)
    assert taesana.config_from_shapes(dec) == dataclasses.replace(preset, has_encoder=False, **dec_fields)
    assert all(k in full for k in taesana.MARKER_KEYS)
    with torch.device("meta"):
        real = shapes_of(taesana.TAESana(taesana.PRESETS["taesana"]).state_dict())
    assert taesana.config_from_shapes(real) == taesana.PRESETS["taesana"]
    stripped = {k[len("vae.") :]: s for k, s in {"vae." + k: s for k, s in real.items()}.items()}
    assert taesana.config_from_shapes(stripped) == taesana.PRESETS["taesana"]


def test_config_from_shapes_refuses_others() -> None:
    taesd_like = {"encoder.0.weight": (64, 3, 3, 3), "encoder.0.bias": (64,)}
    taesd_like.update({f"encoder.1.{k}": tuple(v.shape) for k, v in taesana.Block(64, 64).state_dict().items()})
    assert taesana.config_from_shapes(taesd_like) is None
    assert taesana.config_from_shapes({"encoder.conv_in.weight": (128, 3, 3, 3)}) is None
    assert taesana.config_from_shapes({}) is None
    full = shapes_of(taesana.TAESana(SMALL).state_dict())
    assert taesana.config_from_shapes({**full, "encoder.4.pool.0.weight": (64, 16, 1, 1)}) is None
    broken = dict(full)
    del broken["encoder.6.conv.2.bias"]
    with pytest.raises(LoadError, match="TAESana"):
        taesana.config_from_shapes(broken)
    wrong = {**full, "decoder.1.weight": (32, 16, 3, 3)}  # a 16-channel decoder beside a 32-channel encoder
    with pytest.raises(LoadError, match="latent channels"):
        taesana.config_from_shapes(wrong)


def test_meta_build_and_facts() -> None:
    with torch.device("meta"):
        model = taesana.TAESana(taesana.PRESETS["taesana"])
    assert all(p.is_meta for p in model.parameters())
    cfg = model.config
    assert (cfg.downscale, cfg.gaussian) == (32, False)
    assert taesana.normaliser_spec(cfg) == {"kind": "scalar", "scale": 1.0, "shift": 0.0}
    assert cfg.to_dict()["decoder_widths"] == [256, 128, 64, 64, 64, 64]
    encoder_only = taesana.TAESana(dataclasses.replace(SMALL, has_decoder=False))
    assert not any(k.startswith("decoder.") for k in encoder_only.state_dict())
    decoder_only = taesana.TAESana(dataclasses.replace(SMALL, has_encoder=False))
    with pytest.raises(BadInputError, match="no encoder"):
        decoder_only.encode(torch.zeros(1, 3, 32, 32))


def test_halo_tiles_are_exact() -> None:
    """A region with TILING_HALO latent cells of context on each side gives the whole image's core (no global part)."""
    assert taesana.GLOBAL_PART == ""
    torch.manual_seed(0)
    model = taesana.TAESana(dataclasses.replace(SMALL, width=8, stem_widths=(8, 8))).double().eval()
    he, hd = taesana.TILING_HALO["encode"], taesana.TILING_HALO["decode"]
    cells = 2 * max(he, hd) + 3
    with torch.no_grad():
        images = torch.rand(1, 3, 32, 32 * cells, dtype=torch.float64)
        whole = model.encode(images)
        c = cells // 2
        region = model.encode(images[..., (c - he) * 32 : (c + 1 + he) * 32])
        assert (region[..., he] - whole[..., c]).abs().max() < 1e-12
        z = torch.randn(1, 32, 1, cells, dtype=torch.float64)
        whole = model.decode(z)
        region = model.decode(z[..., c - hd : c + 1 + hd])
        core = region[..., hd * 32 : (hd + 1) * 32]
        assert (core - whole[..., c * 32 : (c + 1) * 32]).abs().max() < 1e-12


def test_no_diffusers_layout() -> None:
    assert taesana.DIFFUSERS_CLASS is None and taesana.DIFFUSERS_KEYS == []
    for call in (
        lambda: taesana.from_diffusers({}),
        lambda: taesana.to_diffusers({}),
        lambda: taesana.diffusers_config(SMALL),
        lambda: taesana.config_from_diffusers({}),
    ):
        with pytest.raises(LoadError, match="no diffusers layout"):
            call()
