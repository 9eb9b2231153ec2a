"""The VAE library: config file, folder layouts, scan cache, name resolution, selection precedence, family checks."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from tests.test_cli import make_env, write_checkpoint, write_vae
from vaekit import library
from vaekit.errors import BadInputError


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A private library folder and config dir for one test."""
    return make_env(tmp_path)


def test_config_file_location(tmp_path: Path) -> None:
    assert library.config_file({"VAEKIT_CONFIG": str(tmp_path)}) == tmp_path / "config.toml"
    assert library.config_file({"VAEKIT_CONFIG": str(tmp_path / "my.toml")}) == tmp_path / "my.toml"
    assert library.cache_file({"VAEKIT_CONFIG": str(tmp_path)}) == tmp_path / "library-cache.json"
    if os.name == "posix" and not os.uname().sysname == "Darwin":
        assert library.config_file({"XDG_CONFIG_HOME": str(tmp_path)}) == tmp_path / "vaekit" / "config.toml"


def test_config_round_trip_through_tomllib(env: dict[str, str]) -> None:
    odd = 'C:\\VAEs\\"quoted" ünïcode\ttab\x01ctrl\x7f'
    cfg = library.LibraryConfig(home=odd, vae="kl-f8-anime", checkpoints={"/models/a b.safetensors": odd})
    path = library.write_config(cfg, env)
    assert tomllib.loads(path.read_text(encoding="utf-8")) == {
        "home": odd,
        "vae": "kl-f8-anime",
        "checkpoints": {"/models/a b.safetensors": odd},
    }
    assert library.read_config(env) == cfg
    path.write_text("vae = [1, 2", encoding="utf-8")
    with pytest.raises(BadInputError, match="not a readable TOML config"):
        library.read_config(env)
    path.write_text("vae = 3\n", encoding="utf-8")
    with pytest.raises(BadInputError, match="vae must be a string"):
        library.read_config(env)


def test_library_home_precedence(tmp_path: Path, env: dict[str, str]) -> None:
    assert library.library_home(env) == Path(env["VAEKIT_HOME"])
    no_home = {**env, "VAEKIT_HOME": ""}
    assert library.library_home(no_home) == Path("models") / "VAE"
    library.write_config(library.LibraryConfig(home=str(tmp_path / "configured")), no_home)
    assert library.library_home(no_home) == tmp_path / "configured"


