"""CRM losses against a direct PyTorch (or numpy) computation of the reference formulas."""

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
