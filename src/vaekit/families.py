"""Every latent family vaekit knows, one entry each: the single place that lists families.

A *family* is a latent space: latents made by one VAE of a family can be decoded by any other VAE of it (SD1's
KL VAE and TAESD speak the same latents). An entry holds what identifies the family (raw latent channels, the
architecture of its full VAE, marker keys of its diffusion models in checkpoints, ``modelspec.architecture``
words, the diffusers ``scaling_factor``), how its latents are normalised for the diffusion model, its presets
(the full VAE first, then its tiny partner), and the latent -> RGB preview factors. Detection, the library,
previews, calibration, training, health checks, export, the server and the cache all ask this module.

Adding a family whose architecture vaekit already has is one :class:`Family` entry (plus its preset configs).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from vaekit import models
from vaekit.errors import BadInputError
from vaekit.formats.known_hashes import KNOWN_HASHES
from vaekit.models import dcae, hunyuanimage, qwenimage, taef2, taesana
from vaekit.models.config import KLConfig, TinyConfig, VAEConfig
from vaekit.normalisers import Normaliser, PatchBatchNorm, PerChannel, ScalarAffine, from_spec

RGBFactors = tuple[tuple[tuple[float, ...], ...], tuple[float, float, float]]


@dataclass(frozen=True)
class Family:
    """One latent family (see the module docstring)."""

    name: str
    title: str
    raw_channels: int  # channels of the VAE's raw latent
    downscale: int  # image pixels per raw latent cell, per side
    normaliser: str = "scalar"  # "scalar" | "per_channel" | "patch_batchnorm"
    scale: float = 1.0  # scalar normaliser: latent = (z - shift) * scale
    shift: float = 0.0
    channel_mean: tuple[float, ...] = ()  # per-channel normaliser
    channel_std: tuple[float, ...] = ()
    presets: dict[str, VAEConfig] = field(default_factory=dict)  # full VAE first, then its tiny partner(s)
    checkpoint_markers: tuple[str, ...] = ()  # key prefixes of this family's diffusion model in a checkpoint
    checkpoint_excludes: tuple[str, ...] = ()  # ... unless one of these is present too (FLUX.2 vs FLUX.1)
    modelspec_words: tuple[str, ...] = ()  # lower-case words of ``modelspec.architecture``
    preview: RGBFactors | None = None  # published latent -> RGB factors on normalised latents, RGB in [-1, 1]
    preview_source: str = ""
    force_upcast: bool = False  # diffusers' config flag: the family's VAE overflows in fp16

    @property
    def full_preset(self) -> str | None:
        """The preset name of the family's full VAE (the first preset)."""
        return next(iter(self.presets), None)

    @property
    def tiny_partner(self) -> str | None:
        """The preset name of the tiny VAE that speaks this family's latents, if any (the second preset)."""
        names = [n for n in self.presets if self.presets[n].kind != self.presets[next(iter(self.presets))].kind]
        return names[0] if names else None

    @property
    def patch(self) -> int:
        """Extra downscale of the normalised latent over the raw one (2 for FLUX.2's 2x2 patches)."""
        return 2 if self.normaliser == "patch_batchnorm" else 1

    @property
    def latent_channels(self) -> int:
        """Channels of the normalised latent (what diffusion models consume)."""
        return self.raw_channels * self.patch * self.patch

    @property
    def latent_downscale(self) -> int:
        """Image pixels per normalised latent cell, per side."""
        return self.downscale * self.patch

    def default_normaliser(self) -> Normaliser | None:
        """The normaliser when it does not depend on a file (None for FLUX.2, whose statistics are in the file)."""
        if self.normaliser == "scalar":
            return ScalarAffine(self.scale, self.shift)
        if self.normaliser == "per_channel":
            return PerChannel(self.channel_mean, self.channel_std)
        return None


def _kl(family: str, channels: int, scale: float, shift: float = 0.0, **kw: Any) -> KLConfig:
    return KLConfig(family=family, latent_channels=channels, scaling_factor=scale, shift_factor=shift, **kw)


