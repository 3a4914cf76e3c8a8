"""PNA evaluation: the mIoU of every stage P0..P4 (the effect of the paper's Table 1).

Protocol: full images, one at a time, no resizing. Each stage's logits (at its own stride of
the padded input) are upsampled bilinearly (align_corners=False) to the padded input size,
cropped to the image (the reference's `sem_seg_postprocess`), and their argmax is scored
against the label map with a streaming `ConfusionMatrix` (label 255 ignored); the mIoU is
over the classes present in the labels or the predictions of the whole set.

Sources: a `semantic_folder` split (`config.eval.builder_kwargs`: images, labels,
class_names, split), or, when `config.dataset.name` is 'synthetic', held-out multi-class
synthetic scenes (seeds 0..n-1, below `TRAIN_SCENE_SEED_OFFSET`, so never trained on).
Writes metrics.json and side-by-side PNGs (image | P0 | P4 | ground truth, a fixed palette,
ignored pixels white).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jax_refine import metrics
from jax_refine.data.pipeline import TRAIN_SCENE_SEED_OFFSET
from jax_refine.data.synthetic import make_scene
from jax_refine.models import pna as pna_lib
from jax_refine.ops.resize import resize_bilinear

IGNORE_LABEL = 255


@dataclasses.dataclass
class Sample:
    name: str
    image: np.ndarray  # uint8 [H, W, 3] RGB
    label: np.ndarray  # uint8 [H, W] class ids, 255 = ignore


def synthetic_samples(num: int, size: int, num_classes: int) -> Iterator[Sample]:
    """Held-out scenes 0..num-1 at size x size with labels 0..num_classes (0 = background)."""
    if num > TRAIN_SCENE_SEED_OFFSET:
        raise ValueError(f"at most {TRAIN_SCENE_SEED_OFFSET} held-out scenes")
    for seed in range(num):
        image, label = make_scene(seed, size, size, num_classes)
        yield Sample(f"scene{seed}", image, label)


def folder_samples(records: Sequence[dict[str, Any]], limit: int = 0) -> Iterator[Sample]:
    """Samples of a `semantic_folder` split (records with 'image', 'label', 'name')."""
    for i in range(len(records) if not limit else min(limit, len(records))):
        r = records[i]
        label = np.asarray(r["label"])
        name = r["name"]
        yield Sample(name.decode() if isinstance(name, bytes) else str(name),
                     np.asarray(r["image"]), label[..., 0] if label.ndim == 3 else label)


def stage_logits_at(stage_logits: Sequence[jax.Array], padded: tuple[int, int],
                    size: tuple[int, int]) -> list[jax.Array]:
    """Every stage's [B, h, w, K] logits upsampled to the padded input size and cropped to
    the image size -> [B, H, W, K] each."""
    out = []
    for logits in stage_logits:
        if logits.shape[1:3] != padded:
            logits = resize_bilinear(logits.astype(jnp.float32), padded, align_corners=False)
        out.append(logits[:, : size[0], : size[1]])
    return out


def make_predictor(model: pna_lib.PNASegmentor, variables: dict[str, Any]):
    """A jitted function image uint8 [H, W, 3] -> int32 [num_stages, H, W] stage argmaxes."""

    @jax.jit
    def predict(variables, image):
        h, w = image.shape[:2]
        d = max(model.size_divisibility, 1)
        padded = (-(-h // d) * d, -(-w // d) * d)
        stages = model.apply(variables, image[None].astype(jnp.float32), train=False)
        logits = stage_logits_at(stages, padded, (h, w))
        return jnp.stack([jnp.argmax(x[0], axis=-1) for x in logits]).astype(jnp.int32)

    return lambda image: np.asarray(predict(variables, jnp.asarray(image)))


def evaluate_samples(
    predict: Any, samples: Iterator[Sample], num_classes: int, *,
    out_dir: str | Path | None = None, num_pngs: int = 4,
) -> dict[str, Any]:
    """Per-stage confusion matrices over `samples` -> {'num_images', 'stages': {'P0':
    {'miou', 'per_class_iou', 'pixel_accuracy'}, ...}, 'pngs'}."""
    matrices: list[metrics.ConfusionMatrix] = []
    pngs, count = [], 0
    for sample in samples:
        preds = predict(sample.image)
        if not matrices:
            matrices = [metrics.ConfusionMatrix(num_classes, IGNORE_LABEL) for _ in preds]
        for matrix, pred in zip(matrices, preds, strict=True):
            matrix.update(pred, sample.label)
        if out_dir is not None and len(pngs) < num_pngs:
            pngs.append(str(side_by_side(Path(out_dir), sample, preds[0], preds[-1])))
        count += 1
    if count == 0:
        raise ValueError("no evaluation samples")
    stages = {}
    for i, m in enumerate(matrices):
        per_class = m.per_class_iou()
        stages[f"P{i}"] = {
            "miou": m.mean_iou(),
            "per_class_iou": [None if np.isnan(v) else float(v) for v in per_class],
            "pixel_accuracy": m.pixel_accuracy(),
        }
    return {"num_images": count, "stages": stages, "pngs": pngs}


def palette(num_colours: int = 256) -> np.ndarray:
    """The Pascal VOC colour map (bit-interleaved RGB) as uint8 [num_colours, 3]; the
    ignore label (255) is drawn white."""
    colours = np.zeros((num_colours, 3), np.uint8)
    for i in range(num_colours):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours[i] = (r, g, b)
    colours[IGNORE_LABEL] = 255
    return colours


def side_by_side(out_dir: Path, sample: Sample, first: np.ndarray, last: np.ndarray,
                 side: int = 256) -> Path:
    """image | P0 | P4 | ground truth (palette colours), each `side` px high."""
    out_dir.mkdir(parents=True, exist_ok=True)
    h, w = sample.label.shape
    size = (max(1, round(w * side / h)), side)
    colours = palette()
    panels = [cv2.resize(sample.image, size, interpolation=cv2.INTER_AREA)]
    for labels in (first, last, sample.label):
        panels.append(cv2.resize(colours[np.asarray(labels, np.uint8)], size,
                                 interpolation=cv2.INTER_NEAREST))
    path = out_dir / f"{sample.name}.png"
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(panels, axis=1), cv2.COLOR_RGB2BGR))
    return path


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """| set | images | P0 | P1 | ... | mIoU (percent) of every stage, one row per set."""
    names = list(next(iter(results.values()))["stages"])
    lines = ["| set | images | " + " | ".join(f"{n} mIoU" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for name, r in results.items():
        values = " | ".join(f"{100 * r['stages'][n]['miou']:.2f}" for n in names)
        lines.append(f"| {name} | {r['num_images']} | {values} |")
    return "\n".join(lines)


def evaluate(config: ml_collections.ConfigDict, checkpoint: str | Path,
             out_dir: str | Path) -> dict[str, Any]:
    """Evaluate a PNA checkpoint (`models.pna.save_checkpoint`) as `config.eval` says.

    Writes out_dir/metrics.json and PNGs under out_dir/pngs; returns the metrics by set.
    """
    model, variables, _ = pna_lib.load_checkpoint(checkpoint)
    e = config.eval
    num_classes = model.pna_head.num_classes
    if config.dataset.name == "synthetic":
        n = e.num_images or 8
        name = f"synthetic{e.synthetic_size}"
        samples = synthetic_samples(n, e.synthetic_size, config.dataset.num_classes)
        if config.dataset.num_classes + 1 != num_classes:
            raise ValueError(f"synthetic scenes have {config.dataset.num_classes + 1} labels, "
                             f"the model {num_classes} classes")
    else:
        from jax_refine.data import tfds as tfds_lib

        kwargs = e.builder_kwargs.to_dict()
        records = tfds_lib.data_source(
            config.dataset.name, data_dir=e.data_dir or config.dataset.data_dir,
            split=kwargs.get("split", "val"), builder_kwargs=kwargs)
        name = f"{config.dataset.name}_{kwargs.get('split', 'val')}"
        samples = folder_samples(records, e.num_images)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {name: evaluate_samples(make_predictor(model, variables), samples, num_classes,
                                      out_dir=out_dir / "pngs", num_pngs=e.num_pngs)}
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
