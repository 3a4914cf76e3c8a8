"""Synthetic scenes: deterministic, resolution independent, and hard in the right places."""

import cv2
import numpy as np
import pytest

from jax_refine import metrics
from jax_refine.data.synthetic import WIRE_ID, make_scene


def test_shapes_dtypes_and_binary_labels():
    image, label = make_scene(3, 97, 131)
    assert image.shape == (97, 131, 3) and image.dtype == np.uint8
    assert label.shape == (97, 131) and label.dtype == np.uint8
    assert set(np.unique(label)) <= {0, 1}


def test_deterministic_per_seed_and_seeds_differ():
    a = make_scene(11, 256, 320)
    b = make_scene(11, 256, 320)
    c = make_scene(12, 256, 320)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert metrics.iou(a[1], c[1]) < 0.9


def test_instance_map_splits_the_label_into_objects():
    """Object ids cover exactly the foreground, one id per object or wire, ids 1..K."""
    image, label = make_scene(4, 300, 300)
    image_i, objects = make_scene(4, 300, 300, instances=True)
    np.testing.assert_array_equal(image_i, image)
    np.testing.assert_array_equal(objects > 0, label > 0)
    ids = np.unique(objects[(objects > 0) & (objects != WIRE_ID)])
    assert len(ids) >= 2 and list(ids) == list(range(1, ids[-1] + 1))
    wires = objects == WIRE_ID
    assert 0 < wires.mean() < 0.05  # thin curves, not filled shapes
    _, window = make_scene(4, 300, 300, window=(100, 50, 64, 80), instances=True)
    np.testing.assert_array_equal(window, objects[100:164, 50:130])


def test_resolution_independent_geometry():
    """A 4K label downsampled to 1K matches the same seed rendered at 1K (IoU >= 0.97)."""
    for seed in (0, 5):
        _, big = make_scene(seed, 4096, 4096)
        _, small = make_scene(seed, 1024, 1024)
        down = cv2.resize(big, (1024, 1024), interpolation=cv2.INTER_AREA)
        assert metrics.iou(down > 0, small) >= 0.97


def test_multiclass_labels_and_class_appearance():
    labels = set()
    for seed in range(6):
        image, label = make_scene(seed, 200, 200, num_classes=5)
        assert label.max() <= 5
        labels |= set(np.unique(label).tolist())
    assert labels == {0, 1, 2, 3, 4, 5}
    # Each class keeps its hue sector across scenes: mean hue of class c grows with c.
    hues = {c: [] for c in range(1, 6)}
    for seed in range(20):
        image, label = make_scene(seed, 256, 256, num_classes=5)
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        for c in hues:
            inner = cv2.erode((label == c).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
            if inner.sum() > 200:
                hues[c].append(np.median(hsv[..., 0][inner]))
    medians = [np.median(hues[c]) for c in range(1, 6)]
    assert medians == sorted(medians)


def test_thin_structures_and_holes_present_at_4k():
    thin_seen = holes_seen = 0
    for seed in range(4):
        _, label = make_scene(seed, 4096, 4096)
        opened = cv2.morphologyEx(label, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
        thin_seen += int(np.count_nonzero(label & (1 - opened)) > 2000)
        _, hierarchy = cv2.findContours(label, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        holes_seen += int(hierarchy is not None and (hierarchy[0][:, 3] >= 0).any())
    assert thin_seen >= 3 and holes_seen >= 1


def test_object_boundaries_are_visible():
    """Objects differ in colour from the pixels just outside them."""
    contrasts = []
    for seed in range(8):
        image, label = make_scene(seed, 512, 512)
        kernel = np.ones((7, 7), np.uint8)
        inside = (cv2.erode(label, kernel) > 0) & (label > 0)
        outside = (cv2.dilate(label, kernel) > 0) & (label == 0)
        contrasts.append(np.abs(image[inside].mean(0) - image[outside].mean(0)).sum())
    assert np.median(contrasts) > 40


@pytest.mark.parametrize(
    "args, message",
    [((0, 4, 100), "at least 8x8"), ((0, 64, 64, 0), "num_classes"), ((-1, 64, 64), "seed")],
)
def test_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        make_scene(*args)


# Windows: (seed, height, width, num_classes, (top, left, h, w)), touching each scene border,
# inside it, with a 1-px margin all round, and one pixel wide; with and without camera blur.
WINDOWS = [
    (0, 256, 256, 1, (16, 40, 100, 120)),
    (1, 700, 517, 3, (0, 0, 224, 224)),
    (2, 700, 517, 1, (476, 293, 224, 224)),
    (3, 2048, 2048, 1, (1, 1, 2046, 2046)),
    (4, 1100, 1300, 1, (0, 500, 224, 224)),
    (5, 1100, 1300, 1, (500, 0, 224, 224)),
    (6, 1100, 1300, 1, (876, 600, 224, 224)),
    (7, 1100, 1300, 1, (300, 1076, 224, 224)),
    (8, 2048, 2048, 1, (900, 1200, 224, 224)),
    (9, 300, 301, 1, (0, 300, 300, 1)),
]


@pytest.mark.parametrize("seed, height, width, num_classes, window", WINDOWS)
def test_window_is_the_crop_of_the_full_render(seed, height, width, num_classes, window):
    """Label: bit-exact. Image: equal up to the sensor noise, which is drawn anew."""
    top, left, h, w = window
    full_image, full_label = make_scene(seed, height, width, num_classes)
    image, label = make_scene(seed, height, width, num_classes, window=window)
    assert image.shape == (h, w, 3) and label.shape == (h, w)
    np.testing.assert_array_equal(label, full_label[top : top + h, left : left + w])

    crop = full_image[top : top + h, left : left + w]
    diff = image.astype(np.float32) - crop
    # Two independent noises in [-6, 6] differ by at most 12; one more for float rounding.
    assert np.abs(diff).max() <= 13
    if h * w < 10_000:
        return
    # Their difference has mean |d| = 728 / 169 = 4.31 (away from saturated pixels) and, once
    # blurred (sigma 2), mean |d| ~ 0.6: a mismatch of the noise-free images would add to both.
    unsaturated = (crop >= 12) & (crop <= 243)
    assert abs(np.abs(diff[unsaturated]).mean() - 728 / 169) < 0.25
    assert np.abs(cv2.GaussianBlur(diff, (0, 0), 2)).mean() < 0.8


def test_window_labels_at_random_windows():
    """Labels of random windows (many crossing long polygon edges and strokes) are exact."""
    rng = np.random.default_rng(0)
    for seed, size in [(10, 256), (11, 640), (12, 1500), (13, 2048)]:
        _, full = make_scene(seed, size, size)
        for _ in range(12):
            h, w = rng.integers(1, min(size, 300) + 1, size=2)
            top, left = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
            _, label = make_scene(seed, size, size, window=(top, left, h, w))
            np.testing.assert_array_equal(label, full[top : top + h, left : left + w])


@pytest.mark.parametrize(
    "window",
    [
        (-1, 0, 10, 10),
        (0, -1, 10, 10),
        (0, 0, 0, 10),
        (0, 0, 10, 0),
        (60, 0, 5, 5),
        (0, 60, 5, 5),
        (0, 0, 65, 64),
        (0, 0, 10),
    ],
)
def test_bad_windows(window):
    with pytest.raises(ValueError, match="window"):
        make_scene(0, 64, 64, window=window)
