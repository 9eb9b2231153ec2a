"""Every command against generated bad inputs and failing destinations (issue 16's "done when").

For each command and each input slot it reads, files are generated of every kind of damage (empty, truncated,
random bytes, a foreign file of another format, a safetensors header claiming a huge length, NaN latents) and
every failing destination (a path component that is a file, a full disk, a read-only file system, Ctrl-C half-way).
Each run must: exit 2 for bad input or 1 for a runtime failure (130 for Ctrl-C), print exactly one line on stderr,
never a traceback, leave nothing half-written (no output, no temporary file) and leave the inputs untouched.

The full disk is injected in-process: ``io.open`` (what ``Path.open`` calls, and so every vaekit writer) is
wrapped so that writes under the destination fail with ENOSPC after a given number of bytes. A few runs go through
a real process, one of them onto a real 64 KiB tmpfs when this machine lets a user namespace mount one.
Property-based tests (Hypothesis) drive the file readers directly.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from tests.test_cli import make_env, write_checkpoint, write_image, write_vae
from vaekit.errors import BadInputError, LoadError
from vaekit.interfaces.cli import main

ROOT = Path(__file__).resolve().parents[1]

# --- generated damage ---------------------------------------------------------------------------------------------


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=metadata)


def _pickle_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo pwned > pwned.txt",))


def _png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def damage(kind: str, good: bytes, seed: int = 0) -> bytes:
    """Bytes of a damaged file made from ``good`` (a valid file of the expected type)."""
    rng = torch.Generator().manual_seed(seed)
    if kind == "empty":
        return b""
    if kind == "truncated-head":
        return good[:5]
    if kind == "truncated":
        return good[: max(9, len(good) * 2 // 3)]
    if kind == "random":
        return bytes(torch.randint(0, 256, (4096,), generator=rng, dtype=torch.uint8).tolist())
    if kind == "huge-header":
        return struct.pack("<Q", 1 << 60) + b'{"a":' + b" " * 64
    if kind == "header-past-end":
        return struct.pack("<Q", 10_000) + b"{}"
    if kind == "text":
        return b"These are my notes, not a model.\n" * 10
    if kind == "png":
        return _png_bytes()
    if kind == "json":
        return json.dumps({"_class_name": "AutoencoderKL"}).encode()
    if kind == "foreign-safetensors":  # valid safetensors, but nothing vaekit knows
        return _safetensors_bytes({"text_model.weight": torch.zeros(3, 5)}, {"who": "someone else"})
    if kind == "evil-pickle":
        return _pickle_bytes({"a": torch.zeros(2), "x": _Evil()})
    if kind == "list-pickle":
        return _pickle_bytes([torch.zeros(2)])
    if kind == "zip-junk":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("archive/data.pkl", b"\x80\x02garbage")
        return buf.getvalue()
    raise ValueError(kind)


WEIGHT_DAMAGE = (
    "empty",
    "truncated-head",
    "truncated",
    "random",
    "huge-header",
    "header-past-end",
    "text",
    "png",
    "foreign-safetensors",
    "evil-pickle",
    "list-pickle",
    "zip-junk",
)
IMAGE_DAMAGE = ("empty", "truncated", "random", "text", "huge-header", "foreign-safetensors")
LATENT_DAMAGE = ("empty", "truncated", "random", "huge-header", "header-past-end", "png", "foreign-safetensors")


# --- the world a command runs in ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Good inputs, made once: a tiny VAE, a checkpoint, two images, a latent file."""
    root = tmp_path_factory.mktemp("world")
    vae = write_vae(root / "good_vae.safetensors")
    ckpt = write_checkpoint(root / "good_ckpt.safetensors")
    img = write_image(root / "good.png", 24, 16, seed=1)
    img2 = write_image(root / "other.png", 16, 16, seed=2)
    env = make_env(root)
    lat_dir = root / "lat"
    assert main(["encode", str(img), "-o", str(lat_dir), "--vae", str(vae), "--precision", "fp32"], env) == 0
    return {"root": root, "vae": vae, "ckpt": ckpt, "img": img, "img2": img2, "latent": lat_dir / "good.safetensors"}


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with its hash."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def run_cli(capsys: pytest.CaptureFixture[str], env: dict[str, str], argv: list[str]) -> tuple[int, str, str]:
    """Run in-process; returns (exit code, stdout, stderr)."""
    code = main(argv, env)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, expected: int, *fragments: str) -> str:
    """Exit ``expected``, exactly one stderr line, no traceback; returns the line."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and "\x1b[" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def assert_nothing_written(dest: Path, before: dict[str, str] | None = None) -> None:
    """No output and no temporary file at ``dest``'s place (or exactly the files there before)."""
    folder = dest if dest.is_dir() or not dest.suffix else dest.parent
    if before is None:
        assert not dest.exists(), f"{dest} was written"
        if folder.exists():
            assert not [p for p in folder.iterdir() if p.name.startswith(".")], list(folder.iterdir())
    else:
        assert _snapshot(folder) == before


