"""CRM and PNA losses against direct PyTorch (or numpy) computations of the reference
formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_refine import losses
from jax_refine.ops import sobel as sobel_op


def _numpy_sobel(x: np.ndarray) -> np.ndarray:
    """Direct loops: [H, W] -> [H, W] (avg pool 3x3 pad 1 count_include_pad, then gx/gy)."""
    x = x.astype(np.float64)
    h, w = x.shape
    p = np.pad(x, 1)
    pooled = sum(p[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9
    q = np.pad(pooled, 1)
    gx = sum(sobel_op.GX[i, j] * q[i:i + h, j:j + w] for i in range(3) for j in range(3))
    gy = sum(sobel_op.GY[i, j] * q[i:i + h, j:j + w] for i in range(3) for j in range(3))
    return np.sqrt(gx ** 2 + gy ** 2 + 1e-4)


def _data(seed=0, shape=(2, 17, 23, 1)):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, shape).astype(np.float32)
    gt = (rng.random(shape) > 0.5).astype(np.float32)
    gt[0, :, :5] = 0.3  # soft values too
    return logits, gt


def test_sobel_matches_loops():
    x = np.random.default_rng(1).random((2, 9, 11, 1)).astype(np.float32)
    got = np.asarray(sobel_op.sobel(x))
    for b in range(2):
        np.testing.assert_allclose(got[b, ..., 0], _numpy_sobel(x[b, ..., 0]), atol=1e-6)


def test_crm_loss_matches_numpy():
    logits, gt = _data()
    total, terms = losses.crm_loss(logits, gt)
    z = logits.astype(np.float64)
    p = 1 / (1 + np.exp(-z))
    t = (gt > 0.5).astype(np.float64)
    bce = np.mean(np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z))))
    l1 = np.mean(np.abs(p - gt))
    mse = np.mean((p - gt) ** 2)
    sob = np.mean([np.abs(_numpy_sobel(gt[b, ..., 0]) - _numpy_sobel(p[b, ..., 0]))
                   for b in range(gt.shape[0])])
    want = {"bce": bce, "l1": l1, "mse": mse, "sobel": sob}
    for k, v in want.items():
        np.testing.assert_allclose(float(terms[k]), v, rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(float(total), bce + 0.5 * l1 + 0.5 * mse + 2 * sob, rtol=1e-5)


def test_crm_loss_matches_torch_reference_ops():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    logits, gt = _data(2)
    z = torch.from_numpy(logits).permute(0, 3, 1, 2).double()
    g = torch.from_numpy(gt).permute(0, 3, 1, 2).double()
    p = torch.sigmoid(z)

    def tsobel(x):
        x = F.avg_pool2d(x, 3, stride=1, padding=1)  # count_include_pad=True by default
        kx = torch.tensor(sobel_op.GX, dtype=x.dtype)[None, None]
        ky = torch.tensor(sobel_op.GY, dtype=x.dtype)[None, None]
        gx, gy = F.conv2d(x, kx, padding=1), F.conv2d(x, ky, padding=1)
        return torch.sqrt(gx ** 2 + gy ** 2 + 1e-4)

    want = {
        "bce": F.binary_cross_entropy_with_logits(z, (g > 0.5).double()),
        "l1": F.l1_loss(p, g),
        "mse": F.mse_loss(p, g),
        "sobel": F.l1_loss(tsobel(g), tsobel(p)),
    }
    _, terms = losses.crm_loss(logits, gt)
    for k, v in want.items():
        np.testing.assert_allclose(float(terms[k]), float(v), rtol=1e-5, err_msg=k)


def test_crm_loss_shape_check():
    with pytest.raises(ValueError, match="shape"):
        losses.crm_loss(np.zeros((1, 4, 4, 1)), np.zeros((1, 4, 5, 1)))


# ----------------------------------------------------------------------------- PNA


def _softmax_ce(logits: np.ndarray, labels: np.ndarray, ignore: int = 255) -> np.ndarray:
    """Per-pixel cross-entropy [B, H, W] (0 at ignored pixels), float64 numpy."""
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    safe = np.where(labels == ignore, 0, labels)
    ce = -np.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    return np.where(labels == ignore, 0.0, ce)


def _semantic_data(seed=0, shape=(2, 13, 19), k=4, ignore_share=0.3):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (*shape, k)).astype(np.float32)
    labels = rng.integers(0, k, shape).astype(np.int32)
    labels[rng.random(shape) < ignore_share] = 255
    return logits, labels


def test_cross_entropy_ignores_void_pixels():
    logits, labels = _semantic_data()
    ce = _softmax_ce(logits, labels)
    valid = labels != 255
    np.testing.assert_allclose(float(losses.cross_entropy(logits, labels)),
                               ce[valid].mean(), rtol=1e-5)
    # Changing the logits of ignored pixels changes nothing.
    other = logits.copy()
    other[~valid] = 100.0
    assert float(losses.cross_entropy(other, labels)) == pytest.approx(
        float(losses.cross_entropy(logits, labels)), rel=1e-6)


def test_cross_entropy_matches_torch():
    torch = pytest.importorskip("torch")
    logits, labels = _semantic_data(1)
    ref = torch.nn.CrossEntropyLoss(ignore_index=255)(
        torch.from_numpy(logits).permute(0, 3, 1, 2), torch.from_numpy(labels).long())
    np.testing.assert_allclose(float(losses.cross_entropy(logits, labels)), ref.item(),
                               rtol=1e-5)


@pytest.mark.parametrize("ratio", [0.2, 0.5, 1.0])
def test_hard_pixel_mining_is_the_official_deeplab_ce(ratio):
    """Top k = int(ratio * B*H*W) over the whole batch, ignored pixels count as 0."""
    logits, labels = _semantic_data(2, shape=(3, 11, 17))
    ce = _softmax_ce(logits, labels).reshape(-1)
    k = int(ratio * ce.size)
    expected = np.sort(ce)[::-1][:k].mean()
    got = float(losses.hard_pixel_cross_entropy(logits, labels, ratio))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    torch = pytest.importorskip("torch")  # the reference's DeepLabCE, written out
    pixel = torch.nn.CrossEntropyLoss(ignore_index=255, reduction="none")(
        torch.from_numpy(logits).permute(0, 3, 1, 2), torch.from_numpy(labels).long()).view(-1)
    ref = pixel.mean() if ratio == 1.0 else torch.topk(pixel, int(ratio * pixel.numel()))[0].mean()
    np.testing.assert_allclose(got, ref.item(), rtol=1e-5)


def test_hard_pixel_mining_is_per_batch_not_per_image():
    # Image 0 easy, image 1 hard: the batch's top 20% all come from image 1.
    logits = np.zeros((2, 10, 10, 3), np.float32)
    logits[..., 0] = 8.0  # confident in class 0
    labels = np.zeros((2, 10, 10), np.int32)
    labels[1] = 2  # image 1 is all wrong
    ce = _softmax_ce(logits, labels)
    got = float(losses.hard_pixel_cross_entropy(logits, labels))
    np.testing.assert_allclose(got, ce[1].mean(), rtol=1e-5)  # 40 pixels, all of image 1
    per_image = np.mean([np.sort(c.ravel())[::-1][:20].mean() for c in ce])
    assert got > per_image + 1.0


def test_all_ignore_batch_is_zero_not_nan():
    logits, _ = _semantic_data()
    labels = np.full(logits.shape[:3], 255, np.int32)
    for fn in (losses.cross_entropy, losses.hard_pixel_cross_entropy):
        value = float(fn(logits, labels))
        assert value == 0.0
    grads = jax.grad(lambda x: losses.pna_loss([x, x], labels)[0])(jnp.asarray(logits))
    assert np.isfinite(np.asarray(grads)).all() and not np.asarray(grads).any()


def test_tiny_batch_keeps_at_least_one_pixel():
    logits, labels = _semantic_data(3, shape=(1, 2, 2), ignore_share=0.0)
    ce = _softmax_ce(logits, labels).ravel()
    np.testing.assert_allclose(float(losses.hard_pixel_cross_entropy(logits, labels)),
                               ce.max(), rtol=1e-5)  # int(0.2 * 4) = 0 -> 1 pixel


def _torch_bilinear(x: np.ndarray, size) -> np.ndarray:
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    out = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("loss_kind", ["hard_pixel_mining", "cross_entropy"])
def test_pna_loss_stage_weights_and_upsampling_odd_sizes(loss_kind):
    rng = np.random.default_rng(4)
    h, w, k = 45, 39, 3  # not multiples of 32; stage maps at strides 32, 32, 16, 8, 4
    sizes = [(2, 2), (2, 2), (3, 3), (6, 5), (12, 10)]
    stages = [rng.normal(0, 2, (2, *s, k)).astype(np.float32) for s in sizes]
    labels = rng.integers(0, k, (2, h, w)).astype(np.int32)
    labels[:, :5] = 255
    total, terms = losses.pna_loss([jnp.asarray(s) for s in stages], jnp.asarray(labels),
                                   coarse_loss=loss_kind, stage_loss=loss_kind)
    assert sorted(terms) == ["p0", "p1", "p2", "p3", "p4"]
    expected = {}
    for i, s in enumerate(stages):
        ce = _softmax_ce(_torch_bilinear(s, (h, w)), labels)
        if loss_kind == "cross_entropy":
            expected[f"p{i}"] = ce[labels != 255].mean()
        else:
            flat = np.sort(ce.ravel())[::-1]
            expected[f"p{i}"] = flat[: int(0.2 * flat.size)].mean()
        np.testing.assert_allclose(float(terms[f"p{i}"]), expected[f"p{i}"], rtol=1e-4)
    weighted = expected["p0"] + 0.1 * sum(expected[f"p{i}"] for i in range(1, 5))
    np.testing.assert_allclose(float(total), weighted, rtol=1e-4)
    total2, _ = losses.pna_loss(stages, labels, coarse_loss=loss_kind, stage_loss=loss_kind,
                                coarse_weight=0.0, stage_weight=1.0)
    np.testing.assert_allclose(float(total2), sum(expected[f"p{i}"] for i in range(1, 5)),
                               rtol=1e-4)


def test_pna_loss_rejects_unknown_type_and_bad_shapes():
    logits, labels = _semantic_data()
    with pytest.raises(ValueError, match="loss_type"):
        losses.pna_loss([logits], labels, coarse_loss="focal")
    with pytest.raises(ValueError, match="labels"):
        losses.cross_entropy(logits, labels[:, :-1])
