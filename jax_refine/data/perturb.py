"""Coarse masks made from ground truth, as the reference papers make them.

* `perturb_mask` — CascadePSP/CRM training perturbation (`boundary_modification.py` +
  `de_transform.py`): contour thinning, then rounds of random dilations/erosions inside random
  rectangles until the IoU with the thinned mask (the reference; or with the ground truth,
  `iou_against='gt'`) falls below a target.
* `coarse_from_lowres` — imitates a low-resolution segmenter: area-downsample, blur, a smooth
  random bias, bilinear upsample, threshold. Boundaries are blobby; thin parts are lost.

Both take an explicit `numpy.random.Generator` and are deterministic given its state. Masks
are 2-D; nonzero is foreground (the reference perturbs `np.array(gt) > 0.5` of the 8-bit
GT, i.e. > 0, so a soft GT's faint pixels count); results are uint8 {0, 1}.

* `perturb_mask_tf` — the same perturbation as TensorFlow graph ops for tf.data (the training
  pipelines; no GIL, so parallel map threads scale), seeded statelessly. Its random draws are
  its own (`rectangle_draws_tf`), so for a seed it gives another mask than `perturb_mask`
  for a Generator, from the same distribution; given the same thinned mask and the same
  rectangles (`modify_rounds` accepts any), the two are bitwise equal (tests/test_perturb.py).
  Evaluation keeps `perturb_mask`: its masks, and the scores on them, stay as they were.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import cv2
import numpy as np

CONTOUR_MIN_VERTICES = 10
REGIONAL_REMOVE_RATE = 0.1  # share of consecutive contour vertices cut away
VERTEX_KEEP_RATE = 0.1  # share of the remaining vertices kept
MAX_ROUNDS = 250
RECTANGLES_PER_ROUND = 4
IOU_AGAINST = ("thinned", "gt")  # what the rounds' IoU stop compares with


def _binary(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array, got shape {mask.shape}")
    return (mask != 0).astype(np.uint8)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def thin_contours(gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Step 1 of the reference: redraw every contour with a run cut out and 10% of vertices.

    For each contour (cv2.RETR_LIST, CHAIN_APPROX_NONE) with >= 10 vertices: remove a run of
    10% consecutive vertices, its start drawn among the 10% of positions whose run endpoints
    are closest; keep a random 10% of the remaining vertices (in order); fill all modified
    contours. If no contour qualifies, the mask is returned unchanged.
    """
    mask = _binary(gt, "gt")
    contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    modified = []
    for contour in contours:
        vertices = contour.shape[0]
        if vertices < CONTOUR_MIN_VERTICES:
            continue
        removes = int(vertices * REGIONAL_REMOVE_RATE)
        points = contour[:, 0, :].astype(np.int64)
        gaps = np.sum((points[: vertices - removes] - points[removes:]) ** 2, axis=1)
        order = np.argsort(gaps, kind="stable")
        start = int(order[rng.integers(math.ceil(0.1 * len(order)))])
        kept = np.concatenate([contour[:start], contour[start + removes :]], axis=0)
        indices = np.sort(rng.choice(len(kept), int(len(kept) * VERTEX_KEEP_RATE), replace=False))
        if len(indices):
            modified.append(kept[indices])
    if not modified:
        return mask.copy()
    out = np.zeros_like(mask)
    cv2.drawContours(out, modified, -1, 1, thickness=cv2.FILLED)
    return out


