"""CRM protocol, exact to the reference (dvlab-research/Entity, High-Quality-Segmention/):
how predictions are stored and scored, the soft ground truth of the losses and the data path,
the perturbation's foreground, and the run length / learning-rate milestones."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jax_refine import io, losses, metrics
from jax_refine.data import pipeline
from jax_refine.data.perturb import (
    MAX_ROUNDS,
    RECTANGLES_PER_ROUND,
    draw_rectangle,
    modify_rounds,
    numpy_rng,
    perturb_mask,
    perturb_mask_tf,
    rectangle_draws_tf,
    thin_contours,
)
from jax_refine.train import evaluate as ev
from jax_refine.train import optim

# ----------------------------------------------------------------------------- predictions


def _reference_png(prob: np.ndarray) -> np.ndarray:
    """test.py's `tensor_to_gray_im`: float32 probabilities -> (p * 255).astype('uint8')."""
    return (prob.astype(np.float32) * np.float32(255)).astype("uint8")


def test_threshold_on_floor_255p(tmp_path):
    p = np.asarray([[0.0, 0.5, 0.505, 0.506, 128 / 255, 129 / 255, 0.999, 1.0]], np.float32)
    png = io.probability_to_uint8(p)
    np.testing.assert_array_equal(png, _reference_png(p))
    np.testing.assert_array_equal(png, [[0, 127, 128, 129, 128, 129, 254, 255]])
    np.testing.assert_array_equal(io.binarize_probability(p),
                                  [[False, False, False, True, False, True, True, True]])
    # The reference's round trip: the PNG read back as 8-bit grayscale, kept where > 128.
    io.write_image(tmp_path / "m.png", png)
    read = np.array(Image.open(tmp_path / "m.png").convert("L"))
    np.testing.assert_array_equal(io.binarize_probability(p), read > 128)
    np.testing.assert_array_equal(io.binarize_mask(read), read > 128)
    with pytest.raises(ValueError, match="uint8"):
        io.binarize_mask(p)
    with pytest.raises(ValueError, match="NaN"):
        io.probability_to_uint8(np.full((2, 2), np.nan, np.float32))


class _Fixed:
    """A stand-in Refiner returning fixed probabilities and recording the masks it got."""

    def __init__(self, prob):
        self.prob, self.masks = prob, []

    def refine_steps(self, image, mask, scales):
        self.masks.append(mask)
        return [self.prob] * len(scales)

    def refine_batch(self, images, masks, scales):
        self.masks.extend(masks)
        return [self.prob] * len(images)


@pytest.mark.parametrize("per_step", [True, False])
def test_evaluation_scores_like_the_reference(per_step):
    """Coarse mask fed as stored (soft 8-bit); predictions floor(255 p) > 128; GT and coarse
    > 128; pass-through on the 8-bit coarse sum < 32 * 32; dataset IoU."""
    h, w = 6, 8
    prob = np.zeros((h, w), np.float32)
    prob[:, :2] = 0.503  # > 0.5 but floor(255 p) = 128: background
    prob[:, 2:5] = 0.51  # 130: foreground
    gt = np.zeros((h, w), bool)
    gt[:, 3:6] = True
    coarse = np.zeros((h, w), np.uint8)
    coarse[:, 1:4] = 100  # soft: sum 1800 >= 1024 (refined), but 100 <= 128 is background
    tiny = np.zeros((h, w), np.uint8)
    tiny[0, :5] = 204  # sum 1020 < 1024: passed through
    image = np.zeros((h, w, 3), np.uint8)
    samples = [ev.Sample("a", image, coarse, gt), ev.Sample("b", image, tiny, gt)]
    refiner = _Fixed(prob)
    result = ev.evaluate_samples(refiner, iter(samples), (0.5, 1.0), per_step=per_step)
    assert len(refiner.masks) == 1 and refiner.masks[0] is coarse  # 'b' passed through
    # a: refined = columns 2..4 vs gt 3..5 -> I = 2 * 6, U = 4 * 6; its coarse (100 <= 128)
    # is empty -> I = 0, U = 18. b: passed through, row 0 columns 0..4 -> I = 2, U = 21.
    assert result["refined"]["iou"] == pytest.approx((12 + 2) / (24 + 21))
    assert result["coarse"]["iou"] == pytest.approx((0 + 2) / (18 + 21))
    assert [s["scale"] for s in result["steps"]] == ([0.5, 1.0] if per_step else [1.0])


