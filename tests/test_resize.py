"""PyTorch-compatible resizes and nearest-cell lookup, checked against torch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_refine.ops import grid, resize

torch = pytest.importorskip("torch")
F = torch.nn.functional

SIZES = [
    ((7, 9), (15, 4)),
    ((16, 16), (31, 33)),
    ((37, 53), (5, 7)),
    ((10, 12), (1, 1)),
    ((1, 5), (3, 8)),
    ((64, 48), (8, 6)),
    ((13, 13), (13, 13)),
]


def _torch_nhwc(x, size, **kwargs):
    t = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))
    out = F.interpolate(t, size=size, **kwargs)
    return np.transpose(out.numpy(), (0, 2, 3, 1))


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("in_size,out_size", SIZES)
def test_bilinear_matches_torch(in_size, out_size, align_corners):
    x = np.random.default_rng(0).normal(size=(2, *in_size, 3)).astype(np.float32)
    want = _torch_nhwc(x, out_size, mode="bilinear", align_corners=align_corners)
    got = np.asarray(resize.resize_bilinear(jnp.asarray(x), out_size, align_corners))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)


@pytest.mark.parametrize("in_size,out_size", SIZES)
def test_nearest_matches_torch(in_size, out_size):
    x = np.random.default_rng(1).normal(size=(1, *in_size, 2)).astype(np.float32)
    want = _torch_nhwc(x, out_size, mode="nearest")
    got = np.asarray(resize.resize_nearest(jnp.asarray(x), out_size))
    np.testing.assert_array_equal(got, want)


def test_bilinear_keeps_dtype_and_leading_dims():
    x = jnp.ones((2, 3, 5, 6, 4), jnp.bfloat16)
    out = resize.resize_bilinear(x, (9, 2), align_corners=False)
    assert out.shape == (2, 3, 9, 2, 4) and out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), 1.0)


def test_dynamic_sizes_match_static_under_jit():
    x = np.random.default_rng(2).normal(size=(1, 40, 50, 2)).astype(np.float32)
    padded = np.pad(x, ((0, 0), (0, 24), (0, 14), (0, 0)), constant_values=7.0)

    @jax.jit
    def f(x, in_h, in_w, out_h, out_w):
        return resize.resize_bilinear_dynamic(x, (32, 32), (in_h, in_w), (out_h, out_w), True)

    got = np.asarray(f(padded, 40, 50, 19, 27))[:, :19, :27]
    want = _torch_nhwc(x, (19, 27), mode="bilinear", align_corners=True)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)


@pytest.mark.parametrize("size", [1, 3, 7, 28, 113])
def test_nearest_cell_matches_grid_sample(size):
    rng = np.random.default_rng(size)
    edges = (-1 + 2 * np.arange(size + 1) / size).astype(np.float32)
    near = np.concatenate([edges, np.nextafter(edges, np.float32(2)), np.nextafter(edges, -2)])
    coords = np.concatenate([rng.uniform(-1, 1, 2000).astype(np.float32), near])
    coords = np.clip(coords, -1 + 1e-6, 1 - 1e-6).astype(np.float32)
    values = torch.arange(size, dtype=torch.float32).view(1, 1, 1, size).expand(1, 1, 2, size)
    g = torch.zeros(1, 1, len(coords), 2)
    g[0, 0, :, 0] = torch.from_numpy(coords)
    want = F.grid_sample(values.contiguous(), g, mode="nearest", align_corners=False)
    want = want[0, 0, 0].numpy().astype(np.int32)
    np.testing.assert_array_equal(grid.nearest_cell_index(coords, size), want)
    on_device = grid.nearest_cell_index(jnp.asarray(coords), size)
    np.testing.assert_array_equal(np.asarray(on_device), want)


def test_pixel_centers_and_grid_match_reference_make_coord():
    for n in (1, 5, 224, 1057):
        r = 1.0 / n
        want = (-1 + r + (2 * r) * torch.arange(n).float()).numpy()
        np.testing.assert_array_equal(grid.pixel_centers(n), want)
    g = np.asarray(grid.coordinate_grid(3, 4))
    assert g.shape == (3, 4, 2)
    np.testing.assert_array_equal(g[:, 0, 0], grid.pixel_centers(3))  # row first ('ij')
    np.testing.assert_array_equal(g[0, :, 1], grid.pixel_centers(4))


def test_gather_nearest_matches_grid_sample():
    rng = np.random.default_rng(3)
    feat = rng.normal(size=(2, 5, 7, 3)).astype(np.float32)
    coord = rng.uniform(-1, 1, size=(2, 11, 2)).astype(np.float32)
    t_feat = torch.from_numpy(np.transpose(feat, (0, 3, 1, 2)).copy())
    t_grid = torch.from_numpy(coord[:, None, :, ::-1].copy())
    want = F.grid_sample(t_feat, t_grid, mode="nearest", align_corners=False)[:, :, 0]
    got = np.asarray(grid.gather_nearest(jnp.asarray(feat), jnp.asarray(coord)))
    np.testing.assert_array_equal(got, want.permute(0, 2, 1).numpy())
