"""Real photographs from Debian packages, and forgery sets made from them.

No image data set can be downloaded where fastiml is developed, but the Debian archive is
reachable through apt. Two free collections, chosen photograph by photograph (drawings, renders,
logos, maps and screenshots left out):

- ``opencv``: 33 photographs among OpenCV's sample images (package ``opencv-doc``, BSD /
  Apache-2.0): aerial views, streets, buildings, fruit, animals, people, scene text; 256 to
  1280 px, many cameras and JPEG histories. **The evaluation collection.**
- ``wallpapers``: 22 photographic desktop backgrounds (``mate-backgrounds``' nature folder and
  the photographs among ``plasma-workspace-wallpapers``; GPL / CC-BY-SA): flowers, leaves,
  landscapes, water, architecture; 1280 to 2560 px. **A training source** (``data.source_dir``),
  never evaluated on.
- ``lomiri``: 15 photographs among Ubuntu Touch's wallpapers (``lomiri-wallpapers-16.04`` and
  ``-20.04``; CC-BY / CC-BY-SA / CC0, one photographer each): landscapes, plants, still lifes,
  interiors; 2056 to 6028 px, each from its own camera. **A training source.**
- ``kphotoalbum``: 23 holiday and family snapshots of KPhotoAlbum's demo album
  (``kphotoalbum``, GPL-2+): people, pets, canyons, beaches, a pool; 800 px, consumer cameras.
  **A training source.**

``TRAINING_SETS`` names the training sources; the camera-trace stage (``fastiml pretrain-trace``)
and ``data.source_dir`` read them. No set holds the sample photographs of scikit-image, scikit-learn or matplotlib, which are kept
for an independent check and must not be trained or tuned on.

    python -m benchmarks.photo_sets --out photos          # both sets, forgeries of opencv
    python -m benchmarks.photo_sets --out photos --sets opencv

writes ``photos/<set>/images/`` (the photographs, bytes unchanged), ``photos/<set>/LICENSES.txt``
(each photograph's package and that package's Debian copyright file, which names the licence of
every file) and, for the evaluation set,
``photos/<set>/forgeries/list.json``: splice / copy-move / inpaint forgeries (``fastiml.data.
synthesize`` with ``--source``) at 256, 320, 384 and 448 px plus authentic crops, each size its
own seed; ``fastiml eval --data photos/opencv/forgeries/list.json`` scores a checkpoint on them.
The packages are read from ``/`` when installed, else fetched with ``apt-get download`` and
unpacked with ``dpkg -x`` into a temporary folder (nothing is installed).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

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
#: forgery sets: set name -> sizes; each size gets its own synthesize() call and seed
FORGERY_SIZES = (256, 320, 384, 448)
IMAGES_PER_SIZE = 30


def _package_root(package: str, files: Sequence[str], cache: Path) -> Path:
    """A folder under which ``files`` of ``package`` lie: ``/`` when installed, else the package
    fetched with ``apt-get download`` and unpacked with ``dpkg -x`` under ``cache``."""
    if all(os.path.isfile("/" + f) for f in files):
        return Path("/")
    root = cache / package
    if not all((root / f).is_file() for f in files):
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", package], cwd=cache, check=True,
                       stdout=subprocess.DEVNULL)
        deb = sorted(cache.glob(f"{package}_*.deb"))[-1]
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise SystemExit(f"photo_sets: {package} lacks {missing[0]} (another package version?)")
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


def forgeries(source: Path, out_dir: Path, sizes: Sequence[int] = FORGERY_SIZES,
              n_per_size: int = IMAGES_PER_SIZE, seed: int = 0,
              authentic_fraction: float = 0.17) -> Dict:
    """Forgeries from the photographs in ``source``: one synthesize() per size (seed + k), then
    one ``list.json`` and ``meta.json`` for all of them under ``out_dir``."""
    from fastiml.data import synthesize

    pairs, meta, counts = [], [], {}
    for k, size in enumerate(sizes):
        sub = out_dir / f"s{size}"
        r = synthesize(sub, n_per_size, size=size, seed=seed + k, source_dir=source,
                       authentic_fraction=authentic_fraction)
        for it in r["items"]:
            image = f"s{size}/{it['image']}"
            mask = it["mask"] if it["mask"] == "Negative" else f"s{size}/{it['mask']}"
            pairs.append([image, mask])
            meta.append(dict(it, image=image, mask=mask))
        for kind, n in r["counts"].items():
            counts[kind] = counts.get(kind, 0) + n
    with open(out_dir / "list.json", "w") as f:
        json.dump(pairs, f, indent=0)
    with open(out_dir / "meta.json", "w") as f:
        json.dump(meta, f, indent=0)
    return {"json": str(out_dir / "list.json"), "counts": counts, "n_images": len(pairs)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--sets", nargs="+", default=sorted(PHOTO_SETS), choices=sorted(PHOTO_SETS))
    p.add_argument("--forge", nargs="*", default=["opencv"], choices=sorted(PHOTO_SETS),
                   help="sets to make forgeries of (default: opencv, the evaluation set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", help="where fetched packages are unpacked (default: a temp folder)")
    args = p.parse_args(argv)
    out = Path(args.out)
    cache = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="fastiml_debs_"))
    try:
        for name in args.sets:
            images = collect(name, out / name / "images", cache)
            print(f"{name}: {len(PHOTO_SETS[name])} photographs in {images}")
            if name in args.forge:
                r = forgeries(images, out / name / "forgeries", seed=args.seed)
                print(f"{name}: {r['n_images']} forgery-set images {r['counts']} -> {r['json']}")
    finally:
        if not args.cache:
            shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
