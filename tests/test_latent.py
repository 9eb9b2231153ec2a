"""Latent space tools: sampling, interpolation, previews, channel views, forward noise, augmentation, anomalies."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import stats

import vaekit
from tests.conftest import small_config
from vaekit.errors import BadInputError, LoadError
from vaekit.formats.io import TensorFile
from vaekit.formats.latent_file import load_latents, save_latents
from vaekit.interfaces.cli import main
from vaekit.latent import anomaly, augmentation, channels, interpolation, noise, preview, sampling
from vaekit.models import build
from vaekit.ops.images import builtin_image_paths, load_image, save_image
from vaekit.vae import VAE, VAEOrigin


def _photo(index: int, size: int = 32) -> torch.Tensor:
    """A builtin photo, area-downsized to ``size`` x ``size``."""
    rgb = load_image(builtin_image_paths()[index]).rgb
    return F.interpolate(rgb[None], size=(size, size), mode="area")[0]


def _small(family: str = "sd1", seed: int = 0) -> VAE:
    """The sd1 preset at an even smaller width than conftest's (these tests run many encodes and decodes)."""
    cfg = dataclasses.replace(small_config("sd1"), base_channels=16, norm_groups=4, family=family)
    torch.manual_seed(seed)
    return VAE(build(cfg), cfg, VAEOrigin(name=f"small-{family}-{seed}"))


@pytest.fixture(scope="module")
def small_vae() -> VAE:
    """A small random sd1 VAE, seeded (shared by this module's tests, which never change it)."""
    return _small()


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory: pytest.TempPathFactory):
    """A small sd1 VAE saved as a safetensors file."""
    path = tmp_path_factory.mktemp("vae") / "small.safetensors"
    _small().save(path)
    return path


@pytest.fixture(scope="module")
def bundled_vae() -> VAE:
    """The bundled default VAE trained by vaekit (``vaekit.load_vae()``)."""
    from vaekit.weights import DEFAULT_VAE_PATH

    if not DEFAULT_VAE_PATH.is_file():
        pytest.skip(f"the bundled VAE {DEFAULT_VAE_PATH.name} is not in the package yet")
    return vaekit.load_vae(device="cpu")


@pytest.fixture(scope="module")
def kl_photo_vae() -> VAE:
    """The KL VAE bundled until issue 15 (4 latent channels, 20 dB held out), kept for the anomaly detector's test:
    its learned posterior variances make the KL term separate corrupted photos (AUROC 0.92). The tiny autoencoder
    bundled since has no posterior and reconstructs inverted colours faithfully (see docs/latent.md).
    """
    return vaekit.load_vae(str(Path(__file__).parent / "data" / "vaekit-small-kl4.safetensors"), device="cpu")


# --- sampling ------------------------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible(small_vae: VAE) -> None:
    a = sampling.sample_latents(small_vae, 2, 16, 24, seed=3)
    assert a.shape == (2, 4, 2, 3)
    assert torch.equal(a, sampling.sample_latents(small_vae, 2, 16, 24, seed=3))
    assert not torch.equal(a, sampling.sample_latents(small_vae, 2, 16, 24, seed=4))
    assert torch.equal(sampling.sample_latents(small_vae, 2, 16, 24, temperature=0.5, seed=3), a * 0.5)
    images = sampling.sample(small_vae, 2, 16, 24, seed=3)
    assert images.shape == (2, 3, 16, 24)
    assert torch.equal(images, small_vae.decode(a))
    with pytest.raises(BadInputError, match="multiples of 8"):
        sampling.sample_latents(small_vae, 1, 20, 16)
    with pytest.raises(BadInputError, match="temperature"):
        sampling.sample_latents(small_vae, 1, 16, 16, temperature=-1)


# --- interpolation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["slerp", "lerp"])
def test_interpolation_endpoints_equal_the_plain_round_trips(small_vae: VAE, method: str) -> None:
    a, b = _photo(0, 20), _photo(1, 20)  # not a multiple of 8: padded and cropped back
    frames = interpolation.interpolate(small_vae, a, b, steps=4, method=method)  # type: ignore[arg-type]
    assert frames.shape == (4, 3, 20, 20)
    for image, frame in ((a, frames[0]), (b, frames[-1])):
        plain = small_vae.decode(small_vae.encode(image[None]), image_size=(20, 20))[0]
        torch.testing.assert_close(frame, plain, atol=1e-5, rtol=0)
    assert not torch.allclose(frames[1], frames[0], atol=1e-3)


