"""The training loop: AdamW + EMA, accumulation, autocast, clipping, validation, logs, checkpoints, export."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vaekit.errors import BadInputError, VaekitError
from vaekit.formats.export import write_vae
from vaekit.formats.io import atomic_path
from vaekit.models import build
from vaekit.models.config import VAEConfig
from vaekit.ops.images import crop_padding, pad_to_multiple, save_image
from vaekit.train.config import TRAIN_PRESETS, TrainConfig
from vaekit.train.data import CropSampler, ImageSet, prepare_data
from vaekit.train.losses import VAELoss, load_lpips, ssim_similarity

CHECKPOINT_NAME = "checkpoint.pt"
EXPORT_NAME = "vae.safetensors"
CHECKPOINT_FORMAT = 1


@dataclass
class TrainResult:
    """What a run did: last step, where its files are, and the last validation figures."""

    out_dir: Path
    step: int
    checkpoint: Path
    export: Path | None
    interrupted: bool = False
    wall_seconds: float = 0.0
    validation: dict[str, float] = field(default_factory=dict)
    skipped: str = ""


def reconstruct(
    model: nn.Module,
    cfg: VAEConfig,
    x: torch.Tensor,
    generator: torch.Generator | None,
    encoder_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Images in [0, 1] -> (reconstruction in [0, 1] unclamped, posterior mean, logvar); samples z when
    ``generator`` is given, else decodes the posterior mean.
    """
    with torch.set_grad_enabled(encoder_grad and torch.is_grad_enabled()):
        if not cfg.gaussian:
            z = model.encode(x)
            mean = logvar = None
        else:
            mean, logvar = model.encode(x)
            z = mean
            if generator is not None:
                noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device, mean.dtype)
                z = mean + torch.exp(0.5 * logvar) * noise
    return model.decode(z), mean, logvar


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1] (mean over the batch of per-image PSNR)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(1 / mse)).mean())