def test_big_folder_keeps_the_coarse_mask_as_stored(tmp_path):
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    gt = np.where(rng.random((5, 7)) < 0.5, 129, 128).astype(np.uint8)
    Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(tmp_path / "x_im.png")
    Image.fromarray(seg).save(tmp_path / "x_seg.png")
    Image.fromarray(gt).save(tmp_path / "x_gt.png")
    (sample,) = ev.big_folder(tmp_path)
    np.testing.assert_array_equal(sample.coarse, seg)
    np.testing.assert_array_equal(sample.gt, gt > 128)


def test_cli_writes_and_scores_reference_pngs(tmp_path):
    from jax_refine import cli

    prob = np.asarray([[0.2, 0.503, 0.506, 0.9]], np.float32)
    gt_path = tmp_path / "gt.png"
    Image.fromarray(np.asarray([[0, 200, 200, 200]], np.uint8)).save(gt_path)
    job = cli.Job("x", tmp_path / "x.png", tmp_path / "m.png", gt_path, tmp_path / "o.png",
                  tmp_path / "o_prob.png")
    coarse = np.asarray([[255, 255, 128, 0]], np.uint8)
    record = cli._record(job, coarse, prob)
    np.testing.assert_array_equal(np.asarray(Image.open(job.out)), [[0, 0, 255, 255]])
    np.testing.assert_array_equal(np.asarray(Image.open(job.prob)), _reference_png(prob))
    assert record["before"][:2] == (1, 4) and record["after"][:2] == (2, 3)


# ----------------------------------------------------------------------------- soft GT


def _loop_sobel(x: np.ndarray) -> np.ndarray:
    """models/sobel_op.py by hand: 3x3 average pool (zero pad, /9), then the /4 Sobel pair
    (cross-correlation, zero pad), sqrt(gx^2 + gy^2 + 1e-4). [H, W] float64."""
    h, w = x.shape
    p = np.pad(x, 1)
    pooled = np.array([[p[i:i + 3, j:j + 3].sum() / 9 for j in range(w)] for i in range(h)])
    q = np.pad(pooled, 1)
    kx = np.asarray([[1, 0, -1], [2, 0, -2], [1, 0, -1]]) / 4
    ky = np.asarray([[1, 2, 1], [0, 0, 0], [-1, -2, -1]]) / 4
    gx = np.array([[(q[i:i + 3, j:j + 3] * kx).sum() for j in range(w)] for i in range(h)])
    gy = np.array([[(q[i:i + 3, j:j + 3] * ky).sum() for j in range(w)] for i in range(h)])
    return np.sqrt(gx ** 2 + gy ** 2 + 1e-4)


def test_loss_terms_on_a_soft_ground_truth():
    """BCE against g > 0.5 (8-bit >= 128), L1 / MSE / Sobel against the soft g = v / 255."""
    rng = np.random.default_rng(0)
    v = rng.choice(np.asarray([0, 1, 60, 127, 128, 129, 200, 255], np.uint8), (1, 6, 7, 1))
    g = v.astype(np.float32) / np.float32(255)  # torchvision ToTensor
    z = rng.normal(0, 2, v.shape).astype(np.float32)
    total, terms = losses.crm_loss(z, g)
    z64, g64 = z.astype(np.float64), g.astype(np.float64)
    p = 1 / (1 + np.exp(-z64))
    t = (v >= 128).astype(np.float64)
    want = {
        "bce": np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p))),
        "l1": np.mean(np.abs(p - g64)),
        "mse": np.mean((p - g64) ** 2),
        "sobel": np.mean(np.abs(_loop_sobel(g64[0, ..., 0]) - _loop_sobel(p[0, ..., 0]))),
    }
    for k, value in want.items():
        assert float(terms[k]) == pytest.approx(value, rel=1e-5), k
    assert float(total) == pytest.approx(
        want["bce"] + 0.5 * want["l1"] + 0.5 * want["mse"] + 2.0 * want["sobel"], rel=1e-5)
    # Binarising the GT (the old pipeline) changes every term but none of BCE's targets.
    _, hard = losses.crm_loss(z, (v > 128).astype(np.float32))
    assert float(hard["l1"]) != pytest.approx(want["l1"], rel=1e-3)


def _soft_gt(size=40):
    """An 8-bit soft GT: a square of 255 with a ramp border, and a faint blob of 1..60."""
    yy, xx = np.mgrid[:size, :size]
    edge = np.minimum.reduce([yy - 8, 26 - yy, xx - 8, 26 - xx]).astype(np.float64)
    gt = np.clip(128 + 40 * edge, 0, 255).astype(np.uint8)
    gt[30:36, 30:36] = np.arange(1, 61, 10, dtype=np.uint8)[None, :]
    return gt