def test_slerp_keeps_the_norm_and_lerp_does_not() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 4, 32, 32, generator=gen), torch.randn(1, 4, 32, 32, generator=gen)
    path = interpolation.interpolate_latents(a, b, 5, "slerp")
    norms = path.flatten(1).norm(dim=1)
    ends = (norms[0] + norms[-1]) / 2
    assert torch.equal(path[0], a[0]) and torch.equal(path[-1], b[0])
    assert ((norms - ends).abs() / ends).max() < 0.03  # an arc between two near-orthogonal vectors of one norm
    lerp_mid = interpolation.interpolate_latents(a, b, 5, "lerp")[2].norm()
    assert 0.65 < float(lerp_mid / ends) < 0.76  # the chord dips towards 1/sqrt(2)
    # Parallel vectors: slerp falls back to a straight line instead of dividing by sin(0).
    torch.testing.assert_close(interpolation.slerp(a, 2 * a, 0.5), 1.5 * a)


def test_interpolation_size_mismatch_refused_or_resized(small_vae: VAE) -> None:
    a, b = _photo(0, 16), _photo(1, 24)
    with pytest.raises(BadInputError, match="--resize"):
        interpolation.interpolate(small_vae, a, b, steps=2)
    frames = interpolation.interpolate(small_vae, a, b, steps=2, resize=True)
    assert frames.shape == (2, 3, 16, 16)
    with pytest.raises(BadInputError, match="slerp or lerp"):
        interpolation.interpolate_latents(torch.zeros(4, 2, 2), torch.zeros(4, 2, 2), 3, "cubic")  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match="at least 2"):
        interpolation.interpolate_latents(torch.zeros(4, 2, 2), torch.zeros(4, 2, 2), 1)


# --- forward noise -------------------------------------------------------------------------------------------------


def test_noise_schedule_matches_diffusers_scaled_linear() -> None:
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ours = noise.alphas_cumprod()
    torch.testing.assert_close(ours.float(), sched.alphas_cumprod, rtol=1e-5, atol=1e-7)
    x, eps = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    for t in (1, 500, 1000):  # our step t is diffusers' timestep index t - 1
        expected = sched.add_noise(x, eps, torch.tensor([t - 1]))
        torch.testing.assert_close(noise.add_noise(x, t, eps), expected, rtol=1e-5, atol=1e-6)
    assert noise.signal_level(0) == 1.0


def test_noise_at_t0_is_the_round_trip_and_at_t1000_near_pure_noise(small_vae: VAE) -> None:
    image = _photo(2, 24)
    strip = noise.noise_strip(small_vae, image, [0, 1000], seed=1)
    plain = small_vae.decode(small_vae.encode(image[None]), image_size=(24, 24))[0]
    torch.testing.assert_close(strip[0], plain, atol=1e-5, rtol=0)
    # A large latent with structure and unit variance: after 1000 steps it is indistinguishable from N(0, 1).
    ramp = torch.linspace(-1.7, 1.7, 64).view(1, 1, 1, 64).expand(1, 4, 64, 64)
    eps = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(5))
    noisy = noise.add_noise(ramp, 1000, eps)
    values = noisy.flatten().double().numpy()
    assert abs(values.mean()) < 0.05 and abs(values.std() - 1) < 0.05
    assert stats.kstest(values, "norm").pvalue > 0.01
    assert abs(np.corrcoef(values, ramp.flatten().numpy())[0, 1]) < 0.1  # 7% of the signal amplitude is left
    assert np.corrcoef(values, eps.flatten().numpy())[0, 1] > 0.99


@pytest.mark.parametrize("t", [-1, 1001, 2.5, "10"])
def test_timesteps_outside_0_1000_are_refused(t: object) -> None:
    with pytest.raises(BadInputError, match=r"outside \[0, 1000\]"):
        noise.add_noise(torch.zeros(1, 4, 2, 2), t)  # type: ignore[arg-type]


# --- previews ------------------------------------------------------------------------------------------------------