# Every command and the slot where it reads a file, with the suffixes that slot sees in practice.
# Each builds argv from (bad file, world, output path).
Slot = tuple[str, tuple[str, ...], Callable[[Path, dict[str, Path], Path], list[str]], str]
SLOTS: list[Slot] = [
    ("inspect", (".safetensors", ".ckpt", ".bin"), lambda f, w, o: ["inspect", str(f), "--no-probe"], "file"),
    ("convert", (".safetensors", ".ckpt"), lambda f, w, o: ["convert", str(f), "-o", str(o / "c.safetensors")], "file"),
    ("extract", (".safetensors", ".ckpt"), lambda f, w, o: ["extract", str(f), "-o", str(o / "e.safetensors")], "file"),
    (
        "bake-checkpoint",
        (".safetensors", ".ckpt"),
        lambda f, w, o: ["bake", str(f), "--vae", str(w["vae"]), "-o", str(o / "b.safetensors")],
        "file",
    ),
    (
        "bake-vae",
        (".safetensors", ".pt"),
        lambda f, w, o: ["bake", str(w["ckpt"]), "--vae", str(f), "-o", str(o / "b.safetensors")],
        "file",
    ),
    (
        "encode-vae",
        (".safetensors", ".ckpt"),
        lambda f, w, o: ["encode", str(w["img"]), "-o", str(o / "lat"), "--vae", str(f)],
        "dir",
    ),
    ("use", (".safetensors", ".ckpt"), lambda f, w, o: ["use", str(f)], "config"),
]
IMAGE_SLOTS: list[Slot] = [
    (
        "encode",
        (".png", ".jpg"),
        lambda f, w, o: ["encode", str(f), "-o", str(o / "lat"), "--vae", str(w["vae"])],
        "dir",
    ),
    (
        "roundtrip",
        (".png", ".webp"),
        lambda f, w, o: ["roundtrip", str(f), "-o", str(o / "rt"), "--vae", str(w["vae"])],
        "dir",
    ),
]
LATENT_SLOTS: list[Slot] = [
    (
        "decode",
        (".safetensors", ".latent"),
        lambda f, w, o: ["decode", str(f), "-o", str(o / "dec"), "--vae", str(w["vae"])],
        "dir",
    ),
]


def _cases() -> Iterator[Any]:
    groups = (
        (SLOTS, WEIGHT_DAMAGE, "vae"),
        (IMAGE_SLOTS, IMAGE_DAMAGE, "img"),
        (LATENT_SLOTS, LATENT_DAMAGE, "latent"),
    )
    for slots, kinds, good in groups:
        for name, suffixes, build, _ in slots:
            for i, kind in enumerate(kinds):
                suffix = suffixes[i % len(suffixes)]  # every suffix meets several kinds of damage
                yield pytest.param(kind, suffix, build, good, id=f"{name}-{kind}{suffix}")


@pytest.mark.parametrize(("kind", "suffix", "build", "good"), list(_cases()))
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    kind: str,
    suffix: str,
    build: Callable[[Path, dict[str, Path], Path], list[str]],
    good: str,
    world: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = make_env(tmp_path)
    bad = tmp_path / "in" / f"bad{suffix}"
    bad.parent.mkdir()
    bad.write_bytes(damage(kind, world[good].read_bytes()))
    out = tmp_path / "out"
    inputs_before = _snapshot(tmp_path / "in")
    world_before = _snapshot(world["root"])
    code, _, err = run_cli(capsys, env, build(bad, world, out))
    assert_one_line_error(code, err, 2, f"bad{suffix}")
    assert not out.exists() or not any(out.rglob("*")), list(out.rglob("*"))
    assert _snapshot(tmp_path / "in") == inputs_before and _snapshot(world["root"]) == world_before
    assert not (Path(env["VAEKIT_CONFIG"]) / "config.toml").exists()  # `use` persisted nothing
    assert not Path("pwned.txt").exists() and not (tmp_path / "pwned.txt").exists()


