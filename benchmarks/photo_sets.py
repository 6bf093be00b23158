"""Photo collections from Debian packages (``fastiml.data.photos``: which photographs, which
licences), and the own-code forgery set of the evaluation collection.

    python -m benchmarks.photo_sets --out photos          # every set, forgeries of opencv
    python -m benchmarks.photo_sets --out photos --sets opencv

writes ``photos/<set>/images/`` (the photographs, bytes unchanged), ``photos/<set>/LICENSES.txt``
and, for the evaluation set ``opencv``, ``photos/opencv/forgeries/list.json``: splice /
copy-move / inpaint forgeries (``fastiml.data.synthesize`` with ``--source``, the code that makes
the training data) at 256, 320, 384 and 448 px plus authentic crops, each size its own seed;
``fastiml eval --data photos/opencv/forgeries/list.json`` scores a checkpoint on them.
``benchmarks/independent_sets.py`` forges the same photographs with other code. The training
sets (``TRAINING_SETS``: wallpapers, lomiri, kphotoalbum) are what ``fastiml pretrain-trace`` and
``data.source_dir`` read; they are never evaluated on.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence

from fastiml.data.photos import PHOTO_SETS, TRAINING_SETS, collect  # noqa: F401 (re-exported)

#: forgery sets: set name -> sizes; each size gets its own synthesize() call and seed
FORGERY_SIZES = (256, 320, 384, 448)
IMAGES_PER_SIZE = 30


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