def test_published_factors_and_the_linear_map() -> None:
    for family, channels_ in (("sd1", 4), ("sdxl", 4), ("sd3", 16), ("flux", 16)):
        pmap = preview.family_preview_map(family)
        assert pmap.weights.shape == (channels_, 3) and pmap.bias.shape == (3,)
    sd1 = preview.family_preview_map("sd1")
    assert sd1.weights[0].tolist() == pytest.approx([0.3512, 0.2297, 0.3227])  # ComfyUI's SD15 first row
    z = torch.randn(2, 4, 3, 5)
    manual = ((z.permute(0, 2, 3, 1) @ sd1.weights + sd1.bias).permute(0, 3, 1, 2) + 1) / 2
    torch.testing.assert_close(preview.latent_to_rgb(z, sd1), manual.clamp(0, 1))
    assert preview.preview_images(z, sd1, scale=8).shape == (2, 3, 24, 40)
    with pytest.raises(BadInputError, match="another family"):
        preview.latent_to_rgb(torch.zeros(1, 16, 2, 2), sd1)
    with pytest.raises(BadInputError, match="fit-preview"):
        preview.family_preview_map("custom")


def test_fitted_preview_is_stored_in_the_vae_metadata(tmp_path) -> None:
    path = tmp_path / "vae.safetensors"
    vae = _small()
    vae.save(path)
    before = TensorFile(path)
    fit = preview.fit_preview_map(vae, [_photo(i, 16) for i in range(3)], repeats=1)
    assert fit.images == 3 and fit.cells == 12 and fit.speed_ratio > 1
    preview.store_preview_map(path, fit.pmap)
    after = TensorFile(path)
    assert preview.PREVIEW_METADATA_KEY in after.metadata
    assert {k: v for k, v in after.metadata.items() if k != preview.PREVIEW_METADATA_KEY} == before.metadata
    old, new = before.load(), after.load()
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    assert [p.name for p in tmp_path.iterdir()] == ["vae.safetensors"]  # no temporary file left behind
    loaded = vaekit.load_vae(path, device="cpu")
    pmap = preview.preview_map_for(loaded)
    assert pmap.source.endswith("vae.safetensors")
    torch.testing.assert_close(pmap.weights, fit.pmap.weights, atol=1e-6, rtol=1e-5)
    # A preset has no file: its family's published map.
    assert preview.preview_map_for(_small()).source.startswith("published sd1")


def test_fitted_preview_beats_baselines_against_the_decoder(bundled_vae: VAE) -> None:
    images = [_photo(i, 64) for i in range(4)]
    fit = preview.fit_preview_map(bundled_vae, images, repeats=3)
    # Held-out PSNR against the full decode: the map explains the decode far better than a mean colour or grey.
    assert fit.psnr_db > fit.psnr_mean_colour_db + 2
    assert fit.psnr_db > fit.psnr_grey_db + 2
    assert fit.psnr_db > 15
    assert fit.speed_ratio > 10


# --- channels ------------------------------------------------------------------------------------------------------


def test_channel_images_and_stats() -> None:
    z = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(0)) * torch.tensor([1, 2, 3, 4]).view(4, 1, 1)
    imgs = channels.channel_images(z)
    assert imgs.shape == (4, 3, 6, 5)
    assert torch.allclose(imgs.flatten(1).min(1).values, torch.zeros(4))
    assert torch.allclose(imgs.flatten(1).max(1).values, torch.ones(4))
    s = channels.channel_stats(z)
    assert [c.channel for c in s] == [0, 1, 2, 3]
    assert s[3].mean == pytest.approx(float(z[3].mean()), abs=1e-6)
    assert s[3].std == pytest.approx(float(z[3].std(correction=0)), abs=1e-6)
    assert (s[2].min, s[2].max) == pytest.approx((float(z[2].min()), float(z[2].max())))
    sheet = channels.channel_sheet(z)
    assert sheet.shape[0] == 3 and sheet.shape[2] > 4 * 5
    assert channels.channel_images(torch.ones(1, 2, 2)).max() == 0  # constant channel: black, not NaN
    with pytest.raises(BadInputError, match="one latent"):
        channels.channel_stats(torch.zeros(2, 4, 2, 2))


# --- augmentation --------------------------------------------------------------------------------------------------


