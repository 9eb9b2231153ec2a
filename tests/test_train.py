"""Training: loss falls, bit-exact resume, decoder-only fine-tune, export parity with diffusers, calibration, and
clear errors on bad input. Tiny models, a few steps, generated images."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest
import torch

import vaekit
from vaekit.errors import BadInputError, VaekitError
from vaekit.formats.export import write_vae
from vaekit.interfaces.cli.core import main
from vaekit.models import build
from vaekit.ops.images import save_image
from vaekit.train import loop
from vaekit.train.calibrate import factors_from_latents
from vaekit.train.config import TRAIN_PRESETS, TrainConfig
from vaekit.train.loop import run_training
from vaekit.vae import load_vae


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread (no parallel-region barriers on a busy, shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _make_images(folder: Path, n: int = 4, size: tuple[int, int] = (48, 40), seed: int = 0) -> Path:
    """Smooth colour gradients with a bright square: easy for a tiny VAE to learn, different per image."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    w, h = size
    for i in range(n):
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        c = torch.rand(3, generator=g)
        img = torch.stack([xx * c[0], yy * c[1], (1 - xx) * c[2] + 0.2]).clamp(0, 1)
        top, left = int(torch.randint(0, h - 12, (1,), generator=g)), int(torch.randint(0, w - 12, (1,), generator=g))
        img[:, top : top + 12, left : left + 12] = 0.9
        save_image(img, folder / f"img{i}.png")
    return folder


