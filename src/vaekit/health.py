"""Health checks of a VAE: broken weights (NaN/inf, all-zero tensors) and whether fp16 would overflow.

The fp16 check runs a probe image through the model in float32 with forward hooks on every module, records the
largest |activation| and compares it with float16's largest finite value (65504). SDXL's original VAE is the
well-known case: its decoder activations pass 65504, so it gives NaN/black images in fp16.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from vaekit.vae import VAE

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
# Beyond this fraction of the fp16 range, other images (larger, more saturated) may well overflow.
FP16_MARGIN = 0.5
PROBE_SIZE = 256


@dataclass
class WeightHealth:
    """Tensors of a state dict that are not finite or entirely zero."""

    tensors: int
    nonfinite: list[str] = field(default_factory=list)
    all_zero: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No NaN/inf tensor (all-zero tensors are suspicious, not fatal: some biases start at zero)."""
        return not self.nonfinite

    def summary(self) -> str:
        """One line for a table."""
        parts = []
        if self.nonfinite:
            parts.append(f"{len(self.nonfinite)} with NaN/inf ({_few(self.nonfinite)})")
        if self.all_zero:
            parts.append(f"{len(self.all_zero)} all-zero ({_few(self.all_zero)})")
        return "; ".join(parts) if parts else f"ok ({self.tensors} tensors finite, none all-zero)"

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        return {**asdict(self), "ok": self.ok}


def weight_health(state_dict: dict[str, torch.Tensor]) -> WeightHealth:
    """Find tensors holding NaN/inf, and weight tensors that are entirely zero (biases may legitimately be zero)."""
    health = WeightHealth(tensors=len(state_dict))
    for name, t in state_dict.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        if not torch.isfinite(t).all():
            health.nonfinite.append(name)
        elif not name.endswith(".bias") and not t.any():
            health.all_zero.append(name)
    return health


@dataclass
class ActivationRange:
    """Largest |activation| seen while a probe image went through the model, against fp16's range."""

    max_abs: float
    module: str  # where the largest value appeared
    probe: str  # what was run: "encode+decode of a 256x256 photo", ...
    limit: float = FP16_MAX

    @property
    def fp16_overflows(self) -> bool:
        """True when some activation exceeds float16's range (or is already not finite)."""
        return not math.isfinite(self.max_abs) or self.max_abs > self.limit

    @property
    def fraction(self) -> float:
        """max |activation| as a fraction of the fp16 limit."""
        return self.max_abs / self.limit

    def verdict(self) -> str:
        """'overflows', 'risky' (past half the range) or 'safe'."""
        if self.fp16_overflows:
            return "overflows"
        return "risky" if self.fraction > FP16_MARGIN else "safe"

    def summary(self) -> str:
        """One line for a table."""
        if not math.isfinite(self.max_abs):
            return f"overflows: non-finite activations in {self.module} already in float32"
        text = f"max |activation| {self.max_abs:.4g} in {self.module} ({self.fraction:.1%} of fp16's {self.limit:.0f})"
        if self.fp16_overflows:
            return f"overflows: {text}; use bf16 or fp32"
        return f"{self.verdict()}: {text}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        return {**asdict(self), "fp16_overflows": self.fp16_overflows, "verdict": self.verdict()}


def probe_image(size: int = PROBE_SIZE) -> torch.Tensor:
    """A real photo (scikit-image's astronaut), resized to ``size`` x ``size``, (1, 3, H, W) in [0, 1]."""
    import numpy as np
    from PIL import Image

    from vaekit.ops.images import builtin_image_paths, load_image, to_pil

    im = to_pil(load_image(builtin_image_paths()[0]).rgb).resize((size, size), Image.Resampling.BICUBIC)
    arr = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
    return arr.permute(2, 0, 1).unsqueeze(0).contiguous()


def activation_range(vae: VAE, image: torch.Tensor | None = None, size: int = PROBE_SIZE) -> ActivationRange:
    """Run a probe image through ``vae`` (as loaded, ideally float32) and record the largest |activation|.

    Hooks are attached to every module for the duration of the probe and removed afterwards; the model is not
    otherwise changed. A decoder-only file is probed with unit-normal latents.
    """
    size -= size % vae.downscale
    image = probe_image(size) if image is None else image
    best: dict[str, Any] = {"value": 0.0, "module": "-"}
    names = {m: n for n, m in vae.model.named_modules()}

    def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        tensors = output if isinstance(output, tuple | list) else (output,)
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                value = float(t.detach().abs().float().amax())
                if not math.isfinite(value) or value > best["value"]:
                    if math.isfinite(best["value"]):
                        best.update(value=value, module=names.get(module) or "model")

    model = vae.model
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        # The raw model, not the codec pipeline: this measures the weights themselves in their loaded dtype.
        with torch.inference_mode():
            if "encoder" in vae.origin.parts:
                x = image.to(vae.device, vae.dtype)
                z = model.encode(x)
                z = z[0] if isinstance(z, tuple) else z
                probe = f"encode{'+decode' if 'decoder' in vae.origin.parts else ''} of a {size}x{size} photo"
            else:
                gen = torch.Generator().manual_seed(0)
                shape = (1, vae.latent_channels, size // vae.downscale, size // vae.downscale)
                z = torch.randn(shape, generator=gen).to(vae.device, vae.dtype)
                z = vae.denormalise(z)
                probe = f"decode of unit-normal {size}x{size} latents"
            if "decoder" in vae.origin.parts and torch.isfinite(z).all():
                model.decode(z)
    finally:
        for h in handles:
            h.remove()
    return ActivationRange(best["value"], best["module"], probe)


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")