def test_perturbation_starts_from_gt_above_zero_and_stops_on_the_thinned_iou():
    """boundary_modification.modify_boundary((gt > 0.5) * 255) on the 8-bit GT: contour
    thinning, then perturb_seg(thinned, target), whose IoU stop compares with `thinned`."""
    gt = _soft_gt()
    assert (gt > 0).sum() > (gt > 128).sum()
    for seed in range(3):
        got = perturb_mask(gt, 0.9, np.random.default_rng(seed))
        binary = perturb_mask((gt > 0).astype(np.uint8), 0.9, np.random.default_rng(seed))
        np.testing.assert_array_equal(got, binary)
        rng = np.random.default_rng(seed)  # replay the reference's steps on the same draws
        thinned = thin_contours(gt > 0, rng)
        rectangles = (draw_rectangle(rng, *gt.shape) for _ in itertools.count())
        want = modify_rounds(thinned.copy(), thinned, 0.9, rectangles)
        np.testing.assert_array_equal(got, want)
        assert metrics.iou(got, thinned) < 0.9
    by_gt = perturb_mask(gt, 0.9, np.random.default_rng(0), iou_against="gt")
    assert metrics.iou(by_gt, gt > 0) < 0.9
    with pytest.raises(ValueError, match="iou_against"):
        perturb_mask(gt, 0.9, np.random.default_rng(0), iou_against="seg")


def test_crm_augment_carries_the_soft_gt():
    """gt = v / 255 through crop and flip; coarse masks from v > 0 (the faint blob too), the
    graph perturbation's IoU stop against the thinned mask; a short image is zero-padded on
    both sides (torchvision pad_if_needed). The perturbation runs as a graph (tf.function):
    eager while loops are slow."""
    import tensorflow as tf

    gt = _soft_gt()
    image = np.repeat(gt[..., None], 3, axis=2)
    # lowres coarse masks (no perturbation loop) where only gt and padding are checked
    augment = pipeline.CrmAugment(0, crop=40, brightness=0, contrast=0, saturation=0,
                                  grayscale_p=0, coarse=pipeline.CoarseSpec(lowres_prob=1.0))
    out = augment(tf, tf.constant(image), tf.constant(gt), tf.constant(0, tf.int64))
    got = out["gt"].numpy()[..., 0]
    flipped = not np.array_equal(got, gt.astype(np.float32) / np.float32(255))
    want = (gt[:, ::-1] if flipped else gt).astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(got, want)  # bitwise ToTensor's float32 v / 255
    # Padding: a 20 x 40 image gets 20 zero rows above and below, then a random 40-row crop
    # (bottom-only padding would always put the image in the top rows).
    half = np.full((20, 40), 255, np.uint8)
    starts = set()
    for k in range(4):
        out = augment(tf, tf.constant(np.repeat(half[..., None], 3, 2)), tf.constant(half),
                      tf.constant(k, tf.int64))
        rows = out["gt"].numpy()[:, 0, 0]
        start = int(np.argmax(rows))
        np.testing.assert_array_equal(rows, np.r_[np.zeros(start), np.ones(20),
                                                  np.zeros(20 - start)])
        starts.add(start)
    assert max(starts) > 0
    # Coarse masks come from gt > 0: the soft GT gives those of its binary gt > 0, which
    # differ from those of gt > 128.
    def coarse(mask):
        return augment(tf, tf.constant(image), tf.constant(mask),
                       tf.constant(0, tf.int64))["mask"].numpy()

    from_soft = coarse(gt)
    np.testing.assert_array_equal(from_soft, coarse((gt > 0).astype(np.uint8) * 255))
    assert not np.array_equal(from_soft, coarse((gt > 128).astype(np.uint8) * 255))
    # The graph perturbation's IoU stop is against the thinned mask (replayed draws).
    stateless = tf.constant([5, 6], tf.int32)
    got = tf.function(perturb_mask_tf)(tf.constant(gt), tf.constant(0.9, tf.float64),
                                       stateless).numpy()
    seeds = tf.random.experimental.stateless_split(stateless, 2).numpy()
    thinned = thin_contours(gt, numpy_rng(seeds[0]))
    draws = rectangle_draws_tf(seeds[1], *gt.shape, MAX_ROUNDS * RECTANGLES_PER_ROUND)
    np.testing.assert_array_equal(got, modify_rounds(thinned.copy(), thinned, 0.9,
                                                     draws.numpy()))


