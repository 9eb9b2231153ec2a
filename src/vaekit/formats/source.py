"""Open a VAE from a file, a diffusers folder or a pair of TAESD part files, detected by content."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vaekit.errors import LoadError
from vaekit.formats.detect import Detection, detect, read_diffusers_config
from vaekit.formats.io import WEIGHT_SUFFIXES, TensorFile, file_sha256, find_diffusers_weights
from vaekit.formats.known_hashes import KNOWN_HASHES

PathLike = str | os.PathLike[str]


@dataclass
class VAESource:
    """One detected VAE and where its tensors live; :meth:`state_dict` reads them in vaekit names."""

    path: Path
    detection: Detection
    files: list[TensorFile]
    diffusers_config: dict[str, Any] | None = None
    sha256: str | None = None
    # One {vaekit key: key in that file} per file; defaults to the detection's map for a single file.
    key_maps: list[dict[str, str]] | None = None

    def file_key_maps(self) -> list[tuple[TensorFile, dict[str, str]]]:
        """Each file with the vaekit keys it holds."""
        maps = self.key_maps or [self.detection.key_map]
        return list(zip(self.files, maps, strict=True))

    @property
    def format(self) -> str:
        """'safetensors', 'pickle' or 'diffusers'."""
        return "diffusers" if self.diffusers_config is not None else self.files[0].format

    @property
    def metadata(self) -> dict[str, str]:
        """Safetensors metadata of the (first) file."""
        return self.files[0].metadata

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the VAE tensors in vaekit names, as :meth:`state_dict` would give them (nothing is read)."""
        out: dict[str, tuple[int, ...]] = {}
        for f, wanted in self.file_key_maps():
            out.update({ours: tuple(f.shapes[theirs]) for ours, theirs in wanted.items()})
        if self._module() is not None:  # convert on meta tensors: names and shapes only
            metas = self._convert({k: torch.empty(s, device="meta") for k, s in out.items()})
            return {k: tuple(v.shape) for k, v in metas.items()}
        from vaekit.formats.keymaps import KL_ATTENTION_WEIGHTS

        return {k: (*s, 1, 1) if k in KL_ATTENTION_WEIGHTS and len(s) == 2 else s for k, s in out.items()}

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Only the named VAE tensors (vaekit names), e.g. FLUX.2's BatchNorm statistics."""
        out: dict[str, torch.Tensor] = {}
        for f, wanted in self.file_key_maps():
            mine = {ours: theirs for ours, theirs in wanted.items() if ours in names}
            if mine:
                loaded = f.load(list(mine.values()))
                out.update({ours: loaded[theirs] for ours, theirs in mine.items()})
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The VAE tensors, renamed to vaekit (LDM / taesd) names; nothing else in a checkpoint is read."""
        det = self.detection
        out: dict[str, torch.Tensor] = {}
        for f, wanted in self.file_key_maps():
            loaded = f.load(list(wanted.values()))
            out.update({ours: loaded[theirs] for ours, theirs in wanted.items()})
        if self._module() is not None:
            return self._convert(out)
        if det.layout in ("diffusers", "taesd-diffusers"):
            # key_map already names our keys; only the attention weights need reshaping.
            out = diffusers_to_ldm_shapes(out)
        return out

    def _module(self) -> Any:
        """The architecture module of a VAE vaekit reads through ``models.FOREIGN`` (None for KL and tiny VAEs)."""
        from vaekit import models

        return models.FOREIGN.get(self.detection.config.kind)

    def _convert(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Such a VAE's tensors in the module's names: diffusers names converted, and files that store 2-D convs
        with a length-1 time axis (HunyuanImage's release) squeezed."""
        mod = self._module()
        if self.detection.layout == "diffusers":
            sd = mod.from_diffusers(sd)
        squeeze = getattr(mod, "squeeze_time_axis", None)
        return squeeze(sd) if squeeze is not None else sd