def test_web_ui_layouts(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    assert library.library_folders(plain) == library.LibraryFolders(plain, (plain,), (), "folder")
    a1111 = tmp_path / "webui"
    (a1111 / "models" / "VAE").mkdir(parents=True)
    (a1111 / "models" / "Stable-diffusion").mkdir()
    folders = library.library_folders(a1111)
    assert folders.layout == "a1111" and folders.vae_dirs == (a1111 / "models" / "VAE",)
    assert folders.checkpoint_dirs == (a1111 / "models" / "Stable-diffusion",)
    comfy = tmp_path / "comfy"
    (comfy / "models" / "vae").mkdir(parents=True)
    (comfy / "models" / "checkpoints").mkdir()
    folders = library.library_folders(comfy)
    assert folders.layout == "comfyui" and folders.checkpoint_dirs == (comfy / "models" / "checkpoints",)


def test_scan_cache_is_keyed_by_size_and_mtime(
    tmp_path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    lib = Path(env["VAEKIT_HOME"])
    a = write_vae(lib / "a.safetensors", seed=1)
    write_vae(lib / "deep" / "er" / "b.safetensors", seed=2)
    first = library.scan(env)
    assert (first.hashed, first.cached) == (2, 0) and library.cache_file(env).is_file()
    calls: list[Path] = []
    real = library.file_sha256
    monkeypatch.setattr(library, "file_sha256", lambda p, *a: calls.append(Path(p)) or real(p, *a))
    second = library.scan(env)
    assert (second.hashed, second.cached) == (0, 2) and calls == []
    assert [e.sha256 for e in second.entries] == [e.sha256 for e in first.entries]
    write_vae(a, seed=3)  # rewritten: new size or mtime -> read again
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = library.scan(env)
    assert (third.hashed, third.cached) == (1, 1)
    assert next(e for e in third.entries if e.name == "a").sha256 != first.entries[0].sha256
    assert library.scan(env, refresh=True).hashed == 2


def test_names_resolve_by_stem_file_name_and_hash(tmp_path: Path, env: dict[str, str]) -> None:
    lib = Path(env["VAEKIT_HOME"])
    a = write_vae(lib / "Anime.safetensors", seed=1)
    write_vae(lib / "x" / "twin.safetensors", seed=2)
    write_vae(lib / "y" / "twin.safetensors", seed=3)
    entries = library.scan(env).entries
    assert library.find_in_library("Anime", entries).path == str(a)
    assert library.find_in_library("anime.safetensors", entries).path == str(a)
    sha = next(e.sha256 for e in entries if e.name == "Anime")
    assert library.find_in_library(sha[:8], entries).path == str(a)
    assert library.find_in_library("x/twin.safetensors", entries).name == "twin"
    with pytest.raises(BadInputError, match="matches 2 VAEs"):
        library.find_in_library("twin", entries)
    with pytest.raises(BadInputError, match="no VAE named 'nope'"):
        library.find_in_library("nope", entries)
    resolved = library.resolve_vae("Anime", env=env)
    assert resolved.path == a and "library name" in resolved.reason
    assert library.resolve_vae(str(a), env=env).path == a
    preset = library.resolve_vae("sdxl", env=env)
    assert preset.path is None and preset.source == "sdxl" and "random weights" in preset.describe()


def test_resolve_precedence_and_default_at_call_time(
    tmp_path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    lib = Path(env["VAEKIT_HOME"])
    g = write_vae(lib / "g.safetensors", seed=1)
    c = write_vae(lib / "c.safetensors", seed=2)
    flag = write_vae(tmp_path / "flag.safetensors", seed=3)
    ckpt = write_checkpoint(tmp_path / "ckpt.safetensors")
    default = write_vae(tmp_path / "default.safetensors", seed=4)
    monkeypatch.setattr("vaekit.weights.DEFAULT_VAE_PATH", default)
    assert library.resolve_vae(None, ckpt, env=env).path == default
    library.select("g", env=env)
    library.select("c", ckpt, env=env)
    assert library.resolve_vae(None, env=env).path == g
    assert library.resolve_vae(None, ckpt, env=env).path == c
    assert library.resolve_vae(str(flag), ckpt, env=env).path == flag
    # a selection by file name written by hand also applies
    cfg = library.read_config(env)
    cfg.checkpoints = {"ckpt.safetensors": "g"}
    library.write_config(cfg, env)
    assert library.resolve_vae(None, ckpt, env=env).path == g
    monkeypatch.setattr("vaekit.weights.DEFAULT_VAE_PATH", tmp_path / "missing.safetensors")
    library.select(None, env=env)
    library.select(None, ckpt, env=env)
    from vaekit.errors import VaekitError

    with pytest.raises(VaekitError, match="bundled default VAE is missing"):
        library.resolve_vae(None, env=env)


def test_family_checks(tmp_path: Path, env: dict[str, str]) -> None:
    sd1_ckpt = write_checkpoint(tmp_path / "sd1.safetensors")
    flux_ckpt = write_checkpoint(tmp_path / "flux.safetensors", preset="flux")
    assert library.checkpoint_family(sd1_ckpt).family == "sd1"
    assert library.checkpoint_family(flux_ckpt).latent_channels == 16
    sd1 = library.vae_family(write_vae(tmp_path / "v1.safetensors"))
    xl = library.vae_family(write_vae(tmp_path / "xl.safetensors", preset="sdxl"))
    flux = library.vae_family(write_vae(tmp_path / "fl.safetensors", preset="flux"))
    library.check_family_match(sd1, library.checkpoint_family(sd1_ckpt), "v1", "sd1")
    library.check_family_match(flux, library.checkpoint_family(flux_ckpt), "fl", "flux")
    with pytest.raises(BadInputError, match="4-channel latents"):
        library.check_family_match(sd1, library.checkpoint_family(flux_ckpt), "v1", "flux")
    with pytest.raises(BadInputError, match="sdxl VAE but sd1 is a sd1 model"):
        library.check_family_match(xl, library.checkpoint_family(sd1_ckpt), "xl", "sd1")
    # an uncertain family (sd1 or sdxl, told apart by nothing in the weights) only has its channels checked
    uncertain = library.FamilyInfo("sd1", 4, False, "latent channels only")
    xl_ckpt = library.FamilyInfo("sdxl", 4, True, "diffusion-model keys")
    library.check_family_match(uncertain, xl_ckpt, "bare", "xl")


def test_checkpoint_names_resolve_in_web_ui_folders(tmp_path: Path, env: dict[str, str]) -> None:
    root = tmp_path / "webui"
    write_vae(root / "models" / "VAE" / "v.safetensors")
    ckpt = write_checkpoint(root / "models" / "Stable-diffusion" / "dreamy.safetensors")
    ui_env = {**env, "VAEKIT_HOME": str(root)}
    assert library.find_checkpoint("dreamy", ui_env) == ckpt
    assert library.find_checkpoint(str(ckpt), ui_env) == ckpt
    with pytest.raises(BadInputError, match="no such checkpoint"):
        library.find_checkpoint("nightmare", ui_env)
    library.select("v", "dreamy", env=ui_env)
    assert library.resolve_vae(None, ckpt, env=ui_env).path == root / "models" / "VAE" / "v.safetensors"