def test_record_source_soft_gt_and_drop_last_epochs():
    records = [{"image": np.full((2, 2, 3), i, np.uint8),
                "mask": np.full((2, 2, 1), 10 * i + 1, np.uint8)} for i in range(5)]
    records.append({"image": np.full((2, 2, 3), 5, np.uint8),
                    "mask": np.eye(2, dtype=np.uint8)[..., None]})  # a 0/1 mask
    source = pipeline.RecordSource(records, seed=0, epoch_batch=4)  # 6 records: epochs of 4
    masks = {int(source(k)[0][0, 0, 0]): source(k)[1] for k in range(40)}
    assert masks[3][0, 0] == 31  # as stored, soft
    np.testing.assert_array_equal(masks[5], np.eye(2) * 255)  # 0/1 -> 0/255
    for epoch in range(5):  # each epoch: the first 4 of a fresh permutation of the 6
        seen = [int(source(4 * epoch + j)[0][0, 0, 0]) for j in range(4)]
        perm = np.random.default_rng([0, epoch, 2]).permutation(6)
        assert seen == perm[:4].tolist()
    labels = pipeline.RecordSource(records, seed=0, labels=True)
    assert {int(labels(k)[1].max()) for k in range(6)} >= {1, 41}  # label maps as stored
    with pytest.raises(ValueError, match="whole batch"):
        pipeline.RecordSource(records, seed=0, epoch_batch=7)(0)


# ----------------------------------------------------------------------------- schedule


def _load(name):
    """configs/NAME.py's get_config() (without importing the training loop)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_run_length_and_milestones_are_the_reference_ones():
    # train.py: total_epoch = int(iterations / len(train_loader) + 0.5), drop_last batches
    # of 12 from FSS-1000, DUTS-TR, DUTS-TE, ECSSD, MSRA-10K.
    n = 10_000 + 10_553 + 5_019 + 1_000 + 10_000
    per_epoch = n // 12
    epochs = int(45_000 / per_epoch + 0.5)
    assert (per_epoch, epochs) == (3_047, 15)
    assert optim.whole_epoch_steps(45_000, n, 12) == epochs * per_epoch == 45_705
    c = _load("crm_paper")
    assert c.total_steps == 45_705
    boundaries = optim.piecewise_boundaries(c.total_steps, c.lr_boundaries)
    assert boundaries == [22_500, 37_500]
    # MultiStepLR(milestones, 0.1) stepped after each iteration: 0-based step s runs at
    # lr * 0.1 ** (number of milestones <= s).
    _, schedule = optim.crm_optimizer(c.learning_rate, c.total_steps, c.lr_boundaries)
    steps = (0, 22_499, 22_500, 37_499, 37_500, 45_704)
    got = np.asarray(schedule(np.asarray(steps)))
    for step, value in zip(steps, got, strict=True):
        want = c.learning_rate * 0.1 ** sum(m <= step for m in (22_500, 37_500))
        assert math.isclose(float(value), want, rel_tol=1e-6), step
    with pytest.raises(ValueError, match="whole batch"):
        optim.whole_epoch_steps(45_000, 11, 12)


def test_colour_jitter_is_torchvisions_on_a_pil_image():
    """ColorJitter(0.2, 0.05, 0.05) + RandomGrayscale on a PIL image, replayed with Pillow
    from the same draws (factors, order, grayscale): bit-exact."""
    import tensorflow as tf
    from PIL import ImageEnhance

    rng = np.random.default_rng(0)
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    amounts = (0.2, 0.05, 0.05)
    orders, grays = set(), set()
    for k in range(24):
        pixels = rng.integers(0, 256, (9, 14, 3), dtype=np.uint8)
        seeds = tf.cast(tf.random.experimental.stateless_split([7, k], 4), tf.int32)
        got = pipeline.colour_jitter(tf, tf.constant(pixels, tf.float32) / 255.0, seeds,
                                     *amounts, grayscale_p=0.5).numpy()
        factors = [float(tf.random.stateless_uniform([], seeds[i], 1 - a, 1 + a))
                   for i, a in enumerate(amounts)]
        order = tf.argsort(tf.random.stateless_uniform(
            [3], tf.random.experimental.stateless_fold_in(seeds[3], 1))).numpy()
        gray = bool(tf.random.stateless_uniform([], seeds[3]) < 0.5)
        image = Image.fromarray(pixels)
        for i in order:
            image = enhancers[i](image).enhance(factors[i])
        if gray:
            image = image.convert("L").convert("RGB")
        expected = np.asarray(image)
        np.testing.assert_array_equal(np.round(got * 255.0).astype(np.uint8), expected)
        np.testing.assert_array_equal(got, (expected / np.float32(255.0)).astype(np.float32))
        orders.add(tuple(order))
        grays.add(gray)
    assert len(orders) >= 4 and grays == {False, True}
