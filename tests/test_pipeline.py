"""The CRM tf.data pipeline: determinism, resume by step, per-process slices, eager == graph."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import cv2
import numpy as np
import pytest

from jax_refine import metrics
from jax_refine.data import pipeline
from jax_refine.data.pipeline import TRAIN_SCENE_SEED_OFFSET
from jax_refine.data.synthetic import WIRE_ID, make_scene

CROP = 32


def _dataset(start_step=0, process_index=0, process_count=1, batch=4, seed=3, workers=0,
             threads=None):
    return pipeline.train_dataset(
        pipeline.SyntheticSource(seed, 48, 80), pipeline.CrmAugment(seed, crop=CROP),
        global_batch_size=batch, start_step=start_step, process_index=process_index,
        process_count=process_count, workers=workers, threads=threads)


def _take(ds, n):
    it = pipeline.as_numpy(ds)
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)


def test_batches_shapes_and_ranges():
    (batch,) = _take(_dataset(), 1)
    assert batch["image"].shape == (4, CROP, CROP, 3)
    assert batch["mask"].shape == batch["gt"].shape == (4, CROP, CROP, 1)
    assert set(np.unique(batch["mask"])) <= {-1.0, 1.0}
    assert set(np.unique(batch["gt"])) <= {0.0, 1.0}
    assert all(v.dtype == np.float32 for v in batch.values())
    assert -2.2 < batch["image"].min() and batch["image"].max() < 2.7  # ImageNet-normalised


def test_deterministic_and_resumable():
    first = _take(_dataset(), 3)
    again = _take(_dataset(), 3)
    assert all(_equal(a, b) for a, b in zip(first, again, strict=True))
    resumed = _take(_dataset(start_step=2), 1)[0]
    assert _equal(first[2], resumed)  # batch k is a pure function of (seed, k)
    assert not _equal(first[0], first[1])
    other_seed = _take(_dataset(seed=4), 1)[0]
    assert not _equal(first[0], other_seed)


@pytest.mark.parametrize("task", ["crm", "pna"])
def test_same_batches_whatever_the_parallelism(task):
    """Example k is a pure function of (seed, k): worker processes and threads change nothing
    (CRM: every coarse-mask kind, some blurred)."""
    if task == "crm":
        source = pipeline.SyntheticSource(3, 48, 80, window=CROP, subset_prob=0.5)
        augment = pipeline.CrmAugment(3, crop=CROP, coarse=pipeline.CoarseSpec(
            lowres_prob=0.5, lowres_factors=(2.0, 8.0), soft_prob=0.5))
    else:
        source = pipeline.SyntheticSemanticSource(3, 24, 48, num_classes=3)
        augment = pipeline.PnaAugment(3, crop=CROP)

    def batches(**parallelism):
        return _take(pipeline.train_dataset(source, augment, global_batch_size=4, start_step=1,
                                            **parallelism), 2)

    serial = batches(workers=0, threads=1)
    assert all(_equal(a, b) for a, b in zip(serial, batches(workers=2, threads=2),
                                            strict=True))


def test_process_slices_make_the_global_batch():
    full = _take(_dataset(), 2)
    parts = [_take(_dataset(process_index=p, process_count=2), 2) for p in range(2)]
    for step in range(2):
        for key in full[step]:
            joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
            np.testing.assert_array_equal(joined, full[step][key])


def test_eager_transform_equals_tf_data():
    import tensorflow as tf

    source = pipeline.SyntheticSource(3, 48, 80)
    augment = pipeline.CrmAugment(3, crop=CROP)
    (batch,) = _take(_dataset(batch=2), 1)
    for k in range(2):
        image, gt = source(k)
        eager = augment(tf, tf.constant(image), tf.constant(gt), tf.constant(k, tf.int64))
        for key in batch:
            np.testing.assert_allclose(eager[key].numpy(), batch[key][k], atol=1e-6)


def test_crop_pads_small_images_and_mask_follows_image():
    import tensorflow as tf

    image = np.zeros((20, 24, 3), np.uint8)
    image[:, 12:] = 255  # right half white = foreground
    gt = (image[..., 0] > 0).astype(np.uint8) * 255
    augment = pipeline.CrmAugment(0, crop=CROP, brightness=0, contrast=0, saturation=0,
                                  grayscale_p=0)
    for k in range(4):  # random flips: the mask must flip with the image
        out = augment(tf, tf.constant(image), tf.constant(gt), tf.constant(k, tf.int64))
        white = out["image"].numpy()[..., 0] > 0
        np.testing.assert_array_equal(white, out["gt"].numpy()[..., 0] > 0.5)


def test_record_source_epochs_are_permutations():
    records = [{"image": np.full((8, 8, 3), i, np.uint8),
                "mask": np.full((8, 8, 1), 255 * (i % 2), np.uint8)} for i in range(5)]
    source = pipeline.RecordSource(records, seed=0)
    for epoch in range(2):
        seen = sorted(int(source(epoch * 5 + j)[0][0, 0, 0]) for j in range(5))
        assert seen == list(range(5))
    assert source(1)[1].max() in (0, 255)  # the 8-bit GT as stored


def _coarse(spec, gt, seed=0):
    import tensorflow as tf

    return spec.make(tf, tf.constant(gt), tf.constant([seed, 1], tf.int32)).numpy()


def test_coarse_spec_iou_range():
    gt = np.zeros((96, 96), np.uint8)
    gt[20:70, 30:80] = 1
    coarse = _coarse(pipeline.CoarseSpec((0.8, 0.81), iou_against="gt"), gt)
    assert coarse.dtype == np.float32 and set(np.unique(coarse)) <= {0.0, 1.0}
    inter = np.logical_and(coarse, gt).sum()
    union = np.logical_or(coarse, gt).sum()
    assert 0.7 < inter / union < 0.81
    lowres = _coarse(pipeline.CoarseSpec(lowres_prob=1.0), gt)
    assert lowres.shape == gt.shape and lowres.max() == 1


def test_coarse_spec_soft_masks_are_blurred_binary_masks():
    gt = np.zeros((96, 96), np.uint8)
    gt[20:70, 30:80] = 1
    spec = pipeline.CoarseSpec(lowres_prob=1.0, lowres_factors=(1.0, 1.0), soft_prob=1.0,
                               soft_sigma=(2.0, 2.0))
    soft = _coarse(spec, gt)
    binary = _coarse(dataclasses.replace(spec, soft_prob=0.0), gt)  # same draws, no blur
    assert soft.dtype == np.float32 and 0 <= soft.min() and soft.max() <= 1
    assert metrics.iou(binary > 0.5, gt) > 0.95
    np.testing.assert_array_equal(
        soft, cv2.GaussianBlur(binary, (0, 0), 2.0, borderType=cv2.BORDER_REFLECT))
    # A step blurred with sigma 2: a ramp across the edge, flat far from it.
    np.testing.assert_array_equal(soft[45] > 0.5, binary[45] > 0.5)  # (corners round off)
    assert soft[45, 10] < 1e-3 and soft[45, 55] > 1 - 1e-3
    assert 0 < ((soft > 0.05) & (soft < 0.95)).sum() < 0.2 * soft.size


@pytest.mark.parametrize("batch,processes", [(3, 2)])
def test_indivisible_batch_is_an_error(batch, processes):
    with pytest.raises(ValueError, match="divisible"):
        _dataset(batch=batch, process_count=processes)


def test_pna_pipeline_scale_crop_ignore_padding():
    records = []
    for i in range(3):
        label = np.zeros((40, 50), np.uint8)
        label[:, 25:] = 2
        records.append({"image": np.full((40, 50, 3), 100 + i, np.uint8), "label": label})
    source = pipeline.RecordSource(records, seed=0, mask_key="label", labels=True)
    augment = pipeline.PnaAugment(0, crop=64, scale_range=(0.5, 0.6))  # always padded
    ds = pipeline.train_dataset(source, augment, global_batch_size=2)
    batch = next(pipeline.as_numpy(ds))
    assert batch["image"].shape == (2, 64, 64, 3) and batch["label"].shape == (2, 64, 64)
    assert batch["label"].dtype == np.int32
    assert set(np.unique(batch["label"])) <= {0, 2, 255}
    assert (batch["label"] == 255).any()  # padding is ignored
    # Images stay RGB in [0, 255]; padding is the mean colour (0 after the model's
    # normalisation, as detectron2 pads).
    mean = 255 * np.asarray(pipeline.IMAGENET_MEAN, np.float32)
    np.testing.assert_allclose(batch["image"][batch["label"] == 255],
                               np.broadcast_to(mean, ((batch["label"] == 255).sum(), 3)),
                               atol=1e-3)
    assert 0 <= batch["image"].min() and batch["image"].max() <= 255
    again = next(pipeline.as_numpy(pipeline.train_dataset(source, augment, global_batch_size=2)))
    np.testing.assert_array_equal(batch["label"], again["label"])


def test_synthetic_semantic_source_is_multiclass_and_seeded():
    source = pipeline.SyntheticSemanticSource(0, min_size=64, max_size=80, num_classes=3)
    image, label = source(5)
    assert image.shape[:2] == label.shape and 64 <= label.shape[0] <= 80
    assert image.dtype == np.uint8 and label.dtype == np.uint8
    assert label.max() <= 3 and len(np.unique(label)) > 1
    again = source(5)
    np.testing.assert_array_equal(again[1], label)
    assert not np.array_equal(source(6)[0][:64, :64], image[:64, :64])


def test_synthetic_source_window_is_a_crop_of_the_same_scene():
    whole = pipeline.SyntheticSource(3, 48, 80)
    windowed = pipeline.SyntheticSource(3, 48, 80, window=CROP)
    corners = set()
    for k in range(6):
        image, label = windowed(k)
        assert image.shape == (CROP, CROP, 3) and label.shape == (CROP, CROP)
        np.testing.assert_array_equal(windowed(k)[0], image)  # deterministic in (seed, k)
        full_image, full_label = whole(k)  # same size and scene: the window is one of its crops
        size = full_label.shape[0]
        matches = [(t, x) for t in range(size - CROP + 1) for x in range(size - CROP + 1)
                   if np.array_equal(full_label[t:t + CROP, x:x + CROP], label)]
        diffs = [np.abs(image.astype(int) - full_image[t:t + CROP, x:x + CROP]).max()
                 for t, x in matches]
        assert min(diffs) <= 13  # only the sensor noise differs
        corners.add(matches[int(np.argmin(diffs))])
    assert len(corners) > 1


def test_synthetic_source_object_subsets():
    """subset_prob=1 keeps a random subset of the objects whole, and every wire."""
    everything = pipeline.SyntheticSource(3, 160, 200)
    subsets = pipeline.SyntheticSource(3, 160, 200, subset_prob=1.0)
    dropped = 0
    for k in range(8):
        image, label = subsets(k)
        full_image, full_label = everything(k)
        np.testing.assert_array_equal(image, full_image)
        assert not np.any(label & ~full_label)
        # Every object is either all in or all out of the target (the source's draws: side,
        # then scene seed).
        rng = np.random.default_rng([3, k, 1])
        size = min(int(np.exp(rng.uniform(np.log(160), np.log(201)))), 200)
        scene = TRAIN_SCENE_SEED_OFFSET + int(rng.integers(2**30))
        _, objects = make_scene(scene, size, size, instances=True)
        for i in np.unique(objects[objects > 0]):
            assert len(np.unique(label[objects == i])) == 1
        assert np.all(label[objects == WIRE_ID] == 255)
        dropped += int(label.sum() < full_label.sum())
    assert dropped >= 3


def test_synthetic_source_window_not_larger_than_the_scene():
    image, label = pipeline.SyntheticSource(0, 40, 40, window=64)(0)
    assert image.shape == (40, 40, 3) and label.shape == (40, 40)


def test_windowed_source_batches():
    ds = pipeline.train_dataset(pipeline.SyntheticSource(3, 48, 80, window=CROP),
                                pipeline.CrmAugment(3, crop=CROP), global_batch_size=2)
    (batch,) = _take(ds, 1)
    assert batch["image"].shape == (2, CROP, CROP, 3) and batch["gt"].shape == (2, CROP, CROP, 1)


def test_training_imports_leave_tensorflow_onednn_off():
    """jax_refine turns TensorFlow's oneDNN kernels off before CLU (or the pipelines) import
    TensorFlow: their per-shape code generation serialises the tf.data threads."""
    code = ("import os, sys; import jax_refine.train.loop; "
            "assert 'tensorflow' in sys.modules; "
            "print(os.environ['TF_ENABLE_ONEDNN_OPTS'])")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-1] == "0"
    assert "oneDNN custom operations are on" not in run.stderr
