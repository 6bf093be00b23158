"""Real photographs from Debian packages: the training photographs of the demo and of the
camera-trace stage, and the evaluation collection of the benchmarks.

Four free collections, chosen photograph by photograph (drawings, renders, logos, maps and
screenshots left out):

- ``opencv``: 33 photographs among OpenCV's sample images (package ``opencv-doc``, BSD /
  Apache-2.0): aerial views, streets, buildings, fruit, animals, people, scene text; 256 to
  1280 px, many cameras and JPEG histories. **Evaluation only** (benchmarks/photo_sets.py and
  independent_sets.py forge it), never trained on.
- ``wallpapers``: 22 photographic desktop backgrounds (``mate-backgrounds``' nature folder and
  the photographs among ``plasma-workspace-wallpapers``; GPL / CC-BY-SA): flowers, leaves,
  landscapes, water, architecture; 1280 to 2560 px.
- ``lomiri``: 15 photographs among Ubuntu Touch's wallpapers (``lomiri-wallpapers-16.04`` and
  ``-20.04``; CC-BY / CC-BY-SA / CC0, one photographer each): landscapes, plants, still lifes,
  interiors; 2056 to 6028 px, each from its own camera.
- ``kphotoalbum``: 23 holiday and family snapshots of KPhotoAlbum's demo album
  (``kphotoalbum``, GPL-2+): people, pets, canyons, beaches, a pool; 800 px, consumer cameras.

:data:`TRAINING_SETS` (the last three, 60 photographs) are what training may read. No set holds
the sample photographs of scikit-image, scikit-learn or matplotlib, nor any CASIA image: those
are kept for independent checks and must not be trained or tuned on.

:func:`collect` copies a set's photographs (bytes unchanged) with a ``LICENSES.txt`` (each
package's Debian copyright file, which names the licence of every file). Packages are read from
``/`` when installed, else fetched with ``apt-get download`` and unpacked with ``dpkg -x`` (nothing
is installed). :func:`training_photos` is what ``fastiml demo`` calls (``demo.photos``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from .datasets import read_image

__all__ = ["PHOTO_SETS", "TRAINING_SETS", "collect", "training_photos", "central_crop",
           "PhotoFetchError"]


class PhotoFetchError(RuntimeError):
    """The photographs could not be fetched (no apt-get, no network to the Debian archive)."""


_OPENCV = "usr/share/doc/opencv-doc/examples/"
_PLASMA = "usr/share/wallpapers/{}/contents/images/"
_MATE = "usr/share/backgrounds/mate/nature/"

#: set name -> [(Debian package, path inside the package), ...]
PHOTO_SETS: Dict[str, List[Tuple[str, str]]] = {
    "opencv": [("opencv-doc", _OPENCV + p) for p in (
        "data/aero1.jpg", "data/aero3.jpg", "data/aloeL.jpg", "data/apple.jpg", "data/baboon.jpg",
        "data/basketball1.png", "data/board.jpg", "data/box_in_scene.png", "data/building.jpg",
        "data/butterfly.jpg", "data/chicky_512.png", "data/fruits.jpg", "data/graf1.png",
        "data/home.jpg", "data/leuvenA.jpg", "data/licenseplate_motion.jpg", "data/messi5.jpg",
        "data/orange.jpg", "data/rubberwhale1.png", "data/squirrel_cls.jpg", "data/stuff.jpg",
        "hfs/data/000.jpg", "hfs/data/001.jpg", "hfs/data/002.jpg",
        "alphamat/input_images/plant.jpg", "dnn_superres/butterfly.png", "reg/home.png",
        "text/scenetext01.jpg", "text/scenetext02.jpg", "text/scenetext03.jpg",
        "text/scenetext04.jpg", "text/scenetext05.jpg", "text/scenetext06.jpg")],
    "wallpapers": [("mate-backgrounds", _MATE + p) for p in (
        "Aqua.jpg", "Blinds.jpg", "Dune.jpg", "FreshFlower.jpg", "Garden.jpg", "GreenMeadow.jpg",
        "LadyBird.jpg", "RainDrops.jpg", "Storm.jpg", "TwoWings.jpg", "Wood.jpg",
        "YellowFlower.jpg")] + [("plasma-workspace-wallpapers", _PLASMA.format(n) + f) for n, f in (
            ("BytheWater", "1920x1080.jpg"), ("ColdRipple", "1920x1080.jpg"),
            ("ColorfulCups", "2560x1600.jpg"), ("EveningGlow", "1920x1080.jpg"),
            ("FallenLeaf", "1920x1080.jpg"), ("Grey", "1920x1080.jpg"), ("Kite", "1920x1080.jpg"),
            ("OneStandsOut", "1920x1080.jpg"), ("Path", "1920x1080.jpg"),
            ("summer_1am", "1920x1080.jpg"))],
}
_LOMIRI = "usr/share/backgrounds/"
PHOTO_SETS["lomiri"] = [("lomiri-wallpapers-16.04", _LOMIRI + p) for p in (
    "Bridge_by_Sander_Klootwijk.jpg", "Dragonfly_by_Bolly.jpg", "Picture_0B_by_freespace.jpg",
    "Picture_1A_by_freespace.jpg", "Wine_by_Jakkub_Mede.jpg", "aitzgorri_by_Aitzol_Berasategi.jpg",
    "analogpattern_by_Peter_Nerlich.jpg", "free_by_Peter_Nerlich.jpg",
    "friends_by_Aitzol_Berasategi.jpg", "greentock_by_Peter_Nerlich.jpg",
    "life_by_Aitzol_Berasategi.jpg", "picosdeeuropa_by_Aitzol_Berasategi.jpg",
    "seeding_by_Clements_Engelhardt.jpg", "sunset_by_Aitzol_Berasategi.jpg")] + [
    ("lomiri-wallpapers-20.04", _LOMIRI + "Kleiber_by_Lukas_Baubkus.jpg")]
PHOTO_SETS["kphotoalbum"] = [("kphotoalbum", "usr/share/kphotoalbum/demo/" + p) for p in (
    "anne_helene.jpg", "bar55.jpg", "bar55_2.jpg", "blackie.jpg", "cold_water.jpg", "donna.jpg",
    "donna_2.jpg", "grand_canyon_1.jpg", "grand_canyon_2.jpg", "grand_canyon_3.jpg", "jesper.jpg",
    "jesper_2.jpg", "new_wave_1.jpg", "new_wave_2.jpg", "pool.jpg", "pool_2.jpg", "skagen.jpg",
    "skagen_2.jpg", "snow.jpg", "spiff.jpg", "spiff_2.jpg", "sunset.jpg", "wayne.jpg")]
#: the sets training may read; ``opencv`` is for evaluation only
TRAINING_SETS = ("wallpapers", "lomiri", "kphotoalbum")
def _package_root(package: str, files: Sequence[str], cache: Path) -> Path:
    """A folder under which ``files`` of ``package`` lie: ``/`` when installed, else the package
    fetched with ``apt-get download`` and unpacked with ``dpkg -x`` under ``cache``."""
    if all(os.path.isfile("/" + f) for f in files):
        return Path("/")
    root = cache / package
    if not all((root / f).is_file() for f in files):
        cache.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(["apt-get", "download", package], cwd=cache, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", b"") or b""
            raise PhotoFetchError(f"apt-get download {package} failed: "
                                  f"{detail.decode(errors='replace').strip() or e}") from None
        deb = sorted(cache.glob(f"{package}_*.deb"))[-1]
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise PhotoFetchError(f"{package} lacks {missing[0]} (another package version?)")
    return root


def collect(name: str, out_dir: Path, cache: Path) -> Path:
    """Copy the photographs of set ``name`` into ``out_dir`` (bytes unchanged) and their
    licences into ``out_dir/../LICENSES.txt``; returns ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    by_package: Dict[str, List[str]] = {}
    for package, path in PHOTO_SETS[name]:
        by_package.setdefault(package, []).append(path)
    licences = []
    for package, files in by_package.items():
        root = _package_root(package, files + [_copyright(package)], cache)
        licences.append(f"# Debian package {package}: {len(files)} photograph(s)\n"
                        + "".join(f"#   {Path(f).name}\n" for f in files)
                        + (root / _copyright(package)).read_text(errors="replace"))
        for f in files:
            # names stay unique across folders (two butterflies, two homes)
            parts = Path(f).parts
            stem = parts[-1] if package != "plasma-workspace-wallpapers" else parts[-4] + Path(f).suffix
            if package == "opencv-doc" and parts[-2] != "data":
                stem = f"{parts[-2]}_{parts[-1]}"
            shutil.copyfile(root / f, out_dir / stem)
    (out_dir.parent / "LICENSES.txt").write_text("\n\n".join(licences))
    return out_dir