@torch.no_grad()
def evaluate(model: nn.Module, cfg: VAEConfig, images: list[torch.Tensor], crop: int | None = None) -> dict[str, float]:
    """Mean PSNR/SSIM of posterior-mean reconstructions: whole images (reflect-padded to the multiple) or,
    with ``crop``, the central ``crop`` x ``crop`` square of each image.
    """
    scores: dict[str, list[float]] = {"psnr": [], "ssim": []}
    for img in images:
        x = img.float()[None] / 255 if img.dtype == torch.uint8 else img[None].float()
        if crop is not None:
            h, w = x.shape[-2:]
            if min(h, w) < crop:
                continue
            top, left = (h - crop) // 2, (w - crop) // 2
            x = x[..., top : top + crop, left : left + crop]
        padded, pad = pad_to_multiple(x, cfg.downscale)
        y, _, _ = reconstruct(model, cfg, padded, None)
        y = crop_padding(y.float(), pad).clamp(0, 1)
        scores["psnr"].append(psnr(x, y))
        scores["ssim"].append(float(ssim_similarity(x, y, "ssim")))
    return {k: sum(v) / len(v) for k, v in scores.items() if v}


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16); without it bf16 autocast is slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: plain float32)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else None


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up, then constant or cosine down to 10%."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup)
    t = min(1.0, (step - cfg.warmup) / span)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def trainable_parameters(model: nn.Module, cfg: VAEConfig, part: str) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs a run updates: all of them, or the decoder side only."""
    if part == "full":
        return list(model.named_parameters())
    prefixes = ("decoder.", "post_quant_conv.")
    return [(n, p) for n, p in model.named_parameters() if n.startswith(prefixes)]


class _StopFlag:
    """Ctrl-C sets a flag the loop reads between steps, so no step is ever left half-applied."""

    def __init__(self) -> None:
        self.requested = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self.requested:  # a second Ctrl-C: the user insists
                raise KeyboardInterrupt
            self.requested = True

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


class RunLog:
    """Appends metrics to log.csv and log.jsonl (and TensorBoard when it is installed)."""

    def __init__(self, out_dir: Path, tensorboard: bool = True) -> None:
        self.jsonl = out_dir / "log.jsonl"
        self.csv = out_dir / "log.csv"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                self.writer = None

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (a resumed run rewrites them)."""
        if self.jsonl.exists():
            rows = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]
            kept = [r for r in rows if r.get("step", 0) <= step]
            with atomic_path(self.jsonl) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            self._rewrite_csv(kept)

    def _rewrite_csv(self, rows: list[dict[str, Any]]) -> None:
        keys: list[str] = []
        for r in rows:
            keys.extend(k for k in r if k not in keys)
        with atomic_path(self.csv) as tmp, tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (a dict with ``step``)."""
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        rows = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]
        keys = list(dict.fromkeys(k for r in rows for k in r))
        if not self.csv.exists() or self.csv.read_text().split("\n", 1)[0].split(",") != keys:
            self._rewrite_csv(rows)
        else:
            with self.csv.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=keys).writerow(record)
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self.writer.add_scalar(k, v, record["step"])

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.writer is not None:
            self.writer.close()


def sample_grid(model: nn.Module, cfg: VAEConfig, images: list[torch.Tensor], size: int, dest: Path) -> None:
    """Save originals (top row) over their reconstructions (bottom row): central crops of the given images."""
    tiles = []
    for img in images[:8]:
        x = img.float() / 255 if img.dtype == torch.uint8 else img.float()
        h, w = x.shape[-2:]
        s = min(size, h, w) // cfg.downscale * cfg.downscale
        top, left = (h - s) // 2, (w - s) // 2
        x = x[:, top : top + s, left : left + s]
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True)[0] if s != size else x
        tiles.append(x)
    if not tiles:
        return
    batch = torch.stack(tiles)
    with torch.no_grad():
        recon = reconstruct(model, cfg, batch, None)[0].float().clamp(0, 1)
    grid = torch.cat([torch.cat(list(batch), dim=2), torch.cat(list(recon), dim=2)], dim=1)
    save_image(grid, dest)


class Trainer:
    """One training run in ``out_dir``: builds the model, data, losses and optimisers, and steps them."""

    def __init__(self, cfg: TrainConfig, out_dir: str | os.PathLike[str], device: str = "cpu") -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.device = torch.device(device)
        torch.manual_seed(cfg.seed)
        if cfg.init:
            from vaekit.vae import load_vae

            loaded = load_vae(cfg.init, device="cpu", dtype=torch.float32)
            if len(loaded.origin.parts) != 2:
                raise BadInputError(f"{cfg.init}: holds only the {loaded.origin.parts[0]}; training needs both halves")
            self.vae_config: VAEConfig = loaded.config
            self.model = loaded.model
        else:
            self.vae_config = TRAIN_PRESETS[cfg.preset]
            self.model = build(self.vae_config)
            if self.vae_config.kind == "tiny":
                from vaekit.train.warm_init import box_codec_init

                box_codec_init(self.model)  # type: ignore[arg-type]
        self.model.to(self.device).train()
        named = trainable_parameters(self.model, self.vae_config, cfg.train_part)
        train_names = {n for n, _ in named}
        for n, p in self.model.named_parameters():
            p.requires_grad_(n in train_names)
        self.params = [p for _, p in named]
        self.param_names = [n for n, _ in named]
        self.ema = [p.detach().clone() for p in self.params]
        lpips_net = load_lpips(cfg.lpips_weights) if cfg.lpips_weights else None
        self.loss = VAELoss(
            cfg.reconstruction,
            cfg.ssim_weight,
            cfg.ssim_kind,
            cfg.kl_weight if cfg.train_part == "full" else 0.0,
            cfg.learned_logvar,
            cfg.disc_weight,
            cfg.disc_start,
            lpips_net,
            cfg.lpips_weight,
        ).to(self.device)
        extra = [self.loss.logvar] if self.loss.logvar is not None else []
        self.optimizer = torch.optim.AdamW(
            [{"params": self.params, "weight_decay": cfg.weight_decay}, {"params": extra, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=(0.9, 0.99),
        )
        self.disc_optimizer = (
            torch.optim.AdamW(self.loss.discriminator.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
            if self.loss.discriminator is not None
            else None
        )
        self.train_set, self.val_set = prepare_data(cfg.data, cfg.val_data, cfg.val_count, cfg.crop, cfg.resize_short)
        self.sampler = CropSampler(self.train_set, cfg.crop, cfg.min_scale, cfg.flip, cfg.seed)
        self.noise = torch.Generator().manual_seed(cfg.seed + 1)
        self.autocast = autocast_dtype(cfg.precision, self.device)
        self.step = 0
        self.elapsed = 0.0
        self.validation: dict[str, float] = {}

    # --- checkpoints -------------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        """Where the latest checkpoint lives."""
        return self.out_dir / CHECKPOINT_NAME

    def state(self) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit."""
        state: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "config": json.dumps(self.cfg.to_dict()),
            "fingerprint": self.cfg.fingerprint(),
            "vae_config": json.dumps(self.vae_config.to_dict()),
            "step": self.step,
            "elapsed": self.elapsed,
            "model": self.model.state_dict(),
            "ema": {n: t for n, t in zip(self.param_names, self.ema, strict=True)},
            "optimizer": self.optimizer.state_dict(),
            "loss": self.loss.state_dict(),
            "rng_torch": torch.get_rng_state(),
            "rng_data": self.sampler.state(),
            "rng_noise": self.noise.get_state(),
            "validation": json.dumps(self.validation),
        }
        if self.disc_optimizer is not None:
            state["disc_optimizer"] = self.disc_optimizer.state_dict()
        return state

    def save_checkpoint(self) -> Path:
        """Write the checkpoint atomically (temporary file, then rename)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.checkpoint_path) as tmp:
            torch.save(self.state(), tmp)
        return self.checkpoint_path

    def load_checkpoint(self, path: Path) -> None:
        """Restore a checkpoint written by this config (a different config is refused)."""
        if not path.is_file():
            raise BadInputError(f"{path}: no checkpoint to resume from")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is one clear message
            raise BadInputError(f"{path}: not a readable vaekit checkpoint ({str(e).splitlines()[0][:120]})") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "fingerprint" not in state:
            raise BadInputError(f"{path}: not a vaekit training checkpoint")
        if state["fingerprint"] != self.cfg.fingerprint():
            theirs = TrainConfig.from_dict(json.loads(state["config"]))
            diff = ", ".join(self.cfg.differences(theirs)) or "settings"
            raise BadInputError(f"{path}: was written by a run with other settings ({diff}); refusing to resume")
        self.model.load_state_dict(state["model"])
        ema = state["ema"]
        self.ema = [ema[n].to(self.device).clone() for n in self.param_names]
        self.optimizer.load_state_dict(state["optimizer"])
        self.loss.load_state_dict(state["loss"])
        if self.disc_optimizer is not None:
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        torch.set_rng_state(state["rng_torch"])
        self.sampler.set_state(state["rng_data"])
        self.noise.set_state(state["rng_noise"])
        self.step = int(state["step"])
        self.elapsed = float(state["elapsed"])
        self.validation = json.loads(state["validation"])

    # --- the model with EMA weights ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[nn.Module]:
        """Temporarily swap the EMA weights into the model (and eval mode), restoring both afterwards."""
        saved = [p.detach().clone() for p in self.params]
        was_training = self.model.training
        with torch.no_grad():
            for p, e in zip(self.params, self.ema, strict=True):
                p.copy_(e)
        self.model.eval()
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved, strict=True):
                    p.copy_(s)
            self.model.train(was_training)

    def export(self, dest: Path, dtype: torch.dtype | None = None, calibrate: bool = True) -> Path:
        """Write the EMA weights as an LDM-layout safetensors file with the config (and factors) in metadata."""
        from vaekit.train.calibrate import estimate_factors_model

        cfg = self.vae_config
        with self.ema_weights() as model:
            if calibrate and cfg.kind == "kl" and cfg.family == "custom":
                scale, shift = estimate_factors_model(model, cfg, self.train_set.images[:64])
                import dataclasses

                cfg = dataclasses.replace(cfg, scaling_factor=scale, shift_factor=shift)
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        extra = {
            "vaekit.train.step": str(self.step),
            "vaekit.train.config": json.dumps(self.cfg.to_dict(), sort_keys=True),
            "vaekit.train.validation": json.dumps(self.validation, sort_keys=True),
        }
        return write_vae(state, cfg, dest, "ldm", dtype, overwrite=True, extra_metadata=extra)

    # --- one step ----------------------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def train_step(self) -> dict[str, float]:
        """One optimiser step (``grad_accum`` micro-batches); raises VaekitError on a non-finite loss."""
        cfg = self.cfg
        # RNG states before the step: a diverged step is rolled back to them, so its checkpoint resumes exactly.
        self.rng_before = (self.sampler.state(), self.noise.get_state(), torch.get_rng_state())
        lr = lr_at(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        gan = self.loss.gan_active(self.step)
        sums: dict[str, float] = {}
        last_layer = self.model.decoder.conv_out.weight if self.vae_config.kind == "kl" else None
        recons = []
        for _ in range(cfg.grad_accum):
            x = self.sampler.batch(cfg.batch_size).to(self.device)
            with self._autocast():
                y, mean, logvar = reconstruct(
                    self.model, self.vae_config, x, self.noise, encoder_grad=cfg.train_part == "full"
                )
            terms = self.loss.generator_loss(x, y.float(), mean, logvar, self.step, last_layer)
            if not torch.isfinite(terms.total):
                raise _Diverged(self.step + 1)
            (terms.total / cfg.grad_accum).backward()
            recons.append((x, y.detach().float()))
            for k, v in terms.parts.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
        grads = [p for p in self.params if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(grads, cfg.grad_clip) if cfg.grad_clip > 0 else None
        if norm is not None and not torch.isfinite(norm):
            raise _Diverged(self.step + 1)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if gan and self.disc_optimizer is not None:
            for group in self.disc_optimizer.param_groups:
                group["lr"] = lr
            for x, y in recons:
                d_loss = self.loss.discriminator_loss(x, y) / cfg.grad_accum
                d_loss.backward()
                sums["d_loss"] = sums.get("d_loss", 0.0) + float(d_loss.detach())
            self.disc_optimizer.step()
            self.disc_optimizer.zero_grad(set_to_none=True)
        decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))  # short warm-up of the average
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1 - decay)
        self.step += 1
        sums["lr"] = lr
        if norm is not None:
            sums["grad_norm"] = float(norm)
        return sums

    def rollback(self) -> None:
        """Undo the part of a step that diverged: drop its gradients and rewind the RNGs it drew from."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.disc_optimizer is not None:
            self.disc_optimizer.zero_grad(set_to_none=True)
        data, noise, global_rng = self.rng_before
        self.sampler.set_state(data)
        self.noise.set_state(noise)
        torch.set_rng_state(global_rng)

    def validate(self) -> dict[str, float]:
        """Validation PSNR/SSIM of the EMA model on the held-out images at full size."""
        if not len(self.val_set):
            return {}
        with self.ema_weights() as model, self._autocast():
            result = evaluate(model, self.vae_config, self.val_set.images)
        self.validation = {f"val_{k}": v for k, v in result.items()}
        return self.validation

    def save_samples(self) -> Path | None:
        """Write a grid of held-out (or training) crops over their reconstructions."""
        images: ImageSet = self.val_set if len(self.val_set) else self.train_set
        dest = self.out_dir / "samples" / f"step-{self.step:07d}.png"
        with self.ema_weights() as model, self._autocast():
            sample_grid(model, self.vae_config, images.images, min(256, max(self.cfg.crop, 128)), dest)
        return dest