_SD1_RGB: RGBFactors = (
    ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177)),
    (0.0, 0.0, 0.0),
)
_SDXL_RGB: RGBFactors = (
    ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188)),
    (0.1084, -0.0175, -0.0011),
)
_SD3_RGB: RGBFactors = (
    (
        (-0.0922, -0.0175, 0.0749),
        (0.0311, 0.0633, 0.0954),
        (0.1994, 0.0927, 0.0458),
        (0.0856, 0.0339, 0.0902),
        (0.0587, 0.0272, -0.0496),
        (-0.0006, 0.1104, 0.0309),
        (0.0978, 0.0306, 0.0427),
        (-0.0042, 0.1038, 0.1358),
        (-0.0194, 0.0020, 0.0669),
        (-0.0488, 0.0130, -0.0268),
        (0.0922, 0.0988, 0.0951),
        (-0.0278, 0.0524, -0.0542),
        (0.0332, 0.0456, 0.0895),
        (-0.0069, -0.0030, -0.0810),
        (-0.0596, -0.0465, -0.0293),
        (-0.1448, -0.1463, -0.1189),
    ),
    (0.2394, 0.2135, 0.1925),
)
_FLUX_RGB: RGBFactors = (
    (
        (-0.0346, 0.0244, 0.0681),
        (0.0034, 0.0210, 0.0687),
        (0.0275, -0.0668, -0.0433),
        (-0.0174, 0.0160, 0.0617),
        (0.0859, 0.0721, 0.0329),
        (0.0004, 0.0383, 0.0115),
        (0.0405, 0.0861, 0.0915),
        (-0.0236, -0.0185, -0.0259),
        (-0.0245, 0.0250, 0.1180),
        (0.1008, 0.0755, -0.0421),
        (-0.0515, 0.0201, 0.0011),
        (0.0428, -0.0012, -0.0036),
        (0.0817, 0.0765, 0.0749),
        (-0.1264, -0.0522, -0.1103),
        (-0.0280, -0.0881, -0.0499),
        (-0.1262, -0.0982, -0.0778),
    ),
    (-0.0329, -0.0718, -0.0851),
)
# FLUX.2 latent -> RGB preview factors on its normalised (N, 128, H/16, W/16) latents: no published set exists, so
# these were fitted by vaekit (`fit_preview_map`) with the real TAEF2 weights (FLUX.2's drop-in partner) on the 6
# builtin photos and scikit-image's chelsea, coffee and rocket: 21.97 dB held out (a mean colour: 12.1 dB).
_FLUX2_RGB: RGBFactors = (
    (
        (0.0235, -0.0025, -0.0140),
        (0.0082, -0.0058, -0.0120),
        (0.0148, 0.0067, -0.0055),
        (0.0104, -0.0028, -0.0138),
        (-0.0057, 0.0017, 0.0094),
        (-0.0122, 0.0012, 0.0142),
        (-0.0198, -0.0094, 0.0018),
        (-0.0163, 0.0008, 0.0144),
        (-0.0114, -0.0086, 0.0050),
        (-0.0122, 0.0016, 0.0126),
        (-0.0048, 0.0008, 0.0096),
        (-0.0082, 0.0024, 0.0134),
        (-0.0090, 0.0547, 0.0944),
        (0.0227, 0.0643, 0.0887),
        (0.0224, 0.0700, 0.0921),
        (0.0448, 0.0764, 0.0915),
        (0.0147, 0.0053, 0.0007),
        (0.0154, -0.0108, -0.0166),
        (0.0303, 0.0142, 0.0092),
        (0.0270, 0.0079, -0.0000),
        (0.0316, 0.0042, -0.0057),
        (0.0285, 0.0025, -0.0092),
        (0.0272, 0.0036, -0.0063),
        (0.0294, 0.0011, -0.0102),
        (-0.0229, 0.0205, 0.0067),
        (-0.0325, 0.0082, -0.0066),
        (-0.0185, 0.0230, 0.0104),
        (-0.0281, 0.0071, -0.0053),
        (-0.0091, 0.0012, 0.0095),
        (-0.0071, 0.0024, 0.0078),
        (-0.0097, -0.0014, 0.0047),
        (-0.0074, 0.0043, 0.0051),
        (-0.1138, -0.0661, -0.0377),
        (-0.1223, -0.0552, -0.0208),
        (-0.1127, -0.0528, -0.0182),
        (-0.1096, -0.0347, 0.0072),
        (0.0029, -0.0081, -0.0053),
        (-0.0118, -0.0239, -0.0202),
        (0.0120, -0.0058, -0.0084),
        (-0.0027, -0.0185, -0.0181),
        (0.0084, -0.0001, -0.0006),
        (0.0102, 0.0028, -0.0001),
        (-0.0017, -0.0085, -0.0089),
        (0.0137, 0.0010, -0.0031),
        (0.0097, -0.0069, -0.0166),
        (0.0024, -0.0105, -0.0182),
        (0.0068, -0.0022, -0.0086),
        (0.0052, -0.0095, -0.0175),
        (-0.0102, -0.0083, 0.0030),
        (-0.0092, -0.0079, 0.0034),
        (-0.0108, -0.0152, -0.0072),
        (-0.0071, -0.0139, -0.0066),
        (-0.0045, 0.0087, 0.0051),
        (-0.0051, 0.0054, 0.0007),
        (-0.0040, 0.0147, 0.0120),
        (0.0045, 0.0201, 0.0109),
        (-0.0110, -0.0051, 0.0009),
        (-0.0017, 0.0015, 0.0056),
        (-0.0061, -0.0043, -0.0018),
        (-0.0118, -0.0064, -0.0053),
        (-0.0301, 0.0099, 0.0086),
        (-0.0246, 0.0216, 0.0218),
        (-0.0230, 0.0094, 0.0100),
        (-0.0250, 0.0167, 0.0157),
        (-0.0001, 0.0024, -0.0063),
        (-0.0027, 0.0079, -0.0037),
        (-0.0006, 0.0140, 0.0045),
        (0.0001, 0.0124, 0.0055),
        (0.0100, 0.0027, -0.0001),
        (0.0223, 0.0062, 0.0078),
        (0.0101, 0.0137, 0.0179),
        (0.0117, 0.0198, 0.0219),
        (-0.0148, 0.0120, 0.0091),
        (0.0007, 0.0134, 0.0035),
        (0.0015, 0.0215, 0.0107),
        (-0.0028, 0.0078, -0.0024),
        (0.0244, -0.0241, -0.0272),
        (0.0260, -0.0213, -0.0241),
        (0.0360, -0.0157, -0.0204),
        (0.0330, -0.0122, -0.0102),
        (0.0003, -0.0022, 0.0032),
        (-0.0211, -0.0133, -0.0031),
        (-0.0120, -0.0007, 0.0075),
        (-0.0219, -0.0101, 0.0000),
        (-0.0042, -0.0014, 0.0097),
        (-0.0114, -0.0049, 0.0090),
        (-0.0019, 0.0001, 0.0072),
        (-0.0140, -0.0098, -0.0040),
        (0.0056, 0.0087, 0.0070),
        (0.0089, 0.0031, 0.0021),
        (0.0011, -0.0030, -0.0072),
        (0.0092, 0.0089, 0.0027),
        (0.0049, -0.0017, 0.0046),
        (-0.0031, 0.0019, 0.0114),
        (0.0019, -0.0011, 0.0018),
        (-0.0091, -0.0111, 0.0025),
        (-0.0047, 0.0063, 0.0133),
        (0.0134, 0.0029, -0.0038),
        (-0.0058, 0.0040, 0.0077),
        (0.0202, 0.0004, -0.0054),
        (-0.0058, -0.0219, -0.0243),
        (-0.0047, -0.0220, -0.0195),
        (-0.0121, -0.0242, -0.0191),
        (-0.0085, -0.0159, -0.0168),
        (0.0239, -0.0063, -0.0020),
        (0.0266, -0.0106, -0.0139),
        (0.0295, 0.0030, 0.0045),
        (0.0287, 0.0001, -0.0030),
        (0.0158, 0.0007, -0.0047),
        (0.0083, -0.0065, -0.0114),
        (0.0103, 0.0016, -0.0014),
        (0.0121, 0.0071, 0.0047),
        (-0.0094, -0.0038, -0.0018),
        (-0.0110, 0.0001, -0.0001),
        (-0.0028, -0.0003, -0.0026),
        (-0.0079, -0.0058, -0.0066),
        (-0.0032, 0.0008, 0.0062),
        (-0.0140, 0.0010, 0.0067),
        (-0.0069, -0.0015, 0.0049),
        (-0.0083, -0.0013, 0.0035),
        (-0.0060, 0.0004, -0.0080),
        (-0.0027, -0.0019, -0.0020),
        (-0.0149, -0.0090, -0.0092),
        (-0.0069, -0.0001, -0.0044),
        (-0.0017, -0.0074, -0.0077),
        (-0.0015, -0.0103, -0.0101),
        (0.0097, -0.0053, -0.0091),
        (0.0152, 0.0010, -0.0037),
    ),
    (-0.0601, -0.2105, -0.2626),
)
_COMFY = "ComfyUI comfy/latent_formats.py"

