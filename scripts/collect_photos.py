"""Collect the training photographs of the bundled VAE: real colour photos that install offline.

Sources: scikit-image's colour photographs, scikit-learn's two sample images, and the photographs (not the
abstract art) of the Debian packages ``mate-backgrounds`` and ``plasma-workspace-wallpapers``. Each photo is
resized so that its long side is at most ``--long-side`` (train) or ``--heldout-long-side`` (held out) pixels
and written as PNG under ``OUT/train`` and ``OUT/heldout``, with list files (``train.txt``, ``heldout.txt``) for
``vaekit train`` and ``manifest.json`` (source path, package, size, licence and copyright of every file, taken
from the package's ``/usr/share/doc/PKG/copyright``). Sources that are not installed are skipped and named.

    python scripts/collect_photos.py --out data/photos
    vaekit train data/photos/train.txt --val-data data/photos/heldout.txt ...
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

Image.MAX_IMAGE_PIXELS = None

# scikit-image colour photographs and the licence stated in the docstring of their loader (skimage.data.NAME).
SKIMAGE = {
    "astronaut.png": "public domain (NASA; skimage.data.astronaut)",
    "chelsea.png": "CC0 (Stefan van der Walt; skimage.data.chelsea)",
    "coffee.png": "CC0 (Rachel Michetti; skimage.data.coffee)",
    "hubble_deep_field.jpg": "public domain (NASA; skimage.data.hubble_deep_field)",
    "ihc.png": "no known copyright restrictions (skimage.data.immunohistochemistry)",
    "motorcycle_left.png": "Middlebury stereo data set, distributed with scikit-image (skimage.data.stereo_motorcycle)",
    "retina.jpg": "CC0 1.0 (Häggström; skimage.data.retina)",
    "rocket.jpg": "public domain (SpaceX; skimage.data.rocket)",
}
SKLEARN = {
    "china.jpg": "CC BY 2.0 (danielbuechele, Flickr; sklearn/datasets/images/README.txt)",
    "flower.jpg": "CC BY 2.0 (vultilion, Flickr; sklearn/datasets/images/README.txt)",
}
# Photographs among the wallpapers (looked at one by one; the rest of these packages is abstract or digital art).
MATE_PHOTOS = (
    "Aqua",
    "Blinds",
    "Dune",
    "FreshFlower",
    "Garden",
    "GreenMeadow",
    "LadyBird",
    "RainDrops",
    "Storm",
    "TwoWings",
    "Wood",
    "YellowFlower",
)
PLASMA_PHOTOS = (
    "BytheWater",
    "ColdRipple",
    "ColorfulCups",
    "EveningGlow",
    "FallenLeaf",
    "Grey",
    "Kite",
    "OneStandsOut",
    "Path",
    "summer_1am",
)
# Fixed held-out split: never seen in training.
HELDOUT = (
    "skimage-chelsea",
    "skimage-coffee",
    "sklearn-china",
    "mate-LadyBird",
    "plasma-EveningGlow",
    "plasma-ColorfulCups",
)


@dataclass
class Photo:
    """One collected photograph and where it came from."""

    name: str
    source: str
    package: str
    licence: str
    copyright: str = ""
    split: str = "train"
    size: tuple[int, int] = (0, 0)
    original_size: tuple[int, int] = (0, 0)


SOURCES = ("scikit-image", "scikit-learn", "mate-backgrounds", "plasma-workspace-wallpapers")


def debian_copyright(package: str, relpath: str, doc_root: Path = Path("/usr/share/doc")) -> tuple[str, str]:
    """(licence, copyright) of ``relpath`` from DOC_ROOT/PACKAGE/copyright (the last matching stanza wins)."""
    path = doc_root / package / "copyright"
    if not path.is_file():
        return "unknown (no copyright file)", ""
    found = ("", "")
    for stanza in path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        patterns = fields.get("Files", "").split()
        if any(fnmatch.fnmatch(relpath, p) or relpath.endswith("/" + p) or p == "*" for p in patterns):
            found = (fields.get("License", "").split(" ")[0], fields.get("Copyright", ""))
    return found


def sources(only: tuple[str, ...] = SOURCES) -> tuple[list[tuple[Photo, Path]], list[str]]:
    """Every known photograph of the sources ``only`` that is installed here, and the ones that are missing."""
    found: list[tuple[Photo, Path]] = []
    missing: list[str] = []
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    for name, licence in SKIMAGE.items() if "scikit-image" in only else ():
        p = folder / name
        if p.is_file():
            found.append((Photo(f"skimage-{p.stem}", str(p), "scikit-image", licence), p))
        else:
            missing.append(f"scikit-image {name}")
    try:
        if "scikit-learn" not in only:
            raise ImportError
        import sklearn

        folder = Path(sklearn.__file__).parent / "datasets" / "images"
        for name, licence in SKLEARN.items():
            photo = Photo(f"sklearn-{Path(name).stem}", str(folder / name), "scikit-learn", licence)
            found.append((photo, folder / name))
    except ImportError:
        if "scikit-learn" in only:
            missing.append("scikit-learn (pip install scikit-learn)")
    for name in MATE_PHOTOS if "mate-backgrounds" in only else ():
        p = Path("/usr/share/backgrounds/mate/nature") / f"{name}.jpg"
        if not p.is_file():
            missing.append(f"mate-backgrounds {name}")
            continue
        licence, holder = debian_copyright("mate-backgrounds", f"nature/{name}.jpg")
        found.append((Photo(f"mate-{name}", str(p), "mate-backgrounds", licence, holder), p))
    for name in PLASMA_PHOTOS if "plasma-workspace-wallpapers" in only else ():
        images = Path("/usr/share/wallpapers") / name / "contents" / "images"
        files = sorted(images.glob("*"), key=lambda f: -f.stat().st_size) if images.is_dir() else []
        if not files:
            missing.append(f"plasma-workspace-wallpapers {name}")
            continue
        licence, holder = debian_copyright("plasma-workspace-wallpapers", f"{name}/contents/images/{files[0].name}")
        meta = images.parent.parent / "metadata.json"
        if meta.is_file():
            info = json.loads(meta.read_text(encoding="utf-8")).get("KPlugin", {})
            authors = ", ".join(a.get("Name", "") for a in info.get("Authors", []))
            holder = f"{authors}; {holder}" if authors else holder
            licence = info.get("License", licence) or licence
        found.append((Photo(f"plasma-{name}", str(files[0]), "plasma-workspace-wallpapers", licence, holder), files[0]))
    return found, missing


def save_png(image: Image.Image, dest: Path) -> None:
    """Write ``image`` as PNG atomically."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".png")
    os.close(fd)
    image.save(tmp, format="PNG", optimize=False)
    os.replace(tmp, dest)


