"""PNA evaluation: the mIoU of every stage P0..P4 (the effect of the paper's Table 1).

Protocol: full images, no resizing, batched as detectron2 batches them: `Predictor` pads
each image at the bottom/right with the model's pixel mean (0 after normalisation) to its
shape bucket (sides rounded up to a multiple of 64 and of the model's size divisibility),
runs `batch_size` images of one bucket per call sharded over every device (one compilation
per bucket, not per image size), upsamples each stage's logits bilinearly (align_corners=
False) to the bucket size, takes the argmax on the device and crops it to the image (the
reference's `sem_seg_postprocess`). The argmaxes are scored against the label map with a
streaming `ConfusionMatrix` (label 255 ignored); the mIoU is over the classes present in the
labels or the predictions of the whole set. Used by evaluate.py and by the training loop's
`config.eval_every`.

Sources: a `semantic_folder` split (`config.eval.builder_kwargs`: images, labels,
class_names, split), or, when `config.dataset.name` is 'synthetic', held-out multi-class
synthetic scenes (seeds 0..n-1, below `TRAIN_SCENE_SEED_OFFSET`, so never trained on).
Writes metrics.json and side-by-side PNGs (image | P0 | P4 | ground truth, a fixed palette,
ignored pixels white).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
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
from jax_refine.train import mesh as mesh_lib
from jax_refine.train.evaluate import write_json

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


class Predictor:
    """Per-stage argmaxes of a `PNASegmentor` for lists of images of any sizes.

    `predictor(variables, images)` with uint8 [H_i, W_i, 3] RGB images returns one
    [num_stages, H_i, W_i] array (uint8, or int32 with more than 256 classes) per image.
    Images are grouped by shape bucket (see the module docstring); each call holds
    `batch_size` images (rounded up to a multiple of the device count; unused slots are
    padding) sharded on the mesh's 'data' axis, with the weights replicated — they are an
    argument, so a training loop reuses the compilations with new weights.
    `trace_count`: compilations so far (one per bucket shape).
    """

    def __init__(self, model: pna_lib.PNASegmentor, *, batch_size: int = 8, bucket: int = 64,
                 mesh: jax.sharding.Mesh | None = None):
        self.model = model
        self.mesh = mesh or mesh_lib.make_mesh()
        devices = self.mesh.devices.size
        self.batch_size = -(-max(batch_size, 1) // devices) * devices
        self.bucket = math.lcm(bucket, max(model.size_divisibility, 1))
        self.dtype = np.uint8 if model.pna_head.num_classes <= 256 else np.int32
        self.trace_count = 0
        self._data = mesh_lib.data_sharded(self.mesh)
        self._predict = jax.jit(self._predict_impl, in_shardings=(
            mesh_lib.replicated(self.mesh), self._data), out_shardings=mesh_lib.replicated(
            self.mesh))

    def _predict_impl(self, variables, images):
        """[B, Hb, Wb, 3] float32 -> [B, num_stages, Hb, Wb] argmaxes."""
        self.trace_count += 1
        size = images.shape[1:3]
        logits = stage_logits_at(self.model.apply(variables, images, train=False), size, size)
        return jnp.stack([jnp.argmax(x, axis=-1) for x in logits], axis=1).astype(self.dtype)

    def bucket_shape(self, height: int, width: int) -> tuple[int, int]:
        b = self.bucket
        return -(-height // b) * b, -(-width // b) * b

    def __call__(self, variables: Any, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        groups: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
        for i, image in enumerate(images):
            groups[self.bucket_shape(*image.shape[:2])].append(i)
        out: list[np.ndarray] = [np.empty(0)] * len(images)
        mean = np.asarray(self.model.pixel_mean, np.float32)
        for (bh, bw), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                batch = np.broadcast_to(mean, (self.batch_size, bh, bw, 3)).copy()
                for j, i in enumerate(chunk):
                    h, w = images[i].shape[:2]
                    batch[j, :h, :w] = images[i]
                # Every process holds the whole batch and contributes its devices' slices.
                batch = jax.make_array_from_callback(batch.shape, self._data,
                                                     lambda index, b=batch: b[index])
                preds = np.asarray(self._predict(variables, batch))
                for j, i in enumerate(chunk):
                    h, w = images[i].shape[:2]
                    out[i] = preds[j, :, :h, :w]
        return out


def evaluate_samples(
    predict: Any, samples: Iterator[Sample], num_classes: int, *,
    out_dir: str | Path | None = None, num_pngs: int = 4, chunk: int = 32,
) -> dict[str, Any]:
    """Per-stage confusion matrices over `samples` -> {'num_images', 'stages': {'P0':
    {'miou', 'per_class_iou', 'pixel_accuracy'}, ...}, 'pngs'}.

    `predict(images)`: list of uint8 [H, W, 3] -> list of [num_stages, H, W] class ids (a
    `Predictor` with its weights bound); called with up to `chunk` samples at a time.
    """
    matrices: list[metrics.ConfusionMatrix] = []
    pngs, count = [], 0
    samples = iter(samples)
    while batch := list(itertools.islice(samples, chunk)):
        for sample, preds in zip(batch, predict([s.image for s in batch]), strict=True):
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


def evaluate_model(config: ml_collections.ConfigDict, predictor: Predictor, variables: Any,
                   out_dir: str | Path) -> dict[str, Any]:
    """Evaluate `predictor.model` with `variables` on `config.eval`'s set (held-out synthetic
    scenes when config.dataset is synthetic, else a `semantic_folder` split).

    Writes out_dir/metrics.json (atomically) and PNGs under out_dir/pngs; returns the
    metrics by set.
    """
    e = config.eval
    num_classes = predictor.model.pna_head.num_classes
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
    results = {name: evaluate_samples(lambda images: predictor(variables, images), samples,
                                      num_classes, out_dir=out_dir / "pngs",
                                      num_pngs=e.num_pngs, chunk=4 * predictor.batch_size)}
    write_json(out_dir / "metrics.json", results)
    return results


def evaluate(config: ml_collections.ConfigDict, checkpoint: str | Path,
             out_dir: str | Path) -> dict[str, Any]:
    """Evaluate a PNA checkpoint (`models.pna.save_checkpoint`) as `config.eval` says
    (`evaluate_model`; `config.eval.batch_size` images per call, default 8)."""
    model, variables, _ = pna_lib.load_checkpoint(checkpoint)
    predictor = Predictor(model, batch_size=config.eval.get("batch_size", 8))
    return evaluate_model(config, predictor, variables, out_dir)
