"""tf.data training pipelines. Example k of the run is a pure function of (seed, k).

CRM pipeline (paper recipe, reference `dataset/online_dataset_crm.py`), per example: load
(image uint8 [H, W, 3], gt uint8 [H, W]: the 8-bit ground truth as stored, soft 0..255, 255
= foreground) -> pad to at least crop x crop (zeros on both sides, as torchvision's
`RandomCrop(pad_if_needed=True)`) -> random crop and horizontal flip of image and mask
together (one stateless seed) -> colour jitter of the image (brightness 0.2, contrast 0.05,
saturation 0.05 in a random order: torchvision's `ColorJitter` on a PIL image, bit-exact)
and random grayscale (p = 0.1, torchvision's default) -> coarse mask from the binary gt > 0
(the reference's `np.array(gt) > 0.5` on 8-bit values; `CoarseSpec`: `perturb_mask_tf` with
target IoU t ~ U[0.8, 1), optionally mixed with `coarse_from_lowres` and blurred) ->
ImageNet normalisation, mask to [-1, 1], gt to the soft float gt / 255 in [0, 1] (the
reference's `ToTensor`; the losses use it soft, BCE against gt > 0.5). The training loop's
`SyntheticSource` renders only a crop-sized window of each scene, at a random position,
instead of the whole scene, so there the random crop is a no-op.

Where the work runs (so that the pipeline scales with host cores): the loaders (scene
rendering, record reading and image decoding: Python holding the GIL for much of their time)
run in worker processes (`train_dataset(workers=...)`); the augmentation is TensorFlow ops in
a parallel tf.data map (no GIL), the perturbation's dilate/erode rounds and IoU stop
included. Three cv2 steps stay numpy inside `tf.numpy_function`, exact as they are: the
perturbation's contour thinning (cv2's contour tracing has no graph op), `coarse_from_lowres`
and the soft masks' Gaussian blur; each is a few cv2 calls (which release the GIL) and little
Python. A loader runs in 'spawn' processes: a script that builds a pipeline needs the usual
`if __name__ == "__main__":` guard. TensorFlow's oneDNN kernels are off (`jax_refine`
sets TF_ENABLE_ONEDNN_OPTS=0 before TensorFlow is imported): they generate code for every
new op shape, which serialised the map threads (2 cores gave 1.2x one core's examples/s).

Determinism and resume: the global example number k = step * batch_size + position seeds
every random choice (stateless TF ops seeded with (seed, k); the loaders' numpy Generators
with [seed, k, tag]); no random state is shared between examples, so the batches are bitwise
the same whatever the number of workers and threads. For a finite source, k maps to record
perm_epoch[k % m] with epoch = k // m, perm_epoch a seeded permutation of the n records and
m = n, or with `RecordSource.epoch_batch` = B the floor(n / B) * B first of them (PyTorch's
`DataLoader(shuffle=True, drop_last=True)`, as the CRM reference trains), so resuming at a
step only means starting the index range there — there is no iterator state to save.
Process p of P reads positions [p * B / P, (p + 1) * B / P) of every global batch (its slice
for `jax.make_array_from_process_local_data`).

The PNA pipeline (`PnaAugment`, same `train_dataset` indexing) is detectron2's semantic
segmentation augmentation (resize, category-area crop, SSD colour, flip, bottom / right
padding with the ignore label 255; graph ops in `seg_transforms`) or mmsegmentation's
(keep-ratio Resize with a ratio range, OpenCV's resize in a `tf.numpy_function`, RandomCrop
with cat_max_ratio, flip, PhotoMetricDistortion, Pad) on semantic label maps;
its images stay RGB in [0, 255] (the PNA model normalises them itself, as detectron2 does).
`SyntheticSemanticSource` renders multi-class synthetic scenes for it.

Query coordinates are not shipped: the train step computes the crop's pixel-centre grid once.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import itertools
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import cv2
import numpy as np

from jax_refine.data import seg_transforms
from jax_refine.data.perturb import coarse_from_lowres, numpy_rng, perturb_mask_tf
from jax_refine.data.synthetic import WIRE_ID, make_scene

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_WORKERS = 32  # default cap on loader processes (each holds numpy, cv2 and a loader)
# Training scene seeds start here; evaluation scenes use seeds below it (held out).
TRAIN_SCENE_SEED_OFFSET = 1_000_000

Loader = Callable[[int], tuple[np.ndarray, np.ndarray]]


def _tf():
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # keep TF off accelerators
    return tf


# ----------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
    """An endless stream of fresh synthetic scenes: example k renders its own scene.

    Attributes:
      seed: run seed.
      min_size, max_size: scenes are square with a side drawn log-uniformly from
        [min_size, max_size] (every octave of sizes equally often, as the octave-spaced scales
        of the multi-resolution schedule show the model a test image at several sizes).
      window: if > 0, a scene larger than window x window is not rendered whole: only a
        window x window crop of it, at a position drawn uniformly from (seed, k), is rendered
        (`make_scene(window=...)`: the crop's exact label, its image with its own sensor
        noise). With window = the augment's crop, the augment's random crop is a no-op.
      subset_prob: probability that the target is a random subset of the scene's objects
        (each kept with probability 1/2, stems and hairs with their object; wires always
        kept) instead of all of them. Objects differ from the background in appearance
        (saturation), so a model trained on all-object targets can find them from the image
        alone; with unchosen objects in the background, only the mask says which is wanted.
    Returns (image uint8 [s, s, 3], gt uint8 [s, s] {0, 255}, an 8-bit ground truth like
    the records'), s = window if the scene is larger, else the scene's side.
    """

    seed: int
    min_size: int = 448
    max_size: int = 1024
    window: int = 0
    subset_prob: float = 0.0

    def __call__(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, k, 1])
        log_size = rng.uniform(np.log(self.min_size), np.log(self.max_size + 1))
        size = min(int(np.exp(log_size)), self.max_size)
        scene = TRAIN_SCENE_SEED_OFFSET + int(rng.integers(2**30))
        window = None
        if 0 < self.window < size:
            top, left = (int(v) for v in rng.integers(size - self.window + 1, size=2))
            window = (top, left, self.window, self.window)
        image, objects = make_scene(scene, size, size, window=window, instances=True)
        chosen = np.ones(256, bool)
        if rng.random() < self.subset_prob:
            chosen = rng.random(256) < 0.5
        chosen[0], chosen[WIRE_ID] = False, True
        return image, chosen[objects].astype(np.uint8) * np.uint8(255)


@dataclasses.dataclass(frozen=True)
class SyntheticSemanticSource:
    """Fresh multi-class synthetic scenes (label 0 background, 1..num_classes objects).

    Attributes:
      seed: run seed.
      min_size, max_size: scenes are square with a side drawn from [min_size, max_size].
      num_classes: object classes of `make_scene` (the model predicts num_classes + 1).
    Example k uses scene seed TRAIN_SCENE_SEED_OFFSET + r, r drawn from (seed, k): disjoint
    from the evaluation scenes (seeds below the offset).
    """

    seed: int
    min_size: int = 192
    max_size: int = 384
    num_classes: int = 4

    def __call__(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, k, 4])
        size = int(rng.integers(self.min_size, self.max_size + 1))
        scene = TRAIN_SCENE_SEED_OFFSET + int(rng.integers(2**30))
        return make_scene(scene, size, size, self.num_classes)


@dataclasses.dataclass(frozen=True)
class RecordSource:
    """A finite random-access source (e.g. a TFDS `as_data_source`) visited in seeded epochs.

    Attributes:
      records: sequence of dicts with 'image' uint8 [H, W, 3] and `mask_key` uint8
        [H, W(, 1)].
      seed: permutation seed.
      mask_key: the record's mask entry.
      labels: False (CRM): the mask is an 8-bit ground truth, returned as stored (soft,
        0..255, 255 = foreground; a 0/1 mask is scaled to 0/255); True: a label map (class
        ids, 255 = ignore), returned as stored.
      epoch_batch: 0, or a batch size B: each epoch then visits only the floor(n / B) * B
        first records of its permutation (PyTorch `DataLoader(drop_last=True)`).
      reduce_zero_label: label maps only: mmseg's LoadAnnotations(reduce_zero_label=True)
        (`seg_transforms.reduce_zero_label`: 0 -> 255, k -> k - 1; COCO-Stuff's ids 1..171).
    Class attribute `gil_free`: reading a record and decoding its images run in C++ with the
    GIL released, so `train_dataset` loads in tf.data's threads by default (on the 2-core
    CI machine, 2026-12-04: 1.5-1.7x the examples/s of worker processes, whose pickling and
    generator hand-over run serially in the main process).
    """

    gil_free: ClassVar[bool] = True
    records: Sequence[dict[str, Any]]
    seed: int
    mask_key: str = "mask"
    labels: bool = False
    epoch_batch: int = 0
    reduce_zero_label: bool = False

    def __call__(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.records)
        used = n - n % self.epoch_batch if self.epoch_batch else n
        if used == 0:
            raise ValueError(f"{n} records hold no whole batch of {self.epoch_batch}")
        epoch, offset = divmod(k, used)
        perm = np.random.default_rng([self.seed, epoch, 2]).permutation(n)
        record = self.records[int(perm[offset])]
        mask = np.asarray(record[self.mask_key]).astype(np.uint8)
        if mask.ndim == 3:
            mask = mask[..., 0]
        if not self.labels and mask.max() == 1:  # a 0/1 ground truth
            mask = mask * np.uint8(255)
        if self.labels and self.reduce_zero_label:
            mask = seg_transforms.reduce_zero_label(mask)
        return np.asarray(record["image"]), mask


# ----------------------------------------------------------------------------- coarse masks


@dataclasses.dataclass(frozen=True)
class CoarseSpec:
    """How training coarse masks are made from the GT crop.

    Attributes:
      iou_range: perturb_mask's target IoU ~ U[iou_range) (paper: [0.8, 1)).
      lowres_prob: probability of using `coarse_from_lowres` instead (paper: 0).
      lowres_factors: its downsampling factor ~ U[lowres_factors].
      soft_prob: probability of then blurring the binary mask with a Gaussian of standard
        deviation ~ U[soft_sigma] pixels (paper: 0). Multi-resolution inference feeds each
        scale the previous scale's *probabilities*, whose boundaries are soft ramps a few
        pixels wide at the next scale's resolution; a model trained only on binary masks
        reads the ramp as object and grows the mask at every scale.
      soft_sigma: range of that standard deviation, in crop pixels.
      iou_against: what perturb_mask's IoU stop compares with: 'thinned' (the reference:
        the contour-thinned mask) or 'gt'.
    """

    iou_range: tuple[float, float] = (0.8, 1.0)
    lowres_prob: float = 0.0
    lowres_factors: tuple[float, float] = (4.0, 16.0)
    soft_prob: float = 0.0
    soft_sigma: tuple[float, float] = (0.5, 3.0)
    iou_against: str = "thinned"

    def make(self, tf: Any, gt: Any, seed: Any) -> Any:
        """float32 [H, W] in [0, 1] (binary unless blurred) from the GT crop (uint8 [H, W],
        foreground = nonzero: the reference perturbs the 8-bit GT's `gt > 0.5`, i.e. > 0)
        and a stateless seed (int32 [2]); TensorFlow ops, for tf.data.

        The perturbation is `perturb_mask_tf` (graph ops but for the contour step). The
        low-resolution masks and the blur stay cv2 (`coarse_from_lowres`, cv2.GaussianBlur)
        in `tf.numpy_function`s: a few cv2 calls each, which release the GIL.
        """
        seeds = tf.random.experimental.stateless_split(seed, 3)
        u = tf.random.stateless_uniform([5], seeds[0], dtype=tf.float64)

        def draw(i, bounds):
            return bounds[0] + (bounds[1] - bounds[0]) * u[i]

        def lowres():
            def fn(g, factor, s):
                return coarse_from_lowres(g, float(factor), numpy_rng(s))

            out = tf.numpy_function(fn, [gt, draw(1, self.lowres_factors), seeds[1]],
                                    tf.uint8, stateful=False)
            return tf.reshape(out, tf.shape(gt))

        def perturbed():
            return perturb_mask_tf(gt, draw(2, self.iou_range), seeds[2],
                                   iou_against=self.iou_against)

        coarse = tf.cast(tf.cond(u[3] < self.lowres_prob, lowres, perturbed), tf.float32)

        def blurred():
            def fn(mask, sigma):
                return cv2.GaussianBlur(mask, (0, 0), float(sigma),
                                        borderType=cv2.BORDER_REFLECT)

            out = tf.numpy_function(fn, [coarse, draw(4, self.soft_sigma)], tf.float32,
                                    stateful=False)
            return tf.reshape(out, tf.shape(coarse))

        return tf.cond(u[0] < self.soft_prob, blurred, lambda: coarse)


# ----------------------------------------------------------------------------- augmentation


def colour_jitter(tf: Any, image: Any, seeds: Any, brightness: float, contrast: float,
                  saturation: float, grayscale_p: float) -> Any:
    """torchvision `ColorJitter(brightness, contrast, saturation)` then
    `RandomGrayscale(grayscale_p)` on a PIL image (the CRM reference's transform), bit-exact
    given the draws.

    image: float [H, W, 3] holding uint8 values / 255 (ToTensor's scale; rounded back to the
    uint8 values PIL sees); returns the same. Factors ~ U[1 - amount, 1 + amount]; the three
    adjustments run in a random order (ColorJitter's randperm); each is PIL's `ImageEnhance`:
    an 8-bit blend with a degenerate image, out = trunc(clip(d + f * (x - d))) in float32 —
    d = black (brightness), the mean of the L image rounded to an integer (contrast), the L
    image (saturation), L = (19595 R + 38470 G + 7471 B + 2^15) >> 16 as PIL's convert('L').
    `seeds`: int32 [4, 2] stateless seeds (factors; grayscale and order).
    """
    def factor(seed, amount):
        return tf.random.stateless_uniform([], seed, 1.0 - amount, 1.0 + amount)

    def luma(x):
        i = tf.cast(x, tf.int32)
        y = tf.bitwise.right_shift(i[..., 0] * 19595 + i[..., 1] * 38470 + i[..., 2] * 7471
                                   + 0x8000, 16)
        return tf.cast(y, tf.float32)[..., None]

    def blend(degenerate, x, f):
        return tf.floor(tf.clip_by_value(degenerate + f * (x - degenerate), 0.0, 255.0))

    def contrast_degenerate(x):
        mean = tf.reduce_mean(tf.cast(luma(x), tf.float64))
        return tf.cast(tf.floor(mean + 0.5), tf.float32)

    factors = [factor(seeds[i], amount)
               for i, amount in enumerate((brightness, contrast, saturation))]
    degenerates = [tf.zeros_like, contrast_degenerate, luma]
    x = tf.round(image * 255.0)
    order = tf.argsort(tf.random.stateless_uniform(
        [3], tf.random.experimental.stateless_fold_in(seeds[3], 1)))
    for step in range(3):
        adjustments = [(lambda x=x, d=d, f=f: blend(d(x), x, f))
                       for d, f in zip(degenerates, factors, strict=True)]
        x = tf.switch_case(order[step], adjustments)
    to_gray = tf.random.stateless_uniform([], seeds[3]) < grayscale_p
    x = tf.cond(to_gray, lambda: tf.tile(luma(x), [1, 1, 3]), lambda: x)
    return x / 255.0


@dataclasses.dataclass(frozen=True)
class CrmAugment:
    """The CRM training transform (see the module docstring). Attributes are the knobs."""

    seed: int
    crop: int = 224
    brightness: float = 0.2
    contrast: float = 0.05
    saturation: float = 0.05
    grayscale_p: float = 0.1
    coarse: CoarseSpec = CoarseSpec()

    def __call__(self, tf: Any, image: Any, gt: Any, k: Any) -> dict[str, Any]:
        """image uint8 [H, W, 3], gt uint8 [H, W] 0..255 (8-bit, soft), k int64 -> one
        training example {'image', 'mask' in [-1, 1], 'gt' = gt / 255}, float32."""
        base = tf.stack([tf.constant(self.seed, tf.int64), k])
        seeds = tf.random.experimental.stateless_split(tf.cast(base, tf.int64), 7)
        seeds = tf.cast(seeds, tf.int32)
        both = tf.concat([image, gt[..., None]], axis=-1)
        # torchvision pad_if_needed: crop - size zeros on *both* sides of a short axis.
        ph = tf.maximum(self.crop - tf.shape(both)[0], 0)
        pw = tf.maximum(self.crop - tf.shape(both)[1], 0)
        both = tf.pad(both, [[ph, ph], [pw, pw], [0, 0]])
        # Image and mask share one crop and one flip (same stateless seeds).
        both = tf.image.stateless_random_crop(both, [self.crop, self.crop, 4], seeds[0])
        both = tf.image.stateless_random_flip_left_right(both, seeds[1])
        rgb = tf.cast(both[..., :3], tf.float32) / 255.0
        rgb = colour_jitter(tf, rgb, seeds[2:6], self.brightness, self.contrast,
                            self.saturation, self.grayscale_p)
        gt_crop = both[..., 3]
        coarse = tf.ensure_shape(self.coarse.make(tf, gt_crop, seeds[6]), [self.crop, self.crop])
        mean, std = tf.constant(IMAGENET_MEAN), tf.constant(IMAGENET_STD)
        return {
            "image": (rgb - mean) / std,
            "mask": (coarse[..., None] - 0.5) / 0.5,
            "gt": (tf.cast(gt_crop, tf.float32) / 255.0)[..., None],
        }


PNA_RESIZE_MODES = ("shortest_edge", "relative", "mmseg_ratio")
PNA_COLOUR_MODES = ("ssd", "mmseg", "jitter", "none")


@dataclasses.dataclass(frozen=True)
class PnaAugment:
    """PNA training transform: detectron2's `build_sem_seg_train_aug` or mmsegmentation's
    train_pipeline (`seg_transforms`).

    Per example, stateless seeds from (seed, k):
    1. resize with PIL's BILINEAR (image) and NEAREST (label), bit-exact, to
       'shortest_edge': a short side drawn uniformly from `min_sizes`, the long side capped
       at `max_size` (detectron2 ResizeShortestEdge, sample style 'choice'), or
       'relative': the image size times s ~ U[scale_range] (rounded); or with OpenCV's
       INTER_LINEAR (image) and INTER_NEAREST (label) to
       'mmseg_ratio': mmseg's Resize(img_scale, ratio_range=scale_range, keep_ratio=True):
       the keep-ratio size fitting `img_scale` (long, short) times r ~ U[scale_range];
    2. crop min(crop, size) per side, with the category-area rule when
       `single_category_max_area` < 1 (`ignore_label` not counted): `crop_rule`
       'detectron2' (RandomCrop_CategoryAreaConstraint, 10 tries) or 'mmseg'
       (RandomCrop(cat_max_ratio): 10 checked tries, then an 11th window unchecked);
    3. colour: 'ssd' (ColorAugSSDTransform: brightness, contrast, saturation, hue on uint8),
       'mmseg' (PhotoMetricDistortion: the same but hue shifts in [-18, 17]), 'jitter'
       (CRM's `colour_jitter` with brightness / contrast / saturation / grayscale_p) or
       'none';
    4. horizontal flip with probability 0.5;
    5. pad at the bottom / right to crop (image with the ImageNet mean colour, 0 after the
       model's normalisation — detectron2's batch padding and mmseg's Pad(pad_val=0) after
       Normalize; label with `ignore_label`).
    Output: {'image' float32 [ch, cw, 3] RGB in [0, 255] (the PNA model normalises),
    'label' int32 [ch, cw]} for crop (ch, cw). The defaults are the former jax_refine
    recipe ('relative' [0.5, 2], no area rule, 'jitter'); the detectron2 and mmseg configs
    set their reference's values.
    """

    seed: int
    crop: int | tuple[int, int] = 512  # side, or (height, width) (Cityscapes: 512 x 1024)
    resize: str = "relative"
    min_sizes: tuple[int, ...] = ()  # 'shortest_edge': short sides (MIN_SIZE_TRAIN)
    max_size: int = 0  # 'shortest_edge': long side cap (MAX_SIZE_TRAIN), 0 = none
    scale_range: tuple[float, float] = (0.5, 2.0)  # 'relative'; 'mmseg_ratio': ratio_range
    img_scale: tuple[int, int] = (2048, 512)  # 'mmseg_ratio': (long, short) at ratio 1
    # CROP.SINGLE_CATEGORY_MAX_AREA / mmseg cat_max_ratio, 1 = off
    single_category_max_area: float = 1.0
    crop_rule: str = "detectron2"  # or 'mmseg' (seg_transforms.CROP_RULES)
    ignore_label: int = 255
    colour: str = "jitter"
    brightness: float = 0.2  # 'jitter' only
    contrast: float = 0.05
    saturation: float = 0.05
    grayscale_p: float = 0.0

    def __post_init__(self):
        where = f"PnaAugment({self})"
        if self.resize not in PNA_RESIZE_MODES:
            raise ValueError(f"{where}: resize must be one of {PNA_RESIZE_MODES}")
        if self.colour not in PNA_COLOUR_MODES:
            raise ValueError(f"{where}: colour must be one of {PNA_COLOUR_MODES}")
        if self.resize == "shortest_edge" and (not self.min_sizes
                                               or min(self.min_sizes) < 1):
            raise ValueError(f"{where}: 'shortest_edge' needs positive min_sizes")
        if self.crop_rule not in seg_transforms.CROP_RULES:
            raise ValueError(f"{where}: crop_rule must be one of {seg_transforms.CROP_RULES}")
        if not 0.0 < self.single_category_max_area <= 1.0:
            raise ValueError(f"{where}: single_category_max_area must be in (0, 1]")

    def _size(self, tf: Any, shape: Any, seed: Any) -> Any:
        if self.resize == "shortest_edge":
            sizes = tf.constant(self.min_sizes, tf.int32)
            i = tf.random.stateless_uniform([], seed, 0, len(self.min_sizes), dtype=tf.int32)
            return seg_transforms.shortest_edge_size(tf, shape[0], shape[1], sizes[i],
                                                     self.max_size)
        if self.resize == "mmseg_ratio":
            scale = seg_transforms.mmseg_ratio_scale(tf, self.img_scale, self.scale_range, seed)
            return seg_transforms.mmcv_rescale_size(tf, shape[0], shape[1], scale)
        scale = tf.random.stateless_uniform([], seed, *self.scale_range)
        return tf.maximum(tf.cast(tf.round(tf.cast(shape, tf.float32) * scale), tf.int32), 1)

    def __call__(self, tf: Any, image: Any, label: Any, k: Any) -> dict[str, Any]:
        base = tf.stack([tf.constant(self.seed, tf.int64), k])
        seeds = tf.cast(tf.random.experimental.stateless_split(base, 4), tf.int32)
        size = self._size(tf, tf.shape(label), seeds[0])
        if self.resize == "mmseg_ratio":
            rgb, lbl = seg_transforms.resize_cv2(tf, image, label, size)
        else:
            rgb = seg_transforms.resize_bilinear_pil(tf, image, size)
            lbl = seg_transforms.resize_nearest_pil(tf, label, size)
        ch, cw = crop_hw(self.crop)
        y0, x0, h, w = tf.unstack(seg_transforms.category_area_crop(
            tf, lbl, (ch, cw), seeds[1], self.single_category_max_area, self.ignore_label,
            rule=self.crop_rule))
        rgb, lbl = rgb[y0:y0 + h, x0:x0 + w], lbl[y0:y0 + h, x0:x0 + w]
        if self.colour in ("ssd", "mmseg"):
            draws = seg_transforms.ssd_draws(tf, seeds[2], hue_inclusive=self.colour == "ssd")
            rgb = tf.cast(seg_transforms.color_aug_ssd(tf, rgb, draws), tf.float32)
        elif self.colour == "jitter":
            jitter_seeds = tf.random.experimental.stateless_split(seeds[2], 4)
            rgb = 255.0 * colour_jitter(tf, tf.cast(rgb, tf.float32) / 255.0, jitter_seeds,
                                        self.brightness, self.contrast, self.saturation,
                                        self.grayscale_p)
        else:
            rgb = tf.cast(rgb, tf.float32)
        both = tf.concat([rgb, tf.cast(lbl, tf.float32)[..., None]], axis=-1)
        both = tf.image.stateless_random_flip_left_right(both, seeds[3])
        pads = [[0, ch - h], [0, cw - w]]
        mean = 255.0 * tf.constant(IMAGENET_MEAN)
        image = tf.ensure_shape(tf.pad(both[..., :3] - mean, pads + [[0, 0]]) + mean,
                                [ch, cw, 3])
        label = tf.pad(tf.cast(both[..., 3], tf.int32), pads,
                       constant_values=self.ignore_label)
        return {"image": image, "label": tf.ensure_shape(label, [ch, cw])}


def crop_hw(crop: int | Sequence[int]) -> tuple[int, int]:
    """A crop size given as a side or as (height, width) -> (height, width)."""
    if isinstance(crop, int):
        return crop, crop
    h, w = crop
    return int(h), int(w)


# ----------------------------------------------------------------------------- dataset


def train_dataset(
    loader: Loader,
    augment: CrmAugment | PnaAugment,
    *,
    global_batch_size: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int = 2,
    workers: int | None = None,
    threads: int | None = None,
) -> Any:
    """tf.data.Dataset of this process's local batches, starting at global step `start_step`.

    Elements: {'image' [b, crop, crop, 3], 'mask' [b, crop, crop, 1], 'gt' [b, crop, crop, 1]}
    float32 with b = global_batch_size / process_count (with a `PnaAugment`: {'image',
    'label' int32 [b, crop, crop]} — the same indexing serves the PNA pipeline).

    A loader that holds the GIL for much of its time (Python scene rendering) runs in
    `workers` processes, a bounded window of examples ahead, in order; it must pickle (the
    sources here do). None: 0 for a loader whose class sets `gil_free = True`
    (`RecordSource`: C++ reading and decoding), otherwise one per core this process may use,
    at most MAX_WORKERS; 0: in tf.data's threads through `tf.numpy_function`. The
    augmentation is TensorFlow ops in a parallel (AUTOTUNE, deterministic) map on a pool of
    `threads` threads (None: TF's default, one per core). Example k is a pure function of
    (seed, k): the batches are bitwise the same whatever `workers` and `threads`.
    """
    tf = _tf()
    if global_batch_size % process_count:
        raise ValueError(f"batch size {global_batch_size} not divisible by {process_count} "
                         f"processes")
    local = global_batch_size // process_count
    first = process_index * local
    if workers is None:
        cores = min(len(os.sched_getaffinity(0)), MAX_WORKERS)
        workers = 0 if getattr(loader, "gil_free", False) else cores
    if workers < 0 or (threads is not None and threads < 1):
        raise ValueError(f"workers must be >= 0 and threads >= 1, got {workers}, {threads}")

    def indices():  # this process's example numbers, from start_step on
        for step in itertools.count(start_step):
            start = step * global_batch_size + first
            yield from range(start, start + local)

    specs = (tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([None, None], tf.uint8),
             tf.TensorSpec([], tf.int64))
    if workers:
        def examples():
            for k, (image, gt) in zip(indices(), _in_workers(loader, indices(), workers),
                                      strict=False):
                yield image, gt, k

        ds = tf.data.Dataset.from_generator(examples, output_signature=specs)
    else:
        def load(k):
            image, gt = tf.numpy_function(lambda i: loader(int(i)), [k], [tf.uint8, tf.uint8],
                                          stateful=False)
            return tf.ensure_shape(image, specs[0].shape), tf.ensure_shape(gt, specs[1].shape), k

        def step_indices(step):
            start = step * global_batch_size + first
            return tf.data.Dataset.range(start, start + local)

        ds = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max // global_batch_size)
        ds = ds.flat_map(step_indices)
        ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # The transforms use explicit tf.cond / tf.while_loop: no AutoGraph conversion (which
    # took most of the pipeline's set-up time).
    transform = tf.autograph.experimental.do_not_convert(
        lambda image, gt, k: augment(tf, image, gt, k))
    ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local, drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True
    if threads is not None:
        options.threading.private_threadpool_size = threads
    return ds.with_options(options).prefetch(prefetch)


_EXITING = threading.Event()


@atexit.register  # runs before multiprocessing's own exit handler (LIFO)
def _let_tf_data_go() -> None:
    """At exit, end the open worker iterators and give tf.data's threads time to leave
    Python: a thread still waiting in there when the interpreter finalises hangs the exit."""
    _EXITING.set()
    time.sleep(0.5)


def _start_worker(parent: int) -> None:
    """Worker set-up: one core per worker; exit when the parent dies (even by SIGKILL)."""
    cv2.setNumThreads(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _in_workers(loader: Loader, ks: Iterator[int], workers: int
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """loader(k) for k in ks, computed by `workers` fresh ('spawn') processes, in order, at
    most 4 per worker ahead of the consumer. The processes end with the iterator, with their
    parent, and at interpreter exit. An open iterator's tf.data thread waits in here: at exit
    it is let go first (`_EXITING`), else TF's shutdown waits for it forever."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a process running TF/JAX threads
    with ctx.Pool(workers, _start_worker, (os.getpid(),)) as pool:  # exit: terminate()
        pending = collections.deque(pool.apply_async(loader, (k,))
                                    for k in itertools.islice(ks, 4 * workers))
        while pending:
            future = pending.popleft()
            while not future.ready():
                if _EXITING.is_set():  # let tf.data's thread leave before the pool ends
                    return
                future.wait(0.1)
            pending.extend(pool.apply_async(loader, (k,)) for k in itertools.islice(ks, 1))
            yield future.get()


def as_numpy(ds: Any) -> Iterator[dict[str, np.ndarray]]:
    """Iterate a tf.data.Dataset as numpy dicts."""
    return iter(ds.as_numpy_iterator())