def test_nan_latents_are_bad_input_naming_the_file(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bug 6: one NaN file among good ones: refused before any image is written, the file named, JSON too."""
    from safetensors import safe_open

    folder = tmp_path / "lat"
    folder.mkdir()
    for i in range(3):
        shutil.copy(world["latent"], folder / f"a{i}.safetensors")
    with safe_open(str(world["latent"]), "pt") as f:
        meta, lat = f.metadata(), f.get_tensor("latents")
    lat[0, 0, 0, 0] = float("nan")
    save_file({"latents": lat}, str(folder / "a1_nan.safetensors"), meta)
    env = make_env(tmp_path)
    for extra in ([], ["--json"]):
        code, out, err = run_cli(capsys, env, ["decode", str(folder), "-o", str(tmp_path / "dec"), *extra])
        assert_one_line_error(code, err, 2, "a1_nan.safetensors", "NaN")
        assert not (tmp_path / "dec").exists()
        assert out == ""  # nothing was done, so there is nothing to report


# --- destinations that fail -----------------------------------------------------------------------------------------


class _FullFile:
    """A writable file that fails with ENOSPC once ``budget`` bytes have been written (shared across files)."""

    def __init__(self, real: Any, state: dict[str, int]) -> None:
        self._real = real
        self._state = state

    def write(self, data: Any) -> int:
        n = len(memoryview(data).cast("B")) if not isinstance(data, str) else len(data.encode())
        if self._state["left"] < n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._real.name)
        self._state["left"] -= n
        return self._real.write(data)

    def __enter__(self) -> _FullFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._real.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Callable[[], None]]:
    """``full_disk(folder, budget, err)``: writes under ``folder`` fail with ``err`` after ``budget`` bytes;
    returns a function that gives the room back."""
    real_open = io.open

    def install(folder: Path, budget: int, error: int = errno.ENOSPC) -> Callable[[], None]:
        state = {"left": budget}
        folder_text = str(folder.resolve())

        def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            writing = any(c in mode for c in "wax+")
            inside = isinstance(file, (str, os.PathLike)) and str(Path(file).resolve()).startswith(folder_text)
            if writing and inside:
                if error != errno.ENOSPC:
                    raise OSError(error, os.strerror(error), str(file))
                return _FullFile(real_open(file, mode, *args, **kwargs), state)
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(io, "open", fake_open)
        return lambda: monkeypatch.setattr(io, "open", real_open)

    return install


def _writers(world: dict[str, Path], out: Path) -> dict[str, list[str]]:
    vae, ckpt = str(world["vae"]), str(world["ckpt"])
    return {
        "encode": ["encode", str(world["img"]), str(world["img2"]), "-o", str(out), "--vae", vae],
        "encode-comfyui": ["encode", str(world["img"]), "-o", str(out), "--vae", vae, "--format", "comfyui"],
        "decode": ["decode", str(world["latent"]), "-o", str(out), "--vae", vae],
        "roundtrip": ["roundtrip", str(world["img"]), str(world["img2"]), "-o", str(out), "--vae", vae],
        "convert": ["convert", vae, "-o", str(out / "c.safetensors"), "--no-probe"],
        "convert-diffusers": ["convert", vae, "-o", str(out / "c_diffusers"), "--layout", "diffusers"],
        "extract": ["extract", ckpt, "-o", str(out / "e.safetensors")],
        "extract-diffusers": ["extract", ckpt, "-o", str(out / "e_diffusers"), "--layout", "diffusers"],
        "bake": ["bake", ckpt, "--vae", vae, "-o", str(out / "b.safetensors")],
    }


WRITERS = (
    "encode",
    "encode-comfyui",
    "decode",
    "roundtrip",
    "convert",
    "convert-diffusers",
    "extract",
    "extract-diffusers",
    "bake",
)


@pytest.mark.parametrize("budget", [0, 200])
@pytest.mark.parametrize("command", WRITERS)
def test_full_disk_is_one_line_exit_1_and_nothing_half_written(
    command: str,
    budget: int,
    world: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    full_disk: Callable[..., None],
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    world_before = _snapshot(world["root"])
    restore = full_disk(out, budget)
    code, _, err = run_cli(capsys, make_env(tmp_path), _writers(world, out)[command])
    assert_one_line_error(code, err, 1, "no space left")
    assert not list(out.iterdir()), list(out.iterdir())  # no output, no temporary file, no empty folder
    assert _snapshot(world["root"]) == world_before
    if budget:  # the disk has room again: the same command works with no --overwrite (nothing was left behind)
        restore()
        code, _, err = run_cli(capsys, make_env(tmp_path), _writers(world, out)[command])
        assert code == 0, err


@pytest.mark.parametrize("error", [errno.EROFS, errno.EACCES])
@pytest.mark.parametrize("command", ["encode", "convert", "convert-diffusers", "bake"])
def test_read_only_destination_is_one_line_exit_1(
    command: str,
    error: int,
    world: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    full_disk: Callable[..., None],
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    full_disk(out, 0, error)
    code, _, err = run_cli(capsys, make_env(tmp_path), _writers(world, out)[command])
    assert_one_line_error(code, err, 1, "cannot write")
    assert not any(out.iterdir())


@pytest.mark.parametrize("command", WRITERS)
def test_path_component_that_is_a_file_is_bad_input(
    command: str, world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bug 10: ``-o afile/...`` names the file in the way, exit 2, before any work."""
    afile = tmp_path / "afile"
    afile.write_text("I am a file")
    argv = _writers(world, afile / "sub")[command]
    code, _, err = run_cli(capsys, make_env(tmp_path), argv)
    assert_one_line_error(code, err, 2, str(afile), "is a file")
    assert afile.read_text() == "I am a file"


@pytest.mark.parametrize("command", ["encode", "decode", "roundtrip"])
def test_output_folder_that_is_a_file_is_bad_input(
    command: str, world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bug 10: ``decode x -o afile``."""
    afile = tmp_path / "afile"
    afile.write_text("I am a file")
    code, _, err = run_cli(capsys, make_env(tmp_path), _writers(world, afile)[command])
    assert_one_line_error(code, err, 2, str(afile))
    assert afile.read_text() == "I am a file"


@pytest.mark.parametrize("command", ["encode", "roundtrip", "decode"])
def test_interrupted_run_says_how_far_and_skip_existing_finishes_it(
    command: str,
    world: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vaekit.ops import codec as pipeline

    env = make_env(tmp_path)
    images = [write_image(tmp_path / "imgs" / f"i{k}.png", 16, 16, seed=k) for k in range(3)]
    vae = str(world["vae"])
    if command == "decode":
        lat = tmp_path / "lat"
        assert main(["encode", *map(str, images), "-o", str(lat), "--vae", vae], env) == 0
        inputs, stage = [str(lat)], "decode"
    else:
        inputs, stage = [str(tmp_path / "imgs")], "encode"
    out = tmp_path / "out"
    real = getattr(pipeline, stage)
    calls = {"n": 0}

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, stage, interrupted)
    capsys.readouterr()
    code, _, err = run_cli(capsys, env, [command, *inputs, "-o", str(out), "--vae", vae])
    line = assert_one_line_error(code, err, 130, "interrupted: 1 of 3 written", "--skip-existing")
    assert line.startswith("interrupted")
    assert len(list(out.iterdir())) == 1 and not [p for p in out.iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(pipeline, stage, real)
    code, _, err = run_cli(capsys, env, [command, *inputs, "-o", str(out), "--vae", vae])
    assert code == 2 and "--skip-existing" in err  # a plain rerun refuses to overwrite, and says how to go on
    first = _snapshot(out)
    code, _, err = run_cli(capsys, env, [command, *inputs, "-o", str(out), "--vae", vae, "--skip-existing"])
    assert code == 0 and "skipped 1" in err
    after = _snapshot(out)
    assert len(after) == 3 and all(after[k] == v for k, v in first.items())  # the finished one was left alone


# --- a few runs through a real process ----------------------------------------------------------------------------


def _vaekit(args: list[str], cwd: Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "VAEKIT_HOME": str(cwd), "VAEKIT_CONFIG": str(cwd / "cfg")}
    return subprocess.run(
        [sys.executable, "-m", "vaekit", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, **kwargs
    )


def test_real_process_bad_files_print_one_line(tmp_path: Path) -> None:
    """What the before-stop hook runs: junk, empty and text files through a real ``vaekit`` process."""
    (tmp_path / "junk.safetensors").write_bytes(damage("random", b""))
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("notes\n")
    for args in (["inspect", "junk.safetensors"], ["inspect", "empty.ckpt"], ["roundtrip", "notes.txt", "-o", "o"]):
        done = _vaekit(args, tmp_path)
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "o").exists()


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d"],
        capture_output=True,
        timeout=30,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="cannot mount a tmpfs in a user namespace here")
@pytest.mark.parametrize("layout", ["ldm", "diffusers"])
def test_real_full_disk_on_a_tiny_tmpfs(layout: str, world: dict[str, Path], tmp_path: Path) -> None:
    """Bug 1 on a real full file system (safetensors' own writer is not used, so this is an OSError too)."""
    out = tmp_path / "small"
    out.mkdir()
    dest = out / ("c.safetensors" if layout == "ldm" else "c_diffusers")
    vaekit = f"{sys.executable} -m vaekit convert {world['vae']} -o {dest} --layout {layout} --no-probe"
    script = f"mount -t tmpfs -o size=64k tmpfs {out} && {vaekit}; rc=$?; ls -A {out}; exit $rc"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "VAEKIT_HOME": str(tmp_path)}
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "no space left" in done.stderr, done.stderr
    assert done.stdout.strip() == ""  # the tmpfs holds nothing: no partial file, no temporary, no empty folder


# --- the readers, driven by Hypothesis ------------------------------------------------------------------------------

READER_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _header_file(tmp: Path, header: Any, tail: bytes) -> Path:
    raw = json.dumps(header).encode()
    path = tmp / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + tail)
    return path


_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-5, 1 << 40), st.text(max_size=8))
_entries = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "U8", "I64", "F8_E4M3", "X9"]), _json_leaf),
        "shape": st.one_of(st.lists(st.integers(-2, 6), max_size=4), _json_leaf),
        "data_offsets": st.one_of(st.lists(st.integers(-4, 300), min_size=0, max_size=3), _json_leaf),
    }
)


