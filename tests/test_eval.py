"""vaekit compare: metrics against reference implementations, interval/winner logic, round trips, the report."""

from __future__ import annotations

import json
import math
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as sstats

from tests.conftest import small_config
from vaekit.errors import BadInputError
from vaekit.eval import metrics as M
from vaekit.eval import perceptual as P
from vaekit.eval.compare import compare
from vaekit.eval.stats import call_winner, mean_ci, paired_p_value
from vaekit.interfaces.cli import main
from vaekit.models import build
from vaekit.ops.images import builtin_image_paths, read_image, save_image
from vaekit.vae import VAE, VAEOrigin

SIZE = 32  # images are downscaled to this long side: the smallest size with 4x4 latents, fast on CPU


def _vae(name: str = "sd1", seed: int = 0, label: str | None = None) -> VAE:
    cfg = small_config(name)
    torch.manual_seed(seed)
    return VAE(build(cfg), cfg, VAEOrigin(name=label or f"small-{name}"))


def _pair(seed: int = 0, size: tuple[int, int] = (64, 80), noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ref = torch.rand(3, *size, generator=g)
    out = (ref + noise * torch.randn(3, *size, generator=g)).clamp(0, 1)
    return ref, out


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with two real photographs (scikit-image's), shrunk to 48 px to keep round trips fast."""
    folder = tmp_path_factory.mktemp("photos")
    for p in builtin_image_paths()[:2]:
        img = read_image(p).rgb
        small = torch.nn.functional.interpolate(img[None], size=(40, 48), mode="area")[0]
        save_image(small, folder / f"{p.stem}.png")
    return folder


# --- metrics against references -------------------------------------------------------------------------------------
def test_psnr_matches_hand_formula() -> None:
    ref, out = _pair()
    mse = float(((ref.double() - out.double()) ** 2).mean())
    assert M.psnr(ref, out) == pytest.approx(10 * math.log10(1 / mse), abs=1e-4)
    assert M.psnr(ref, ref) == M.PSNR_CAP_DB


def test_ssim_matches_scikit_image() -> None:
    from skimage.metrics import structural_similarity

    ref, out = _pair(seed=1, size=(192, 224))  # large enough that border handling differs by < 1e-4
    expected = structural_similarity(
        ref.permute(1, 2, 0).numpy(),
        out.permute(1, 2, 0).numpy(),
        channel_axis=2,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
    )
    assert M.ssim(ref, out) == pytest.approx(expected, abs=2e-4)
    assert M.ssim(ref, ref) == pytest.approx(1.0, abs=1e-6)


def _ms_ssim_reference(x: torch.Tensor, y: torch.Tensor, weights: tuple[float, ...]) -> float:
    """MS-SSIM written from Wang, Simoncelli and Bovik (2003): Gaussian window 11 / 1.5 over the valid region,
    contrast-structure at the finer scales, full SSIM at the coarsest, 2x2 average pooling between scales."""
    x, y = x[None].double(), y[None].double()
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    g /= g.sum()
    win = (g[:, None] * g[None, :]).expand(3, 1, 11, 11)
    c1, c2 = 0.01**2, 0.03**2
    factors = []
    for i, w in enumerate(weights):
        f = lambda t: torch.nn.functional.conv2d(t, win, groups=3)  # noqa: E731
        mu_x, mu_y = f(x), f(y)
        sxx, syy, sxy = f(x * x) - mu_x**2, f(y * y) - mu_y**2, f(x * y) - mu_x * mu_y
        cs = (2 * sxy + c2) / (sxx + syy + c2)
        if i == len(weights) - 1:
            lum = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
            factors.append((lum * cs).mean(dim=(2, 3)).clamp(min=0) ** w)
        else:
            factors.append(cs.mean(dim=(2, 3)).clamp(min=0) ** w)
            pad = (x.shape[2] % 2, x.shape[3] % 2)
            x = torch.nn.functional.avg_pool2d(x, 2, padding=pad)
            y = torch.nn.functional.avg_pool2d(y, 2, padding=pad)
    return float(torch.stack(factors).prod(dim=0).mean())


def test_ms_ssim_matches_the_paper_and_reduces_scales_on_small_images() -> None:
    ref, out = _pair(seed=2, size=(192, 200))
    value, scales = M.ms_ssim(ref, out)
    assert scales == 5
    assert value == pytest.approx(_ms_ssim_reference(ref, out, M.MS_SSIM_WEIGHTS), abs=5e-4)
    # Fewer scales on smaller images; the documented thresholds, then n/a below 11 px.
    assert [M.ms_ssim_scales(s, 300) for s in (176, 175, 99, 98, 44, 43, 11, 10)] == [5, 4, 4, 3, 3, 2, 2, 0]
    small_ref, small_out = _pair(seed=3, size=(98, 120))
    v3, n3 = M.ms_ssim(small_ref, small_out)
    three = tuple(w / sum(M.MS_SSIM_WEIGHTS[:3]) for w in M.MS_SSIM_WEIGHTS[:3])
    # The coarsest scale is only 24x30 px here, where torchmetrics' border handling (reflect padding, then
    # cropping) and the reference's valid-only window differ by a few 1e-3.
    assert n3 == 3 and v3 == pytest.approx(_ms_ssim_reference(small_ref, small_out, three), abs=3e-3)
    tiny_value, tiny_scales = M.ms_ssim(*_pair(seed=4, size=(8, 8)))
    assert tiny_scales == 0 and math.isnan(tiny_value)


def test_colour_metrics_on_known_colours() -> None:
    red = torch.zeros(3, 8, 8)
    red[0] = 1.0
    grey = torch.full((3, 8, 8), 0.5)
    assert M.mean_saturation(red) == pytest.approx(1.0)
    assert M.mean_saturation(grey) == pytest.approx(0.0)
    # A flat colour: no spread, so M = 0.3 * |mean(rg), mean(yb)| on 0-255 values (rg = 255, yb = 127.5).
    assert M.colourfulness(red) == pytest.approx(0.3 * math.hypot(255.0, 127.5))
    assert M.colourfulness(grey) == pytest.approx(0.0)
    fid = M.colour_fidelity(red, grey)
    assert fid["saturation_ratio"] == pytest.approx(0.0) and fid["colourfulness_change"] == pytest.approx(-100.0)
    assert fid["delta_e"] > 30
    assert M.delta_e(red, red) == pytest.approx(0.0, abs=1e-9)
    assert math.isnan(M.colour_fidelity(grey, red)["saturation_ratio"])  # nothing to compare a grey input with


def test_colour_flags_catch_a_desaturated_photo_and_spare_the_original() -> None:
    from skimage import color

    photo = read_image(builtin_image_paths()[0]).rgb[:, ::8, ::8].contiguous()
    hsv = color.rgb2hsv(photo.permute(1, 2, 0).numpy())
    hsv[..., 1] *= 0.55
    foggy = torch.from_numpy(color.hsv2rgb(hsv)).permute(2, 0, 1).float()
    faithful = M.colour_fidelity(photo, photo)
    assert M.colour_flags(faithful["saturation_ratio"], faithful["colourfulness_change"], faithful["delta_e"]) == []
    washed = M.colour_fidelity(photo, foggy)
    flags = M.colour_flags(washed["saturation_ratio"], washed["colourfulness_change"], washed["delta_e"])
    assert washed["saturation_ratio"] == pytest.approx(0.55, abs=0.02)
    assert any("desaturated" in f for f in flags) and any("washed out" in f for f in flags)


def test_metrics_refuse_mismatched_images() -> None:
    with pytest.raises(BadInputError, match="one size"):
        M.psnr(torch.rand(3, 8, 8), torch.rand(3, 8, 9))


# --- intervals and winners ------------------------------------------------------------------------------------------
def test_mean_ci_is_the_t_interval() -> None:
    xs = [1.0, 2.0, 4.0, 7.0, 8.5]
    s = mean_ci(xs)
    low, high = sstats.t.interval(0.95, len(xs) - 1, loc=np.mean(xs), scale=sstats.sem(xs))
    assert (s.mean, s.low, s.high, s.n) == (pytest.approx(np.mean(xs)), pytest.approx(low), pytest.approx(high), 5)
    one = mean_ci([3.0, math.nan])
    assert one.mean == 3.0 and one.n == 1 and math.isnan(one.low)


def test_paired_p_value_matches_scipy() -> None:
    worse = [3.1, 2.9, 4.0, 3.6, 2.2, 3.3]
    better = [2.0, 2.5, 3.1, 3.7, 1.9, 2.8]
    expected = sstats.ttest_rel(worse, better, alternative="greater").pvalue
    assert paired_p_value(worse, better) == pytest.approx(expected)
    assert paired_p_value([2.0, 3.0], [1.0, 2.0]) == 0.0  # the same positive difference on every image
    assert paired_p_value([1.0, 2.0], [1.0, 2.0]) == 1.0


def test_winner_called_only_when_the_paired_test_says_so() -> None:
    psnr = M.METRICS["psnr"]
    clear = {"a": [30.0, 31.0, 29.5, 32.0, 30.5], "b": [28.0, 29.2, 27.1, 30.3, 28.0], "c": [20.0, 21, 19, 22, 20]}
    w = call_winner(psnr, clear)
    assert w.label == "a" and w.p_value < 0.05
    # Overlapping per-image values: a has the better mean but does not beat b consistently.
    noisy = {"a": [30.0, 25.0, 33.0, 27.0], "b": [29.0, 27.0, 31.0, 27.5]}
    w = call_winner(psnr, noisy)
    assert w.label is None and "no clear winner" in w.reason
    assert call_winner(psnr, {"a": [30.0, 31.0], "b": [30.0, 31.0]}).label is None  # identical rows
    assert call_winner(psnr, {"a": [30.0], "b": [20.0]}).label is None  # one image: nothing to test
    # "target" metrics rank by distance to the target: 0.98 beats 1.10 for a saturation ratio.
    sat = M.METRICS["saturation_ratio"]
    assert call_winner(sat, {"x": [0.98, 0.99, 0.97], "y": [1.10, 1.12, 1.09]}).label == "x"


# --- round trips ----------------------------------------------------------------------------------------------------
def test_a_vae_compared_with_itself_scores_identical_rows_and_a_desaturated_one_is_flagged(photos: Path) -> None:
    vae = _vae()
    twin = _vae()  # same seed: the same weights, a separate object
    grey = _vae(label="greyed")
    with torch.no_grad():  # mix the RGB output convolution 90% towards its channel mean: a foggy, grey decoder
        conv = grey.model.decoder.conv_out
        for p in (conv.weight, conv.bias):
            p.copy_(0.1 * p + 0.9 * p.mean(dim=0, keepdim=True))
    result = compare([vae, twin, grey], photos, max_size=SIZE, warmup=False)
    assert len(result) == 3 and result.labels == ["small-sd1", "small-sd1 #2", "greyed"]
    a, b, foggy = result.rows
    assert a.ok and b.ok and foggy.ok
    for key in ("psnr", "ssim", "ms_ssim", "saturation_ratio", "colourfulness_change", "delta_e"):
        assert a.values[key] == b.values[key], key
        assert all(math.isfinite(v) for v in a.values[key])
    assert result.winners["psnr"].label is None  # a and b tie: nobody beats every other row
    assert all(v > 0 for v in a.values["decode_s_per_mpx"])
    assert len(result.images) == 2 and all(max(i.width, i.height) == SIZE for i in result.images)
    # The greyed decoder: far less saturated than the same VAE untouched, and said so in plain words.
    assert foggy.mean("saturation_ratio") < 0.5 * a.mean("saturation_ratio")
    assert any("desaturated" in f for f in foggy.flags)
    rows = result.to_rows()
    assert rows[0]["psnr"] == pytest.approx(np.mean(a.values["psnr"]))
    assert rows[0]["psnr_low"] < rows[0]["psnr"] < rows[0]["psnr_high"]
    data = json.loads(result.to_json())
    assert data["rows"][0]["per_image"]["psnr"] == a.values["psnr"]
    assert "lpips" in data["skipped_metrics"] and "rfid" in data["skipped_metrics"]


def test_precision_variants_and_reconstruction_close_to_pipeline(photos: Path) -> None:
    from vaekit.ops.codec import roundtrip

    vae = _vae()
    result = compare([vae], photos, precisions=["fp32", "bf16"], max_size=SIZE, warmup=False)
    assert result.labels == ["small-sd1 · fp32", "small-sd1 · bf16"]
    fp32, bf16 = result.rows
    assert fp32.ok and bf16.ok and fp32.precision == "fp32" and bf16.precision == "bf16"
    # The fp32 row measures exactly what the pipeline gives.
    img = torch.nn.functional.interpolate(
        read_image(sorted(photos.iterdir())[0]).rgb[None], size=(27, 32), mode="bicubic", antialias=True
    )[0].clamp(0, 1)
    _, dec = roundtrip(vae, img)
    assert fp32.values["psnr"][0] == pytest.approx(M.psnr(img, dec.images[0]), abs=1e-4)
    assert bf16.values["psnr"][0] == pytest.approx(fp32.values["psnr"][0], abs=0.5)


# --- bad input ------------------------------------------------------------------------------------------------------
def test_incompatible_and_failing_vaes_are_reported_in_their_rows(tmp_path: Path) -> None:
    images = [torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    sd3 = _vae("sd3", label="small-sd3")  # 16 latent channels
    sd1 = _vae("sd1")
    result = compare([sd1, sd3, tmp_path / "missing.safetensors"], images, latents_from=sd1, warmup=False)
    ok, incompatible, failed = result.rows
    assert ok.ok and "encode_s_per_mpx" not in result.metrics
    assert incompatible.status == "incompatible" and "16" in incompatible.reason
    assert failed.status == "failed" and "could not load" in failed.reason
    assert all(math.isnan(v) for v in incompatible.values["psnr"])


def test_unreadable_images_are_skipped_and_no_images_is_an_error(tmp_path: Path) -> None:
    save_image(torch.rand(3, SIZE, SIZE), tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    result = compare([_vae()], tmp_path, warmup=False)
    assert [i.name for i in result.images] == ["good"]
    assert [Path(s.path).name for s in result.skipped_images] == ["broken.png"]
    (tmp_path / "good.png").unlink()
    with pytest.raises(BadInputError, match="no readable image"):
        compare([_vae()], tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInputError, match="no readable image"):
        compare([_vae()], empty)


def test_bad_options_are_bad_input(tmp_path: Path) -> None:
    img = [torch.rand(3, SIZE, SIZE)]
    with pytest.raises(BadInputError, match="precision"):
        compare([_vae()], img, precisions=["fp8"])
    with pytest.raises(BadInputError, match="tiling"):
        compare([_vae()], img, tilings=["sideways"])
    with pytest.raises(BadInputError, match="at least one VAE"):
        compare([], img)
    (tmp_path / "old.txt").write_text("keep me")
    with pytest.raises(BadInputError, match="not empty"):
        compare([_vae()], img, report_dir=tmp_path)
    assert (tmp_path / "old.txt").read_text() == "keep me"


# --- the report -----------------------------------------------------------------------------------------------------
class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []
        self.links: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"] or "")
        if tag == "a":
            self.links.append(a["href"] or "")
        if tag in ("script", "link") or any((v or "").startswith(("http:", "https:", "//")) for v in a.values()):
            self.external.append(tag)


def test_html_report_holds_every_image_and_works_offline(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = compare([_vae(), _vae("taesd", label="small-taesd")], photos, max_size=SIZE, report_dir=out, warmup=False)
    assert result.report_dir == out
    for name in ("report.html", "report.json", "report.csv", "per_image.csv"):
        assert (out / name).is_file(), name
    parser = _Tags()
    parser.feed((out / "report.html").read_text(encoding="utf-8"))
    files = [s for s in parser.imgs if not s.startswith("data:")]
    charts = [s for s in parser.imgs if s.startswith("data:image/png;base64,")]
    # Per image: the original, and per row a reconstruction and a difference heatmap.
    assert len(files) == 2 * (1 + 2 * 2)
    assert len(charts) == len(result.metrics)
    assert parser.external == []
    for rel in files + parser.links:
        assert (out / rel).is_file(), rel
    assert all(link.endswith(".png") for link in parser.links)
    csv_lines = (out / "report.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("label,vae,family")
    assert json.loads((out / "report.json").read_text())["rows"][1]["label"] == "small-taesd"


def test_cli_compare_writes_the_report_and_exits_2_on_no_images(photos: Path, tmp_path: Path, capsys) -> None:
    vae_file = tmp_path / "small-sd1.safetensors"
    _vae().save(vae_file)
    out = tmp_path / "rep"
    code = main(["compare", str(vae_file), "--images", str(photos), "--max-size", str(SIZE), "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "PSNR" in captured.out and "lpips" in captured.out and (out / "report.html").is_file()
    empty = tmp_path / "none"
    empty.mkdir()
    assert main(["compare", str(vae_file), "--images", str(empty)]) == 2
    assert "no readable image" in capsys.readouterr().err


# --- LPIPS and rFID from local weights ------------------------------------------------------------------------------
def test_lpips_matches_torchmetrics_on_the_same_backbone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import save_file
    from torchmetrics.functional.image import lpips as tm_lpips

    features = P._features("alex")
    torch.manual_seed(1)
    for m in features:
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=0.05)
    path = tmp_path / "alexnet.safetensors"
    save_file({f"features.{k}": v.contiguous() for k, v in features.state_dict().items()}, str(path))
    mine = P.load_lpips(path)
    # torchmetrics would fetch the backbone through torchvision: hand it the same layers instead.
    monkeypatch.setattr(tm_lpips, "_get_tv_model_features", lambda net, pretrained=False: features)
    reference = tm_lpips._LPIPS(pretrained=True, net="alex").eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    y = (x + 0.2 * torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    expected = reference(x, y, normalize=True).flatten()
    assert torch.allclose(mine(x, y), expected, atol=1e-5)
    assert P.lpips(mine, x[0], x[0]) == pytest.approx(0.0, abs=1e-7)
    # Used by compare when given; reported as skipped otherwise.
    result = compare([_vae()], [x[0], y[1]], lpips_weights=[path], warmup=False)
    assert "lpips" in result.metrics and all(v > 0 for v in result.rows[0].values["lpips"])


def test_lpips_and_inception_refuse_bad_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import save_file

    bogus = tmp_path / "bogus.safetensors"
    save_file({"foo": torch.zeros(2)}, str(bogus))
    with pytest.raises(BadInputError, match="no backbone"):
        P.load_lpips(bogus)
    with pytest.raises(BadInputError, match="lpips-weights"):
        P.load_lpips(tmp_path / "absent.pth")
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # as on a machine without the fid extra
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(BadInputError, match="torch-fidelity"):
        P.load_inception(bogus)


def test_frechet_distance_closed_form() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 3))
    shift = np.array([1.0, -2.0, 0.5])
    # Same covariance, shifted mean: the distance is |shift|^2 exactly.
    assert P.frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    # Diagonal covariances: sum((sqrt(s1) - sqrt(s2))^2) for the spread term.
    b = a * np.array([2.0, 1.0, 0.5])
    s1, s2 = np.var(a, axis=0, ddof=1), np.var(b, axis=0, ddof=1)
    diag = float(np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2))
    assert P.frechet_distance(a, b) == pytest.approx(diag, rel=0.05)
    assert math.isnan(P.frechet_distance(a[:1], b[:1]))
