"""TAEF2: the tiny autoencoder for FLUX.2's latents (madebyollin/taesd, ``taef2_encoder.pth`` / ``taef2_decoder.pth``).

Architecture (taesd.py at commit 5cccb12, ``Block(use_midblock_gn=True)``, ``Encoder``/``Decoder(32, True)``): the
TAESD network (width 64; encoder blocks 1/3/3/3 with three stride-2 convs, so downscale 8; decoder 3/3/3/1 with
nearest 2x upsampling and a ``tanh(z / 3) * 3`` soft clamp in front) whose lowest-resolution blocks (encoder
indices 11-13, decoder indices 3-5) carry a ``pool`` branch added to the block's input before its convs:
``x = x + conv1x1(relu(GroupNorm(4, 4w)(conv1x1(x, 4w))), w)`` (both 1x1 convs without bias, GroupNorm affine,
eps 1e-5). That GroupNorm is the only norm and the only non-local part: its statistics are GLOBAL (per sample and
group, over all positions), so tiles computed alone differ from the whole image unless the statistics are shared.
Everything else is 3x3 convs and ReLUs; receptive field per side (local part only, measured by gradients): encoder
145 input pixels, decoder 19 latent cells (152 output pixels). No attention. Max fp32 activation (astronaut 256 px): 32.

Latent convention: TAEF2's 32 channels are FLUX.2's *normalised* latents, unpatchified: ``patchify(encode(x))``
(2x2 patches, channel ``c * 4 + dy * 2 + dx`` as diffusers' ``Flux2Pipeline._patchify_latents``) is what FLUX.2's
transformer consumes, with no scale, shift or BatchNorm statistics of its own. Source: ComfyUI loads ``taef2`` with
``tae_latent_channels = 128`` and no ``vae_scale``/``vae_shift`` (nodes.py ``VAELoader.load_vae``), wraps it in
``EncoderFlux2``/``DecoderFlux2`` that only patchify/unpatchify (comfy/taesd/taesd.py), and feeds it the same
latents as its FLUX.2 VAE, which applies the BatchNorm inside ``encode``/``decode``
(comfy/ldm/models/autoencoder.py, ``batch_norm_latent``) under an identity ``Flux2`` latent format
(comfy/latent_formats.py). So TAEF2's normaliser is a 2x2 patchify only (:func:`normaliser_spec`).

Diffusers has no class for TAEF2 (``AutoencoderTiny`` has no pool branch); :data:`DIFFUSERS_KEYS` only renames to
the ``encoder.layers.N`` / ``decoder.layers.N-1`` names of diffusers' tiny layout for files published that way.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vaekit.errors import LoadError

FAMILY = "flux2"  # TAEF2 speaks FLUX.2's normalised latent space (as TAESD speaks SD1's)


@dataclass(frozen=True)
class TAEF2Config:
    """TAEF2: TAESD with a GroupNorm pool branch in the blocks of the lowest resolution."""

    family: str = FAMILY
    kind: str = "taef2"
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 32
    width: int = 64
    encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    pool_expand: int = 4  # the pool branch runs at width * pool_expand channels
    pool_groups: int = 4  # GroupNorm groups of the pool branch
    has_encoder: bool = True  # False for a decoder-only file (e.g. taef2_decoder.pth alone)
    has_decoder: bool = True

    @property
    def downscale(self) -> int:
        """Pixels per latent cell along one side (8)."""
        return 2 ** (len(self.encoder_blocks) - 1)

    @property
    def gaussian(self) -> bool:
        """TAEF2's encoder is deterministic."""
        return False

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


PRESETS: dict[str, TAEF2Config] = {"taef2": TAEF2Config()}

# Region tiling (vaekit.ops.tiling): halo in latent cells per side (receptive fields above: 145 px / 8, 19 cells),
# and the part that reads the whole image, which makes tiles approximate.
TILING_HALO: dict[str, int] = {"encode": 19, "decode": 19}
GLOBAL_PART = "pool branch's GroupNorm (statistics over the whole image)"

