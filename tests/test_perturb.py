"""Coarse masks: reference-like perturbation and low-resolution segmenter imitation."""

import cv2
import numpy as np
import pytest

from jax_refine import metrics
from jax_refine.data.perturb import (
    MAX_ROUNDS,
    NUM_KERNELS,
    RECTANGLES_PER_ROUND,
    coarse_from_lowres,
    modify_rounds,
    modify_rounds_tf,
    numpy_rng,
    perturb_mask,
    perturb_mask_tf,
    rectangle_draws_tf,
    thin_contours,
)
from jax_refine.data.synthetic import make_scene


def training_crops(count, size=224, render=896):
    """224-px crops around object pixels, as the CRM training pipeline cuts them."""
    for seed in range(count):
        _, gt = make_scene(seed, render, render)
        ys, xs = np.nonzero(gt)
        pick = np.random.default_rng(seed).integers(len(ys))
        y0 = int(np.clip(ys[pick] - size // 2, 0, render - size))
        x0 = int(np.clip(xs[pick] - size // 2, 0, render - size))
        yield seed, gt[y0 : y0 + size, x0 : x0 + size]


def full_scenes(count, size=1024):
    for seed in range(count):
        yield seed, make_scene(seed, size, size)[1]


@pytest.mark.parametrize("masks", [training_crops, full_scenes])
def test_perturbation_lands_just_below_target(masks):
    hits = []
    for seed, gt in masks(30):
        rng = np.random.default_rng(1000 + seed)
        target = rng.uniform(0.8, 1.0)
        result = perturb_mask(gt, target, rng, iou_against="gt")
        assert result.dtype == np.uint8 and set(np.unique(result)) <= {0, 1}
        score = metrics.iou(result, gt)
        hits.append(target - 0.1 < score < target)
    assert np.mean(hits) >= 0.9


def test_perturbation_is_deterministic_given_rng():
    _, gt = make_scene(4, 300, 260)
    a = perturb_mask(gt, 0.85, np.random.default_rng(7))
    b = perturb_mask(gt, 0.85, np.random.default_rng(7))
    c = perturb_mask(gt, 0.85, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_thin_contours_keeps_shape_roughly():
    _, gt = make_scene(2, 512, 512)
    thinned = thin_contours(gt, np.random.default_rng(0))
    assert 0.8 < metrics.iou(thinned, gt) < 1.0


def test_perturbation_edge_cases():
    empty = np.zeros((40, 40), np.uint8)
    np.testing.assert_array_equal(perturb_mask(empty, 0.9, np.random.default_rng(0)), empty)
    dot = empty.copy()
    dot[5, 5] = 255  # contours under 10 vertices are kept as they are
    assert perturb_mask(dot, 0.5, np.random.default_rng(0)).shape == dot.shape
    with pytest.raises(ValueError, match=r"2-D.*\(3, 4, 5\)"):
        perturb_mask(np.zeros((3, 4, 5)), 0.9, np.random.default_rng(0))


def test_coarse_from_lowres_is_blobby_and_loses_thin_parts():
    thin_recall, ious = [], []
    for seed in range(4):
        _, gt = make_scene(seed, 2048, 2048)
        coarse = coarse_from_lowres(gt, 16, np.random.default_rng(seed))
        assert coarse.shape == gt.shape and coarse.dtype == np.uint8
        ious.append(metrics.iou(coarse, gt))
        opened = cv2.morphologyEx(gt, cv2.MORPH_OPEN, np.ones((9, 9), np.uint8))
        thin = (gt > 0) & (opened == 0)
        thin_recall.append(coarse[thin].mean())
        assert metrics.boundary_accuracy(coarse, gt) < 0.9
    assert min(ious) > 0.85
    assert np.mean(thin_recall) < 0.5


def test_coarse_from_lowres_deterministic_and_validated():
    _, gt = make_scene(1, 256, 192)
    a = coarse_from_lowres(gt, 8, np.random.default_rng(3))
    np.testing.assert_array_equal(a, coarse_from_lowres(gt, 8, np.random.default_rng(3)))
    with pytest.raises(ValueError, match="factor"):
        coarse_from_lowres(gt, 0.5, np.random.default_rng(3))


# ----------------------------------------------------------------------------- graph ops


@pytest.fixture(scope="module")
def tf():
    import tensorflow

    tensorflow.config.set_visible_devices([], "GPU")
    return tensorflow


def test_graph_rounds_equal_cv2_for_every_element(tf):
    """Every element, dilated and eroded, centre pixels set or not: bitwise cv2's result."""
    rng = np.random.default_rng(0)
    height, width = 37, 53
    seg = (cv2.GaussianBlur(rng.random((height, width)), (0, 0), 3) > 0.5).astype(np.uint8)
    rows = []
    for kernel in range(NUM_KERNELS):
        for dilate in (0, 1):
            y0, x0 = int(rng.integers(height)), int(rng.integers(width))
            y1, x1 = int(rng.integers(y0 + 1, height + 1)), int(rng.integers(x0 + 1, width + 1))
            rows.append((y0, x0, y1, x1, int(rng.integers(-1, 2)), dilate, kernel))
    rows.append((0, 0, height, width, 1, 1, NUM_KERNELS - 1))  # the whole mask
    rows += rows[:3]  # whole rounds of 4
    rounds = len(rows) // RECTANGLES_PER_ROUND
    expected = modify_rounds(seg.copy(), seg, -1.0, rows, rounds)  # target -1: never stops
    got = modify_rounds_tf(tf.constant(seg, tf.float32), tf.constant(seg, tf.float32),
                           tf.constant(-1.0, tf.float64), tf.constant(rows, tf.int32), rounds)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_graph_perturbation_replays_as_numpy_and_lands_below_target(tf):
    """perturb_mask_tf = thin_contours + modify_rounds on its own draws, bitwise; its IoU
    lands just below the target as perturb_mask's does (the same test, fewer and smaller
    crops)."""
    perturb = tf.function(perturb_mask_tf)
    hits = []
    for seed, gt in training_crops(12, size=160, render=640):
        target = np.random.default_rng(seed).uniform(0.8, 1.0)
        stateless = tf.constant([seed, 5], tf.int32)
        got = perturb(tf.constant(gt), tf.constant(target, tf.float64), stateless,
                      iou_against="gt").numpy()
        seeds = tf.random.experimental.stateless_split(stateless, 2).numpy()
        thinned = thin_contours(gt, numpy_rng(seeds[0]))
        draws = rectangle_draws_tf(seeds[1], *gt.shape, MAX_ROUNDS * RECTANGLES_PER_ROUND)
        np.testing.assert_array_equal(got, modify_rounds(thinned, gt, target, draws.numpy()))
        assert got.dtype == np.uint8 and set(np.unique(got)) <= {0, 1}
        hits.append(target - 0.1 < metrics.iou(got, gt) < target)
    assert np.mean(hits) >= 0.8  # numpy's perturb_mask: 15 / 16 here, 14 / 16 at 128 px


def test_graph_draws_cover_the_reference_ranges(tf):
    draws = rectangle_draws_tf(tf.constant([1, 2]), 20, 30, 4000).numpy()
    y0, x0, y1, x1, centre, dilate, kernel = draws.T
    assert (0 <= y0).all() and (y0 < y1).all() and (y1 <= 20).all()
    assert (0 <= x0).all() and (x0 < x1).all() and (x1 <= 30).all()
    assert set(np.unique(kernel)) == set(range(NUM_KERNELS)) and set(dilate) == {0, 1}
    np.testing.assert_allclose(np.mean(centre >= 0), 0.25, atol=0.03)  # as the reference
    np.testing.assert_allclose(np.mean(centre[centre >= 0]), 0.5, atol=0.06)
    np.testing.assert_allclose(np.mean(dilate), 0.5, atol=0.03)


def test_graph_perturbation_edge_cases(tf):
    empty = np.zeros((40, 40), np.uint8)
    seed = tf.constant([0, 0])
    out = perturb_mask_tf(tf.constant(empty), tf.constant(0.9, tf.float64), seed)
    np.testing.assert_array_equal(out.numpy(), empty)
    line = np.zeros((2, 40), np.uint8)
    line[:, 5:30] = 7  # nonzero is foreground; too thin for rectangles
    out = perturb_mask_tf(tf.constant(line), tf.constant(0.9, tf.float64), seed).numpy()
    assert out.shape == line.shape and set(np.unique(out)) <= {0, 1}
