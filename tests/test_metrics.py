"""Metrics against small, obviously-correct references written here."""

import math

import cv2
import numpy as np
import pytest

from jax_refine import metrics


def disk_offsets(radius):
    """OpenCV's elliptical disk of size 2r+1: row dy spans |dx| <= round(sqrt(r² - dy²))."""
    return [
        (dy, dx)
        for dy in range(-radius, radius + 1)
        for dx in range(-radius, radius + 1)
        if abs(dx) <= round(math.sqrt(radius * radius - dy * dy))
    ]


def gradient_by_pixel_loop(gt, radius):
    """Morphological gradient: a pixel is boundary iff its disk (inside the image) sees 0 and 1."""
    height, width = gt.shape
    out = np.zeros(gt.shape, bool)
    offsets = disk_offsets(radius)
    for y in range(height):
        for x in range(width):
            seen = {
                gt[y + dy, x + dx]
                for dy, dx in offsets
                if 0 <= y + dy < height and 0 <= x + dx < width
            }
            out[y, x] = len(seen) > 1
    return out


def gradient_by_shifts(gt, radius):
    """Same definition, vectorised over pixels, looping over the disk's offsets."""
    height, width = gt.shape
    any_fg = np.zeros(gt.shape, bool)
    any_bg = np.zeros(gt.shape, bool)
    for dy, dx in disk_offsets(radius):
        ys = slice(max(-dy, 0), height - max(dy, 0))
        xs = slice(max(-dx, 0), width - max(dx, 0))
        src = gt[max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)]
        any_fg[ys, xs] |= src
        any_bg[ys, xs] |= ~src
    return any_fg & any_bg


def reference_radii(height, width):
    max_r = (width + height) / 300
    return [1 + int((max_r - 1) / 5 * i) for i in range(5)]


def reference_mba(pred, gt, gradient=gradient_by_shifts):
    pred, gt = pred != 0, gt != 0
    accs = []
    for r in reference_radii(*gt.shape):
        region = gradient(gt, r)
        accs.append(np.mean(pred[region] == gt[region]))
    return float(np.mean(accs))