# A pool branch key, present only in TAEF2-style files (plain TAESD/TAESDXL/TAESD3/TAEF1 blocks have none).
MARKER_KEYS: tuple[str, ...] = ("encoder.11.pool.0.weight", "decoder.3.pool.0.weight")


def _conv(n_in: int, n_out: int, **kwargs: Any) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """Soft clamp of latents to (-3, 3): ``tanh(z / 3) * 3``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """Three 3x3 convs with ReLUs and a residual; with ``pool``, a global GroupNorm branch added to the input first."""

    def __init__(self, width: int, pool: bool = False, expand: int = 4, groups: int = 4) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(width, width), nn.ReLU(), _conv(width, width), nn.ReLU(), _conv(width, width))
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()
        self.pool: nn.Sequential | None = None
        if pool:
            wide = width * expand
            self.pool = nn.Sequential(
                nn.Conv2d(width, wide, 1, bias=False),
                nn.GroupNorm(groups, wide),
                nn.ReLU(),
                nn.Conv2d(wide, width, 1, bias=False),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def _encoder(cfg: TAEF2Config) -> nn.Sequential:
    w, last = cfg.width, len(cfg.encoder_blocks) - 1
    layers: list[nn.Module] = []
    for level, n in enumerate(cfg.encoder_blocks):
        layers.append(_conv(cfg.in_channels, w) if level == 0 else _conv(w, w, stride=2, bias=False))
        layers.extend(Block(w, level == last, cfg.pool_expand, cfg.pool_groups) for _ in range(n))
    layers.append(_conv(w, cfg.latent_channels))
    return nn.Sequential(*layers)


def _decoder(cfg: TAEF2Config) -> nn.Sequential:
    w, last = cfg.width, len(cfg.decoder_blocks) - 1
    layers: list[nn.Module] = [Clamp(), _conv(cfg.latent_channels, w), nn.ReLU()]
    for level, n in enumerate(cfg.decoder_blocks):
        layers.extend(Block(w, level == 0, cfg.pool_expand, cfg.pool_groups) for _ in range(n))
        if level != last:
            layers.extend([nn.Upsample(scale_factor=2), _conv(w, w, bias=False)])
    layers.append(_conv(w, cfg.out_channels))
    return nn.Sequential(*layers)


class TAEF2VAE(nn.Module):
    """TAEF2 with the original file indices: ``encoder.N`` = ``taef2_encoder.pth``'s ``N``, same for the decoder."""

    def __init__(self, cfg: TAEF2Config) -> None:
        super().__init__()
        self.config = cfg
        if cfg.has_encoder:
            self.encoder = _encoder(cfg)
        if cfg.has_decoder:
            self.decoder = _decoder(cfg)

    @staticmethod
    def net_input(images: torch.Tensor) -> torch.Tensor:
        """The networks take images in [0, 1] as they are."""
        return images

    @staticmethod
    def net_output(y: torch.Tensor) -> torch.Tensor:
        """The decoder already returns images in [0, 1]."""
        return y

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (N, 3, H, W), H and W multiples of 8 -> latent (N, 32, H/8, W/8), unpatchified FLUX.2."""
        if not self.config.has_encoder:
            raise LoadError("this TAEF2 has no encoder (decoder-only file)")
        return self.encoder(images)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (N, 32, h, w) -> images in [0, 1] (not clamped)."""
        if not self.config.has_decoder:
            raise LoadError("this TAEF2 has no decoder (encoder-only file)")
        return self.decoder(z)


def normaliser_spec(cfg: TAEF2Config) -> dict[str, Any]:
    """TAEF2's latent is already FLUX.2's normalised latent, unpatchified: the normaliser is a 2x2 patchify only."""
    # Equivalent to a patch BatchNorm with running_mean 0 and running_var + eps = 1 (see the module docstring).
    return {"kind": "patchify", "patch": 2}


