"""The VAE library: a folder of VAE files, its scan cache, and which VAE is selected (persisted as TOML).

Where things live:

- the library folder: ``VAEKIT_HOME`` if set, else ``home`` in the config file, else ``./models/VAE``. Pointed at
  the root of an AUTOMATIC1111 (``models/VAE``, ``models/Stable-diffusion``) or ComfyUI (``models/vae``,
  ``models/checkpoints``) install, the VAE and checkpoint folders inside it are used;
- the config dir: ``VAEKIT_CONFIG`` if set (a folder, or the path of the ``.toml`` file itself), else the
  platform's config dir (``$XDG_CONFIG_HOME/vaekit``, ``~/Library/Application Support/vaekit``, ``%APPDATA%\\vaekit``).
  It holds ``config.toml`` (home, global and per-checkpoint selection) and ``library-cache.json`` (scan results keyed
  by path, size and mtime, so a large library lists without re-hashing).

Selection precedence (:func:`resolve_vae`): an explicit name or path > the checkpoint's own selection > the global
selection > the bundled default VAE.
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vaekit import families
from vaekit.errors import BadInputError, VaekitError
from vaekit.errors import reason as error_reason
from vaekit.families import PRESETS
from vaekit.formats.io import WEIGHT_SUFFIXES, TensorFile, atomic_path, file_sha256, find_diffusers_weights

CONFIG_NAME = "config.toml"
CACHE_NAME = "library-cache.json"
CACHE_VERSION = 1
DEFAULT_HOME = Path("models") / "VAE"
# Sub-folders of a web UI's root that hold VAEs and full checkpoints (AUTOMATIC1111 first, then ComfyUI).
UI_VAE_DIRS = (Path("models") / "VAE", Path("models") / "vae")
UI_CHECKPOINT_DIRS = (Path("models") / "Stable-diffusion", Path("models") / "checkpoints")
MIN_HASH_PREFIX = 6


# --- where things live -------------------------------------------------------------------------------------------


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def config_file(env: Mapping[str, str] | None = None) -> Path:
    """Path of ``config.toml``: ``VAEKIT_CONFIG`` (folder or .toml file), else the platform's config dir."""
    e = _env(env)
    given = e.get("VAEKIT_CONFIG", "")
    if given:
        p = Path(given).expanduser()
        return p if p.suffix.lower() == ".toml" else p / CONFIG_NAME
    if sys.platform == "win32":
        base = Path(e.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(e.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "vaekit" / CONFIG_NAME


def cache_file(env: Mapping[str, str] | None = None) -> Path:
    """Path of the library scan cache (beside the config file)."""
    return config_file(env).parent / CACHE_NAME


# --- the config file ---------------------------------------------------------------------------------------------


@dataclass
class LibraryConfig:
    """What ``config.toml`` holds: the library folder, the global selection and per-checkpoint selections."""

    home: str | None = None
    vae: str | None = None
    checkpoints: dict[str, str] = field(default_factory=dict)


def read_config(env: Mapping[str, str] | None = None) -> LibraryConfig:
    """Read ``config.toml`` (an absent file is an empty config)."""
    path = config_file(env)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return LibraryConfig()
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadInputError(f"{path}: not a readable TOML config ({first}); fix or delete it") from None
    checkpoints = data.get("checkpoints", {})
    if not isinstance(checkpoints, dict) or not all(isinstance(v, str) for v in checkpoints.values()):
        raise BadInputError(f"{path}: [checkpoints] must map checkpoint paths to VAE names; fix or delete it")
    home, vae = data.get("home"), data.get("vae")
    for key, value in (("home", home), ("vae", vae)):
        if value is not None and not isinstance(value, str):
            raise BadInputError(f"{path}: {key} must be a string; fix or delete it")
    return LibraryConfig(home=home, vae=vae, checkpoints=dict(checkpoints))


def _toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped, everything else literal."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def config_to_toml(cfg: LibraryConfig) -> str:
    """Serialise the config (flat strings plus one table of strings: a tiny writer is enough)."""
    lines = ["# vaekit settings; edit freely or use `vaekit use`."]
    for key in ("home", "vae"):
        value = getattr(cfg, key)
        if value is not None:
            lines.append(f"{key} = {_toml_string(value)}")
    if cfg.checkpoints:
        lines += ["", "[checkpoints]"]
        lines += [f"{_toml_string(k)} = {_toml_string(v)}" for k, v in sorted(cfg.checkpoints.items())]
    return "\n".join(lines) + "\n"


def write_config(cfg: LibraryConfig, env: Mapping[str, str] | None = None) -> Path:
    """Write ``config.toml`` atomically; returns its path."""
    path = config_file(env)
    with atomic_path(path) as tmp:
        tmp.write_text(config_to_toml(cfg), encoding="utf-8")
    return path


# --- the library folder ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LibraryFolders:
    """The folder the user named and the VAE and checkpoint folders found in it."""

    home: Path
    vae_dirs: tuple[Path, ...]
    checkpoint_dirs: tuple[Path, ...]
    layout: str  # "folder", "a1111", "comfyui" or "a1111+comfyui"


def library_home(env: Mapping[str, str] | None = None, config: LibraryConfig | None = None) -> Path:
    """The library folder: ``VAEKIT_HOME`` > ``home`` in the config file > ``./models/VAE``."""
    given = _env(env).get("VAEKIT_HOME", "")
    if given:
        return Path(given).expanduser()
    cfg = config if config is not None else read_config(env)
    return Path(cfg.home).expanduser() if cfg.home else DEFAULT_HOME


def library_folders(home: Path) -> LibraryFolders:
    """Recognise a web UI root (A1111 / ComfyUI) in ``home``; otherwise ``home`` itself is the VAE folder."""
    vae_dirs: list[Path] = []
    ckpt_dirs: list[Path] = []
    kinds: list[str] = []
    for vae_sub, ckpt_sub, kind in zip(UI_VAE_DIRS, UI_CHECKPOINT_DIRS, ("a1111", "comfyui"), strict=True):
        vae_dir, ckpt_dir = home / vae_sub, home / ckpt_sub
        # On case-insensitive file systems models/VAE and models/vae are the same folder: keep it once.
        if vae_dir.is_dir() and not any(_same(vae_dir, d) for d in vae_dirs):
            vae_dirs.append(vae_dir)
            kinds.append(kind)
        if ckpt_dir.is_dir() and not any(_same(ckpt_dir, d) for d in ckpt_dirs):
            ckpt_dirs.append(ckpt_dir)
    if not vae_dirs:
        return LibraryFolders(home, (home,), tuple(ckpt_dirs), "folder")
    return LibraryFolders(home, tuple(vae_dirs), tuple(ckpt_dirs), "+".join(kinds))


def _same(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


# --- scanning ----------------------------------------------------------------------------------------------------


@dataclass
class LibraryEntry:
    """One VAE (or checkpoint) found in the library, with what detection and hashing said about it."""

    path: str
    name: str  # file stem (folder name for a diffusers folder)
    size: int
    mtime_ns: int
    sha256: str
    short_hash: str
    family: str
    family_certain: bool
    kind: str
    latent_channels: int
    layout: str
    container: str
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        return asdict(self)


@dataclass
class ScanResult:
    """Entries of a scan, the warnings about entries that were skipped, and how many were hashed afresh."""

    folders: LibraryFolders
    entries: list[LibraryEntry]
    warnings: list[str]
    hashed: int
    cached: int


def _candidates(root: Path, warnings: list[str]) -> list[Path]:
    """Weight files and diffusers folders under ``root``, recursively; unreadable folders become warnings."""
    found: list[Path] = []

    def on_error(e: OSError) -> None:
        warnings.append(f"{e.filename}: skipped, cannot read this folder ({e.strerror or e})")

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=True):
        here = Path(dirpath)
        if "config.json" in filenames and any(n.startswith("diffusion_pytorch_model") for n in filenames):
            found.append(here)  # a diffusers folder is one VAE
            dirnames.clear()
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(here / n for n in sorted(filenames) if Path(n).suffix.lower() in WEIGHT_SUFFIXES)
    return found


def _stat_key(path: Path) -> tuple[Path, int, int]:
    """The file that holds the weights (for a diffusers folder, its weight file), its size and mtime."""
    weights = find_diffusers_weights(path)[1] if path.is_dir() else path
    st = weights.stat()
    return weights, st.st_size, st.st_mtime_ns


def _read_cache(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # absent or damaged: rescan
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def _write_cache(path: Path, entries: dict[str, dict[str, Any]]) -> None:
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1), encoding="utf-8")
    except OSError:
        pass  # a read-only config dir only costs speed next time


def describe_file(path: Path, sha256: str | None = None) -> LibraryEntry:
    """Detect and hash one VAE file or diffusers folder (or the VAE baked into a checkpoint)."""
    from vaekit.formats.source import open_source

    src = open_source(path)
    det = src.detection
    weights, size, mtime = _stat_key(path)
    sha = sha256 or src.sha256 or file_sha256(weights)
    return LibraryEntry(
        path=str(path),
        name=path.name if path.is_dir() else path.stem,
        size=size,
        mtime_ns=mtime,
        sha256=sha,
        short_hash=sha[:10],
        family=det.family,
        family_certain=det.family_certain,
        kind=det.config.kind,
        latent_channels=det.config.latent_channels,
        layout=det.layout,
        container=det.container,
        dtype=det.dtype,
    )


def scan(
    env: Mapping[str, str] | None = None,
    home: Path | None = None,
    checkpoints: bool = False,
    progress: Callable[[Path], None] | None = None,
    refresh: bool = False,
) -> ScanResult:
    """Scan the library's VAE folders (or its checkpoint folders) recursively, reusing cached results.

    A file is re-read and re-hashed only when its size or mtime changed since the cached scan (or ``refresh``).
    Files that are not readable VAEs are skipped with a warning, never fatal.
    """
    from vaekit.errors import LoadError

    folders = library_folders(home if home is not None else library_home(env))
    roots = folders.checkpoint_dirs if checkpoints else folders.vae_dirs
    warnings: list[str] = []
    for root in roots:
        if not root.is_dir():
            what = "checkpoint folder" if checkpoints else "VAE library folder"
            warnings.append(f"{root}: no such {what}; set VAEKIT_HOME or `vaekit use --home DIR`")
    cache_path = cache_file(env)
    cache = {} if refresh else _read_cache(cache_path)
    entries: list[LibraryEntry] = []
    hashed = cached = 0
    changed = False
    for root in roots:
        if not root.is_dir():
            continue
        for path in _candidates(root, warnings):
            if progress:
                progress(path)
            key = str(path.resolve())
            try:
                _, size, mtime = _stat_key(path)
            except (OSError, LoadError) as e:
                reason = e.strerror if isinstance(e, OSError) and e.strerror else _strip_path(str(e), path)
                warnings.append(f"{path}: skipped, cannot read it ({reason})")
                continue
            hit = cache.get(key)
            if hit and hit.get("size") == size and hit.get("mtime_ns") == mtime:
                if "error" in hit:
                    warnings.append(f"{path}: skipped, {hit['error']}")
                    continue
                try:
                    entries.append(LibraryEntry(**{**hit, "path": str(path)}))
                    cached += 1
                    continue
                except TypeError:
                    pass  # an entry written by another vaekit version: read the file again
            try:
                entry = describe_file(path)
            except VaekitError as e:  # not a VAE, damaged, a refused pickle: one entry skipped, never the library
                why = _strip_path(str(e), path)
                warnings.append(f"{path}: skipped, {why}")
                cache[key] = {"size": size, "mtime_ns": mtime, "error": why}
                changed = True
                continue
            except OSError as e:
                warnings.append(f"{path}: skipped, cannot read it ({e.strerror or e})")
                continue
            except Exception as e:  # a reader's bug must not hide the rest of the library either
                warnings.append(f"{path}: skipped, unexpected {type(e).__name__} ({error_reason(e)})")
                continue
            entries.append(entry)
            cache[key] = entry.to_dict()
            hashed += 1
            changed = True
    if changed:
        _write_cache(cache_path, cache)
    return ScanResult(folders, entries, warnings, hashed, cached)


def _strip_path(message: str, path: Path) -> str:
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


# --- resolving names ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedVAE:
    """The VAE a command will use and why (``path`` is None for a preset: a randomly initialised model)."""

    path: Path | None
    reason: str
    preset: str | None = None

    @property
    def source(self) -> str:
        """What :func:`vaekit.load_vae` takes: the file path or the preset name."""
        return str(self.path) if self.path is not None else str(self.preset)

    def describe(self) -> str:
        """One line for the user: which VAE and why."""
        what = str(self.path) if self.path is not None else f"preset {self.preset} (random weights)"
        return f"{what} ({self.reason})"


def find_in_library(name: str, entries: list[LibraryEntry], what: str = "VAE", where: str = "") -> LibraryEntry:
    """The one entry ``name`` names: a file stem, a file name, a path relative to the library, or a hash prefix."""
    lowered = name.lower()

    def matches(e: LibraryEntry) -> bool:
        p = Path(e.path)
        if name in (e.name, p.name) or lowered in (e.name.lower(), p.name.lower()):
            return True
        if len(lowered) >= MIN_HASH_PREFIX and all(c in "0123456789abcdef" for c in lowered):
            return e.sha256.startswith(lowered)
        return str(p).endswith(os.sep + name)

    hits = sorted((e for e in entries if matches(e)), key=lambda e: e.path)
    if len(hits) > 1 and len({e.sha256 for e in hits}) == 1:
        return hits[0]  # identical copies (same hash) are one VAE: any copy will do
    if len(hits) > 1:
        shown = "; ".join(f"{e.path} ({e.short_hash})" for e in hits[:4])
        raise BadInputError(
            f"{name!r} matches {len(hits)} {what}s: {shown}; give the file name, a longer hash or the full path"
        )
    if not hits:
        raise BadInputError(
            f"no {what} named {name!r} in {where or 'the library'} ({len(entries)} {what}s); "
            "run `vaekit list` to see the names, or give a path"
        )
    return hits[0]


def _looks_like_path(name: str) -> bool:
    return os.sep in name or "/" in name or Path(name).suffix.lower() in WEIGHT_SUFFIXES or Path(name).exists()


def _resolve_name(name: str, env: Mapping[str, str] | None, reason: str) -> ResolvedVAE:
    path = Path(name).expanduser()
    if path.exists():
        return ResolvedVAE(path, reason)
    if name in PRESETS:
        return ResolvedVAE(None, reason, preset=name)
    result = scan(env)
    try:
        entry = find_in_library(name, result.entries, where=str(result.folders.home))
    except BadInputError:
        if _looks_like_path(name):
            raise BadInputError(f"{name}: no such file, and no VAE of that name in the library") from None
        raise
    return ResolvedVAE(Path(entry.path), f"{reason}, library name {name!r}")


def find_checkpoint(name: str, env: Mapping[str, str] | None = None) -> Path:
    """A checkpoint path, or a checkpoint's file name or stem inside the library's checkpoint folders."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    folders = library_folders(library_home(env))
    hits = [
        p
        for root in folders.checkpoint_dirs
        for p in _candidates(root, [])
        if p.is_file() and name.lower() in (p.name.lower(), p.stem.lower())
    ]
    if len(hits) > 1:
        raise BadInputError(f"{name!r} matches {len(hits)} checkpoints: {'; '.join(map(str, hits[:4]))}; give a path")
    if not hits:
        where = ", ".join(map(str, folders.checkpoint_dirs)) or "no checkpoint folder in the library"
        raise BadInputError(f"{name}: no such checkpoint file (looked in {where}); give the checkpoint's path")
    return hits[0]


def checkpoint_key(checkpoint: str | os.PathLike[str]) -> str:
    """How a checkpoint is stored in ``[checkpoints]``: its absolute path."""
    return str(Path(checkpoint).expanduser().resolve())


def selection_for(checkpoint: str | os.PathLike[str], config: LibraryConfig) -> str | None:
    """The VAE selected for ``checkpoint``: by absolute path, else by file name (hand-written entries)."""
    key = checkpoint_key(checkpoint)
    if key in config.checkpoints:
        return config.checkpoints[key]
    name = Path(checkpoint).name
    return next((v for k, v in config.checkpoints.items() if k == name or Path(k).name == name), None)


def resolve_vae(
    name_or_path: str | None,
    checkpoint: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> ResolvedVAE:
    """Which VAE to use: ``name_or_path`` (a path, a library name or hash, a preset) > the selection for
    ``checkpoint`` > the global selection > the bundled default VAE.
    """
    if name_or_path:
        return _resolve_name(name_or_path, env, "--vae")
    config = read_config(env)
    if checkpoint is not None and (chosen := selection_for(checkpoint, config)):
        name = Path(checkpoint).name
        with _stale_selection(chosen, f"vaekit use --for {name} --clear", env):
            return _resolve_name(chosen, env, f"selected for {name} (vaekit use --for)")
    if config.vae:
        with _stale_selection(config.vae, "vaekit use --clear", env):
            return _resolve_name(config.vae, env, "global selection (vaekit use)")
    from vaekit import weights  # looked up at call time: the bundled file may be swapped (tests, updates)

    return ResolvedVAE(weights.default_vae_path(), "bundled default")


@contextmanager
def _stale_selection(chosen: str, clear: str, env: Mapping[str, str] | None) -> Iterator[None]:
    """A selection that no longer resolves (file deleted or moved) says how to forget it."""
    try:
        yield
    except BadInputError as e:
        raise BadInputError(
            f"{e} (the selection {chosen!r} in {config_file(env)} is stale: `{clear}` forgets it, "
            "`vaekit use NAME` picks another)"
        ) from None


# --- checkpoint families -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FamilyInfo:
    """What a file says about its latent family: channels always, the family when it can tell."""

    family: str | None
    latent_channels: int | None
    certain: bool
    source: str


def vae_family(path: str | os.PathLike[str]) -> FamilyInfo:
    """Family and latent channels of a VAE file (or of the VAE baked into a checkpoint)."""
    from vaekit.formats.source import open_source

    det = open_source(path).detection
    return FamilyInfo(det.family, det.config.latent_channels, det.family_certain, det.family_source)


def checkpoint_family(path: str | os.PathLike[str]) -> FamilyInfo:
    """Family of a full checkpoint: from its metadata or diffusion-model keys, else from its baked VAE."""
    from vaekit.errors import LoadError

    f = TensorFile(path)
    found = families.from_modelspec(f.metadata.get("modelspec.architecture", ""))
    source = "metadata"
    if found is None:
        found, source = families.from_checkpoint_keys(f.keys()), "diffusion-model keys"
    if found is not None:
        return FamilyInfo(found.name, found.raw_channels, True, source)
    try:
        return vae_family(path)
    except LoadError:
        raise BadInputError(
            f"{path}: neither a diffusion model nor a VAE is recognisable in it; is this a checkpoint?"
        ) from None


def check_family_match(vae: FamilyInfo, checkpoint: FamilyInfo, vae_name: str, checkpoint_name: str) -> None:
    """Refuse a VAE whose latent channels or (when both are certain) family differ from the checkpoint's."""
    if vae.latent_channels and checkpoint.latent_channels and vae.latent_channels != checkpoint.latent_channels:
        raise BadInputError(
            f"{vae_name} makes {vae.latent_channels}-channel latents but {checkpoint_name} is a "
            f"{checkpoint.family or '?'} model that takes {checkpoint.latent_channels}; pick a matching VAE "
            "(or --force if you really mean it)"
        )
    if vae.certain and checkpoint.certain and vae.family and checkpoint.family and vae.family != checkpoint.family:
        raise BadInputError(
            f"{vae_name} is a {vae.family} VAE but {checkpoint_name} is a {checkpoint.family} model (different latent "
            "scaling: foggy or broken images); pick a matching VAE (or --force if you really mean it)"
        )


def _clear_checkpoint(config: LibraryConfig, name: str, env: Mapping[str, str] | None) -> None:
    """Forget the selection for a checkpoint named the way selecting names it: a path, or a library checkpoint's
    file name or stem (found in the checkpoint folders, or matched by name when the file is gone)."""
    keys = {checkpoint_key(name)}
    try:
        keys.add(checkpoint_key(find_checkpoint(name, env)))
    except BadInputError:
        pass  # the checkpoint file is gone: its entry is still matched by name below
    lowered, file_name = name.lower(), Path(name).name.lower()
    gone = [
        k
        for k in config.checkpoints
        if k in keys or lowered in (k.lower(), Path(k).name.lower(), Path(k).stem.lower()) or file_name == k.lower()
    ]
    if not gone:
        raise BadInputError(f"no VAE is selected for {name!r}, so there is nothing to clear; `vaekit use` shows them")
    for k in gone:
        del config.checkpoints[k]


def select(
    name_or_path: str | None,
    checkpoint: str | os.PathLike[str] | None = None,
    force: bool = False,
    env: Mapping[str, str] | None = None,
) -> tuple[LibraryConfig, ResolvedVAE | None]:
    """Persist the global selection (or the one for ``checkpoint``); ``None`` clears it. Returns the new config."""
    config = read_config(env)
    resolved = None
    stored: str | None = None
    if name_or_path is not None:
        resolved = _resolve_name(name_or_path, env, "selected")
        if resolved.path is None:
            raise BadInputError(f"{name_or_path!r} is a preset with random weights; select a VAE file instead")
        family = vae_family(resolved.path)  # nothing is persisted that every later command would fail to load
        # Library names are stored as given (they survive moving the library); other paths are made absolute.
        stored = name_or_path if not Path(name_or_path).expanduser().exists() else str(resolved.path.resolve())
    if checkpoint is not None:
        if name_or_path is None:
            _clear_checkpoint(config, str(checkpoint), env)
        else:
            checkpoint = find_checkpoint(str(checkpoint), env)
            if resolved is not None and resolved.path is not None and not force:
                ckpt = checkpoint_family(checkpoint)
                check_family_match(family, ckpt, resolved.path.name, Path(checkpoint).name)
            key = checkpoint_key(checkpoint)
            config.checkpoints = {k: v for k, v in config.checkpoints.items() if k != key}
            config.checkpoints[key] = str(stored)
    else:
        config.vae = stored
    write_config(config, env)
    return config, resolved