# Order matters where families share an architecture: the first is assumed when nothing else tells them apart.
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "sd1",
            "Stable Diffusion 1.x / 2.x",
            raw_channels=4,
            downscale=8,
            scale=0.18215,
            presets={
                "sd1": _kl("sd1", 4, 0.18215),
                "sd2": _kl("sd1", 4, 0.18215),
                "taesd": TinyConfig(family="sd1"),
            },
            checkpoint_markers=("model.diffusion_model.input_blocks.",),
            modelspec_words=("stable-diffusion-v1", "stable-diffusion-v2", "stable-diffusion"),
            preview=_SD1_RGB,
            preview_source=_COMFY,
        ),
        Family(
            "sdxl",
            "Stable Diffusion XL",
            raw_channels=4,
            downscale=8,
            scale=0.13025,
            presets={"sdxl": _kl("sdxl", 4, 0.13025), "taesdxl": TinyConfig(family="sdxl")},
            checkpoint_markers=("conditioner.embedders.1.", "model.diffusion_model.label_emb."),
            force_upcast=True,
            modelspec_words=("stable-diffusion-xl", "-xl"),
            preview=_SDXL_RGB,
            preview_source=_COMFY,
        ),
        Family(
            "flux",
            "FLUX.1",
            raw_channels=16,
            downscale=8,
            scale=0.3611,
            shift=0.1159,
            presets={
                "flux": _kl("flux", 16, 0.3611, 0.1159, use_quant_conv=False),
                "taef1": TinyConfig(family="flux", latent_channels=16),
            },
            checkpoint_markers=("model.diffusion_model.double_blocks.", "double_blocks."),
            checkpoint_excludes=(  # FLUX.2's and HunyuanImage's transformers have double blocks too
                "double_stream_modulation_img.",
                "model.diffusion_model.double_stream_modulation_img.",
                "byt5_in.",
                "model.diffusion_model.byt5_in.",
            ),
            modelspec_words=("flux-1", "flux.1", "flux"),
            preview=_FLUX_RGB,
            preview_source=_COMFY,
        ),
        Family(
            "sd3",
            "Stable Diffusion 3 / 3.5",
            raw_channels=16,
            downscale=8,
            scale=1.5305,
            shift=0.0609,
            presets={
                "sd3": _kl("sd3", 16, 1.5305, 0.0609, use_quant_conv=False),
                "taesd3": TinyConfig(family="sd3", latent_channels=16),
            },
            checkpoint_markers=("model.diffusion_model.joint_blocks.",),
            modelspec_words=("stable-diffusion-3",),
            preview=_SD3_RGB,
            preview_source=_COMFY,
        ),
        Family(
            "flux2",
            "FLUX.2",
            raw_channels=32,
            downscale=8,
            normaliser="patch_batchnorm",
            presets={
                "flux2": _kl("flux2", 32, 1.0, 0.0, nested_quant=True, patch_batchnorm=True),
                "taef2": taef2.PRESETS["taef2"],
            },
            preview=_FLUX2_RGB,
            preview_source="fitted by vaekit with TAEF2 on 9 photos, 22.0 dB",
            # BFL's FLUX.2 transformer has shared modulations that FLUX.1's double blocks lack.
            checkpoint_markers=("double_stream_modulation_img.", "model.diffusion_model.double_stream_modulation_img."),
            modelspec_words=("flux-2", "flux.2", "flux2"),
        ),
        Family(
            "qwenimage",
            "Qwen-Image (the Wan 2.1 VAE, single frames)",
            raw_channels=16,
            downscale=8,
            normaliser="per_channel",
            channel_mean=qwenimage.QWENIMAGE_LATENTS_MEAN,
            channel_std=qwenimage.QWENIMAGE_LATENTS_STD,
            presets={"qwenimage": qwenimage.PRESETS["qwenimage"]},
            modelspec_words=("qwen-image",),
            preview=(qwenimage.PREVIEW_RGB_FACTORS, qwenimage.PREVIEW_RGB_BIAS),
            preview_source="ComfyUI comfy/latent_formats.py Wan21",
        ),
        Family(
            "dcae",
            "Sana (deep-compression autoencoder DC-AE f32c32)",
            raw_channels=32,
            downscale=32,
            scale=0.41407,
            presets={"dcae": dcae.PRESETS["dcae"], "taesana": taesana.PRESETS["taesana"]},
            modelspec_words=("sana",),
        ),
        Family(
            "hunyuanimage",
            "HunyuanImage 2.1",
            raw_channels=64,
            downscale=32,
            scale=hunyuanimage.SCALING_FACTOR,
            shift=hunyuanimage.SHIFT_FACTOR,
            presets={"hunyuanimage": hunyuanimage.PRESETS["hunyuanimage"]},
            checkpoint_markers=("byt5_in.", "model.diffusion_model.byt5_in."),  # its DiT's ByT5 text input
            modelspec_words=("hunyuanimage", "hunyuan-image"),
        ),
        Family(
            "custom",
            "vaekit-trained or unknown",
            raw_channels=0,  # any
            downscale=8,
        ),
    )
}