# ---- recognising files ----

_PARTS = ("encoder", "decoder")


def _split(shapes: dict[str, tuple[int, ...]]) -> dict[str, dict[str, tuple[int, ...]]] | None:
    """Keys per part (``encoder``/``decoder``, prefix removed); bare part files are told apart by their first conv."""
    if any(k.startswith(("encoder.", "decoder.")) for k in shapes):
        parts: dict[str, dict[str, tuple[int, ...]]] = {p: {} for p in _PARTS}
        for k, v in shapes.items():
            part, _, rest = k.partition(".")
            if part not in parts:
                return None
            parts[part][rest] = v
        return {p: sd for p, sd in parts.items() if sd}
    # A bare file: the encoder starts with conv 0 (image -> width), the decoder has no 0 (the clamp).
    return {"encoder" if "0.weight" in shapes else "decoder": dict(shapes)}


def _indices(sd: dict[str, tuple[int, ...]]) -> dict[int, dict[str, tuple[int, ...]]]:
    out: dict[int, dict[str, tuple[int, ...]]] = {}
    for k, v in sd.items():
        m = re.match(r"(\d+)\.(.+)$", k)
        if m is None:
            raise LoadError(f"TAEF2: unexpected key {k!r}")
        out.setdefault(int(m.group(1)), {})[m.group(2)] = v
    return out


def _runs(mods: dict[int, dict[str, tuple[int, ...]]], first: int) -> tuple[list[int], list[bool]]:
    """Blocks per level between convs, and whether each level's blocks have a pool branch."""
    runs: list[int] = [0]
    pools: list[set[bool]] = [set()]
    for i in range(first + 1, max(mods)):
        entry = mods.get(i)
        if entry is None:  # a parameter-free layer (ReLU / Upsample in the decoder)
            continue
        if "conv.0.weight" in entry:
            runs[-1] += 1
            pools[-1].add("pool.0.weight" in entry)
        else:
            runs.append(0)
            pools.append(set())
    if any(len(p) > 1 for p in pools):
        raise LoadError("TAEF2: the blocks of one level disagree on the pool branch")
    return runs, [bool(p and p.pop()) for p in pools]