def collect(
    out: Path, long_side: int = 1024, heldout_long_side: int = 640, only: tuple[str, ...] = SOURCES
) -> dict[str, object]:
    """Resize every installed photo into OUT/train or OUT/heldout; write the list files and the manifest."""
    photos, missing = sources(only)
    for split in ("train", "heldout"):
        (out / split).mkdir(parents=True, exist_ok=True)
    lists: dict[str, list[str]] = {"train": [], "heldout": []}
    for photo, path in photos:
        photo.split = "heldout" if photo.name in HELDOUT else "train"
        image = Image.open(path).convert("RGB")
        photo.original_size = image.size
        limit = heldout_long_side if photo.split == "heldout" else long_side
        scale = limit / max(image.size)
        if scale < 1:
            image = image.resize(
                (max(8, round(image.width * scale)), max(8, round(image.height * scale))), Image.Resampling.LANCZOS
            )
        photo.size = image.size
        dest = out / photo.split / f"{photo.name}.png"
        if not dest.is_file() or Image.open(dest).size != image.size:
            save_png(image, dest)
        lists[photo.split].append(f"{photo.split}/{photo.name}.png")
    for split, entries in lists.items():
        (out / f"{split}.txt").write_text("\n".join(entries) + "\n", encoding="utf-8")
    manifest = {
        "long_side": long_side,
        "heldout_long_side": heldout_long_side,
        "missing": missing,
        "photos": [asdict(p) for p, _ in photos],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/photos"))
    parser.add_argument("--long-side", type=int, default=1024, help="Long side of the training photos (at most).")
    parser.add_argument("--heldout-long-side", type=int, default=640, help="Long side of the held-out photos.")
    parser.add_argument("--only", default=",".join(SOURCES), help="Comma-separated sources to collect.")
    args = parser.parse_args(argv)
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = set(only) - set(SOURCES)
    if unknown:
        print(f"unknown source(s) {', '.join(sorted(unknown))}; known: {', '.join(SOURCES)}", file=sys.stderr)
        return 2
    manifest = collect(args.out, args.long_side, args.heldout_long_side, only)
    photos = manifest["photos"]
    assert isinstance(photos, list)
    n_train = sum(p["split"] == "train" for p in photos)
    print(f"{n_train} training and {len(photos) - n_train} held-out photos in {args.out}")
    for item in manifest["missing"]:  # type: ignore[union-attr]
        print(f"missing: {item}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
