"""Key conversion tables between the original (LDM / taesd) names vaekit uses and diffusers names.

Each row maps a key prefix in vaekit (LDM) naming to the same prefix in diffusers naming; the rest of the key
(``norm1.weight`` ...) is copied. Placeholders stand for integers: ``{i}``/``{j}`` copy the number, ``{r}`` is
a decoder level counted from the other end (LDM ``up.0`` is the highest resolution, diffusers ``up_blocks.0``
the lowest), ``{d}`` is a tiny-decoder index shifted by one (LDM/taesd index 0 is the parameter-free clamp).
Rows are tried in order, so more specific rows come first.
"""

from __future__ import annotations

KL_TO_DIFFUSERS: list[tuple[str, str]] = [
    ("encoder.down.{i}.block.{j}.nin_shortcut.", "encoder.down_blocks.{i}.resnets.{j}.conv_shortcut."),
    ("encoder.down.{i}.block.{j}.", "encoder.down_blocks.{i}.resnets.{j}."),
    ("encoder.down.{i}.downsample.conv.", "encoder.down_blocks.{i}.downsamplers.0.conv."),
    ("decoder.up.{r}.block.{j}.nin_shortcut.", "decoder.up_blocks.{r}.resnets.{j}.conv_shortcut."),
    ("decoder.up.{r}.block.{j}.", "decoder.up_blocks.{r}.resnets.{j}."),
    ("decoder.up.{r}.upsample.conv.", "decoder.up_blocks.{r}.upsamplers.0.conv."),
    ("encoder.mid.block_1.", "encoder.mid_block.resnets.0."),
    ("encoder.mid.block_2.", "encoder.mid_block.resnets.1."),
    ("decoder.mid.block_1.", "decoder.mid_block.resnets.0."),
    ("decoder.mid.block_2.", "decoder.mid_block.resnets.1."),
    ("encoder.mid.attn_1.norm.", "encoder.mid_block.attentions.0.group_norm."),
    ("encoder.mid.attn_1.q.", "encoder.mid_block.attentions.0.to_q."),
    ("encoder.mid.attn_1.k.", "encoder.mid_block.attentions.0.to_k."),
    ("encoder.mid.attn_1.v.", "encoder.mid_block.attentions.0.to_v."),
    ("encoder.mid.attn_1.proj_out.", "encoder.mid_block.attentions.0.to_out.0."),
    ("decoder.mid.attn_1.norm.", "decoder.mid_block.attentions.0.group_norm."),
    ("decoder.mid.attn_1.q.", "decoder.mid_block.attentions.0.to_q."),
    ("decoder.mid.attn_1.k.", "decoder.mid_block.attentions.0.to_k."),
    ("decoder.mid.attn_1.v.", "decoder.mid_block.attentions.0.to_v."),
    ("decoder.mid.attn_1.proj_out.", "decoder.mid_block.attentions.0.to_out.0."),
    ("encoder.norm_out.", "encoder.conv_norm_out."),
    ("decoder.norm_out.", "decoder.conv_norm_out."),
    ("encoder.conv_in.", "encoder.conv_in."),
    ("encoder.conv_out.", "encoder.conv_out."),
    ("decoder.conv_in.", "decoder.conv_in."),
    ("decoder.conv_out.", "decoder.conv_out."),
    ("quant_conv.", "quant_conv."),
    ("post_quant_conv.", "post_quant_conv."),
    ("bn.", "bn."),  # FLUX.2's latent BatchNorm statistics
]

# FLUX.2's original files nest the quant convs inside encoder/decoder; diffusers keeps them at the top level.
# vaekit names follow the original file, so a VAE with the latent BatchNorm (``bn.``) uses the nested names.
NESTED_QUANT_CONVS: list[tuple[str, str]] = [
    ("quant_conv.", "encoder.quant_conv."),
    ("post_quant_conv.", "decoder.post_quant_conv."),
]

# Older diffusers files (before 0.14) name the mid-block attention differently; read-only aliases.
DIFFUSERS_LEGACY_ALIASES: list[tuple[str, str]] = [
    ("mid_block.attentions.0.query.", "mid_block.attentions.0.to_q."),
    ("mid_block.attentions.0.key.", "mid_block.attentions.0.to_k."),
    ("mid_block.attentions.0.value.", "mid_block.attentions.0.to_v."),
    ("mid_block.attentions.0.proj_attn.", "mid_block.attentions.0.to_out.0."),
]

# Tensors whose shape differs between layouts: LDM stores attention projections as 1x1 convs
# (C, C, 1, 1), diffusers as linear layers (C, C).
KL_ATTENTION_WEIGHTS: tuple[str, ...] = tuple(
    f"{part}.mid.attn_1.{name}.weight" for part in ("encoder", "decoder") for name in ("q", "k", "v", "proj_out")
)

TINY_TO_DIFFUSERS: list[tuple[str, str]] = [
    ("encoder.{i}.", "encoder.layers.{i}."),
    ("decoder.{d}.", "decoder.layers.{d}."),
]

# Prefixes under which a VAE sits inside a larger checkpoint (tried in order).
CHECKPOINT_PREFIXES: tuple[str, ...] = ("first_stage_model.", "vae.", "model.first_stage_model.")

# ComfyUI's combined TAESD files: prefix renames plus scale/shift scalars kept as metadata.
TINY_COMFY_PREFIXES: list[tuple[str, str]] = [("taesd_encoder.", "encoder."), ("taesd_decoder.", "decoder.")]
TINY_COMFY_EXTRAS: tuple[str, ...] = ("vae_scale", "vae_shift")