def test_augment_is_seeded_and_perturbs_the_latent(small_vae: VAE) -> None:
    images = [_photo(0, 16), _photo(1, 24)]
    a = augmentation.augment(small_vae, images, n=2, mode="noise", seed=1)
    assert [v.shape for v in a] == [(2, 3, 16, 16), (2, 3, 24, 24)]
    again = augmentation.augment(small_vae, images, 2, "noise", seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, again, strict=True))
    assert not torch.equal(a[0], augmentation.augment(small_vae, images, 2, "noise", seed=2)[0])
    zero = augmentation.augment(small_vae, images[:1], n=1, mode="noise", strength=0.0)[0][0]
    plain = small_vae.decode(small_vae.encode(images[0][None]))[0]
    torch.testing.assert_close(zero, plain, atol=1e-5, rtol=0)
    nb = augmentation.augment(small_vae, images, n=2, mode="neighbours", seed=1)  # sizes differ: latents resized
    assert [v.shape for v in nb] == [(2, 3, 16, 16), (2, 3, 24, 24)]
    with pytest.raises(BadInputError, match="at least 2"):
        augmentation.augment(small_vae, images[:1], n=1, mode="neighbours")
    with pytest.raises(BadInputError, match="noise or neighbours"):
        augmentation.augment(small_vae, images, n=1, mode="mixup")  # type: ignore[arg-type]


# --- anomaly detection ---------------------------------------------------------------------------------------------


def _crops(count: int, size: int, seed: int) -> list[torch.Tensor]:
    """Random crops of the builtin photos, each downsized so the crop shows a good part of the scene."""
    gen = torch.Generator().manual_seed(seed)
    photos = [load_image(p).rgb for p in builtin_image_paths()]
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        scale = 2.5 * size / min(photo.shape[1:])
        small = F.interpolate(photo[None], scale_factor=scale, mode="area", recompute_scale_factor=False)[0]
        y = int(torch.randint(small.shape[1] - size + 1, (), generator=gen))
        x = int(torch.randint(small.shape[2] - size + 1, (), generator=gen))
        out.append(small[:, y : y + size, x : x + size].contiguous())
    return out


