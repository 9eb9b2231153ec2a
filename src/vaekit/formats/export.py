"""Write a VAE out: a single LDM-layout safetensors file (what A1111/ComfyUI read) or a diffusers folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from vaekit import families, models
from vaekit.errors import BadInputError
from vaekit.formats.convert import ldm_to_diffusers
from vaekit.formats.detect import METADATA_CONFIG_KEY
from vaekit.formats.io import atomic_dir, write_json, write_safetensors
from vaekit.models.config import VAEConfig


def metadata_for(cfg: VAEConfig, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Safetensors metadata that lets vaekit reload the exact config (family, factors, widths)."""
    return {METADATA_CONFIG_KEY: json.dumps(cfg.to_dict(), sort_keys=True), **(extra or {})}


def diffusers_config(cfg: VAEConfig) -> dict[str, Any]:
    """The config.json diffusers expects for this architecture."""
    if cfg.kind in models.FOREIGN:
        return models.FOREIGN[cfg.kind].diffusers_config(cfg)
    if cfg.kind == "tiny":
        n_enc, n_dec = len(cfg.encoder_blocks), len(cfg.decoder_blocks)  # type: ignore[union-attr]
        return {
            "_class_name": "AutoencoderTiny",
            "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels,
            "encoder_block_out_channels": [cfg.width] * n_enc,  # type: ignore[union-attr]
            "decoder_block_out_channels": [cfg.width] * n_dec,  # type: ignore[union-attr]
            "num_encoder_blocks": list(cfg.encoder_blocks),  # type: ignore[union-attr]
            "num_decoder_blocks": list(cfg.decoder_blocks),  # type: ignore[union-attr]
            "latent_channels": cfg.latent_channels,
            "act_fn": "relu",
            "upsample_fn": "nearest",
            "scaling_factor": cfg.scaling_factor,
            "shift_factor": cfg.shift_factor,
        }
    n = len(cfg.channel_mult)  # type: ignore[union-attr]
    if cfg.patch_batchnorm:  # type: ignore[union-attr]
        return {
            **_kl_common(cfg, n),
            "_class_name": "AutoencoderKLFlux2",
            "batch_norm_eps": cfg.batchnorm_eps,  # type: ignore[union-attr]
            "batch_norm_momentum": 0.1,
            "patch_size": [2, 2],
        }
    return {
        **_kl_common(cfg, n),
        "_class_name": "AutoencoderKL",
        "scaling_factor": cfg.scaling_factor,
        "shift_factor": cfg.shift_factor if cfg.shift_factor else None,
        "force_upcast": families.FAMILIES.get(cfg.family, families.FAMILIES["custom"]).force_upcast,
    }


def _kl_common(cfg: VAEConfig, n: int) -> dict[str, Any]:
    return {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(cfg.block_channels),  # type: ignore[union-attr]
        "layers_per_block": cfg.num_res_blocks,  # type: ignore[union-attr]
        "act_fn": "silu",
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_groups,  # type: ignore[union-attr]
        "use_quant_conv": cfg.use_quant_conv,  # type: ignore[union-attr]
        "use_post_quant_conv": cfg.use_quant_conv,  # type: ignore[union-attr]
        "mid_block_add_attention": cfg.mid_attention,  # type: ignore[union-attr]
    }


def write_vae(
    state_dict: dict[str, torch.Tensor],
    cfg: VAEConfig,
    dest: str | os.PathLike[str],
    layout: str = "ldm",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``state_dict`` (vaekit names) as an LDM safetensors file or a diffusers folder; atomic."""
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise BadInputError(f"{dest}: already exists (pass overwrite=True / --overwrite to replace it)")
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    meta = metadata_for(cfg, extra_metadata)
    if layout == "ldm":
        write_safetensors(state_dict, dest, meta)
    elif layout == "diffusers":
        if cfg.kind in models.FOREIGN:
            renamed = models.FOREIGN[cfg.kind].to_diffusers(state_dict)
        else:
            renamed = ldm_to_diffusers(state_dict, cfg.kind)
        config = diffusers_config(cfg)  # may refuse (no diffusers class): before anything is written
        # Built in a temporary folder and renamed: a failure leaves no partial folder to trip the next run.
        with atomic_dir(dest, overwrite=overwrite) as tmp:
            write_safetensors(renamed, tmp / "diffusion_pytorch_model.safetensors", meta)
            write_json(config, tmp / "config.json")
    else:
        raise BadInputError(f"unknown layout {layout!r}: use 'ldm' or 'diffusers'")
    return dest