def structuring_element(kernel: int) -> np.ndarray:
    """Structuring element number `kernel` in [0, NUM_KERNELS): uint8 [h, w], cv2's anchor.

    kernel = (size - 3) * 4 + shape for size 3..9 and shape 0: rect size x size, 1: ellipse
    size x size, 2: ellipse of half the height, 3: ellipse of half the width.
    """
    size, shape = divmod(int(kernel), 4)
    size += 3
    if shape == 0:
        return cv2.getStructuringElement(cv2.MORPH_RECT, (size, size))
    widths_heights = {1: (size, size), 2: (size, size // 2), 3: (size // 2, size)}
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, widths_heights[shape])


NUM_KERNELS = 7 * 4
KERNEL_REACH = 4  # every element fits in a 9 x 9 square centred on its anchor


def kernel_bank() -> np.ndarray:
    """float32 [NUM_KERNELS, 9, 9, 1, 1]: each structuring element with its anchor at (4, 4)
    (a conv2d filter bank).

    cv2 anchors an element of size (w, h) at (w // 2, h // 2) and computes
    dilate(x)[i, j] = max over element pixels (a, b) of x[i + a - h // 2, j + b - w // 2];
    a 9 x 9 'SAME' cross-correlation with this bank (4 pixels of zero padding before) visits
    the same pixels.
    """
    side = 2 * KERNEL_REACH + 1
    bank = np.zeros((NUM_KERNELS, side, side, 1, 1), np.float32)
    for kernel in range(NUM_KERNELS):
        element = structuring_element(kernel)
        h, w = element.shape
        top, left = KERNEL_REACH - h // 2, KERNEL_REACH - w // 2
        bank[kernel, top:top + h, left:left + w, 0, 0] = element
    return bank


# A rectangle of the rounds: (y0, x0, y1, x1, centre, dilate, kernel): rows [y0, y1) and
# columns [x0, x1); centre -1 (untouched) or the value the centre pixel is set to; dilate 1
# (dilate) or 0 (erode); kernel an index of `structuring_element`.
Rectangle = tuple[int, int, int, int, int, int, int]


def draw_rectangle(rng: np.random.Generator, height: int, width: int) -> Rectangle:
    """The reference's random rectangle: corners, centre seed (p 0.25), operation, element."""
    x0, y0 = int(rng.integers(width)), int(rng.integers(height))
    x1, y1 = int(rng.integers(x0 + 1, width + 1)), int(rng.integers(y0 + 1, height + 1))
    centre = int(rng.integers(2)) if rng.random() < 0.25 else -1
    dilate = int(rng.random() < 0.5)
    size, shape = int(rng.integers(3, 10)), int(rng.integers(1, 5))
    return y0, x0, y1, x1, centre, dilate, (size - 3) * 4 + shape - 1


def modify_rectangle(seg: np.ndarray, rectangle: Sequence[int]) -> None:
    """Apply one rectangle to `seg` in place: set its centre pixel, then dilate or erode it.

    cv2 sees only the rectangle: pixels outside it take no part (cv2's default border).
    """
    y0, x0, y1, x1, centre, dilate, kernel = (int(v) for v in rectangle)
    if centre >= 0:
        seg[(y0 + y1) // 2, (x0 + x1) // 2] = centre
    op = cv2.dilate if dilate else cv2.erode
    seg[y0:y1, x0:x1] = op(seg[y0:y1, x0:x1], structuring_element(kernel), iterations=1)


def modify_rounds(
    seg: np.ndarray,
    truth: np.ndarray,
    iou_target: float,
    rectangles: Iterable[Sequence[int]],
    max_rounds: int = MAX_ROUNDS,
) -> np.ndarray:
    """Rounds of `RECTANGLES_PER_ROUND` rectangles on `seg` (in place) until IoU(seg, truth)
    falls below `iou_target` after a round, or `max_rounds` rounds. Returns `seg`."""
    rectangles = iter(rectangles)
    for _ in range(max_rounds):
        for _ in range(RECTANGLES_PER_ROUND):
            modify_rectangle(seg, next(rectangles))
        if _iou(seg, truth) < iou_target:
            break
    return seg


def _check_against(iou_against: str) -> None:
    if iou_against not in IOU_AGAINST:
        raise ValueError(f"iou_against must be one of {IOU_AGAINST}, got {iou_against!r}")


def perturb_mask(
    gt: np.ndarray,
    iou_target: float,
    rng: np.random.Generator,
    *,
    max_rounds: int = MAX_ROUNDS,
    iou_against: str = "thinned",
) -> np.ndarray:
    """Degrade a ground-truth mask until its IoU falls below `iou_target`.

    The reference algorithm: `thin_contours`, then up to `max_rounds` rounds of 4 random
    rectangles; in each, with probability 0.25 the rectangle's centre pixel is set to 0 or 1
    (seeds for holes and islands), then the rectangle is dilated or eroded (equal odds) with a
    rect / ellipse / half-height / half-width ellipse element of size 3..9. After each round
    the loop stops once the IoU is below the target: the IoU with the contour-thinned mask,
    as the reference (`perturb_seg(thinned, iou_target)`), so the result's IoU with `gt` is
    lower still by what the thinning cost; or, with `iou_against='gt'`, the IoU with `gt`
    itself (the result lands just below the target whenever the loop stops early; on small
    masks at large sizes it may not get there within `max_rounds`). An empty `gt` is
    returned as is. `perturb_mask_tf` is the same algorithm as TensorFlow graph ops.

    Args:
      gt: 2-D ground truth, nonzero = foreground.
      iou_target: stop once the IoU < iou_target (training draws it from [0.8, 1)).
      rng: the only source of randomness.
      max_rounds: round limit (250 in the reference).
      iou_against: 'thinned' (the reference) or 'gt'.

    Returns:
      uint8 {0, 1} mask of gt's shape.
    """
    _check_against(iou_against)
    truth = _binary(gt, "gt")
    if not truth.any():
        return truth.copy()
    seg = thin_contours(truth, rng)
    height, width = seg.shape
    if height <= 2 or width <= 2:
        return seg
    rectangles = (draw_rectangle(rng, height, width) for _ in itertools.count())
    reference = seg.copy() if iou_against == "thinned" else truth
    return modify_rounds(seg, reference, iou_target, rectangles, max_rounds)


# ----------------------------------------------------------------------------- graph ops


def numpy_rng(seed: np.ndarray) -> np.random.Generator:
    """A numpy Generator from a stateless TF seed (int32 [2], possibly negative)."""
    return np.random.default_rng(np.asarray(seed, np.int64) & 0xFFFFFFFF)


def rectangle_draws_tf(seed: Any, height: Any, width: Any, count: int) -> Any:
    """int32 [count, 7] `Rectangle`s drawn from a stateless seed (int32 [2]) for a mask of
    height x width: the distribution of `draw_rectangle` (other values)."""
    import tensorflow as tf

    r = tf.random.stateless_uniform([count, 7], seed, minval=0, maxval=2**31 - 1,
                                    dtype=tf.int64)
    height, width = tf.cast(height, tf.int64), tf.cast(width, tf.int64)
    x0, y0 = r[:, 0] % width, r[:, 1] % height
    x1, y1 = x0 + 1 + r[:, 2] % (width - x0), y0 + 1 + r[:, 3] % (height - y0)
    centre = tf.where(r[:, 4] % 4 == 0, (r[:, 4] // 4) % 2, -1)
    dilate, kernel = r[:, 5] % 2, r[:, 6] % NUM_KERNELS
    return tf.cast(tf.stack([y0, x0, y1, x1, centre, dilate, kernel], axis=1), tf.int32)


def dilate_tf(mask: Any, kernel: Any, bank: Any) -> Any:
    """cv2.dilate of a float32 {0, 1} [h, w] mask by `structuring_element(kernel)`, pixels
    outside the mask taking no part (zero padding): float32 {0, 1} [h, w].

    bank: `kernel_bank()` as a tensor. The element's pixel count under it is exact in
    float32; the conv2d is the fastest of the TF CPU kernels tried (dilation2d, run sums on
    prefix sums, gathers).
    """
    import tensorflow as tf

    hits = tf.nn.conv2d(mask[None, :, :, None], tf.gather(bank, kernel), 1, "SAME")
    return tf.cast(hits[0, :, :, 0] > 0.5, tf.float32)


def modify_rounds_tf(seg: Any, truth: Any, iou_target: Any, rectangles: Any,
                     max_rounds: int = MAX_ROUNDS) -> Any:
    """`modify_rounds` as graph ops: float32 {0, 1} [H, W] masks, rectangles int32
    [>= max_rounds * 4, 7], iou_target float64. Bitwise the same mask as `modify_rounds`.

    Erosion is the complement of the dilation of the complement (`dilate_tf`), outside
    pixels again taking no part, as cv2 computes both on the rectangle alone.
    """
    import tensorflow as tf

    bank = tf.constant(kernel_bank())

    def rectangle(seg, r):
        begin, end = r[0:2], r[2:4]
        centre, erode = r[4], tf.cast(1 - r[5], tf.float32)
        at = ((begin + end) // 2)[None]
        value = tf.where(centre >= 0, tf.cast(centre, tf.float32), tf.gather_nd(seg, at)[0])
        seg = tf.tensor_scatter_nd_update(seg, at, value[None])
        window = tf.abs(tf.slice(seg, begin, end - begin) - erode)  # complement to erode
        out = tf.abs(dilate_tf(window, r[6], bank) - erode)
        return tf.raw_ops.TensorStridedSliceUpdate(input=seg, begin=begin, end=end,
                                                   strides=[1, 1], value=out)

    def iou(seg):
        inter = tf.cast(tf.reduce_sum(seg * truth), tf.float64)
        union = tf.cast(tf.reduce_sum(tf.maximum(seg, truth)), tf.float64)
        return tf.where(union > 0, inter / tf.maximum(union, 1.0), tf.constant(1.0, tf.float64))

    def body(i, seg, _):
        for j in range(RECTANGLES_PER_ROUND):
            seg = rectangle(seg, rectangles[i * RECTANGLES_PER_ROUND + j])
        return i + 1, seg, iou(seg)

    def cond(i, seg, score):
        return (i < max_rounds) & (score >= iou_target)

    start = (tf.constant(0), seg, tf.constant(np.inf, tf.float64))
    return tf.while_loop(cond, body, start)[1]


def perturb_mask_tf(gt: Any, iou_target: Any, seed: Any, *, max_rounds: int = MAX_ROUNDS,
                    iou_against: str = "thinned") -> Any:
    """`perturb_mask` as TensorFlow ops (for tf.data): uint8 [H, W] gt (nonzero =
    foreground), float64 target, stateless int32 [2] seed -> uint8 {0, 1} [H, W];
    `iou_against` as `perturb_mask`'s.

    `thin_contours` (cv2's contour tracing, no graph op) runs in a `tf.numpy_function` with a
    numpy Generator seeded from `seed`; its few calls release the GIL for their cv2 work.
    The rounds are `modify_rounds_tf` on `rectangle_draws_tf(seed)`: given the same thinned
    mask and rectangles, the result is bitwise `modify_rounds`'s.
    """
    import tensorflow as tf

    _check_against(iou_against)
    seeds = tf.random.experimental.stateless_split(seed, 2)
    truth = tf.cast(gt != 0, tf.uint8)

    seg = tf.numpy_function(lambda mask, s: thin_contours(mask, numpy_rng(s)),
                            [truth, seeds[0]], tf.uint8, stateful=False)
    seg = tf.reshape(seg, tf.shape(truth))
    height, width = tf.shape(truth)[0], tf.shape(truth)[1]

    def rounds():
        rects = rectangle_draws_tf(seeds[1], height, width, max_rounds * RECTANGLES_PER_ROUND)
        reference = seg if iou_against == "thinned" else truth
        out = modify_rounds_tf(tf.cast(seg, tf.float32), tf.cast(reference, tf.float32),
                               tf.cast(iou_target, tf.float64), rects, max_rounds)
        return tf.cast(out, tf.uint8)

    work = tf.reduce_any(truth > 0) & (height > 2) & (width > 2)
    return tf.cond(work, rounds, lambda: seg)


def coarse_from_lowres(
    gt: np.ndarray,
    factor: float,
    rng: np.random.Generator,
    *,
    blur: tuple[float, float] = (0.5, 1.5),
    bias: float = 0.15,
) -> np.ndarray:
    """Imitate a segmenter that saw the image at 1/`factor` of its resolution.

    Area-downsample the mask by `factor`, blur it (Gaussian, sigma drawn from `blur` in
    low-resolution pixels), add a smooth random bias field of amplitude `bias` (the segmenter's
    confident and unsure areas), upsample bilinearly to full size and threshold at a level
    drawn from [0.4, 0.6]. Thin structures narrower than about `factor`/2 pixels disappear.

    Returns:
      uint8 {0, 1} mask of gt's shape.
    """
    truth = _binary(gt, "gt").astype(np.float32)
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    height, width = truth.shape
    low_h, low_w = max(1, round(height / factor)), max(1, round(width / factor))
    low = cv2.resize(truth, (low_w, low_h), interpolation=cv2.INTER_AREA)
    low = cv2.GaussianBlur(low, (0, 0), sigmaX=float(rng.uniform(*blur)))
    field = rng.uniform(-bias, bias, size=(4, 4)).astype(np.float32)
    low += cv2.resize(field, (low_w, low_h), interpolation=cv2.INTER_CUBIC)
    prob = cv2.resize(low, (width, height), interpolation=cv2.INTER_LINEAR)
    return (prob > rng.uniform(0.4, 0.6)).astype(np.uint8)
