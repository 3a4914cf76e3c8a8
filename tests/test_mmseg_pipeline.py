"""mmsegmentation's training pipeline for the mmseg PNA configs (issue 20, item 6): each rule
against a small reference computation written here (mmcv 1.x's rescale_size, cv2's resize,
mmseg's RandomCrop / LoadAnnotations / PhotoMetricDistortion / Pad rules)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from jax_refine.data import pipeline
from jax_refine.data import seg_transforms as st
from tests.test_pna_protocol import examples_eager_and_in_tf_data


@pytest.fixture(scope="module")
def tf():
    return pipeline._tf()


def _rescale_size(h, w, scale):
    """mmcv.rescale_size((w, h), scale) (keep ratio), as (h, w)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def test_mmseg_ratio_resize_size_is_mmcv(tf):
    for s, (h, w) in enumerate([(375, 500), (500, 333), (427, 640), (7, 3000)]):
        seed = tf.constant([s, 11], tf.int32)
        u = tf.random.stateless_uniform([], seed, dtype=tf.float64).numpy()
        ratio = u * (2.0 - 0.5) + 0.5
        scale = int(2048 * ratio), int(512 * ratio)  # Resize.random_sample_ratio
        got = st.mmseg_ratio_scale(tf, (2048, 512), (0.5, 2.0), seed).numpy()
        assert tuple(got) == scale
        size = st.mmcv_rescale_size(tf, h, w, tf.constant(scale)).numpy()
        assert tuple(size) == _rescale_size(h, w, scale)
    # The short side binds for a wide image, the long side for a narrow one.
    assert _rescale_size(375, 500, (1024, 256)) == (256, 341)
    assert _rescale_size(100, 2000, (2048, 512)) == (102, 2048)


def test_resize_cv2_is_opencv_linear_and_nearest(tf):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (23, 37, 3), np.uint8)
    label = rng.integers(0, 6, (23, 37), np.uint8)
    fn = tf.function(lambda i, lbl, s: st.resize_cv2(tf, i, lbl, s))
    for size in [(31, 50), (11, 16), (23, 37), (40, 19)]:
        rgb, lbl = (t.numpy() for t in fn(image, label, tf.constant(size)))
        np.testing.assert_array_equal(
            rgb, cv2.resize(image, size[::-1], interpolation=cv2.INTER_LINEAR))
        # INTER_NEAREST's index rule: source = floor(dst * in / out).
        rows = np.minimum(np.floor(np.arange(size[0]) * (23 / size[0])).astype(int), 22)
        cols = np.minimum(np.floor(np.arange(size[1]) * (37 / size[1])).astype(int), 36)
        np.testing.assert_array_equal(lbl, label[rows][:, cols])


def _mmseg_accepted(seg, ratio, ignore):
    labels, cnt = np.unique(seg, return_counts=True)
    cnt = cnt[labels != ignore]
    return len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < ratio


def test_mmseg_crop_checks_ten_windows_then_takes_the_eleventh(tf):
    label = np.zeros((40, 40), np.uint8)  # class 0, a 12x12 block of class 3, ignored rows
    label[28:, 28:] = 3
    label[:5] = 255
    seen_fallback = seen_later = False
    for s in range(12):
        seed = tf.constant([s, 7], tf.int32)
        windows = st.crop_windows(tf, tf.shape(label), (10, 10), seed, 11).numpy()
        checks = [_mmseg_accepted(label[y:y + h, x:x + w], 0.75, 255)
                  for y, x, h, w in windows[:10]]
        expected = windows[checks.index(True)] if any(checks) else windows[10]
        got = st.category_area_crop(tf, label, (10, 10), seed, 0.75, 255, rule="mmseg")
        np.testing.assert_array_equal(got.numpy(), expected)
        seen_fallback |= not any(checks)
        seen_later |= any(checks) and not checks[0]
    assert seen_later and seen_fallback  # both branches of the rule ran
    # A map no window passes (one class): the 11th window, unchecked.
    flat = np.ones((40, 40), np.uint8)
    seed = tf.constant([1, 2], tf.int32)
    got = st.category_area_crop(tf, flat, (10, 10), seed, 0.75, 255, rule="mmseg").numpy()
    np.testing.assert_array_equal(got, st.crop_windows(tf, tf.shape(flat), (10, 10), seed,
                                                       11).numpy()[10])
    # Only the ignore index besides one class: len(cnt) == 1, rejected.
    assert not _mmseg_accepted(label[:10, :10], 0.75, 255)
    with pytest.raises(ValueError, match="rule"):
        st.category_area_crop(tf, flat, (10, 10), seed, 0.75, 255, rule="other")