def _corrupt(image: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """A corrupted copy: Gaussian noise, solid random-colour blocks, or inverted colours."""
    if kind == "noise":
        return (image + 0.15 * torch.randn(image.shape, generator=gen)).clamp(0, 1)
    if kind == "inverted":
        return 1 - image
    out = image.clone()
    size = image.shape[-1]
    for _ in range(3):
        s = size // 3
        y, x = (int(v) for v in torch.randint(size - s + 1, (2,), generator=gen))
        out[:, y : y + s, x : x + s] = torch.rand(3, 1, 1, generator=gen)
    return out


def _auroc(normal: list[float], anomalous: list[float]) -> float:
    u = stats.mannwhitneyu(anomalous, normal, alternative="greater").statistic
    return float(u) / (len(normal) * len(anomalous))


def test_anomaly_scores_separate_clean_photos_from_corrupted_copies(kl_photo_vae: VAE) -> None:
    bundled_vae = kl_photo_vae
    fit_set = _crops(24, 64, seed=0)
    detector = anomaly.fit_anomaly(bundled_vae, fit_set, fpr=0.1)
    clean = _crops(12, 64, seed=1)
    gen = torch.Generator().manual_seed(2)
    corrupted = [_corrupt(img, kind, gen) for kind in ("noise", "blocks", "inverted") for img in clean]
    clean_scores = [r.score for r in anomaly.score_images(detector, bundled_vae, clean)]
    bad = anomaly.score_images(detector, bundled_vae, corrupted)
    auroc = _auroc(clean_scores, [r.score for r in bad])
    assert auroc >= 0.9, f"AUROC {auroc:.3f}"
    for k, kind in enumerate(("noise", "blocks", "inverted")):
        part = [r.score for r in bad[k * 12 : (k + 1) * 12]]
        assert _auroc(clean_scores, part) >= 0.75, f"{kind}: AUROC {_auroc(clean_scores, part):.3f}"
    # Where the reconstruction fails: the heatmap of a noisy copy is hotter than that of its clean original.
    clean_heat = anomaly.score_images(detector, bundled_vae, clean[:1])[0].heatmap
    assert bad[0].heatmap.mean() > clean_heat.mean()


def test_anomaly_model_file_calibration_and_refusals(tmp_path) -> None:
    vae = _small()
    normal = [_photo(i, 16) for i in range(5)]
    model = anomaly.fit_anomaly(vae, normal, fpr=0.2, score="recon")
    above = [s > model.thresholds["recon"] for s in model.normal_scores["recon"]]
    assert sum(above) <= 0.2 * len(normal)  # the threshold lets at most the chosen rate of normal images through
    path = anomaly.save_anomaly_model(model, tmp_path / "det.json")
    data = json.loads(path.read_text())
    assert data["format"] == "vaekit-anomaly" and data["vae_weights_sha256"] == anomaly.weights_sha256(vae)
    loaded = anomaly.load_anomaly_model(path)
    assert loaded == model
    results = anomaly.score_images(loaded, vae, normal[:2] + [1 - normal[0]])
    assert [r.score for r in results[:2]] == pytest.approx(model.normal_scores["recon"][:2], rel=1e-6)
    assert results[0].heatmap.shape == (3, 16, 16) and results[0].anomalous == (
        results[0].score > model.thresholds["recon"]
    )
    with pytest.raises(BadInputError, match="fitted on the VAE"):
        anomaly.score_images(loaded, _small(seed=1), normal[:1])
    with pytest.raises(BadInputError, match="already exists"):
        anomaly.save_anomaly_model(model, path)
    (tmp_path / "bad.json").write_text('{"format": "vaekit-anomaly", "version": 1, "score": "elbo"}')
    with pytest.raises(LoadError, match="damaged"):
        anomaly.load_anomaly_model(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text("[1, 2]")
    with pytest.raises(LoadError, match="not a vaekit anomaly model"):
        anomaly.load_anomaly_model(tmp_path / "other.json")
    with pytest.raises(BadInputError, match="at least 2"):
        anomaly.fit_anomaly(vae, normal[:1])
    with pytest.raises(BadInputError, match="false-positive"):
        anomaly.fit_anomaly(vae, normal, fpr=1.5)


def test_anomaly_kl_term_matches_torch_distributions() -> None:
    from torch.distributions import MultivariateNormal, kl_divergence

    gen = torch.Generator().manual_seed(0)
    mean, var = torch.randn(5, 4, generator=gen).double(), torch.rand(5, 4, generator=gen).double() + 0.1
    a = torch.randn(4, 4, generator=gen).double()
    prior_mean, prior_cov = torch.randn(4, generator=gen).double(), a @ a.T + torch.eye(4, dtype=torch.float64)
    measured = anomaly._Measured(torch.zeros(3, 1, 1), torch.zeros(1, 1), mean, var)
    q = MultivariateNormal(mean, torch.diag_embed(var))
    expected = kl_divergence(q, MultivariateNormal(prior_mean, prior_cov)).sum()
    assert anomaly._latent_nats(measured, prior_mean, prior_cov) == pytest.approx(float(expected), rel=1e-9)
    point = anomaly._Measured(torch.zeros(3, 1, 1), torch.zeros(1, 1), mean, None)  # deterministic encoder
    nll = -MultivariateNormal(prior_mean, prior_cov).log_prob(mean).sum()
    assert anomaly._latent_nats(point, prior_mean, prior_cov) == pytest.approx(float(nll), rel=1e-9)


def test_anomaly_tiny_vae_uses_the_latent_cross_entropy(small_tiny_vae: VAE) -> None:
    normal = [_photo(i, 16) for i in range(3)]
    model = anomaly.fit_anomaly(small_tiny_vae, normal)
    r = anomaly.score_images(model, small_tiny_vae, normal[:1])[0]
    assert np.isfinite(r.elbo) and r.elbo != r.recon


# --- command line --------------------------------------------------------------------------------------------------


def _png(tmp_path, name: str, image: torch.Tensor):
    return save_image(image, tmp_path / name)


def test_cli_sample_interpolate_noise_augment(tmp_path, vae_file, capsys) -> None:
    vae = ["--vae", str(vae_file), "--device", "cpu"]
    out = tmp_path / "s.png"
    assert main(["sample", "--n", "3", "--size", "16", "--seed", "2", "-o", str(out), *vae]) == 0
    assert Image.open(out).size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # a 2 x 2 grid, one cell empty
    assert main(["sample", "--n", "1", "--size", "16", "-o", str(out), *vae]) == 2  # exists: refused
    a, b = _png(tmp_path, "a.png", _photo(0, 16)), _png(tmp_path, "b.png", _photo(1, 24))
    assert main(["interpolate", str(a), str(b), "--steps", "3", "-o", str(tmp_path / "i"), *vae]) == 2
    assert "--resize" in capsys.readouterr().err
    args = ["interpolate", str(a), str(b), "--steps", "3", "--resize", "-o", str(tmp_path / "i"), *vae]
    assert main(args) == 0
    names = sorted(p.name for p in (tmp_path / "i").iterdir())
    assert names == ["animation.gif", "frame_000.png", "frame_001.png", "frame_002.png", "grid.png"]
    gif = Image.open(tmp_path / "i" / "animation.gif")
    assert gif.n_frames == 3 and gif.size == (16, 16)
    capsys.readouterr()
    assert main(["noise", str(a), "--t", "0,500", "--t", "1000", "-o", str(tmp_path / "n.png"), "--json", *vae]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [s["t"] for s in report["steps"]] == [0, 500, 1000] and report["steps"][0]["alpha_bar"] == 1.0
    assert Image.open(tmp_path / "n.png").size[0] == 3 * 16 + 4 * 2
    assert main(["noise", str(a), "--t", "1001", "-o", str(tmp_path / "n2.png"), *vae]) == 2
    assert "outside [0, 1000]" in capsys.readouterr().err
    assert not (tmp_path / "n2.png").exists()
    sheet = tmp_path / "sheet.png"
    args = ["augment", str(a), str(b), "--n", "2", "--seed", "1", "-o", str(tmp_path / "aug"), "--sheet", str(sheet)]
    assert main([*args, *vae]) == 0
    assert Image.open(sheet).size == (3 * 24 + 4 * 2, 2 * 24 + 3 * 2)  # rows: an image, then its 2 variants
    assert sorted(p.name for p in (tmp_path / "aug").iterdir()) == [
        "a_aug00.png",
        "a_aug01.png",
        "b_aug00.png",
        "b_aug01.png",
    ]


def test_cli_preview_show_latent_and_family_mismatch(tmp_path, vae_file, capsys) -> None:
    vae = _small()
    z = vae.encode(_photo(0, 16)[None])
    lat = save_latents(tmp_path / "z.safetensors", z, vae, image_size=(16, 16), padding=(0, 0, 0, 0))
    assert main(["preview", str(lat), "-o", str(tmp_path / "p.png"), "--scale", "4"]) == 0
    assert Image.open(tmp_path / "p.png").size == (8, 8)
    assert "published sd1" in capsys.readouterr().out
    # Latents of another family than the VAE: refused, even with the same channel count.
    sdxl = _small("sdxl")
    lat_x = save_latents(
        tmp_path / "x.safetensors", sdxl.encode(_photo(0, 16)[None]), sdxl, image_size=(16, 16), padding=(0, 0, 0, 0)
    )
    assert main(["preview", str(lat_x), "--vae", str(vae_file), "-o", str(tmp_path / "q.png")]) == 2
    assert "sdxl" in capsys.readouterr().err
    assert not (tmp_path / "q.png").exists()
    assert main(["show-latent", str(lat), "-o", str(tmp_path / "c.png"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["channels"]) == 4
    assert report["channels"][1]["mean"] == pytest.approx(float(load_latents(lat).latents[0, 1].mean()), abs=1e-5)
    assert (tmp_path / "c.png").is_file()
    assert main(["show-latent", str(lat), "--index", "3", "-o", str(tmp_path / "d.png")]) == 2


def test_cli_fit_preview_and_anomaly(tmp_path, vae_file, capsys) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        _png(folder, f"{i}.png", _photo(i, 16))
    copy = tmp_path / "copy.safetensors"
    args = ["fit-preview", str(vae_file), "--images", str(folder), "--output", str(copy), "--json", "--device", "cpu"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stored_in"] == str(copy) and report["images"] == 3 and report["speed_ratio"] > 1
    assert preview.PREVIEW_METADATA_KEY in TensorFile(copy).metadata
    assert preview.PREVIEW_METADATA_KEY not in TensorFile(vae_file).metadata  # the original is untouched
    det = tmp_path / "det.json"
    vae = ["--vae", str(vae_file), "--device", "cpu"]
    assert main(["anomaly", "fit", "--images", str(folder), "-o", str(det), "--fpr", "0.34", *vae]) == 0
    assert "threshold" in capsys.readouterr().out
    heat = tmp_path / "heat"
    assert (
        main(["anomaly", "score", str(folder / "0.png"), "--model", str(det), "--heatmaps", str(heat), "--json", *vae])
        == 0
    )
    scores = json.loads(capsys.readouterr().out)
    assert len(scores) == 1 and isinstance(scores[0]["anomalous"], bool)
    assert Image.open(next(heat.iterdir())).size == (16, 16)
    other = tmp_path / "other.safetensors"
    _small(seed=7).save(other)
    assert main(["anomaly", "score", str(folder / "0.png"), "--model", str(det), "--vae", str(other)]) == 2
    assert "fitted on the VAE" in capsys.readouterr().err
