"""DeepGlobe land cover: RGB masks -> label maps of the reference's 7 classes.

DeepGlobe ships `ID_sat.jpg` images with `ID_mask.png` colour masks. The PNA reference
(`pna/datasets/register_deep_globe.py`, `configs/deep_globe/*.yaml`) trains 7 classes, in
the order of its metadata: 0 unknown (0, 0, 0), 1 urban (0, 255, 255), 2 agriculture
(255, 255, 0), 3 rangeland (255, 0, 255), 4 forest (0, 255, 0), 5 water (0, 0, 255),
6 barren (255, 255, 255). The reference's dict names its first two entries 'unknown' (a
duplicate key: urban's name is lost, its colour stays second), and the reference does not
ship its label conversion; this order is the one its metadata lists and the one of the
common GLNet DeepGlobe loader (`RGB_mapping_to_class`: unknown 0, urban 1, ... barren 6).
The paper's mIoU is over the 6 land-cover classes 1..6 (`config.eval.mean_classes` in
configs/pna_deepglobe.py). Not reproduced: the reference's SemSegEvaluator takes its class
count from the same metadata (6 names after the duplicate key), so it would score labels 0..5
and treat barren (6), and pixels predicted as barren, like the ignore label.

Masks are binarised at 128 per channel first, as the DeepGlobe challenge instructs (the
PNGs are not pure colours everywhere; GLNet compares exact colours instead); the one colour
outside the table, (255, 0, 0), becomes the ignore label 255.

    python -m jax_refine.data.deepglobe /data/deepglobe/train /data/deepglobe/train_labels

writes `ID_sat.png` label maps (the image's stem, so a `semantic_folder` build pairs them
with `ID_sat.jpg`), each atomically.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

CLASS_NAMES = ("unknown", "urban", "agriculture", "rangeland", "forest", "water", "barren")
COLOURS = np.array([(0, 0, 0), (0, 255, 255), (255, 255, 0), (255, 0, 255), (0, 255, 0),
                    (0, 0, 255), (255, 255, 255)], np.uint8)
LAND_COVER_CLASSES = tuple(range(1, len(CLASS_NAMES)))  # the paper's mIoU classes
IGNORE_LABEL = 255


def rgb_to_labels(mask: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] RGB mask -> uint8 [H, W] class ids 0..6 (255 = unknown colour)."""
    mask = np.asarray(mask)
    if mask.ndim != 3 or mask.shape[-1] != 3:
        raise ValueError(f"expected an RGB mask [H, W, 3], got shape {mask.shape}")
    bits = (mask >= 128).astype(np.int64)
    code = bits[..., 0] * 4 + bits[..., 1] * 2 + bits[..., 2]
    table = np.full(8, IGNORE_LABEL, np.uint8)
    colour_codes = (COLOURS >= 128).astype(np.int64) @ np.array([4, 2, 1])
    table[colour_codes] = np.arange(len(COLOURS), dtype=np.uint8)
    return table[code]


def convert_folder(src: str | Path, dst: str | Path) -> list[Path]:
    """Every `ID_mask.png` of `src` -> `dst/ID_sat.png` label map; returns the written paths."""
    from jax_refine.io import read_image, write_image

    src, dst = Path(src), Path(dst)
    masks = sorted(p for p in src.iterdir() if p.name.endswith("_mask.png"))
    if not masks:
        raise ValueError(f"no *_mask.png files in {src}")
    dst.mkdir(parents=True, exist_ok=True)
    written = []
    for path in masks:
        mask = read_image(path)
        if mask.ndim != 3 or mask.shape[-1] < 3:
            raise ValueError(f"{path}: expected an RGB mask, got shape {mask.shape}")
        out = dst / f"{path.name[: -len('_mask.png')]}_sat.png"
        write_image(out, rgb_to_labels(mask[..., :3]))
        written.append(out)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jax_refine.data.deepglobe",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="folder of DeepGlobe ID_mask.png colour masks")
    parser.add_argument("dst", help="output folder of ID_sat.png label maps")
    args = parser.parse_args(argv)
    try:
        written = convert_folder(args.src, args.dst)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(written)} label maps to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
