"""CRM evaluation at full resolution with the multi-resolution Refiner.

Protocol of the reference (`test.py`, `eval_post*.py`): the coarse mask goes to the model as
stored (8-bit, not binarised); each scale's probability p is scored as the reference scores
its saved 8-bit PNG, foreground = floor(255 p) > 128 (`jax_refine.io.binarize_probability`);
ground truth and coarse masks are binarised with > 128 (`io.binarize_mask`; synthetic GT is
exact); IoU is dataset-level (sum of intersections / sum of unions over all images); mBA is
the mean of the per-image mBA (images whose GT has no boundary are skipped, `np.nanmean`); a
coarse mask whose 8-bit sum is < 32 * 32 (fewer than ~4 foreground pixels) is passed through
unrefined. Both the coarse and the refined masks are scored. One deliberate difference: the
reference's pass-through applies only to square images (its `eval_post*.py` compares the
mask height with the image width and otherwise scores the model's output); here it applies
to every image, as intended there.

Sources: a BIG-layout folder (name_im.jpg, name_gt.png, name_seg.png) or held-out synthetic
scenes (seeds 0..n-1, never used in training, see `jax_refine.data.pipeline`) with coarse
masks of two kinds:
* 'lowres': `coarse_from_lowres(gt, 16)` at full resolution;
* 'perturb': `perturb_mask` at 512 px (IoU with the GT stopped below 0.85), upsampled
  bilinearly and thresholded at 0.5 — at 2048 px perturb_mask's 250 rounds of small
  rectangles barely change the mask, so the degradation is made at the resolution the
  reference used.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import jax
import numpy as np

from jax_refine import metrics
from jax_refine.data.perturb import coarse_from_lowres, perturb_mask
from jax_refine.data.synthetic import make_scene
from jax_refine.io import (
    binarize_mask,
    binarize_probability,
    files_by_stem,
    read_image,
    read_mask,
)
from jax_refine.train.distributed_eval import (
    LazySequence,
    global_index,
    in_item_order,
    process_items,
)

PASS_THROUGH_SUM = 32 * 32  # in 0..255 units


@dataclasses.dataclass
class Sample:
    name: str
    image: np.ndarray  # uint8 [H, W, 3]
    coarse: np.ndarray  # uint8 [H, W] 0..255 as stored (255 = foreground): the model input
    gt: np.ndarray  # bool [H, W], binarised


def big_folder(folder: str | Path, limit: int = 0) -> LazySequence[Sample]:
    """Samples of a BIG-layout folder (name_im.*, name_gt.*, name_seg.*), in name order,
    the first `limit` (0 = all); each is read when accessed."""
    from jax_refine.refine import image_to_rgb

    folder = Path(folder)
    by_stem = files_by_stem(folder)  # literal names: "a[1]_im.png" pairs with "a[1]_seg.png"
    names = [stem[: -len("_im")] for stem in by_stem if stem.endswith("_im")]
    if not names:
        raise ValueError(f"no *_im.* images in {folder}")
    if limit:
        names = names[:limit]

    def load(k: int) -> Sample:
        name = names[k]
        path = by_stem[f"{name}_im"][0]
        found = {}
        for tag in ("gt", "seg"):
            matches = by_stem.get(f"{name}_{tag}")
            if not matches:
                raise ValueError(f"{path}: missing {name}_{tag}.* in {folder}")
            found[tag] = read_mask(matches[0])
        image = image_to_rgb(read_image(path))
        if image.shape[:2] != found["gt"].shape or found["gt"].shape != found["seg"].shape:
            raise ValueError(f"{path}: image {image.shape[:2]}, gt {found['gt'].shape} and "
                             f"seg {found['seg'].shape} sizes differ")
        return Sample(name, image, found["seg"], binarize_mask(found["gt"]))

    return LazySequence(len(names), load)


def synthetic_coarse(gt: np.ndarray, kind: str, seed: int) -> np.ndarray:
    """A coarse mask of `kind` ('perturb' or 'lowres') for a synthetic GT (see module doc)."""
    rng = np.random.default_rng([seed, 7])
    if kind == "lowres":
        return coarse_from_lowres(gt, 16, rng)
    if kind == "perturb":
        h, w = gt.shape
        scale = min(1.0, 512 / max(h, w))
        small = cv2.resize(gt.astype(np.float32), (round(w * scale), round(h * scale)),
                           interpolation=cv2.INTER_AREA) > 0.5
        coarse = perturb_mask(small.astype(np.uint8), 0.85, rng, iou_against="gt")
        coarse = coarse.astype(np.float32)
        return (cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR) > 0.5).astype(
            np.uint8)
    raise ValueError(f"unknown coarse kind {kind!r}; expected 'perturb' or 'lowres'")


def synthetic_scenes(num: int, size: int, kind: str) -> LazySequence[Sample]:
    """Held-out synthetic scenes 0..num-1 at size x size with `kind` coarse masks (each
    rendered when accessed)."""
    def load(seed: int) -> Sample:
        image, label = make_scene(seed, size, size)
        gt = (label > 0).astype(np.uint8)
        coarse = synthetic_coarse(gt, kind, seed) * np.uint8(255)
        return Sample(f"scene{seed}_{kind}", image, coarse, gt.astype(bool))

    return LazySequence(num, load)


def _predictions(refiner: Any, samples: Iterator[Sample], scales: tuple[float, ...],
                 per_step: bool, chunk: int) -> Iterator[tuple[Sample, list[np.ndarray]]]:
    """(sample, bool mask after each scored step): every scale's with `per_step`
    (`Refiner.refine_steps`, one image at a time), else only the last one, `chunk` images per
    `Refiner.refine_batch` call (grouped by shape bucket, sharded over the local devices).
    Probabilities are binarised as the reference scores them (`io.binarize_probability`).
    A passed-through sample (8-bit coarse sum < PASS_THROUGH_SUM) keeps its coarse mask."""
    samples = iter(samples)
    while batch := list(itertools.islice(samples, 1 if per_step else chunk)):
        keep = [i for i, s in enumerate(batch)
                if int(s.coarse.sum(dtype=np.int64)) >= PASS_THROUGH_SUM]
        probs: dict[int, list[np.ndarray]] = {}
        if per_step:
            probs = {i: refiner.refine_steps(batch[i].image, batch[i].coarse, scales)
                     for i in keep}
        elif keep:
            finals = refiner.refine_batch([batch[i].image for i in keep],
                                          [batch[i].coarse for i in keep], scales)
            probs = {i: [p] for i, p in zip(keep, finals, strict=True)}
        for i, s in enumerate(batch):
            if i in probs:
                yield s, [binarize_probability(p) for p in probs[i]]
            else:
                yield s, [binarize_mask(s.coarse)] * (len(scales) if per_step else 1)


def evaluate_samples(
    refiner: Any,
    samples: Iterator[Sample],
    scales: Sequence[float],
    *,
    out_dir: str | Path | None = None,
    num_pngs: int = 4,
    per_step: bool = True,
    chunk: int = 8,
) -> dict[str, Any]:
    """Score coarse and refined masks of `samples`; optionally write side-by-side PNGs.

    With `per_step`, every step of the schedule is scored too: 'steps' holds the IoU / mBA
    of the mask after each scale (floor(255 p) > 128 of `Refiner.refine_steps`, as the
    reference scores each scale's PNG; the last is 'refined'),
    which shows what each step of the cascade adds or costs. Without it (the training loop's
    evaluation), `chunk` samples at a time go through `Refiner.refine_batch` (batched and
    sharded over the devices) and 'steps' holds the last scale only. A passed-through sample
    counts as its coarse mask at every step.

    In a multi-process run, `samples` are this process's items of the set
    (`distributed_eval.process_items`); the scores are the whole set's, the same on every
    process and bitwise those of one process scoring every item. PNGs: the items numbered
    below `num_pngs`, each written by its process; 'pngs' lists this process's.
    Returns {'num_images', 'coarse': {'iou', 'mba'}, 'refined': {...},
    'steps': [{'scale', 'iou', 'mba'}, ...], 'pngs': [...]}.
    """
    scales = tuple(scales)
    scored = scales if per_step else scales[-1:]
    keys = ("coarse", *[f"step{k}" for k in range(len(scored))])
    rows = []  # per sample and key: intersection, union, mBA
    pngs = []
    for local, (sample, steps) in enumerate(_predictions(refiner, samples, scales, per_step,
                                                         chunk)):
        rows.append([(*metrics.intersection_union(pred, sample.gt),
                      metrics.boundary_accuracy(pred, sample.gt))
                     for pred in (binarize_mask(sample.coarse), *steps)])
        if out_dir is not None and global_index(local) < num_pngs:
            pngs.append(str(_side_by_side(Path(out_dir), sample, steps[-1])))
    table = in_item_order(np.asarray(rows, np.float64).reshape(-1, len(keys), 3))
    if len(table) == 0:
        raise ValueError("no evaluation samples")

    def scores(key: str) -> dict[str, float]:
        column = table[:, keys.index(key)]
        inter, union = column[:, :2].astype(np.int64).sum(axis=0)
        mba = column[:, 2]
        return {"iou": float(inter / union) if union else 1.0,
                "mba": float("nan") if np.all(np.isnan(mba)) else float(np.nanmean(mba))}

    return {"num_images": len(table), "pngs": pngs, "coarse": scores("coarse"),
            "refined": scores(keys[-1]),
            "steps": [{"scale": s, **scores(k)} for s, k in zip(scored, keys[1:], strict=True)]}


def _side_by_side(out_dir: Path, sample: Sample, refined: np.ndarray, side: int = 512) -> Path:
    """image | coarse | refined | GT, each resized to `side` px high."""
    out_dir.mkdir(parents=True, exist_ok=True)
    h, w = sample.gt.shape
    size = (max(1, round(w * side / h)), side)
    panels = [cv2.resize(sample.image, size, interpolation=cv2.INTER_AREA)]
    for m in (binarize_mask(sample.coarse), refined, sample.gt):
        gray = cv2.resize(m.astype(np.uint8) * 255, size, interpolation=cv2.INTER_AREA)
        panels.append(np.repeat(gray[..., None], 3, axis=2))
    path = out_dir / f"{sample.name}.png"
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(panels, axis=1), cv2.COLOR_RGB2BGR))
    return path


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """| set | n | coarse IoU | refined IoU | coarse mBA | refined mBA | (percent)."""
    lines = ["| set | images | coarse IoU | refined IoU | coarse mBA | refined mBA |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['num_images']} | {100 * r['coarse']['iou']:.2f} | "
            f"{100 * r['refined']['iou']:.2f} | {100 * r['coarse']['mba']:.2f} | "
            f"{100 * r['refined']['mba']:.2f} |"
        )
    return "\n".join(lines)


def steps_table(results: dict[str, dict[str, Any]]) -> str:
    """| set | after scale | IoU | mBA | (percent): the mask after each step of the cascade."""
    lines = ["| set | after scale | IoU | mBA |", "|---|---|---|---|"]
    for name, r in results.items():
        for step in r["steps"]:
            lines.append(f"| {name} | {step['scale']:g} | {100 * step['iou']:.2f} | "
                         f"{100 * step['mba']:.2f} |")
    return "\n".join(lines)


def eval_kwargs(eval_config: Any) -> dict[str, Any]:
    """`evaluate_refiner` keyword arguments of a config's `eval` block (evaluate.py, the
    training loop's `eval_every`)."""
    e = eval_config
    return {"folder": e.folder, "scales": tuple(e.scales), "num_images": e.num_images,
            "num_pngs": e.num_pngs, "synthetic_size": e.get("synthetic_size", 2048)}


def evaluate_refiner(
    refiner: Any,
    out_dir: str | Path,
    *,
    folder: str = "",
    scales: Sequence[float] = (0.125, 0.25, 0.5, 1.0),
    num_images: int = 0,
    num_pngs: int = 4,
    synthetic_size: int = 2048,
    synthetic_kinds: Sequence[str] = ("perturb", "lowres"),
    per_step: bool = True,
) -> dict[str, Any]:
    """Evaluate a Refiner on a BIG folder (if given) or held-out synthetic scenes
    (`evaluate_samples`; `per_step=False` is the batched evaluation of the training loop).
    In a multi-process run each process scores its share of every set (item i on process
    i % P) and all return the whole sets' metrics.

    Writes out_dir/metrics.json (atomically, process 0) and PNGs under out_dir/pngs;
    returns the metrics by set.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    if folder:
        results[Path(folder).name] = evaluate_samples(
            refiner, process_items(big_folder(folder, num_images)), scales,
            out_dir=out_dir / "pngs", num_pngs=num_pngs, per_step=per_step)
    else:
        n = num_images or 4
        for kind in synthetic_kinds:
            results[f"synthetic{synthetic_size}_{kind}"] = evaluate_samples(
                refiner, process_items(synthetic_scenes(n, synthetic_size, kind)), scales,
                out_dir=out_dir / "pngs", num_pngs=max(1, num_pngs // len(synthetic_kinds)),
                per_step=per_step)
    if jax.process_index() == 0:
        write_json(out_dir / "metrics.json", results)
    return results


def write_json(path: Path, value: Any) -> None:
    """Write `value` as JSON to `path` through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.replace(path)


def evaluate(checkpoint: str | Path, out_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """`evaluate_refiner` of the Refiner checkpoint directory `checkpoint`."""
    from jax_refine.refine import Refiner

    return evaluate_refiner(Refiner.from_checkpoint(checkpoint), out_dir, **kwargs)