def _copyright(package: str) -> str:
    """Where a Debian package keeps its copyright file (the licence of every file it ships)."""
    return f"usr/share/doc/{package}/copyright"




#: the central square of each training photograph the demo keeps (native pixels, as PNG)
KEEP = 1024


def central_crop(img: np.ndarray, keep: int) -> np.ndarray:
    """The central ``keep`` x ``keep`` square of an image (less along a shorter side): native
    pixels, so the camera traces are untouched."""
    h, w = img.shape[:2]
    y, x = max(0, (h - keep) // 2), max(0, (w - keep) // 2)
    return np.ascontiguousarray(img[y:y + keep, x:x + keep])


def _cache_root() -> Path:
    return Path(os.environ.get("FASTIML_CACHE") or Path.home() / ".cache" / "fastiml")


def training_photos(root: Optional[Path] = None, cache: Optional[Path] = None, log=print) -> Path:
    """The 60 training photographs as one folder of central crops (at most KEEP x KEEP native
    pixels, PNG: lossless, and cheap to decode when forging thousands of crops), fetched once into
    ``root`` (default ``$FASTIML_CACHE`` or ``~/.cache/fastiml``) + ``/photos``; returns it.
    ``cache``: where packages are unpacked (default: a temporary folder, removed after)."""
    root = Path(root or _cache_root()) / "photos"
    flat = root / "train"
    expected = sum(len(PHOTO_SETS[s]) for s in TRAINING_SETS)
    if flat.is_dir() and len(list(flat.glob("*.png"))) == expected:
        return flat
    own_cache = cache is None
    cache = Path(tempfile.mkdtemp(prefix="fastiml_debs_")) if own_cache else Path(cache)
    try:
        flat.mkdir(parents=True, exist_ok=True)
        for name in TRAINING_SETS:
            images = collect(name, root / name / "images", cache)
            for f in sorted(images.iterdir()):
                crop = central_crop(read_image(f), KEEP)
                cv2.imwrite(str(flat / f"{name}_{f.stem}.png"), crop[..., ::-1])
        log(f"[data] {expected} training photographs from Debian packages in {root} "
            f"(licences: {root}/<set>/LICENSES.txt)")
    finally:
        if own_cache:
            shutil.rmtree(cache, ignore_errors=True)
    return flat
