"""Command line of the CRM Refiner: refine one image/mask pair or a BIG-layout folder.

`python -m jax_refine.cli` (and `python -m jax_refine.refine`, kept for compatibility).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jax_refine.refine import DEFAULT_SCALES, Refiner

# ----------------------------------------------------------------------------- command line


def read_image(path: str | Path) -> np.ndarray:
    """An image file -> uint8 RGB/RGBA/grayscale array; unreadable files raise ValueError."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in ("RGB", "RGBA", "L"):
                im = im.convert("RGB")
            return np.asarray(im).copy()
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file -> uint8 [H, W] (converted to 8-bit grayscale, as the reference does)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L")).copy()
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read mask {path}: {err}") from err


def write_png(path: str | Path, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(array).save(path)


def _find(directory: Path, stem: str) -> Path | None:
    matches = sorted(p for p in directory.glob(f"{stem}.*") if p.is_file())
    return matches[0] if matches else None


def _scores(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, float]:
    """(intersection, union, mBA) of one prediction: the reference protocol's per-image terms."""
    from jax_refine import metrics

    return (*metrics.intersection_union(pred, gt), metrics.boundary_accuracy(pred, gt))


def _summary(scores: list[tuple[int, int, float]]) -> tuple[float, float]:
    """Dataset IoU (sum of intersections / sum of unions) and mean mBA (NaNs skipped)."""
    inter, union = sum(s[0] for s in scores), sum(s[1] for s in scores)
    mbas = [s[2] for s in scores if not np.isnan(s[2])]
    return (inter / union if union else 1.0), (float(np.mean(mbas)) if mbas else float("nan"))


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Refine one pair or a BIG-layout folder; returns per-image records (and writes PNGs)."""
    refiner = Refiner.from_checkpoint(args.checkpoint)
    scales = tuple(args.scales)
    jobs: list[tuple[str, Path, Path, Path | None, Path]] = []
    if args.input_dir:
        in_dir, out_dir = Path(args.input_dir), Path(args.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for image_path in sorted(in_dir.glob("*_im.*")):
            name = image_path.name[: image_path.name.rindex("_im.")]
            seg = _find(in_dir, f"{name}_seg")
            if seg is None:
                raise ValueError(f"no coarse mask {name}_seg.* for {image_path}")
            jobs.append((name, image_path, seg, _find(in_dir, f"{name}_gt"),
                         out_dir / f"{name}_refined.png"))
        if not jobs:
            raise ValueError(f"no *_im.* images in {in_dir}")
    else:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        gt = Path(args.gt) if args.gt else None
        jobs.append((Path(args.image).stem, Path(args.image), Path(args.mask), gt, out))

    from tqdm import tqdm

    records = []
    for name, image_path, seg_path, gt_path, out_path in tqdm(
        jobs, desc="refine", disable=len(jobs) == 1, file=sys.stderr
    ):
        image, coarse = read_image(image_path), read_mask(seg_path)
        prob = refiner.refine(image, coarse, scales)
        refined = prob > 0.5
        write_png(out_path, refined.astype(np.uint8) * 255)
        if args.save_prob:
            prob_path = out_path.with_name(out_path.stem + "_prob.png")
            write_png(prob_path, np.round(prob * 255).astype(np.uint8))
        record: dict[str, Any] = {"name": name, "output": str(out_path)}
        if gt_path is not None:
            gt = read_mask(gt_path) > 128
            record["before"] = _scores(coarse > 128, gt)
            record["after"] = _scores(refined, gt)
            (iou_0, mba_0), (iou_1, mba_1) = (_summary([record[k]]) for k in ("before", "after"))
            print(f"{name}: IoU {iou_0:.4f} -> {iou_1:.4f}, mBA {mba_0:.4f} -> {mba_1:.4f}")
        records.append(record)
    scored = [r for r in records if "after" in r]
    if len(scored) > 1:
        (iou_0, mba_0), (iou_1, mba_1) = (
            _summary([r[k] for r in scored]) for k in ("before", "after")
        )
        print(f"{len(scored)} images (dataset IoU, mean mBA): IoU {iou_0:.4f} -> {iou_1:.4f}, "
              f"mBA {mba_0:.4f} -> {mba_1:.4f}")
    return records


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jax_refine.cli",
        description="Refine coarse masks with CRM (single pair or a BIG-layout folder).",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory")
    parser.add_argument("--image", help="input image (single-pair mode)")
    parser.add_argument("--mask", help="coarse mask (single-pair mode)")
    parser.add_argument("--out", help="output mask PNG (single-pair mode)")
    parser.add_argument("--gt", help="ground-truth mask: print IoU/mBA before and after")
    parser.add_argument("--input-dir", help="folder with NAME_im.*, NAME_seg.* [NAME_gt.*]")
    parser.add_argument("--output-dir", help="where NAME_refined.png files are written")
    parser.add_argument("--save-prob", action="store_true",
                        help="also write 8-bit probability PNGs (*_prob.png)")
    parser.add_argument("--scales", type=float, nargs="+", default=list(DEFAULT_SCALES),
                        help="multi-resolution schedule (default: 0.125 0.25 0.5 1.0)")
    args = parser.parse_args(argv)
    single = [args.image, args.mask, args.out]
    if args.input_dir or args.output_dir:
        if not (args.input_dir and args.output_dir) or any(single):
            parser.error("folder mode needs --input-dir and --output-dir (and no --image/"
                         "--mask/--out)")
    elif not all(single):
        parser.error("give --image, --mask and --out, or --input-dir and --output-dir")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        run(parse_args(argv))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