def _expected(cfg: TAEF2Config, part: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        net = _encoder(cfg) if part == "encoder" else _decoder(cfg)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> TAEF2Config | None:
    """TAEF2 config from key shapes (a bare part file, or ``encoder.``/``decoder.`` prefixed); None if not TAEF2.

    TAEF2 is recognised by the ``N.pool.*`` keys of a TAESD-style block; files without them (plain TAESD, TAESDXL,
    TAESD3, TAEF1) are not TAEF2.
    """
    parts = _split(shapes)
    if not parts or not any(re.search(r"(^|\.)\d+\.pool\.\d+\.weight$", k) for k in shapes):
        return None
    key = re.compile(r"\d+\.((conv|skip|pool)\.\d+\.)?(weight|bias)$")
    if not all(key.match(k) for sd in parts.values() for k in sd):
        return None
    kw: dict[str, Any] = {"has_encoder": "encoder" in parts, "has_decoder": "decoder" in parts}
    try:
        if "encoder" in parts:
            mods = _indices(parts["encoder"])
            runs, pools = _runs(mods, 0)
            kw.update(
                width=mods[0]["weight"][0],
                in_channels=mods[0]["weight"][1],
                latent_channels=mods[max(mods)]["weight"][0],
                encoder_blocks=tuple(runs),
            )
            pool_levels = [i for i, p in enumerate(pools) if p]
            if pool_levels and pool_levels != [len(runs) - 1]:
                raise LoadError("TAEF2: the encoder's pool branch must be in its last level only")
            pool_entry = next((e for e in mods.values() if "pool.0.weight" in e), None)
        if "decoder" in parts:
            mods = _indices(parts["decoder"])
            runs, pools = _runs(mods, 1)
            latent = mods[1]["weight"][1]
            if kw.get("latent_channels", latent) != latent:
                raise LoadError(f"TAEF2: encoder makes {kw['latent_channels']} latent channels, decoder reads {latent}")
            kw.update(
                width=mods[1]["weight"][0],
                latent_channels=latent,
                out_channels=mods[max(mods)]["weight"][0],
                decoder_blocks=tuple(runs),
            )
            pool_levels = [i for i, p in enumerate(pools) if p]
            if pool_levels and pool_levels != [0]:
                raise LoadError("TAEF2: the decoder's pool branch must be in its first level only")
            pool_entry = next((e for e in mods.values() if "pool.0.weight" in e), None)
    except (KeyError, IndexError, ValueError) as e:
        raise LoadError(f"TAEF2: incomplete or inconsistent file ({e})") from None
    if pool_entry is None:
        raise LoadError("TAEF2: pool keys outside the blocks")
    kw["pool_expand"] = pool_entry["pool.0.weight"][0] // max(1, pool_entry["pool.0.weight"][1])
    cfg = TAEF2Config(**kw)
    for part, sd in parts.items():
        want = _expected(cfg, part)
        missing = sorted(set(want) - set(sd))
        extra = sorted(set(sd) - set(want))
        wrong = sorted(k for k in set(want) & set(sd) if tuple(want[k]) != tuple(sd[k]))
        if missing or extra or wrong:
            what = (
                f"missing {missing[0]}"
                if missing
                else f"unexpected {extra[0]}"
                if extra
                else f"{wrong[0]} has shape {tuple(sd[wrong[0]])}, expected {want[wrong[0]]}"
            )
            raise LoadError(
                f"TAEF2 {part}: {what} ({len(missing)} missing, {len(extra)} unexpected, {len(wrong)} wrong)"
            )
    return cfg


def part_state_dict(sd: dict[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    """A bare ``taef2_encoder.pth``/``taef2_decoder.pth`` state dict -> this module's ``encoder.N``/``decoder.N``."""
    return {f"{part}.{k}": v for k, v in sd.items()}


# ---- diffusers-style names (no diffusers class exists for TAEF2) ----

DIFFUSERS_KEYS: list[tuple[str, str]] = [
    ("encoder.{i}.", "encoder.layers.{i}."),
    ("decoder.{d}.", "decoder.layers.{d}."),  # {d}: diffusers' index is ours minus one (our 0 is the clamp)
]


def _rename(sd: dict[str, Any], pattern: str, shift: int, dst: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in sd.items():
        m = re.match(pattern, k)
        if m is None:
            raise LoadError(f"TAEF2: unexpected key {k!r}")
        part, idx, rest = m.group(1), int(m.group(2)), k[m.end() :]
        out[f"{part}.{dst}{idx + (shift if part == 'decoder' else 0)}.{rest}"] = v
    return out


def to_diffusers(sd: dict[str, Any]) -> dict[str, Any]:
    """Our names -> diffusers' tiny layout names (``encoder.layers.N``, ``decoder.layers.N-1``); values untouched."""
    return _rename(sd, r"(encoder|decoder)\.(\d+)\.", -1, "layers.")


def from_diffusers(sd: dict[str, Any]) -> dict[str, Any]:
    """Diffusers' tiny layout names -> ours; values untouched."""
    return _rename(sd, r"(encoder|decoder)\.layers\.(\d+)\.", 1, "")


_NO_DIFFUSERS = "diffusers has no class for TAEF2 (AutoencoderTiny has no pool branch); no diffusers config exists"


def diffusers_config(cfg: TAEF2Config) -> dict[str, Any]:
    """No diffusers class exists for TAEF2: always a LoadError (a folder claiming AutoencoderTiny would load wrong)."""
    raise LoadError(_NO_DIFFUSERS)


def config_from_diffusers(dc: dict[str, Any]) -> TAEF2Config:
    """No diffusers class exists for TAEF2: always a LoadError."""
    raise LoadError(_NO_DIFFUSERS)
