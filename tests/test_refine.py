"""Refiner: accepted inputs, errors, sizes, compilation reuse and labels (the command line:
tests/test_cli.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_refine.models.crm import CRM
from jax_refine.refine import Refiner

SCALES = (0.5, 1.0)


def small_model() -> CRM:
    return CRM(depth=18, width=8, fusion_channels=(8, 8, 8), latent_channels=16, hidden=(8, 8))


@pytest.fixture(scope="module")
def small():
    model = small_model()
    x = jnp.zeros((1, 32, 32, 3))
    q = jnp.zeros((1, 4, 2))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x, x[..., :1], q, q)
    return model, variables


@pytest.fixture(scope="module")
def refiner(small):
    return Refiner(*small)


def scene(h, w, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    mask = ((yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (min(h, w) / 3) ** 2).astype(np.uint8) * 255
    return image, mask


def test_output_shape_dtype_and_range(refiner):
    image, mask = scene(37, 53)
    prob = refiner.refine(image, mask, SCALES)
    assert prob.shape == (37, 53) and prob.dtype == np.float32
    assert np.all((prob >= 0) & (prob <= 1))


def test_refine_steps_are_the_schedule_prefixes(refiner):
    image, mask = scene(37, 53, seed=2)
    scales = (0.25, 0.5, 1.0)
    steps = refiner.refine_steps(image, mask, scales)
    assert len(steps) == 3 and all(p.shape == (37, 53) for p in steps)
    for k, prob in enumerate(steps):  # step k is the cascade stopped after scales[k]
        np.testing.assert_array_equal(prob, refiner.refine(image, mask, scales[: k + 1]))
    assert not np.array_equal(steps[0], steps[-1])
    with pytest.raises(ValueError, match="scales must be"):
        refiner.refine_steps(image, mask, ())


def test_image_forms_are_equivalent(refiner):
    image, mask = scene(37, 53, seed=1)
    gray = image[..., 0]
    want_gray = refiner.refine(np.repeat(gray[..., None], 3, axis=2), mask, SCALES)
    np.testing.assert_array_equal(refiner.refine(gray, mask, SCALES), want_gray)
    np.testing.assert_array_equal(refiner.refine(gray[..., None], mask, SCALES), want_gray)
    rgba = np.concatenate([image, np.full((37, 53, 1), 7, np.uint8)], axis=2)
    np.testing.assert_array_equal(
        refiner.refine(rgba, mask, SCALES), refiner.refine(image, mask, SCALES)
    )


def test_mask_forms_are_equivalent(refiner):
    image, mask = scene(37, 53, seed=2)
    want = refiner.refine(image, mask, SCALES)
    for form in (
        mask[..., None],
        np.repeat(mask[..., None], 3, axis=2),
        mask > 0,
        mask.astype(np.float32) / np.float32(255),
        mask.astype(np.float64) / 255,
    ):
        np.testing.assert_allclose(refiner.refine(image, form, SCALES), want, atol=1e-6)


@pytest.mark.parametrize(
    "image,mask,match",
    [
        (np.zeros((8, 9, 3), np.float32), np.zeros((8, 9), np.uint8), "uint8.*float32"),
        (np.zeros((8, 9, 2), np.uint8), np.zeros((8, 9), np.uint8), r"shape \(8, 9, 2\)"),
        ([[1, 2]], np.zeros((8, 9), np.uint8), "type list"),
        (np.zeros((8, 9, 3), np.uint8), np.zeros((8, 9), np.int32), "int32"),
        (np.zeros((8, 9, 3), np.uint8), np.full((8, 9), 1.5), r"\[0, 1\].*1.5"),
        (np.zeros((8, 9, 3), np.uint8), np.zeros((8, 9, 2), np.uint8), r"\(8, 9, 2\)"),
        (np.zeros((8, 9, 3), np.uint8), np.zeros((8, 9, 3), bool), "bool"),
        (np.zeros((8, 9, 3), np.uint8), np.zeros((9, 8), np.uint8), r"\(8, 9\).*\(9, 8\)"),
    ],
)
def test_invalid_inputs_raise(refiner, image, mask, match):
    with pytest.raises(ValueError, match=match):
        refiner.refine(image, mask, SCALES)


def test_invalid_scales_raise(refiner):
    image, mask = scene(8, 9)
    for scales in ((), (0.0,), (-1.0, 1.0)):
        with pytest.raises(ValueError, match="scales"):
            refiner.refine(image, mask, scales)


def test_empty_mask_gives_empty_output(refiner):
    image, _ = scene(37, 53)
    np.testing.assert_array_equal(refiner.refine(image, np.zeros((37, 53), np.uint8)), 0)


@pytest.mark.parametrize("size", [(5, 7), (1, 1), (64, 3)])
def test_tiny_images(refiner, size):
    image, mask = scene(*size)
    mask[0, 0] = 255
    prob = refiner.refine(image, mask, SCALES)
    assert prob.shape == size and np.all(np.isfinite(prob))


def test_nearby_sizes_reuse_compilation_and_match_unbucketed(small):
    refiner = Refiner(*small, bucket=64)
    image, mask = scene(37, 53, seed=3)
    refiner.refine(image, mask, SCALES)
    traces = refiner.trace_count
    assert traces > 0
    for size in ((40, 50), (35, 56)):
        image, mask = scene(*size, seed=4)
        got = refiner.refine(image, mask, SCALES)
        assert refiner.trace_count == traces, f"{size} triggered a new compilation"
        exact = Refiner(*small, bucket=None).refine(image, mask, SCALES)
        # Same arithmetic; XLA may vectorise other array widths differently (~1 ulp).
        np.testing.assert_allclose(got, exact, atol=1e-6, rtol=0)


def test_default_schedule_runs(refiner):
    image, mask = scene(40, 44, seed=5)
    prob = refiner.refine(image, mask)
    assert prob.shape == (40, 44)


def test_refine_labels(refiner):
    image, _ = scene(37, 53, seed=6)
    labels = np.zeros((37, 53), np.uint8)
    labels[5:20, 5:30] = 3
    labels[22:35, 30:50] = 7
    out = refiner.refine_labels(image, labels, SCALES)
    assert out.shape == labels.shape and out.dtype == labels.dtype
    assert set(np.unique(out)) <= {0, 3, 7}
    probs = np.stack([refiner.refine(image, labels == c, SCALES) for c in (0, 3, 7)])
    np.testing.assert_array_equal(out, np.array([0, 3, 7])[probs.argmax(0)])
    np.testing.assert_array_equal(refiner.refine_labels(image, np.full((37, 53), 2)), 2)
    with pytest.raises(ValueError, match="integer"):
        refiner.refine_labels(image, labels.astype(np.float32))
    for scales in ((), (0.5, -1.0)):  # checked up front, even for a one-class map
        with pytest.raises(ValueError, match="scales must be"):
            refiner.refine_labels(image, np.full((37, 53), 2), scales)
