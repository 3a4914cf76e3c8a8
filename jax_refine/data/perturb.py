"""Coarse masks made from ground truth, as the reference papers make them.

* `perturb_mask` — CascadePSP/CRM training perturbation (`boundary_modification.py` +
  `de_transform.py`): contour thinning, then rounds of random dilations/erosions inside random
  rectangles until the IoU with the ground truth falls below a target.
* `coarse_from_lowres` — imitates a low-resolution segmenter: area-downsample, blur, a smooth
  random bias, bilinear upsample, threshold. Boundaries are blobby; thin parts are lost.

Both take an explicit `numpy.random.Generator` and are deterministic given its state. Masks
are 2-D; nonzero is foreground; results are uint8 {0, 1}.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

CONTOUR_MIN_VERTICES = 10
REGIONAL_REMOVE_RATE = 0.1  # share of consecutive contour vertices cut away
VERTEX_KEEP_RATE = 0.1  # share of the remaining vertices kept
MAX_ROUNDS = 250
RECTANGLES_PER_ROUND = 4


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


def _random_structure(rng: np.random.Generator, size: int) -> np.ndarray:
    choice = int(rng.integers(1, 5))
    if choice == 1:
        return cv2.getStructuringElement(cv2.MORPH_RECT, (size, size))
    if choice == 2:
        return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    if choice == 3:
        return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size // 2))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size // 2, size))


def perturb_mask(
    gt: np.ndarray,
    iou_target: float,
    rng: np.random.Generator,
    *,
    max_rounds: int = MAX_ROUNDS,
) -> np.ndarray:
    """Degrade a ground-truth mask until its IoU with `gt` falls below `iou_target`.

    The reference algorithm: `thin_contours`, then up to `max_rounds` rounds of 4 random
    rectangles; in each, with probability 0.25 the rectangle's centre pixel is set to 0 or 1
    (seeds for holes and islands), then the rectangle is dilated or eroded (equal odds) with a
    rect / ellipse / half-height / half-width ellipse element of size 3..9. After each round
    the loop stops once the IoU is below the target.

    One deliberate difference: the reference's stopping test compares with the
    contour-thinned mask; here it compares with `gt` itself, so the returned mask's IoU with
    the ground truth is below the target whenever the loop stops early (on small masks at
    large sizes it may not get there within `max_rounds`). An empty `gt` is returned as is.

    Args:
      gt: 2-D ground truth, nonzero = foreground.
      iou_target: stop once IoU(result, gt) < iou_target (training draws it from [0.8, 1)).
      rng: the only source of randomness.
      max_rounds: round limit (250 in the reference).

    Returns:
      uint8 {0, 1} mask of gt's shape.
    """
    truth = _binary(gt, "gt")
    if not truth.any():
        return truth.copy()
    seg = thin_contours(truth, rng)
    height, width = seg.shape
    if height <= 2 or width <= 2:
        return seg
    for _ in range(max_rounds):
        for _ in range(RECTANGLES_PER_ROUND):
            x0, y0 = int(rng.integers(width)), int(rng.integers(height))
            x1, y1 = int(rng.integers(x0 + 1, width + 1)), int(rng.integers(y0 + 1, height + 1))
            if rng.random() < 0.25:
                seg[(y0 + y1) // 2, (x0 + x1) // 2] = int(rng.integers(2))
            dilate = rng.random() < 0.5
            kernel = _random_structure(rng, int(rng.integers(3, 10)))
            window = seg[y0:y1, x0:x1]
            op = cv2.dilate if dilate else cv2.erode
            seg[y0:y1, x0:x1] = op(window, kernel, iterations=1)
        if _iou(seg, truth) < iou_target:
            break
    return seg


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