class _Diverged(Exception):
    def __init__(self, step: int) -> None:
        self.step = step


ProgressCallback = Callable[[int, int, dict[str, float]], None]


def run_training(
    cfg: TrainConfig,
    out_dir: str | os.PathLike[str],
    resume: bool = False,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    stop_after: int | None = None,
    export: bool = True,
    export_dtype: torch.dtype | None = None,
) -> TrainResult:
    """Train (or resume) in ``out_dir``; checkpoints atomically, exports the EMA model to ``vae.safetensors``.

    ``stop_after`` ends the run after that many steps as if interrupted (used to test resuming).
    """
    trainer = Trainer(cfg, out_dir, device)
    out = trainer.out_dir
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        trainer.load_checkpoint(trainer.checkpoint_path)
    elif trainer.checkpoint_path.exists():
        raise BadInputError(f"{trainer.checkpoint_path}: a run already exists here; pass --resume or another --out")
    log = RunLog(out)
    log.truncate_after(trainer.step)
    (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    stop = _StopFlag()
    interrupted = False
    start = time.monotonic() - trainer.elapsed
    with stop.installed():
        while trainer.step < cfg.steps:
            try:
                parts = trainer.train_step()
            except _Diverged as d:
                log.write({"step": d.step, "diverged": 1})
                trainer.rollback()
                trainer.elapsed = time.monotonic() - start
                trainer.save_checkpoint()
                raise VaekitError(
                    f"loss became NaN/inf at step {d.step}; training stopped. The last good state (step {d.step - 1}) "
                    f"is in {trainer.checkpoint_path}; start a new run with a lower --lr, or --precision fp32"
                ) from None
            trainer.elapsed = time.monotonic() - start
            step = trainer.step
            if progress is not None:
                progress(step, cfg.steps, parts)
            out_of_time = cfg.time_limit is not None and trainer.elapsed >= cfg.time_limit * 60
            stopping = stop.requested or (stop_after is not None and step >= stop_after)
            last = step == cfg.steps or out_of_time
            record: dict[str, Any] = {}
            if step % cfg.log_every == 0 or last:
                record.update(parts)
            if step % cfg.val_every == 0 or last:
                record.update(trainer.validate())
            if step % cfg.sample_every == 0 or last:
                trainer.save_samples()
            if record:
                log.write({"step": step, "time_s": round(trainer.elapsed, 2), **record})
            if step % cfg.checkpoint_every == 0 or last or stopping:
                trainer.save_checkpoint()
            if stopping:
                interrupted = True
                break
            if out_of_time:
                break
    log.close()
    exported = None
    if export and not interrupted:
        exported = trainer.export(out / EXPORT_NAME, export_dtype)
    return TrainResult(
        out,
        trainer.step,
        trainer.checkpoint_path,
        exported,
        interrupted,
        trainer.elapsed,
        dict(trainer.validation),
        trainer.train_set.skipped_text(),
    )