def diffusers_to_ldm_shapes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reshape linear attention weights (C, C) to the 1x1 conv shape (C, C, 1, 1) vaekit uses."""
    from vaekit.formats.keymaps import KL_ATTENTION_WEIGHTS

    return {k: v.reshape(*v.shape, 1, 1) if k in KL_ATTENTION_WEIGHTS and v.ndim == 2 else v for k, v in sd.items()}


def open_source(path: PathLike | list[PathLike], family: str | None = None) -> VAESource:
    """Detect the VAE at ``path`` (a file, a diffusers folder, or a list of TAESD encoder/decoder files)."""
    if isinstance(path, list | tuple):
        return _open_parts([Path(p) for p in path], family)
    path = Path(path)
    if not path.exists():
        raise LoadError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / "config.json").is_file() or (path / "vae" / "config.json").is_file():
            return _open_diffusers(path, family)
        weights = sorted(p for p in path.iterdir() if p.suffix.lower() in WEIGHT_SUFFIXES)
        if len(weights) == 2:
            return _open_parts(weights, family)
        raise LoadError(f"{path}: a folder without config.json; pass a weight file instead")
    return _open_file(path, family)


def _detect_file(f: TensorFile, family: str | None, dc: dict[str, Any] | None = None) -> tuple[Detection, str | None]:
    det = detect(f.shapes, f.metadata, dc, f.dtypes, family=family)
    sha = None
    if not det.family_certain and KNOWN_HASHES:
        sha = file_sha256(f.path)
        if sha in KNOWN_HASHES:
            det = detect(f.shapes, f.metadata, dc, f.dtypes, family=family, known_family=KNOWN_HASHES[sha][0])
    return det, sha


def _open_file(path: Path, family: str | None) -> VAESource:
    f = TensorFile(path)
    try:
        det, sha = _detect_file(f, family)
    except LoadError as e:
        raise LoadError(f"{path}: {e}") from None
    return VAESource(path, det, [f], sha256=sha)


def _open_diffusers(folder: Path, family: str | None) -> VAESource:
    config_path, weights = find_diffusers_weights(folder)
    dc = read_diffusers_config(config_path)
    f = TensorFile(weights)
    try:
        det, sha = _detect_file(f, family, dc)
    except LoadError as e:
        raise LoadError(f"{weights}: {e}") from None
    return VAESource(folder, det, [f], diffusers_config=dc, sha256=sha)


def _open_parts(paths: list[Path], family: str | None) -> VAESource:
    """Separate TAESD encoder and decoder files, each recognised by its content."""
    if len(paths) != 2:
        raise LoadError("give exactly two part files: a TAESD encoder and a TAESD decoder")
    sources = [_open_file(p, family) for p in paths]
    by_part = {s.detection.parts: s for s in sources}
    if set(by_part) != {("encoder",), ("decoder",)}:
        raise LoadError(f"{paths[0]} and {paths[1]}: expected one encoder-only and one decoder-only TAESD file")
    enc, dec = by_part[("encoder",)], by_part[("decoder",)]
    e_cfg, d_cfg = enc.detection.config, dec.detection.config
    if e_cfg.latent_channels != d_cfg.latent_channels:
        raise LoadError(
            f"encoder has {e_cfg.latent_channels} latent channels, decoder {d_cfg.latent_channels}: not a pair"
        )
    import dataclasses

    both = {"has_encoder": True, "has_decoder": True} if hasattr(d_cfg, "has_encoder") else {}
    cfg = dataclasses.replace(d_cfg, encoder_blocks=e_cfg.encoder_blocks, in_channels=e_cfg.in_channels, **both)
    det = dataclasses.replace(
        dec.detection,
        config=cfg,
        parts=("encoder", "decoder"),
        key_map={**enc.detection.key_map, **dec.detection.key_map},
    )
    key_maps = [enc.detection.key_map, dec.detection.key_map]
    return VAESource(paths[0], det, [enc.files[0], dec.files[0]], key_maps=key_maps)


__all__ = ["VAESource", "open_source"]
