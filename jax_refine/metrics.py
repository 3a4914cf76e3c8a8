"""Segmentation metrics of the reference papers (numpy/OpenCV; no JAX).

* `iou` — intersection over union of two binary masks.
* `boundary_accuracy` — mBA, CascadePSP's mean boundary accuracy (`util/compute_boundary_acc.py`):
  for radii r_i = 1 + int((max_r - 1) / 5 * i), i = 0..4, with max_r = (H + W) / 300, the
  boundary region is the morphological gradient of the ground truth with OpenCV's elliptical
  disk of size 2r+1; the accuracy is the share of boundary pixels where prediction == GT; mBA is
  the mean over the five radii.
* `boundary_accuracy_multiclass` — the multi-class variant (union of per-class boundaries).
* `ConfusionMatrix` — streaming confusion matrix for semantic segmentation: mIoU, fwIoU, mACC,
  pACC as detectron2's `SemSegEvaluator` or mmsegmentation's `mean_iou` define them.

All functions take 2-D arrays (bool or integer); the binary ones treat nonzero as foreground.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

MBA_NUM_RADII = 5
IOU_CLASSES = ("gt_or_pred", "gt")  # which classes count in the mIoU (see ConfusionMatrix)


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.ndim != 2 or gt.ndim != 2:
        raise ValueError(
            f"expected 2-D arrays, got pred of shape {pred.shape} and gt of shape {gt.shape}"
        )
    if pred.shape != gt.shape:
        raise ValueError(f"shape mismatch: pred {pred.shape} vs gt {gt.shape}")
    if pred.size == 0:
        raise ValueError(f"empty arrays: pred {pred.shape}, gt {gt.shape}")
    for name, array in (("pred", pred), ("gt", gt)):
        if not (array.dtype == bool or np.issubdtype(array.dtype, np.integer)):
            raise ValueError(f"{name} must be bool or integer, got dtype {array.dtype}")
    return pred, gt


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """|pred ∧ gt| / |pred ∨ gt| of two binary masks; 1.0 when both are empty.

    Dataset-level IoU as in the reference evaluation (sum of intersections over sum of
    unions) uses `intersection_union` instead.
    """
    intersection, union = intersection_union(pred, gt)
    return 1.0 if union == 0 else intersection / union


def intersection_union(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """Pixel counts (|pred ∧ gt|, |pred ∨ gt|) of two binary masks (nonzero = foreground)."""
    pred, gt = _check_pair(pred, gt)
    pred, gt = pred != 0, gt != 0
    return int(np.count_nonzero(pred & gt)), int(np.count_nonzero(pred | gt))


def mba_radii(height: int, width: int) -> list[int]:
    """CascadePSP's five boundary radii for an image of the given size."""
    max_radius = (width + height) / 300
    return [1 + int((max_radius - 1) / MBA_NUM_RADII * i) for i in range(MBA_NUM_RADII)]


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _morphological_gradient(mask: np.ndarray, radius: int) -> np.ndarray:
    """`cv2.morphologyEx(mask, MORPH_GRADIENT, disk(radius)) > 0` of a uint8 {0, 1} mask.

    OpenCV ignores pixels outside the image (its default morphology border), as the
    reference does.
    """
    return cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, _disk(radius)) > 0


def boundary_accuracy(pred: np.ndarray, gt: np.ndarray) -> float:
    """mBA of a binary prediction (CascadePSP definition, nonzero = foreground).

    Returns NaN when the ground truth has no boundary (empty or full mask): there is nothing
    to measure, as in the reference (which divides 0 by 0). Aggregate with `np.nanmean`.
    """
    pred, gt = _check_pair(pred, gt)
    mask = (gt != 0).astype(np.uint8)
    correct = (pred != 0) == (gt != 0)  # the same for every radius
    accuracies = []
    for radius in mba_radii(*gt.shape):
        region = _morphological_gradient(mask, radius)
        count = np.count_nonzero(region)
        if count == 0:
            return float("nan")
        accuracies.append(np.count_nonzero(region & correct) / count)
    return float(np.mean(accuracies))


def boundary_accuracy_multiclass(
    pred: np.ndarray, gt: np.ndarray, void_label: int | None = 0
) -> float:
    """Multi-class mBA: boundaries of every GT class except `void_label`, united.

    Per radius, the boundary region is the union of the morphological gradients of
    `gt == c` for each class c present (skipping `void_label`, 0 as in CascadePSP's ADE/
    PASCAL evaluation); void pixels inside it are discounted; the accuracy is the share of the
    remaining pixels where pred == gt. The reference subtracts the void count from its
    numerator, which equals this whenever the prediction is void where the GT is void (and
    goes wrong otherwise); this function discounts void pixels exactly. NaN when there is no
    boundary.
    """
    pred, gt = _check_pair(pred, gt)
    classes = [c for c in np.unique(gt) if void_label is None or c != void_label]
    valid = np.ones(gt.shape, bool) if void_label is None else gt != void_label
    correct = pred == gt
    accuracies = []
    for radius in mba_radii(*gt.shape):
        region = np.zeros(gt.shape, bool)
        for c in classes:
            region |= _morphological_gradient((gt == c).astype(np.uint8), radius)
        region &= valid
        count = np.count_nonzero(region)
        if count == 0:
            return float("nan")
        accuracies.append(np.count_nonzero(region & correct) / count)
    return float(np.mean(accuracies))