def test_reduce_zero_label_is_mmseg_load_annotations():
    label = np.arange(256, dtype=np.uint8).reshape(16, 16)
    expected = label.copy()  # mmseg's exact uint8 ops
    expected[expected == 0] = 255
    expected = expected - 1
    expected[expected == 254] = 255
    np.testing.assert_array_equal(st.reduce_zero_label(label), expected)
    assert st.reduce_zero_label(label).dtype == np.uint8
    source = pipeline.RecordSource([{"image": np.zeros((16, 16, 3), np.uint8),
                                     "label": label}], seed=0, mask_key="label", labels=True,
                                   reduce_zero_label=True)
    np.testing.assert_array_equal(source(0)[1], expected)
    from jax_refine.train import evaluate_pna

    records = [{"image": np.zeros((16, 16, 3), np.uint8), "label": label[..., None],
                "name": b"a"}]
    (sample,) = evaluate_pna.folder_samples(records, reduce_zero_label=True)
    np.testing.assert_array_equal(sample.label, expected)


def test_photometric_distortion_hue_shift_excludes_the_upper_delta(tf):
    seeds = tf.stack([tf.range(1000), tf.fill([1000], 5)], axis=1)

    def shifts(inclusive):
        draw = tf.function(lambda s: tf.map_fn(
            lambda x: st.ssd_draws(tf, x, hue_inclusive=inclusive)["hue_shift"], s,
            fn_output_signature=tf.int32))
        return draw(seeds).numpy()

    mmseg, detectron2 = shifts(False), shifts(True)
    assert set(mmseg) == set(range(-18, 18))  # numpy randint(-18, 18)
    assert set(detectron2) == set(range(-18, 19))  # Python random.randint(-18, 18)


def test_pna_augment_mmseg_mode_is_the_reference_and_deterministic(tf):
    """The mmseg configs' transform, with colour 'none', equals resize (mmcv) -> crop
    (mmseg rule) -> flip -> Pad computed here from the same draws; with PhotoMetric-
    Distortion it gives the same example eagerly and in tf.data's graph."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 45, 3), np.uint8)
    label = np.zeros((30, 45), np.uint8)
    label[10:, 20:] = 2
    kwargs = dict(crop=(24, 40), resize="mmseg_ratio", img_scale=(64, 24),
                  scale_range=(0.5, 2.0), single_category_max_area=0.75, crop_rule="mmseg")
    plain = pipeline.PnaAugment(3, colour="none", **kwargs)
    mean = 255 * np.asarray(pipeline.IMAGENET_MEAN, np.float32)
    for k in range(4):
        out = plain(tf, image, label, tf.constant(k, tf.int64))
        seeds = tf.cast(tf.random.experimental.stateless_split(
            tf.constant([3, k], tf.int64), 4), tf.int32)
        scale = st.mmseg_ratio_scale(tf, (64, 24), (0.5, 2.0), seeds[0]).numpy()
        h, w = _rescale_size(30, 45, scale)
        rgb = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
        lbl = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)
        y0, x0, ch, cw = st.category_area_crop(tf, lbl, (24, 40), seeds[1], 0.75, 255,
                                               rule="mmseg").numpy()
        rgb, lbl = rgb[y0:y0 + ch, x0:x0 + cw], lbl[y0:y0 + ch, x0:x0 + cw]
        got_label, got_image = out["label"].numpy(), out["image"].numpy()
        region_label, region_image = got_label[:ch, :cw], got_image[:ch, :cw]
        if not (np.array_equal(region_label, lbl) and np.array_equal(region_image, rgb)):
            region_label, region_image = region_label[:, ::-1], region_image[:, ::-1]  # flip
        np.testing.assert_array_equal(region_label, lbl)
        np.testing.assert_array_equal(region_image, rgb.astype(np.float32))
        assert (got_label[ch:] == 255).all() and (got_label[:, cw:] == 255).all()
        np.testing.assert_allclose(got_image[ch:], np.broadcast_to(mean, got_image[ch:].shape))
        np.testing.assert_allclose(got_image[:, cw:],
                                   np.broadcast_to(mean, got_image[:, cw:].shape))

    augment = pipeline.PnaAugment(3, colour="mmseg", **kwargs)
    for g in examples_eager_and_in_tf_data(tf, augment, image, label, (5, 6)):
        assert g["image"].shape == (24, 40, 3) and g["label"].shape == (24, 40)


def test_mmseg_configs_use_the_mmseg_pipeline_and_detectron2_ones_keep_theirs():
    from pathlib import Path

    from jax_refine.train import loop

    configs = Path(__file__).resolve().parents[1] / "configs"
    coco = loop.load_config_file(configs / "pna_cocostuff10k_r50_deeplabv3.py")
    augment = loop.build_augment(coco)
    assert (augment.resize, augment.crop_rule, augment.colour) == ("mmseg_ratio", "mmseg",
                                                                   "mmseg")
    assert augment.img_scale == (2048, 512) and augment.single_category_max_area == 0.75
    assert coco.dataset.reduce_zero_label
    base = loop.build_augment(loop.load_config_file(configs / "pna_detectron2_base.py"))
    assert (base.resize, base.colour, base.crop_rule) == ("shortest_edge", "ssd", "detectron2")
    synthetic = loop.build_augment(loop.load_config_file(configs / "pna_synthetic.py"))
    assert (synthetic.resize, synthetic.colour) == ("relative", "jitter")