@READER_SETTINGS
@given(
    header=st.one_of(
        st.dictionaries(st.text(max_size=6), _entries, max_size=4),
        st.dictionaries(st.just("__metadata__"), st.dictionaries(st.text(max_size=4), _json_leaf, max_size=3)),
        st.lists(_json_leaf, max_size=3),
        _json_leaf,
    ),
    tail=st.binary(max_size=300),
)
def test_safetensors_header_parser_only_raises_load_error(header: Any, tail: bytes, tmp_path: Path) -> None:
    from vaekit.formats.io import TensorFile

    path = _header_file(tmp_path, header, tail)
    try:
        f = TensorFile(path)
    except LoadError:
        return
    loaded = f.load()  # a header the parser accepted must be readable too
    assert set(loaded) == set(f.shapes)
    for k, t in loaded.items():
        assert tuple(t.shape) == f.shapes[k]


@READER_SETTINGS
@given(data=st.binary(max_size=600), prefix=st.sampled_from([b"", b"\x80\x02", b"\x80\x04\x95", b"PK\x03\x04"]))
def test_pickle_reader_only_raises_load_error(data: bytes, prefix: bytes, tmp_path: Path) -> None:
    from vaekit.formats.io import read_pickle

    path = tmp_path / "x.ckpt"
    path.write_bytes(prefix + data)
    try:
        read_pickle(path)
    except LoadError as e:
        assert "\n" not in str(e) and "\x1b" not in str(e) and "Re-running" not in str(e)