class ConfusionMatrix:
    """Streaming confusion matrix; rows are ground truth, columns predictions.

    Attributes:
      num_classes: labels are 0..num_classes-1; `ignore_label` pixels are skipped.
      matrix: int64 [num_classes, num_classes] counts.
    """

    def __init__(self, num_classes: int, ignore_label: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.matrix = np.zeros((num_classes, num_classes), np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one prediction / label-map pair (2-D integer arrays of equal shape)."""
        pred, gt = _check_pair(pred, gt)
        keep = gt != self.ignore_label
        pred, gt = pred[keep].astype(np.int64), gt[keep].astype(np.int64)
        for name, values in (("gt", gt), ("pred", pred)):
            if values.size and (values.min() < 0 or values.max() >= self.num_classes):
                raise ValueError(
                    f"{name} has labels outside 0..{self.num_classes - 1} "
                    f"(and not the ignore label {self.ignore_label}): "
                    f"min {values.min()}, max {values.max()}"
                )
        self.matrix += np.bincount(
            gt * self.num_classes + pred, minlength=self.num_classes**2
        ).reshape(self.num_classes, self.num_classes)

    def per_class_iou(self, iou_classes: str = "gt_or_pred") -> np.ndarray:
        """IoU per class, float64 [num_classes]; NaN for the classes that do not count.

        `iou_classes` says which classes count, where the two reference evaluators differ:
        'gt_or_pred' (mmsegmentation's `mean_iou`: every class with a nonzero union, so a
        class predicted but absent from the ground truth scores 0) or 'gt' (detectron2's
        `SemSegEvaluator`: only classes present in the ground truth).
        """
        if iou_classes not in IOU_CLASSES:
            raise ValueError(f"iou_classes must be one of {IOU_CLASSES}, got {iou_classes!r}")
        true_positive = np.diag(self.matrix).astype(np.float64)
        in_gt = self.matrix.sum(1)
        union = self.matrix.sum(0) + in_gt - true_positive
        keep = union > 0 if iou_classes == "gt_or_pred" else in_gt > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(keep, true_positive / union, np.nan)

    def per_class_accuracy(self) -> np.ndarray:
        """Recall per class (correct / ground-truth pixels), float64 [num_classes]; NaN for
        classes absent from the ground truth (both references)."""
        in_gt = self.matrix.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(in_gt > 0, np.diag(self.matrix) / in_gt, np.nan)

    def mean_iou(self, iou_classes: str = "gt_or_pred",
                 classes: Sequence[int] | None = None) -> float:
        """Mean IoU over the counting classes (`per_class_iou(iou_classes)`), restricted to
        `classes` if given (e.g. Trans10k's two transparent classes); NaN if none counts."""
        return _nanmean(self._subset(self.per_class_iou(iou_classes), classes))

    def mean_class_accuracy(self, classes: Sequence[int] | None = None) -> float:
        """mACC: mean per-class accuracy over the classes present in the ground truth
        (restricted to `classes` if given); NaN if none."""
        return _nanmean(self._subset(self.per_class_accuracy(), classes))

    def frequency_weighted_iou(self) -> float:
        """fwIoU (detectron2): sum of IoU_c * |GT_c| / |GT| over the classes present in the
        ground truth; NaN without ground-truth pixels."""
        in_gt = self.matrix.sum(1).astype(np.float64)
        if in_gt.sum() == 0:
            return float("nan")
        iou = self.per_class_iou("gt")
        keep = in_gt > 0
        return float(np.sum(iou[keep] * in_gt[keep]) / in_gt.sum())

    def pixel_accuracy(self) -> float:
        """pACC: share of non-ignored pixels predicted correctly."""
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else float("nan")

    def summary(self, iou_classes: str = "gt_or_pred",
                classes: Sequence[int] | None = None) -> dict[str, Any]:
        """{'miou', 'fwiou', 'macc', 'pacc', 'per_class_iou', 'per_class_acc'}: the means as
        floats (mIoU and mACC over `classes` if given), the per-class lists with None for the
        classes that do not count."""
        def listed(values: np.ndarray) -> list[float | None]:
            return [None if np.isnan(v) else float(v) for v in values]

        return {"miou": self.mean_iou(iou_classes, classes), "fwiou": self.frequency_weighted_iou(),
                "macc": self.mean_class_accuracy(classes), "pacc": self.pixel_accuracy(),
                "per_class_iou": listed(self.per_class_iou(iou_classes)),
                "per_class_acc": listed(self.per_class_accuracy())}

    def _subset(self, values: np.ndarray, classes: Sequence[int] | None) -> np.ndarray:
        if classes is None or len(classes) == 0:
            return values
        bad = [c for c in classes if not 0 <= int(c) < self.num_classes]
        if bad:
            raise ValueError(f"classes {bad} outside 0..{self.num_classes - 1}")
        return values[np.asarray(classes, np.int64)]


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
