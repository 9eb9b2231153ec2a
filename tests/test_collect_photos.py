"""scripts/collect_photos.py: the data step of the bundled VAE (issue 15)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("collect_photos", ROOT / "scripts" / "collect_photos.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: Backgrounds

Files: *
Copyright: 2014 Some Group
License: GPL-2+

Files: nature/Aqua.jpg
 nature/Garden.jpg
Copyright: 2008, A Photographer
License: CC-BY-SA-4.0
"""


def test_debian_copyright_last_matching_stanza_wins(tmp_path: Path) -> None:
    cp = _module()
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "copyright").write_text(COPYRIGHT)
    assert cp.debian_copyright("pkg", "nature/Garden.jpg", tmp_path) == ("CC-BY-SA-4.0", "2008, A Photographer")
    assert cp.debian_copyright("pkg", "abstract/Silk.png", tmp_path) == ("GPL-2+", "2014 Some Group")
    assert cp.debian_copyright("missing", "x.jpg", tmp_path)[0].startswith("unknown")


def test_collect_skimage_keeps_the_fixed_heldout_split(tmp_path: Path) -> None:
    cp = _module()
    manifest = cp.collect(tmp_path, long_side=96, heldout_long_side=64, only=("scikit-image",))
    photos = {p["name"]: p for p in manifest["photos"]}
    assert photos["skimage-chelsea"]["split"] == photos["skimage-coffee"]["split"] == "heldout"
    assert photos["skimage-astronaut"]["split"] == "train"
    assert tuple(photos["skimage-coffee"]["original_size"]) == (600, 400)
    assert all(p["licence"] for p in photos.values())
    heldout = (tmp_path / "heldout.txt").read_text().split()
    train = (tmp_path / "train.txt").read_text().split()
    assert "heldout/skimage-chelsea.png" in heldout and not set(heldout) & set(train)
    assert Image.open(tmp_path / "heldout" / "skimage-coffee.png").size == (64, 43)
    assert max(Image.open(tmp_path / "train" / "skimage-astronaut.png").size) == 96
    assert json.loads((tmp_path / "manifest.json").read_text())["heldout_long_side"] == 64


def test_wallpaper_licences_come_from_the_package() -> None:
    cp = _module()
    if not Path("/usr/share/doc/mate-backgrounds/copyright").is_file():
        pytest.skip("mate-backgrounds is not installed (apt-get install mate-backgrounds)")
    licence, holder = cp.debian_copyright("mate-backgrounds", "nature/Storm.jpg")
    assert licence == "GPL-2+" and "Sergey Nazarov" in holder