@READER_SETTINGS
@given(data=st.binary(max_size=400), cut=st.integers(0, 2000))
def test_image_reader_only_raises_bad_input(data: bytes, cut: int, tmp_path: Path) -> None:
    from vaekit.ops.images import read_image

    png = _png_bytes()
    for i, blob in enumerate((data, png[:cut] + data, b"\x89PNG\r\n\x1a\n" + data)):
        path = tmp_path / f"x{i}.png"
        path.write_bytes(blob)
        try:
            img = read_image(path)
        except BadInputError:
            continue
        assert img.rgb.ndim == 3 and img.rgb.shape[0] == 3


@READER_SETTINGS
@given(
    meta=st.dictionaries(
        st.sampled_from(["format", "version", "vaekit.latents", "vaekit", "prompt"]),
        st.one_of(
            st.text(max_size=20),
            st.just("vaekit-latents"),
            st.builds(json.dumps, st.dictionaries(st.text(max_size=12), _json_leaf, max_size=6)),
        ),
        max_size=5,
    ),
    key=st.sampled_from(["latents", "latent_tensor", "other"]),
    shape=st.lists(st.integers(0, 3), min_size=1, max_size=5),
    version_marker=st.booleans(),
)
def test_latent_readers_only_raise_bad_input(
    meta: dict[str, str], key: str, shape: list[int], version_marker: bool, tmp_path: Path
) -> None:
    from vaekit.formats.comfy_latent import read_comfy_latent
    from vaekit.formats.latent_file import load_latents

    tensors = {key: torch.zeros(shape)}
    if version_marker:
        tensors["latent_format_version_0"] = torch.tensor([])
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), meta)
    for reader in (load_latents, read_comfy_latent):
        try:
            reader(path)
        except BadInputError:
            pass
