"""Tell what a weight file holds from its keys, shapes and metadata only (never from its name)."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vaekit import families, models
from vaekit.errors import BadInputError, LoadError
from vaekit.formats import keymaps
from vaekit.formats.convert import rename_diffusers_to_ldm
from vaekit.models import config_from_dict
from vaekit.models.config import KLConfig, TinyConfig, VAEConfig

Shapes = dict[str, tuple[int, ...]]

METADATA_CONFIG_KEY = "vaekit.config"


def diffusers_vae_classes() -> tuple[str, ...]:
    """Class names of the diffusers VAE configs vaekit reads."""
    names = ["AutoencoderKL", "AutoencoderKLFlux2", "AutoencoderTiny"]
    for mod in models.FOREIGN.values():
        try:
            names.append(mod.diffusers_config(next(iter(mod.PRESETS.values())))["_class_name"])
        except LoadError:  # diffusers has no class for it (TAEF2, TAESana)
            continue
    return tuple(names)


@dataclass
class Detection:
    """What a set of keys is: layout, where the VAE sits, its architecture and family."""

    layout: str  # "ldm" (original names), "diffusers", "taesd", "taesd-diffusers"
    container: str  # "bare" or "checkpoint"
    prefix: str  # prefix stripped to reach the VAE keys ("" for a bare file)
    config: VAEConfig
    family_certain: bool
    family_source: str  # where the family came from
    family_note: str = ""  # e.g. "sd1 or sdxl: same architecture" when uncertain
    parts: tuple[str, ...] = ("encoder", "decoder")
    dtype: str = "float32"
    key_map: dict[str, str] = field(default_factory=dict)  # vaekit key -> key in the file

    @property
    def family(self) -> str:
        """The family the VAE is taken to be."""
        return self.config.family


def _strip_container(keys: list[str]) -> tuple[str, str, dict[str, str]]:
    """Find the VAE inside a checkpoint: returns (container, prefix, {inner key: file key})."""
    for prefix in keymaps.CHECKPOINT_PREFIXES:
        inner = {k[len(prefix) :]: k for k in keys if k.startswith(prefix)}
        if any(k.startswith(("encoder.", "decoder.")) for k in inner):
            container = "checkpoint" if len(inner) < len(keys) else "bare"
            return container, prefix, inner
    for old, new in keymaps.TINY_COMFY_PREFIXES:
        if any(k.startswith(old) for k in keys):
            inner = {}
            for k in keys:
                if k in keymaps.TINY_COMFY_EXTRAS:
                    continue
                renamed = next((new + k[len(o) :] for o, new in keymaps.TINY_COMFY_PREFIXES if k.startswith(o)), k)
                inner[renamed] = k
            return "bare", "taesd_", inner
    if any(k.startswith(("encoder.", "decoder.")) for k in keys):
        return "bare", "", {k: k for k in keys}
    flat = [k for k in keys if re.match(r"\d+\.", k)]
    if flat and len(flat) == len(keys):
        part = "decoder." if "0.weight" not in keys else "encoder."
        return "bare", "", {part + k: k for k in keys}
    raise LoadError("no VAE found: none of the keys look like an encoder or decoder (is this a VAE or checkpoint?)")


def _metadata_family(metadata: dict[str, str]) -> tuple[VAEConfig | None, str | None]:
    """A vaekit config stored in the file, or the family a ``modelspec.architecture`` names."""
    if METADATA_CONFIG_KEY in metadata:
        try:
            return config_from_dict(json.loads(metadata[METADATA_CONFIG_KEY])), None
        except (ValueError, TypeError) as e:
            raise LoadError(f"the file's {METADATA_CONFIG_KEY} metadata is invalid ({e})") from None
    found = families.from_modelspec(metadata.get("modelspec.architecture", ""))
    return None, found.name if found else None


def _kl_config(shapes: Shapes) -> KLConfig:
    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise LoadError(f"incomplete KL VAE: missing {key}")
        return shapes[key]

    base = shape("encoder.conv_in.weight")[0]
    levels = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
    widths = [shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(levels)]
    res_blocks = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
    if any(w % base for w in widths):
        raise LoadError(f"unsupported KL VAE: level widths {widths} are not multiples of {base}")
    return KLConfig(
        family="custom",
        in_channels=shape("encoder.conv_in.weight")[1],
        out_channels=shape("decoder.conv_out.weight")[0],
        latent_channels=shape("decoder.conv_in.weight")[1],
        base_channels=base,
        channel_mult=tuple(w // base for w in widths),
        num_res_blocks=res_blocks,
        use_quant_conv="quant_conv.weight" in shapes or "encoder.quant_conv.weight" in shapes,
        mid_attention="encoder.mid.attn_1.q.weight" in shapes,
        nested_quant="encoder.quant_conv.weight" in shapes or "bn.running_mean" in shapes,
        patch_batchnorm="bn.running_mean" in shapes,
    )


def _runs(shapes: Shapes, part: str) -> tuple[list[str], int]:
    """Sequence of layer kinds ("conv"/"block") of a tiny encoder/decoder, and its width."""
    idx = sorted({int(m.group(1)) for k in shapes if (m := re.match(rf"{part}\.(\d+)\.", k))})
    seq = ["block" if f"{part}.{i}.conv.0.weight" in shapes else "conv" for i in idx]
    first = shapes[f"{part}.{idx[0]}.weight"]
    width = first[0]
    return seq, width


def _counts(seq: list[str]) -> tuple[int, ...]:
    """Lengths of the block runs that follow each conv (the last conv ends the sequence)."""
    counts: list[int] = []
    for kind in seq:
        if kind == "conv":
            counts.append(0)
        else:
            counts[-1] += 1
    return tuple(counts[:-1]) if counts and counts[-1] == 0 else tuple(counts)


def _tiny_config(shapes: Shapes) -> tuple[TinyConfig, tuple[str, ...]]:
    parts = tuple(p for p in ("encoder", "decoder") if any(k.startswith(p + ".") for k in shapes))
    kwargs: dict[str, Any] = {}
    if "encoder" in parts:
        seq, width = _runs(shapes, "encoder")
        last = max(int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.(\d+)\.", k)))
        kwargs.update(
            width=width,
            in_channels=shapes["encoder.0.weight"][1],
            latent_channels=shapes[f"encoder.{last}.weight"][0],
            encoder_blocks=_counts(seq),
        )
    if "decoder" in parts:
        seq, width = _runs(shapes, "decoder")
        last = max(int(m.group(1)) for k in shapes if (m := re.match(r"decoder\.(\d+)\.", k)))
        kwargs.update(
            width=width,
            latent_channels=shapes["decoder.1.weight"][1],
            out_channels=shapes[f"decoder.{last}.weight"][0],
            decoder_blocks=_decoder_counts(seq),
        )
    return TinyConfig(family="custom", **kwargs), parts


def _decoder_counts(seq: list[str]) -> tuple[int, ...]:
    """Tiny decoder: conv_in, then per level a run of blocks closed by a conv."""
    counts: list[int] = []
    run = 0
    for kind in seq[1:]:
        if kind == "block":
            run += 1
        else:
            counts.append(run)
            run = 0
    return tuple(counts)


def _is_tiny(inner: list[str]) -> bool:
    return any(re.match(r"(encoder|decoder)\.(layers\.)?\d+\.", k) for k in inner)


def detect(
    shapes_in_file: Shapes,
    metadata: dict[str, str] | None = None,
    diffusers_config: dict[str, Any] | None = None,
    dtypes: dict[str, torch.dtype] | None = None,
    family: str | None = None,
    known_family: str | None = None,
) -> Detection:
    """Detect layout, container, architecture and family from key shapes (plus optional metadata/config).

    ``family`` is a user override; ``known_family`` comes from a known file hash.
    """
    metadata = metadata or {}
    keys = list(shapes_in_file)
    container, prefix, inner = _strip_container(keys)
    inner_shapes = {k: shapes_in_file[f] for k, f in inner.items()}
    cfg: VAEConfig
    foreign = _foreign(inner_shapes)
    if foreign is not None:
        cfg, layout = foreign
        parts = tuple(p for p in ("encoder", "decoder") if getattr(cfg, f"has_{p}", True))
        key_map = dict(inner)  # names as in the file: a diffusers layout is converted whole when read
    else:
        cfg, layout, parts, key_map = _kl_or_tiny(inner, inner_shapes)
    found = (cfg, layout, container, prefix, parts, key_map)
    return _finish(*found, keys, inner, metadata, dtypes, family, known_family, diffusers_config)


def _kl_or_tiny(inner: dict[str, str], inner_shapes: Shapes) -> tuple[VAEConfig, str, tuple[str, ...], dict[str, str]]:
    """(config, layout, parts, {vaekit key: file key}) of a KL or tiny autoencoder, LDM/taesd or diffusers names."""
    tiny = _is_tiny(list(inner))
    diffusers = any(".layers." in k or "down_blocks." in k or "up_blocks." in k for k in inner)
    if diffusers:
        ldm_to_inner = rename_diffusers_to_ldm({k: k for k in inner}, "tiny" if tiny else "kl")
    else:
        ldm_to_inner = {k: k for k in inner}
    shapes = {k: inner_shapes[v] for k, v in ldm_to_inner.items()}
    parts: tuple[str, ...] = ("encoder", "decoder")
    cfg: VAEConfig
    if tiny:
        cfg, parts = _tiny_config(shapes)
        layout = "taesd-diffusers" if diffusers else "taesd"
    else:
        cfg = _kl_config(shapes)
        layout = "diffusers" if diffusers else "ldm"
    return cfg, layout, parts, {k: inner[v] for k, v in ldm_to_inner.items()}


def _foreign(shapes: Shapes) -> tuple[VAEConfig, str] | None:
    """(config, layout) when an architecture module of ``models.FOREIGN`` recognises the keys, original names or
    diffusers names (converted on meta tensors: nothing is read)."""
    for mod in models.FOREIGN.values():
        cfg = mod.config_from_shapes(shapes)
        if cfg is not None:
            return cfg, "ldm"
    metas = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    for mod in models.FOREIGN.values():
        try:
            converted = mod.from_diffusers(metas)
        except (LoadError, KeyError, ValueError, IndexError, RuntimeError):
            continue
        cfg = mod.config_from_shapes({k: tuple(v.shape) for k, v in converted.items()})
        if cfg is not None:
            return cfg, "diffusers"
    return None


def _finish(
    cfg: VAEConfig,
    layout: str,
    container: str,
    prefix: str,
    parts: tuple[str, ...],
    key_map: dict[str, str],
    keys: list[str],
    inner: dict[str, str],
    metadata: dict[str, str],
    dtypes: dict[str, torch.dtype] | None,
    family: str | None,
    known_family: str | None,
    diffusers_config: dict[str, Any] | None = None,
) -> Detection:
    meta_cfg, meta_family = _metadata_family(metadata)
    if meta_cfg is not None and meta_cfg.kind == cfg.kind:
        meta_cfg = _keep_facts(meta_cfg, cfg)
        cfg = meta_cfg
    elif diffusers_config and cfg.kind in models.FOREIGN:
        cfg = _keep_facts(models.FOREIGN[cfg.kind].config_from_diffusers(diffusers_config), cfg)
    elif diffusers_config:
        cfg = _apply_diffusers_config(cfg, diffusers_config)
    fam, certain, source, note = _decide_family(
        cfg, container, keys, family, meta_cfg, meta_family, diffusers_config, known_family
    )
    try:
        relabelled = families.with_family(cfg, fam)
    except BadInputError as e:
        raise LoadError(str(e)) from None
    # a vaekit file of this family keeps its own (calibrated) factors
    cfg = meta_cfg if meta_cfg is not None and meta_cfg.family == fam else relabelled
    dtype = _main_dtype({k: dtypes[v] for k, v in inner.items()} if dtypes else {})
    return Detection(layout, container, prefix, cfg, certain, source, note, parts, dtype, key_map)


def _keep_facts(meta: VAEConfig, weights: VAEConfig) -> VAEConfig:
    """Metadata may add what shapes cannot tell (norm groups, factors) but never overrules the weights."""
    import dataclasses

    facts = {"latent_channels", "patch_batchnorm", "nested_quant", "use_quant_conv", "mid_attention"}
    facts |= {"has_encoder", "has_decoder"}
    fields = {f.name for f in dataclasses.fields(weights)}
    return dataclasses.replace(meta, **{k: getattr(weights, k) for k in facts & fields})


def _decide_family(
    cfg: VAEConfig,
    container: str,
    keys: list[str],
    override: str | None,
    meta_cfg: VAEConfig | None,
    meta_family: str | None,
    diffusers_config: dict[str, Any] | None,
    known_family: str | None,
) -> tuple[str, bool, str, str]:
    """(family, certain, source, note). The weights' architecture is a hard fact; every other piece of evidence is
    taken in order of trust only when it agrees with it, and evidence that contradicts it is dropped with a note."""
    if override:
        return override, True, "user override", ""
    fits = families.candidates(cfg)
    names = [f.name for f in fits]
    evidence: list[tuple[str | None, str]] = []
    if meta_cfg is not None:
        evidence.append((meta_cfg.family, "vaekit metadata"))
    if diffusers_config and cfg.kind == "kl" and "scaling_factor" in diffusers_config:
        found = families.from_scaling_factor(diffusers_config.get("scaling_factor"))
        evidence.append((found.name if found else None, "diffusers config scaling_factor"))
    if known_family:
        evidence.append((families.family_of_preset(known_family), "known file hash"))
    if meta_family:
        evidence.append((meta_family, "modelspec.architecture metadata"))
    if container == "checkpoint" and (ckpt := families.from_checkpoint_keys(keys)) is not None:
        evidence.append((ckpt.name, "checkpoint diffusion-model keys"))
    dropped = []
    for fam, source in evidence:
        if fam is None:
            continue
        if fam == "custom" and source == "vaekit metadata":
            return "custom", True, source, ""
        if fam in names:
            note = "; ".join(dropped)
            return fam, True, source, note
        dropped.append(f"{source} says {fam}, but the weights are not a {fam} VAE ({_facts(cfg)}); ignored")
    note = "; ".join(dropped)
    if len(fits) == 1:
        return fits[0].name, True, "architecture (" + _facts(cfg) + ")", note
    if len(fits) > 1:
        why = (
            f"{' or '.join(names)}: same architecture, cannot tell from weights; assumed {names[0]} "
            "(override with --family)"
        )
        return names[0], False, "latent channels only", "; ".join([why, *dropped])
    return "custom", False, "no known family has this architecture", note


def _facts(cfg: VAEConfig) -> str:
    text = f"{cfg.latent_channels} raw latent channels"
    if getattr(cfg, "patch_batchnorm", False):
        text += ", latent BatchNorm"
    return text


def _apply_diffusers_config(cfg: VAEConfig, dc: dict[str, Any]) -> VAEConfig:
    """Take what shapes cannot tell (norm groups, factors) from a diffusers config.json."""
    import dataclasses

    updates: dict[str, Any] = {}
    if cfg.kind == "kl":
        if "norm_num_groups" in dc:
            updates["norm_groups"] = int(dc["norm_num_groups"])
        if dc.get("mid_block_add_attention") is False:
            updates["mid_attention"] = False
        if isinstance(dc.get("batch_norm_eps"), int | float):
            updates["batchnorm_eps"] = float(dc["batch_norm_eps"])
    for ours, theirs in (("scaling_factor", "scaling_factor"), ("shift_factor", "shift_factor")):
        if isinstance(dc.get(theirs), int | float):
            updates[ours] = float(dc[theirs])
    return dataclasses.replace(cfg, **updates)


def _main_dtype(dtypes: dict[str, torch.dtype]) -> str:
    if not dtypes:
        return "unknown"
    counts = Counter(str(d).removeprefix("torch.") for d in dtypes.values())
    return counts.most_common(1)[0][0]


def read_diffusers_config(path: Path) -> dict[str, Any]:
    """The config.json of a diffusers folder, checked to be a VAE class."""
    from vaekit.formats.io import read_json

    data = read_json(path)
    cls = data.get("_class_name")
    known = diffusers_vae_classes()
    if cls not in (None, *known):
        raise LoadError(f"{path}: a diffusers {cls}, not a VAE ({', '.join(known)})")
    return data
