"""Apply the key tables of :mod:`vaekit.formats.keymaps` and load state dicts strictly."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from vaekit.errors import LoadError
from vaekit.formats import keymaps

Rule = tuple[re.Pattern[str], str, str]
T = TypeVar("T")


def _compile(src: str) -> re.Pattern[str]:
    pattern = re.escape(src)
    for name in "ijrd":
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>\\d+)")
    return re.compile(pattern)


def _rules(table: list[tuple[str, str]], reverse: bool) -> list[Rule]:
    return [(_compile(b if reverse else a), a if reverse else b, b if reverse else a) for a, b in table]


def _rename(sd: dict[str, T], rules: list[Rule], index: Callable[[str, int], int], what: str) -> dict[str, T]:
    out: dict[str, T] = {}
    for key, value in sd.items():
        for pattern, dst, _src in rules:
            m = pattern.match(key)
            if m:
                fields = {name: index(name, int(v)) for name, v in m.groupdict().items()}
                out[dst.format(**fields) + key[m.end() :]] = value
                break
        else:
            raise LoadError(f"unexpected key {key!r} for the {what} layout")
    return out


def _count(keys: object, pattern: str) -> int:
    found = {m.group(1) for k in keys if (m := re.match(pattern, k))}  # type: ignore[attr-defined]
    return len(found)


def rename_diffusers_to_ldm(sd: dict[str, T], kind: str) -> dict[str, T]:
    """Rename diffusers keys to vaekit (LDM / taesd) names; values untouched (also works on shapes)."""
    if kind == "tiny":
        return _rename(sd, _rules(keymaps.TINY_TO_DIFFUSERS, True), lambda n, v: v + 1 if n == "d" else v, "tiny")
    sd = apply_prefix_aliases(sd, keymaps.DIFFUSERS_LEGACY_ALIASES)
    n = _count(sd, r"decoder\.up_blocks\.(\d+)\.")
    out = _rename(sd, _rules(keymaps.KL_TO_DIFFUSERS, True), lambda k, v: n - 1 - v if k == "r" else v, "diffusers")
    if any(k.startswith("bn.") for k in out):  # FLUX.2: vaekit (and BFL) nest the quant convs
        out = _swap_prefixes(out, keymaps.NESTED_QUANT_CONVS)
    return out


def _swap_prefixes(sd: dict[str, T], pairs: list[tuple[str, str]]) -> dict[str, T]:
    """Replace the first matching key prefix ``old`` by ``new`` for each (old, new) pair."""
    out: dict[str, T] = {}
    for key, value in sd.items():
        new_key = next((new + key[len(old) :] for old, new in pairs if key.startswith(old)), key)
        out[new_key] = value
    return out


def rename_ldm_to_diffusers(sd: dict[str, T], kind: str) -> dict[str, T]:
    """Rename vaekit (LDM / taesd) keys to current diffusers names; values untouched."""
    if kind == "tiny":
        return _rename(sd, _rules(keymaps.TINY_TO_DIFFUSERS, False), lambda n, v: v - 1 if n == "d" else v, "tiny")
    n = _count(sd, r"decoder\.up\.(\d+)\.")
    sd = _swap_prefixes(sd, [(new, old) for old, new in keymaps.NESTED_QUANT_CONVS])
    return _rename(sd, _rules(keymaps.KL_TO_DIFFUSERS, False), lambda k, v: n - 1 - v if k == "r" else v, "LDM")


def diffusers_to_ldm(sd: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """Convert a diffusers state dict to vaekit names; attention weights become (C, C, 1, 1) convs."""
    out = rename_diffusers_to_ldm(sd, kind)
    for key in keymaps.KL_ATTENTION_WEIGHTS:
        if key in out and out[key].ndim == 2:
            out[key] = out[key].reshape(*out[key].shape, 1, 1)
    return out


def ldm_to_diffusers(sd: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """Convert a vaekit state dict to current diffusers names; attention weights become (C, C) linears."""
    sd = dict(sd)
    for key in keymaps.KL_ATTENTION_WEIGHTS:
        if key in sd and sd[key].ndim == 4:
            sd[key] = sd[key].reshape(sd[key].shape[:2])
    return rename_ldm_to_diffusers(sd, kind)


def apply_prefix_aliases(sd: dict[str, T], aliases: list[tuple[str, str]]) -> dict[str, T]:
    """Replace the first matching substring alias in each key (used for legacy names)."""
    out: dict[str, T] = {}
    for key, value in sd.items():
        for old, new in aliases:
            if old in key:
                key = key.replace(old, new, 1)
                break
        out[key] = value
    return out


def strict_load(model: nn.Module, sd: dict[str, torch.Tensor], source: str, skip_prefix: str | None = None) -> None:
    """Assign ``sd`` to ``model``: any missing or unexpected key, or wrong shape, is an error naming them.

    ``skip_prefix`` names a part (``encoder.``) that the file does not hold and that stays unloaded.
    """
    check_architecture(model, {k: tuple(v.shape) for k, v in sd.items()}, source, skip_prefix)
    model.load_state_dict(sd, strict=skip_prefix is None, assign=True)


def check_architecture(
    model: nn.Module, shapes: dict[str, tuple[int, ...]], source: str, skip_prefix: str | None = None
) -> None:
    """The strict check of loading, on shapes alone: a LoadError naming any missing, unexpected or misshapen key.

    ``model`` may live on the meta device; :func:`vaekit.inspect` runs this without reading a tensor.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if skip_prefix:
        expected = {k: s for k, s in expected.items() if not k.startswith(skip_prefix)}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(shapes) & set(expected) if tuple(shapes[k]) != expected[k])
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
    if wrong:
        text = ", ".join(f"{k}: file {tuple(shapes[k])} vs model {expected[k]}" for k in wrong[:3])
        problems.append(f"{len(wrong)} with wrong shape ({text})")
    if problems:
        raise LoadError(f"{source}: does not match the detected architecture: " + "; ".join(problems))


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")
