"""Training run settings (a frozen dataclass) and the architecture presets a run can start from."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from vaekit.errors import BadInputError
from vaekit.models.config import KLConfig, TinyConfig, VAEConfig

# Architectures for training from scratch. Factors start neutral (1, 0); the export calibrates them on the data.
TRAIN_PRESETS: dict[str, VAEConfig] = {
    "tiny": KLConfig(
        family="custom",
        base_channels=16,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=1,
        norm_groups=8,
        scaling_factor=1.0,
    ),
    # Narrow at full resolution (where the compute is), wide at 1/8 (where the parameters are cheap to run):
    # 2.7M parameters, ~11 GFLOP per 128 px image forward and backward.
    "small": KLConfig(
        family="custom",
        base_channels=16,
        channel_mult=(1, 2, 4, 8),
        num_res_blocks=1,
        norm_groups=8,
        scaling_factor=1.0,
    ),
    # The bundled default since issue 15: ``small`` with 16 latent channels (like SD3/FLUX) instead of 4. At the
    # same compute the 16-channel latent keeps far more detail (+PSNR, see src/vaekit/weights/MODEL_CARD.md).
    "small16": KLConfig(
        family="custom",
        latent_channels=16,
        base_channels=16,
        channel_mult=(1, 2, 4, 8),
        num_res_blocks=1,
        norm_groups=8,
        scaling_factor=1.0,
    ),
    "wide16": KLConfig(
        family="custom",
        latent_channels=16,
        base_channels=32,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=1,
        norm_groups=8,
        scaling_factor=1.0,
    ),
    "sd-size": KLConfig(family="custom", scaling_factor=1.0),
    # The bundled default since issue 15: a TAESD-style autoencoder (plain convs and ReLUs, no normalisation)
    # with 16 latent channels at downscale 8, width 48, started from a box-filter codec (vaekit.train.warm_init).
    "tae16": TinyConfig(family="custom", latent_channels=16, width=48),
}

RECONSTRUCTION = ("l1", "mse")
SSIM_KINDS = ("ssim", "ms-ssim")
TRAIN_PARTS = ("full", "decoder")
PRECISIONS = ("auto", "bf16", "fp32")
SCHEDULES = ("cosine", "constant")

# Fields that may change when a run is resumed: they do not alter the maths of the steps already taken.
RESUMABLE_CHANGES = frozenset({"steps", "val_every", "checkpoint_every", "sample_every", "log_every", "time_limit"})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; its :meth:`fingerprint` guards ``--resume`` against a mix-up."""

    data: tuple[str, ...]
    val_data: tuple[str, ...] = ()
    val_count: int = 2
    preset: str = "small"
    init: str | None = None  # fine-tune this VAE file instead of training a preset from scratch
    train_part: str = "full"
    crop: int = 128
    resize_short: int | None = None
    min_scale: float = 1.0  # random down-scaling of each crop's source region, in [min_scale, 1]
    flip: bool = True
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    warmup: int = 100
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "auto"
    reconstruction: str = "l1"
    ssim_weight: float = 0.2
    ssim_kind: str = "ssim"
    kl_weight: float = 1e-6
    learned_logvar: bool = False
    disc_weight: float = 0.0
    disc_start: int = 0
    lpips_weights: str | None = None
    lpips_weight: float = 0.0
    val_every: int = 250
    checkpoint_every: int = 250
    sample_every: int = 500
    log_every: int = 10
    time_limit: float | None = None  # minutes; the run stops (and exports) when it is spent

    def __post_init__(self) -> None:
        checks = [
            (self.preset in TRAIN_PRESETS, f"unknown preset {self.preset!r}; known: {', '.join(TRAIN_PRESETS)}"),
            (self.train_part in TRAIN_PARTS, f"train part must be one of {', '.join(TRAIN_PARTS)}"),
            (self.train_part == "full" or self.init, "--train-part decoder needs --init (a VAE to fine-tune)"),
            (self.reconstruction in RECONSTRUCTION, f"reconstruction loss must be one of {', '.join(RECONSTRUCTION)}"),
            (self.ssim_kind in SSIM_KINDS, f"ssim kind must be one of {', '.join(SSIM_KINDS)}"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
            (self.lr_schedule in SCHEDULES, f"lr schedule must be one of {', '.join(SCHEDULES)}"),
            (self.crop >= 16 and self.crop % 8 == 0, f"crop must be a multiple of 8 and at least 16, got {self.crop}"),
            (self.resize_short is None or self.resize_short >= self.crop, "--resize-short must be at least --crop"),
            (0 < self.min_scale <= 1, f"min scale must be in (0, 1], got {self.min_scale}"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch size and gradient accumulation must be >= 1"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.lr > 0, f"learning rate must be positive, got {self.lr}"),
            (0 <= self.ema_decay < 1, f"EMA decay must be in [0, 1), got {self.ema_decay}"),
            (self.val_count >= 0, "val count must be >= 0"),
            (
                min(self.val_every, self.checkpoint_every, self.sample_every, self.log_every) >= 1,
                "intervals must be >= 1",
            ),
            (self.lpips_weight == 0 or self.lpips_weights, "--lpips-weight needs --lpips-weights (a local file)"),
            (min(self.kl_weight, self.ssim_weight, self.disc_weight, self.lpips_weight) >= 0, "weights must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise BadInputError(message)
        if not self.data:
            raise BadInputError("no training data given (pass image folders, files or a list file)")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Rebuild from :meth:`to_dict` output (unknown keys from other versions are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names})

    def fingerprint(self) -> str:
        """Hash of the settings that shape the maths of the run (not its length or logging cadence)."""
        core = {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_CHANGES}
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, other: TrainConfig) -> list[str]:
        """Names of the settings (outside the resumable ones) where ``other`` differs."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [k for k in mine if k not in RESUMABLE_CHANGES and mine[k] != theirs.get(k)]
