"""PNA evaluation: every stage P0..P4 scored as the references score the model.

Protocol (`config.eval`): each test image is resized to its network size as the reference
does (`ResizeProtocol`, `config.eval.resize`: 'none' = native size, jax_refine's default;
'shortest_edge' = detectron2's ResizeShortestEdge with Pillow's bilinear; 'keep_ratio' =
mmsegmentation's keep-ratio Resize with OpenCV's bilinear — both bit-exact, on the device);
`Predictor` batches images as detectron2 pads them (bottom/right, the pixel mean, to a shape
bucket: sides rounded up to a multiple of 64 and of the model's size divisibility), runs
`batch_size` images of one bucket per call sharded over this process's devices (one
compilation per bucket, not per image size), upsamples each stage's logits bilinearly
(align_corners=False) to the bucket, crops them to the resized image and resizes them back
to the original size (bilinear, align_corners=False: detectron2's `sem_seg_postprocess`,
mmseg's `whole_inference`), then takes the argmax on the device. The argmaxes are scored at
the original size against the label map with a streaming `ConfusionMatrix` (label 255
ignored): mIoU, fwIoU, mACC and pACC per stage (`ConfusionMatrix.summary`), the mIoU over
the classes that `config.eval.iou_classes` counts ('gt': detectron2's SemSegEvaluator,
'gt_or_pred': mmseg) and, with `config.eval.mean_classes`, mIoU and mACC over a class subset
(Trans10k's two transparent classes, DeepGlobe's six land-cover classes). Used by
evaluate.py and by the training loop's `config.eval_every`.

Padding (`config.eval.bucket`): the references evaluate each image padded only to the
model's size divisibility. `bucket=1` does the same (the paper configs' default; one
compilation per distinct image size — Cityscapes and DeepGlobe have one). A larger bucket
(e.g. 64, `pna_synthetic`) pads each side up to a multiple of it so that nearby sizes share a
compilation, at the price of logits that differ from the reference's near the bottom/right
border (the padding reaches the deeper layers' receptive fields and the global operations:
image pooling, PSP, channel attention).

Sources: a `semantic_folder` split (`config.eval.builder_kwargs`: images, labels,
class_names, split), or, when `config.dataset.name` is 'synthetic', held-out multi-class
synthetic scenes (seeds 0..n-1, below `TRAIN_SCENE_SEED_OFFSET`, so never trained on).
Writes metrics.json and side-by-side PNGs (image | P0 | P4 | ground truth, a fixed palette,
ignored pixels white).

Multi-process runs (`distributed_eval`): process p of P loads and predicts images p, p + P,
... on its own devices; the confusion matrices are summed over the processes (int64, so the
metrics are bitwise one process's), and process 0 writes metrics.json.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
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
from jax_refine.data.seg_transforms import reduce_zero_label as reduce_zero_label_map
from jax_refine.data.synthetic import make_scene
from jax_refine.models import pna as pna_lib
from jax_refine.ops import image_resize
from jax_refine.ops.resize import resize_bilinear, resize_bilinear_dynamic
from jax_refine.train import mesh as mesh_lib
from jax_refine.train.distributed_eval import (
    LazySequence,
    all_processes,
    global_index,
    process_items,
)
from jax_refine.train.evaluate import write_json

IGNORE_LABEL = 255


@dataclasses.dataclass
class Sample:
    name: str
    image: np.ndarray  # uint8 [H, W, 3] RGB
    label: np.ndarray  # uint8 [H, W] class ids, 255 = ignore


def synthetic_samples(num: int, size: int, num_classes: int) -> LazySequence[Sample]:
    """Held-out scenes 0..num-1 at size x size with labels 0..num_classes (0 = background),
    each rendered when accessed."""
    if num > TRAIN_SCENE_SEED_OFFSET:
        raise ValueError(f"at most {TRAIN_SCENE_SEED_OFFSET} held-out scenes")

    def load(seed: int) -> Sample:
        image, label = make_scene(seed, size, size, num_classes)
        return Sample(f"scene{seed}", image, label)

    return LazySequence(num, load)


def folder_samples(records: Sequence[dict[str, Any]], limit: int = 0,
                   reduce_zero_label: bool = False) -> LazySequence[Sample]:
    """Samples of a `semantic_folder` split (records with 'image', 'label', 'name'), the first
    `limit` (0 = all), each read when accessed; `reduce_zero_label`: mmseg's 0 -> 255,
    k -> k - 1 on the label maps (as the training loader, `config.dataset.reduce_zero_label`).

    TFDS's random-access data source decodes images with OpenCV (Pillow without it), whose
    JPEG pixels equal Pillow's (detectron2's `read_image`) and mmcv's; TensorFlow's default
    JPEG decoder (fast integer DCT, the tf.data training pipeline) differs from them in
    about 65% of the pixels, by up to 5 levels (measured on noise images).
    """
    def load(i: int) -> Sample:
        r = records[i]
        label = np.asarray(r["label"])
        label = label[..., 0] if label.ndim == 3 else label
        if reduce_zero_label:
            label = reduce_zero_label_map(label)
        name = r["name"]
        return Sample(name.decode() if isinstance(name, bytes) else str(name),
                      np.asarray(r["image"]), label)

    return LazySequence(min(limit, len(records)) if limit else len(records), load)


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


@dataclasses.dataclass(frozen=True)
class ResizeProtocol:
    """How test images are resized before the network (`config.eval.resize`).

    Modes (the prediction is always scored at the original size):
    * 'none': native size (jax_refine's default; no resampling at all).
    * 'shortest_edge': detectron2's `ResizeShortestEdge(min_size, max_size)` at test time:
      the short side to `min_size` unless the long side would exceed `max_size`, then the
      long side to `max_size`; sides rounded with int(x + 0.5); the image resampled with
      Pillow's BILINEAR (`ResizeTransform`).
    * 'keep_ratio': mmsegmentation's `Resize(img_scale=scale, keep_ratio=True)`: factor
      min(max(scale) / max(H, W), min(scale) / min(H, W)), sides int(x * factor + 0.5);
      the image resampled with OpenCV's INTER_LINEAR (`mmcv.imresize`).
    Both references then crop the logits to the resized image and resize them bilinearly
    (align_corners=False) to the original size before the argmax (detectron2's
    `sem_seg_postprocess`, mmseg's `whole_inference`).
    """

    mode: str = "none"
    min_size: int = 0
    max_size: int = 0
    scale: tuple[int, int] = (0, 0)

    def __post_init__(self):
        if self.mode not in RESIZE_MODES:
            raise ValueError(f"eval.resize.mode must be one of {RESIZE_MODES}, got "
                             f"{self.mode!r}")
        if self.mode == "shortest_edge" and not (0 < self.min_size and 0 < self.max_size):
            raise ValueError("eval.resize mode 'shortest_edge' needs min_size > 0 and "
                             f"max_size > 0, got {self.min_size}, {self.max_size}")
        if self.mode == "keep_ratio" and not (len(self.scale) == 2 and min(self.scale) > 0):
            raise ValueError("eval.resize mode 'keep_ratio' needs scale=(long, short) > 0, "
                             f"got {self.scale}")

    @classmethod
    def from_config(cls, resize: Any) -> ResizeProtocol:
        """From a `config.eval.resize` block (None or a missing block = 'none')."""
        if resize is None:
            return cls()
        return cls(mode=resize.mode, min_size=int(resize.get("min_size", 0)),
                   max_size=int(resize.get("max_size", 0)),
                   scale=tuple(int(v) for v in resize.get("scale", (0, 0))))

    @property
    def resampler(self) -> str:
        """'pil' (detectron2) or 'cv2' (mmsegmentation): see `ops.image_resize`."""
        return "cv2" if self.mode == "keep_ratio" else "pil"

    def output_shape(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) the network sees for an image of (height, width)."""
        if self.mode == "shortest_edge":
            size = float(self.min_size)
            scale = size / min(height, width)
            new_h, new_w = (size, scale * width) if height < width else (scale * height, size)
            if max(new_h, new_w) > self.max_size:
                scale = self.max_size / max(new_h, new_w)
                new_h, new_w = new_h * scale, new_w * scale
            return int(new_h + 0.5), int(new_w + 0.5)
        if self.mode == "keep_ratio":
            factor = min(max(self.scale) / max(height, width),
                         min(self.scale) / min(height, width))
            return int(height * factor + 0.5), int(width * factor + 0.5)
        return height, width


RESIZE_MODES = ("none", "shortest_edge", "keep_ratio")


class Predictor:
    """Per-stage argmaxes of a `PNASegmentor` for lists of images of any sizes.

    `predictor(variables, images)` with uint8 [H_i, W_i, 3] RGB images returns one
    [num_stages, H_i, W_i] array (uint8, or int32 with more than 256 classes) per image.
    Everything after the host's copy into a bucket runs in one jitted call per batch:
    `resize` (a `ResizeProtocol`) resamples each image to its network size on the device
    (`ops.image_resize`, bit-exact to the reference's Pillow / OpenCV), the network input is
    padded at the bottom/right with the pixel mean (0 after normalisation) to its shape bucket
    (sides rounded up to a multiple of `bucket` and of the model's size divisibility; 1 =
    the references' per-image padding, see the module docstring), every stage's
    logits are upsampled bilinearly to the bucket, cropped to the resized image and resized
    back to the original size per image (`resize_bilinear_dynamic`, traced sizes), and the
    argmax is taken on the device. Images are grouped by (original bucket, network bucket,
    resampled or not); each call holds `batch_size` images (rounded up to a multiple of the
    device count; unused slots are padding) sharded on the 'data' axis of `mesh` (default:
    this process's devices, `mesh.make_local_mesh`), with the weights
    replicated — they are an argument, so a training loop reuses the compilations with new
    weights. `trace_count`: compilations so far (one per group shape).
    """

    def __init__(self, model: pna_lib.PNASegmentor, *, batch_size: int = 8, bucket: int = 64,
                 mesh: jax.sharding.Mesh | None = None, resize: ResizeProtocol | None = None):
        self.model = model
        self.resize = resize or ResizeProtocol()
        self.mesh = mesh or mesh_lib.make_local_mesh()
        devices = self.mesh.devices.size
        self.batch_size = -(-max(batch_size, 1) // devices) * devices
        self.bucket = math.lcm(bucket, max(model.size_divisibility, 1))
        self.dtype = np.uint8 if model.pna_head.num_classes <= 256 else np.int32
        self.trace_count = 0
        self._data = mesh_lib.data_sharded(self.mesh)
        self._predict = jax.jit(self._predict_impl, in_shardings=(
            mesh_lib.replicated(self.mesh), self._data, self._data, self._data),
            out_shardings=mesh_lib.replicated(self.mesh))

    def _predict_impl(self, variables, images, sizes, taps):
        """uint8 [B, Hb, Wb, 3] images in their original-size bucket, int32 [B, 4] sizes
        (network h, w, original H, W), `image_resize.resize_taps` arrays [B, ...] to the
        network bucket (None: no resize) -> [B, num_stages, Hb, Wb] argmaxes."""
        self.trace_count += 1
        out_shape = images.shape[1:3]
        if taps is not None:
            images = jax.vmap(functools.partial(image_resize.resize_uint8,
                                                resampler=self.resize.resampler))(images, taps)
        net_shape = images.shape[1:3]
        rows = jnp.arange(net_shape[0])[None, :, None, None] < sizes[:, 0, None, None, None]
        cols = jnp.arange(net_shape[1])[None, None, :, None] < sizes[:, 1, None, None, None]
        x = jnp.where(rows & cols, images.astype(jnp.float32),
                      jnp.asarray(self.model.pixel_mean, jnp.float32))
        logits = stage_logits_at(self.model.apply(variables, x, train=False), net_shape,
                                 net_shape)
        if taps is not None:  # crop to the network size, resize to the original size
            back = jax.vmap(lambda y, s: resize_bilinear_dynamic(
                y, out_shape, (s[0], s[1]), (s[2], s[3]), align_corners=False))
            logits = [back(y, sizes) for y in logits]
        return jnp.stack([jnp.argmax(y, axis=-1) for y in logits], axis=1).astype(self.dtype)

    def bucket_shape(self, height: int, width: int) -> tuple[int, int]:
        b = self.bucket
        return -(-height // b) * b, -(-width // b) * b

    def __call__(self, variables: Any, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        groups: dict[tuple[Any, ...], list[int]] = collections.defaultdict(list)
        resampler = self.resize.resampler
        sizes = np.ones((len(images), 4), np.int32)
        taps_needed = np.zeros(len(images), np.int64)  # 0: no resampling
        for i, image in enumerate(images):
            h, w = image.shape[:2]
            sizes[i] = (*self.resize.output_shape(h, w), h, w)
            if tuple(sizes[i, :2]) != (h, w):
                taps_needed[i] = image_resize.num_taps(resampler, (h, w), tuple(sizes[i, :2]))
            groups[(self.bucket_shape(h, w), self.bucket_shape(*sizes[i, :2]),
                    bool(taps_needed[i]))].append(i)
        out: list[np.ndarray] = [np.empty(0)] * len(images)
        for (in_shape, net_shape, _), members in groups.items():
            num_taps = int(taps_needed[members].max())  # one tap count (program) per group
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                batch = np.zeros((self.batch_size, *in_shape, 3), np.uint8)
                size = np.ones((self.batch_size, 4), np.int32)
                taps = None
                if num_taps:
                    taps = [np.zeros((self.batch_size, n, num_taps), np.int32)
                            for n in (net_shape[0], net_shape[0], net_shape[1], net_shape[1])]
                for j, i in enumerate(chunk):
                    h, w = images[i].shape[:2]
                    batch[j, :h, :w] = images[i]
                    size[j] = sizes[i]
                    if num_taps:
                        for array, t in zip(taps, image_resize.resize_taps(
                                resampler, (h, w), tuple(sizes[i, :2]), net_shape, num_taps),
                                strict=True):
                            array[j] = t
                preds = np.asarray(self._predict(variables, *map(self._put, (batch, size)),
                                                 None if taps is None else
                                                 tuple(map(self._put, taps))))
                for j, i in enumerate(chunk):
                    h, w = images[i].shape[:2]
                    out[i] = preds[j, :, :h, :w]
        return out

    def _put(self, array: np.ndarray) -> jax.Array:
        return jax.device_put(array, self._data)


def evaluate_samples(
    predict: Any, samples: Iterator[Sample], num_classes: int, *,
    out_dir: str | Path | None = None, num_pngs: int = 4, chunk: int = 32,
    iou_classes: str = "gt_or_pred", mean_classes: Sequence[int] = (),
) -> dict[str, Any]:
    """Per-stage confusion matrices over `samples` -> {'num_images', 'stages': {'P0':
    `ConfusionMatrix.summary` (miou, fwiou, macc, pacc, per-class IoU and accuracy), ...},
    'pngs'}.

    `predict(images)`: list of uint8 [H, W, 3] -> list of [num_stages, H, W] class ids (a
    `Predictor` with its weights bound); called with up to `chunk` samples at a time.
    `iou_classes`: which classes count in the mIoU ('gt': detectron2, 'gt_or_pred': mmseg);
    `mean_classes`: class ids that mIoU and mACC average over (empty = all).

    In a multi-process run, `samples` are this process's items of the set
    (`distributed_eval.process_items`); the confusion matrices are summed over the processes,
    so every process returns the whole set's metrics, bitwise one process's. PNGs: the items
    numbered below `num_pngs`, each written by its process; 'pngs' lists this process's.
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
            if out_dir is not None and global_index(count) < num_pngs:
                pngs.append(str(side_by_side(Path(out_dir), sample, preds[0], preds[-1])))
            count += 1
    # Every process needs the stage count; one with no items of its own has no matrices.
    stages_and_counts = all_processes(np.asarray([len(matrices), count], np.int64))
    num_stages, count = int(stages_and_counts[:, 0].max()), int(stages_and_counts[:, 1].sum())
    local = np.zeros((num_stages, num_classes, num_classes), np.int64)
    for i, matrix in enumerate(matrices):
        local[i] = matrix.matrix
    if count == 0:
        raise ValueError("no evaluation samples")
    matrices = [metrics.ConfusionMatrix(num_classes, IGNORE_LABEL) for _ in range(num_stages)]
    for matrix, total in zip(matrices, all_processes(local).sum(axis=0), strict=True):
        matrix.matrix = total
    classes = tuple(int(c) for c in mean_classes) or None
    stages = {f"P{i}": m.summary(iou_classes, classes) for i, m in enumerate(matrices)}
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
    """| set | images | P0 mIoU | ... | P4 mIoU | fwIoU | mACC | pACC | (percent), one row per
    set; fwIoU, mACC and pACC are the last stage's (the model's prediction)."""
    names = list(next(iter(results.values()))["stages"])
    extra = ("fwiou", "macc", "pacc")
    lines = ["| set | images | " + " | ".join(f"{n} mIoU" for n in names)
             + f" | {names[-1]} fwIoU | {names[-1]} mACC | {names[-1]} pACC |",
             "|---|---|" + "---|" * (len(names) + len(extra))]
    for name, r in results.items():
        last = r["stages"][names[-1]]
        values = [r["stages"][n]["miou"] for n in names] + [last[k] for k in extra]
        lines.append(f"| {name} | {r['num_images']} | "
                     + " | ".join(f"{100 * v:.2f}" for v in values) + " |")
    return "\n".join(lines)


def evaluate_model(config: ml_collections.ConfigDict, predictor: Predictor, variables: Any,
                   out_dir: str | Path) -> dict[str, Any]:
    """Evaluate `predictor.model` with `variables` on `config.eval`'s set (held-out synthetic
    scenes when config.dataset is synthetic, else a `semantic_folder` split), with the
    predictor's resize protocol (`predictor_for(config, model)` reads it from
    config.eval.resize), config.eval's `iou_classes` and `mean_classes`, and the training
    set's label mapping config.dataset.reduce_zero_label (mmseg's, a dataset option).

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
        samples = folder_samples(records, e.num_images,
                                 config.dataset.get("reduce_zero_label", False))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Host copies placed on the predictor's devices (a training state's arrays live on the
    # global mesh; the predictor runs on this process's devices).
    variables = jax.device_put(jax.device_get(variables), mesh_lib.replicated(predictor.mesh))
    results = {name: evaluate_samples(
        lambda images: predictor(variables, images), process_items(samples), num_classes,
        out_dir=out_dir / "pngs", num_pngs=e.num_pngs, chunk=4 * predictor.batch_size,
        iou_classes=e.get("iou_classes", "gt_or_pred"),
        mean_classes=tuple(e.get("mean_classes", ())))}
    if jax.process_index() == 0:
        write_json(out_dir / "metrics.json", results)
    return results


def evaluate(config: ml_collections.ConfigDict, checkpoint: str | Path,
             out_dir: str | Path) -> dict[str, Any]:
    """Evaluate a PNA checkpoint (`models.pna.save_checkpoint`) as `config.eval` says
    (`evaluate_model`; `config.eval.batch_size` images per call, default 8)."""
    model, variables, _ = pna_lib.load_checkpoint(checkpoint)
    return evaluate_model(config, predictor_for(config, model), variables, out_dir)


def predictor_for(config: ml_collections.ConfigDict, model: pna_lib.PNASegmentor) -> Predictor:
    """The `Predictor` of config.eval: `batch_size` (default 8), `bucket` (default 64) and
    the `resize` protocol."""
    return Predictor(model, batch_size=config.eval.get("batch_size", 8),
                     bucket=config.eval.get("bucket", 64),
                     resize=ResizeProtocol.from_config(config.eval.get("resize")))