def _cfg(data: Path, **kw: object) -> TrainConfig:
    base = dict(
        data=(str(data),),
        val_count=1,
        preset="tiny",
        crop=32,
        batch_size=2,
        steps=4,
        lr=2e-3,
        warmup=1,
        val_every=100,
        checkpoint_every=100,
        sample_every=100,
        log_every=1,
        precision="fp32",
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def trained(images: Path, tmp_path_factory: pytest.TempPathFactory) -> loop.TrainResult:
    """One short run shared by the loss, export and diffusers tests."""
    out = tmp_path_factory.mktemp("run")
    cfg = _cfg(images, steps=40, batch_size=4, lr=3e-3, warmup=2, ssim_weight=0.1, val_every=40, sample_every=40)
    return run_training(cfg, out)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_loss_falls_and_run_writes_its_files(trained: loop.TrainResult) -> None:
    rows = [r for r in _log(trained.out_dir) if "loss" in r]
    assert len(rows) == 40
    first = sum(r["l1"] for r in rows[:5]) / 5
    last = sum(r["l1"] for r in rows[-5:]) / 5
    assert last < 0.85 * first, (first, last)
    assert trained.validation["val_psnr"] > 10
    assert (trained.out_dir / "samples" / "step-0000040.png").is_file()
    assert (trained.out_dir / "log.csv").read_text().startswith("step,")
    assert trained.export is not None and trained.export.is_file()


def test_export_loads_in_vaekit_with_calibrated_factors(trained: loop.TrainResult) -> None:
    vae = load_vae(trained.export)
    assert vae.family == "custom"
    assert vae.config == dataclasses.replace(
        TRAIN_PRESETS["tiny"], scaling_factor=vae.config.scaling_factor, shift_factor=vae.config.shift_factor
    )
    # The export calibrates on the training images: their latents come out with unit variance.
    from vaekit.ops.images import load_image

    train_images = sorted(trained.out_dir.parent.glob("images*/img[0-2].png"))
    lat = torch.cat([vae.encode(load_image(p).rgb[:, :40, :40]).flatten() for p in train_images])
    assert 0.7 < float(lat.std()) < 1.3
    assert abs(float(lat.mean())) < 0.3


def test_export_matches_diffusers(trained: loop.TrainResult) -> None:
    diffusers = pytest.importorskip("diffusers")
    from safetensors.torch import load_file

    from vaekit.formats.convert import ldm_to_diffusers
    from vaekit.formats.export import diffusers_config

    vae = load_vae(trained.export)
    kwargs = diffusers_config(vae.config)
    kwargs.pop("_class_name")
    twin = diffusers.AutoencoderKL(**kwargs).eval()
    missing, unexpected = twin.load_state_dict(ldm_to_diffusers(load_file(trained.export), "kl"), strict=True)
    assert not missing and not unexpected
    x = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mean_d = twin.encode(x * 2 - 1).latent_dist.mean
        out_d = (twin.decode(mean_d).sample + 1) / 2
    mean_v, _ = vae.encode_posterior(x)
    torch.testing.assert_close(mean_v, mean_d, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(vae.decode(vae.normalise(mean_v)), out_d.clamp(0, 1), atol=1e-4, rtol=1e-4)


def _tensors(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_resume_reproduces_the_uninterrupted_run_exactly(images: Path, tmp_path: Path) -> None:
    # Every optional part on: discriminator from step 2 (adaptive weight), learned log-variance, accumulation.
    cfg = _cfg(images, steps=5, disc_weight=0.5, disc_start=2, learned_logvar=True, grad_accum=2, min_scale=0.5)
    whole = run_training(cfg, tmp_path / "whole", export=False)
    part = run_training(cfg, tmp_path / "split", stop_after=2, export=False)
    assert part.interrupted and part.step == 2
    resumed = run_training(cfg, tmp_path / "split", resume=True, export=False)
    assert resumed.step == 5
    a, b = _tensors(whole.checkpoint), _tensors(resumed.checkpoint)
    for key in ("model", "ema", "loss"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert "discriminator.main.0.weight" in a["loss"]
    assert torch.equal(a["rng_data"], b["rng_data"]) and torch.equal(a["rng_noise"], b["rng_noise"])
    # The log is continuous: no duplicated or missing steps after the resume.
    assert [r["step"] for r in _log(tmp_path / "split")] == [1, 2, 3, 4, 5]


def test_resume_refuses_a_run_with_other_settings(images: Path, tmp_path: Path) -> None:
    run_training(_cfg(images, steps=1), tmp_path, export=False)
    with pytest.raises(BadInputError, match=r"other settings \(lr\)"):
        run_training(_cfg(images, steps=2, lr=1e-4), tmp_path, resume=True)
    # More steps is allowed (the length of a run does not change the steps already taken).
    assert run_training(_cfg(images, steps=2), tmp_path, resume=True, export=False).step == 2
    with pytest.raises(BadInputError, match="already exists here; pass --resume"):
        run_training(_cfg(images, steps=2), tmp_path)


def test_decoder_only_finetune_leaves_the_encoder_bit_identical(images: Path, tmp_path: Path) -> None:
    cfg = dataclasses.replace(TRAIN_PRESETS["tiny"], family="custom")
    torch.manual_seed(3)
    src = write_vae(build(cfg).state_dict(), cfg, tmp_path / "base.safetensors")
    before = load_vae(src).state_dict()
    result = run_training(_cfg(images, init=str(src), train_part="decoder", steps=3, lr=1e-2), tmp_path / "ft")
    after = load_vae(result.export).state_dict()
    encoder_side = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    decoder_side = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert encoder_side and decoder_side
    assert all(torch.equal(before[k], after[k]) for k in encoder_side)
    assert sum(not torch.equal(before[k], after[k]) for k in decoder_side) > len(decoder_side) // 2


def test_decoder_only_needs_a_vae_to_finetune(images: Path) -> None:
    with pytest.raises(BadInputError, match="needs --init"):
        _cfg(images, train_part="decoder")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = loop.reconstruct
    calls = {"n": 0}

    def poisoned(*args, **kwargs):  # type: ignore[no-untyped-def]
        y, mean, logvar = real(*args, **kwargs)
        calls["n"] += 1
        return (y * float("nan"), mean, logvar) if calls["n"] == 3 else (y, mean, logvar)

    monkeypatch.setattr(loop, "reconstruct", poisoned)
    with pytest.raises(VaekitError, match=r"NaN/inf at step 3.*last good state \(step 2\)"):
        run_training(_cfg(images, steps=5), tmp_path)
    state = _tensors(tmp_path / "checkpoint.pt")
    assert state["step"] == 2
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    # The diverged step was rolled back: the checkpoint equals that of a clean stop after step 2.
    monkeypatch.setattr(loop, "reconstruct", real)
    clean = _tensors(run_training(_cfg(images, steps=5), tmp_path / "clean", stop_after=2).checkpoint)
    assert torch.equal(state["rng_data"], clean["rng_data"]) and torch.equal(state["rng_noise"], clean["rng_noise"])
    assert all(torch.equal(state["model"][k], clean["model"][k]) for k in clean["model"])


def test_ctrl_c_saves_and_stops_cleanly(images: Path, tmp_path: Path) -> None:
    def press_ctrl_c(step: int, steps: int, parts: dict) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    result = run_training(_cfg(images, steps=6), tmp_path, progress=press_ctrl_c)
    assert result.interrupted and result.step == 2 and result.export is None
    assert _tensors(result.checkpoint)["step"] == 2


def test_data_skips_bad_files_and_counts_them(tmp_path: Path) -> None:
    folder = _make_images(tmp_path / "data" / "nested", n=3)
    (tmp_path / "data" / "broken.png").write_bytes(b"not a png at all")
    save_image(torch.rand(3, 16, 16), tmp_path / "data" / "small.png")
    listed = tmp_path / "list.txt"
    listed.write_text(f"# training list\n{folder}\n{tmp_path / 'data' / 'broken.png'}\n")
    from vaekit.train.data import expand_inputs, prepare_data

    assert len(expand_inputs([str(listed)])) == 4
    train, val = prepare_data((str(tmp_path / "data"),), (), 0, 32, None)
    assert len(train) == 3 and len(val) == 0  # of 5 files: the broken and the too small one are skipped
    assert "1 undecodable" in train.skipped_text() and "1 smaller than 32 px" in train.skipped_text()


def test_bad_data_gives_clear_messages(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInputError, match="no image files found"):
        run_training(_cfg(empty), tmp_path / "a")
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"b{i}.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(BadInputError, match="no usable training images"):
        run_training(_cfg(broken), tmp_path / "b")
    small = _make_images(tmp_path / "small", n=3, size=(40, 40))
    with pytest.raises(BadInputError, match="--crop 64 is larger than every training image"):
        run_training(_cfg(small, crop=64), tmp_path / "c")


def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["train", str(empty), "--out", str(tmp_path / "run"), "--preset", "tiny"])
    err = capsys.readouterr().err
    assert code == 2 and "no image files found" in err and len(err.strip().splitlines()) == 1
    assert main(["train", str(empty), "--out", str(tmp_path / "run"), "--preset", "huge"]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err


def test_cli_train_then_calibrate_writes_factors(images: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    args = ["train", str(images), "--out", str(out), "--preset", "tiny", "--crop", "32", "--batch-size", "2"]
    assert main([*args, "--steps", "2", "--warmup", "1", "--precision", "fp32", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 2 and Path(summary["export"]).is_file()
    vae_file = Path(summary["export"])
    # Overwrite the factors with known wrong ones, then let calibrate put the measured ones back.
    from vaekit.train.calibrate import write_factors

    write_factors(vae_file, load_vae(vae_file).config, 1.0, 0.0)
    assert main(["calibrate", str(vae_file), "--images", str(images), "--write", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    vae = load_vae(vae_file)
    assert vae.config.scaling_factor == pytest.approx(result["scale"]) and result["scale"] != 1.0
    assert vae.config.shift_factor == pytest.approx(result["shift"])


def test_calibrate_recovers_a_known_scale_on_synthetic_latents() -> None:
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(2, 4, 16, 16, generator=g) * 2.5 + 0.7 for _ in range(8)]
    result = factors_from_latents(latents)
    assert result.scale == pytest.approx(1 / 2.5, rel=0.02)
    assert result.shift == pytest.approx(0.7, abs=0.03)
    assert result.images == 16 and result.elements == 8 * 2 * 4 * 16 * 16


def test_calibrate_follows_a_scaled_encoder(small_vae) -> None:
    """Multiplying the posterior mean by 3 (through quant_conv) divides the calibrated scale by 3."""
    from vaekit.train.calibrate import calibrate

    imgs = [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    before = calibrate(small_vae, imgs)
    with torch.no_grad():
        c = small_vae.latent_channels
        small_vae.model.quant_conv.weight[:c] *= 3
        small_vae.model.quant_conv.bias[:c] *= 3
    after = calibrate(small_vae, imgs)
    assert after.scale == pytest.approx(before.scale / 3, rel=1e-4)
    assert after.shift == pytest.approx(before.shift * 3, rel=1e-4, abs=1e-6)


def test_tae16_preset_starts_as_a_box_codec_and_exports_a_loadable_tiny_vae(images: Path, tmp_path: Path) -> None:
    """The bundled VAE's preset: after one small step it is still the box codec (far above a random init)."""
    result = run_training(_cfg(images, preset="tae16", steps=2, val_every=1, lr=1e-4), tmp_path / "tae")
    run_training(_cfg(images, steps=1, val_every=1, lr=1e-4), tmp_path / "kl", export=False)
    box, random_init = _log(tmp_path / "tae")[0]["val_psnr"], _log(tmp_path / "kl")[0]["val_psnr"]
    assert box > random_init + 4, (box, random_init)  # measured: 16.0 dB against 9-10 dB
    vae = vaekit.load_vae(result.export)
    assert vae.config.kind == "tiny" and vae.config.latent_channels == 16 and vae.config.family == "custom"
    x = torch.rand(1, 3, 32, 40)
    assert vae.decode(vae.encode(x)).shape == x.shape