def random_mask(rng, shape, blobs=6):
    mask = np.zeros(shape, np.uint8)
    for _ in range(blobs):
        centre = (int(rng.integers(shape[1])), int(rng.integers(shape[0])))
        axes = (int(rng.integers(2, shape[1] // 3)), int(rng.integers(2, shape[0] // 3)))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return mask


def noisy_copy(rng, mask, flips=0.05):
    boundary = gradient_by_shifts(mask != 0, 2)
    flip = boundary & (rng.random(mask.shape) < 0.5) | (rng.random(mask.shape) < flips / 10)
    return np.where(flip, 1 - mask, mask).astype(mask.dtype)


@pytest.mark.parametrize("radius", [1, 2, 3, 5, 8, 13, 21, 30])
def test_disk_is_opencv_ellipse(radius):
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    expected = np.zeros_like(kernel)
    for dy, dx in disk_offsets(radius):
        expected[dy + radius, dx + radius] = 1
    np.testing.assert_array_equal(kernel, expected)


def test_radii_match_reference_formula():
    assert metrics.mba_radii(2048, 2048) == reference_radii(2048, 2048) == [1, 3, 6, 8, 11]
    assert metrics.mba_radii(37, 53) == [1, 1, 1, 1, 1]


@pytest.mark.parametrize("shape", [(23, 31), (40, 40), (1, 17)])
def test_mba_matches_pixel_loop_reference(shape):
    rng = np.random.default_rng(sum(shape))
    gt = random_mask(rng, shape) if min(shape) > 4 else (rng.random(shape) < 0.5).astype(np.uint8)
    pred = noisy_copy(rng, gt)
    expected = reference_mba(pred, gt, gradient=gradient_by_pixel_loop)
    assert metrics.boundary_accuracy(pred, gt) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("shape", [(900, 1000), (1024, 1500), (1301, 777)])
def test_mba_matches_reference_at_larger_radii(shape):
    rng = np.random.default_rng(shape[0])
    gt = random_mask(rng, shape)
    pred = noisy_copy(rng, gt)
    assert len(set(metrics.mba_radii(*shape))) == 5
    assert metrics.boundary_accuracy(pred, gt) == pytest.approx(reference_mba(pred, gt), abs=1e-12)


def test_mba_perfect_and_inverted_predictions():
    gt = random_mask(np.random.default_rng(1), (120, 160))
    assert metrics.boundary_accuracy(gt, gt) == 1.0
    assert metrics.boundary_accuracy(1 - gt, gt) == 0.0


def test_mba_accepts_bool_and_nonzero_integer_masks():
    rng = np.random.default_rng(2)
    gt = random_mask(rng, (64, 80))
    pred = noisy_copy(rng, gt)
    expected = metrics.boundary_accuracy(pred, gt)
    assert metrics.boundary_accuracy(pred.astype(bool), gt * 255) == expected
    assert metrics.boundary_accuracy(pred.astype(np.int64) * 7, gt.astype(bool)) == expected


def test_mba_edge_cases():
    empty = np.zeros((50, 60), np.uint8)
    full = np.ones((50, 60), np.uint8)
    assert math.isnan(metrics.boundary_accuracy(empty, empty))  # no GT boundary
    assert math.isnan(metrics.boundary_accuracy(empty, full))
    dot = empty.copy()
    dot[20, 30] = 1
    # One-pixel object, radius 1: the region is the dot and its 4 neighbours.
    assert metrics.boundary_accuracy(empty, dot) == pytest.approx(4 / 5)
    assert metrics.boundary_accuracy(dot, dot) == 1.0
    assert metrics.boundary_accuracy(dot, dot) == reference_mba(dot, dot, gradient_by_pixel_loop)


def test_iou():
    rng = np.random.default_rng(3)
    for shape in [(31, 47), (64, 64), (5, 200)]:
        a = rng.random(shape) < 0.4
        b = rng.random(shape) < 0.6
        expected = np.sum(a & b) / np.sum(a | b)
        assert metrics.iou(a, b) == pytest.approx(expected)
        assert metrics.iou(a.astype(np.uint8) * 255, b.astype(np.int32)) == pytest.approx(expected)
    empty = np.zeros((4, 4), bool)
    assert metrics.iou(empty, empty) == 1.0
    assert metrics.iou(empty, ~empty) == 0.0
    assert metrics.intersection_union(empty, ~empty) == (0, 16)


@pytest.mark.parametrize(
    "pred, gt, message",
    [
        (np.zeros((4, 5)), np.zeros((4, 6)), r"\(4, 5\).*\(4, 6\)"),
        (np.zeros((4, 5, 1)), np.zeros((4, 5, 1)), r"2-D.*\(4, 5, 1\)"),
        (np.zeros((0, 5)), np.zeros((0, 5)), r"empty.*\(0, 5\)"),
        (np.zeros(5), np.zeros(5), r"2-D.*\(5,\)"),
    ],
)
def test_metric_errors_name_the_shapes(pred, gt, message):
    pred, gt = pred.astype(np.uint8), gt.astype(np.uint8)
    for fn in (metrics.iou, metrics.boundary_accuracy, metrics.boundary_accuracy_multiclass):
        with pytest.raises(ValueError, match=message):
            fn(pred, gt)
    with pytest.raises(ValueError, match=message):
        metrics.ConfusionMatrix(3).update(pred, gt)


def test_float_masks_are_rejected():
    with pytest.raises(ValueError, match="float"):
        metrics.iou(np.zeros((3, 3), np.float32), np.zeros((3, 3), np.uint8))


def reference_mba_multiclass(pred, gt, void=0):
    accs = []
    for r in reference_radii(*gt.shape):
        region = np.zeros(gt.shape, bool)
        for c in np.unique(gt):
            if c != void:
                region |= gradient_by_shifts(gt == c, r)
        region &= gt != void
        accs.append(np.mean(pred[region] == gt[region]))
    return float(np.mean(accs))


def test_mba_multiclass_matches_reference():
    rng = np.random.default_rng(4)
    shape = (700, 820)
    gt = np.zeros(shape, np.uint8)
    for c in (1, 2, 3, 1, 2):
        gt[random_mask(rng, shape, blobs=2) > 0] = c
    pred = gt.copy()
    flips = rng.random(shape) < 0.2
    pred[flips] = rng.integers(0, 4, size=shape)[flips]
    expected = reference_mba_multiclass(pred, gt)
    assert metrics.boundary_accuracy_multiclass(pred, gt) == pytest.approx(expected, abs=1e-12)
    # When the prediction is void wherever the GT is void, CascadePSP's formula agrees.
    pred_void = np.where(gt == 0, 0, pred)
    assert metrics.boundary_accuracy_multiclass(pred_void, gt) == pytest.approx(
        reference_mba_multiclass(pred_void, gt), abs=1e-12
    )
    # Binary maps: with class 0 counted as a class (no void), it is the binary mBA.
    binary = (gt > 0).astype(np.uint8)
    binary_pred = (pred > 0).astype(np.uint8)
    assert metrics.boundary_accuracy_multiclass(binary_pred, binary, void_label=None) == (
        pytest.approx(metrics.boundary_accuracy(binary_pred, binary))
    )


def test_confusion_matrix_streaming_and_ignore():
    rng = np.random.default_rng(5)
    num_classes = 4
    cm = metrics.ConfusionMatrix(num_classes)
    counts = np.zeros((num_classes, num_classes), np.int64)
    for shape in [(10, 12), (7, 3)]:
        gt = rng.integers(0, num_classes, size=shape).astype(np.uint8)
        gt[rng.random(shape) < 0.2] = 255
        pred = rng.integers(0, num_classes, size=shape)
        cm.update(pred, gt)
        for g, p in zip(gt.ravel(), pred.ravel(), strict=True):
            if g != 255:
                counts[g, p] += 1
    np.testing.assert_array_equal(cm.matrix, counts)
    expected = [
        counts[c, c] / (counts[c, :].sum() + counts[:, c].sum() - counts[c, c])
        for c in range(num_classes)
    ]
    np.testing.assert_allclose(cm.per_class_iou(), expected)
    assert cm.mean_iou() == pytest.approx(np.mean(expected))
    assert cm.pixel_accuracy() == pytest.approx(np.trace(counts) / counts.sum())


def test_confusion_matrix_absent_classes_and_bad_labels():
    cm = metrics.ConfusionMatrix(3)
    cm.update(np.array([[0, 0], [1, 1]]), np.array([[0, 0], [1, 0]]))
    iou = cm.per_class_iou()
    assert iou[0] == pytest.approx(2 / 3) and iou[1] == pytest.approx(1 / 2) and np.isnan(iou[2])
    assert cm.mean_iou() == pytest.approx((2 / 3 + 1 / 2) / 2)
    with pytest.raises(ValueError, match="outside 0..2"):
        cm.update(np.array([[0, 3]]), np.array([[0, 1]]))
    with pytest.raises(ValueError, match="outside 0..2"):
        cm.update(np.array([[0, 1]]), np.array([[0, 7]]))