# Presets of every family by name (the full VAE at its real width, the tiny partners).
PRESETS: dict[str, VAEConfig] = {name: cfg for fam in FAMILIES.values() for name, cfg in fam.presets.items()}


def get(name: str) -> Family:
    """The family called ``name``; a one-line error naming the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise BadInputError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}") from None


def preset(name: str, **overrides: Any) -> VAEConfig:
    """The named preset config, optionally with fields replaced (e.g. ``base_channels=32`` for tests)."""
    try:
        cfg = PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def candidates(cfg: VAEConfig) -> list[Family]:
    """The families whose VAEs could have this architecture: the hard facts read from the weights.

    The raw latent channel count must match, a FLUX.2-style BatchNorm must be present exactly when the family
    normalises with one, and a tiny VAE fits the families that list a tiny preset of its kind.
    """
    has_bn = bool(getattr(cfg, "patch_batchnorm", False))
    out = []
    for fam in FAMILIES.values():
        if fam.name == "custom" or fam.raw_channels != cfg.latent_channels:
            continue
        if cfg.kind == "kl" and has_bn != (fam.normaliser == "patch_batchnorm"):
            continue
        if cfg.kind != "kl" and not any(p.kind == cfg.kind for p in fam.presets.values()):
            continue
        out.append(fam)
    return out


def with_family(cfg: VAEConfig, name: str) -> VAEConfig:
    """``cfg`` relabelled as family ``name`` (a full VAE also takes the family's scalar factors).

    A one-line error when the weights contradict it (another raw channel count, BatchNorm or not).
    """
    fam = get(name)
    if name == "custom":
        return dataclasses.replace(cfg, family="custom")
    if fam not in candidates(cfg):
        have = f"{cfg.latent_channels} raw latent channels"
        if getattr(cfg, "patch_batchnorm", False):
            have += " and a latent BatchNorm"
        raise BadInputError(f"family {name} has {fam.raw_channels} raw latent channels; this VAE has {have}")
    if cfg.kind != "kl" or fam.normaliser != "scalar":
        return dataclasses.replace(cfg, family=name)
    return dataclasses.replace(cfg, family=name, scaling_factor=fam.scale, shift_factor=fam.shift)


def normaliser_for(cfg: VAEConfig, model: nn.Module | None = None) -> Normaliser:
    """The normaliser between ``cfg``'s raw latent and the normalised latent of its family.

    Tiny partners already read and write normalised latents (their scalar factors are 1 and 0 unless a file
    says otherwise); a full VAE uses its family's normaliser, FLUX.2's built from the ``bn`` statistics of
    ``model``; custom and scalar families use the factors in the config (calibrated ones for vaekit-trained VAEs).
    """
    fam = FAMILIES.get(cfg.family, FAMILIES["custom"])
    if cfg.kind in models.FOREIGN:
        return from_spec(models.FOREIGN[cfg.kind].normaliser_spec(cfg))
    if cfg.kind == "kl" and fam.normaliser == "patch_batchnorm":
        bn = getattr(model, "bn", None)
        if bn is None or getattr(bn.running_mean, "is_meta", True):
            raise BadInputError("a FLUX.2 VAE needs its BatchNorm statistics (bn.running_mean/var) to normalise")
        return PatchBatchNorm.from_module(bn)
    if cfg.kind == "kl" and fam.normaliser == "per_channel":
        return PerChannel(fam.channel_mean, fam.channel_std)
    return ScalarAffine(float(cfg.scaling_factor), float(cfg.shift_factor))


def from_scaling_factor(scale: object) -> Family | None:
    """The family whose published scalar factor is ``scale`` (as a diffusers config states it), if any."""
    if not isinstance(scale, int | float) or isinstance(scale, bool):
        return None
    wanted = round(float(scale), 5)
    return next((f for f in FAMILIES.values() if f.scale != 1.0 and round(f.scale, 5) == wanted), None)


def from_modelspec(architecture: str) -> Family | None:
    """The family a ``modelspec.architecture`` string names, if any (most specific words first)."""
    arch = architecture.lower()
    ranked = sorted(
        ((w, f) for f in FAMILIES.values() for w in f.modelspec_words), key=lambda wf: len(wf[0]), reverse=True
    )
    return next((f for w, f in ranked if w in arch), None)


def from_checkpoint_keys(keys: list[str]) -> Family | None:
    """The family whose diffusion-model marker keys a checkpoint holds, if any."""
    for fam in FAMILIES.values():
        hit = any(k.startswith(m) for m in fam.checkpoint_markers for k in keys)
        if hit and not any(k.startswith(x) for x in fam.checkpoint_excludes for k in keys):
            return fam
    return None


def is_diffusion_checkpoint(keys: list[str]) -> bool:
    """True when the keys include the diffusion model of any family."""
    return any(k.startswith(m) for f in FAMILIES.values() for m in f.checkpoint_markers for k in keys)


def from_known_hash(sha256: str) -> tuple[str, str] | None:
    """(preset or family name, description) of a published VAE file with this sha256, if known."""
    return KNOWN_HASHES.get(sha256)


def family_of_preset(name: str) -> str:
    """The family a preset (or known-hash label such as ``taesd``) belongs to."""
    if name in FAMILIES:
        return name
    return PRESETS[name].family if name in PRESETS else "custom"
