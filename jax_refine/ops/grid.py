"""Coordinate grids and nearest-cell lookup with PyTorch's conventions.

Coordinates live in (-1, 1) with component 0 the row (y) and component 1 the column (x)
('ij' order, as in the CRM/LIIF reference). Pixel centres of an n-sample axis are
c_i = -1 + 1/n + 2i/n, computed exactly as the reference's `make_coord` does in float32
(the offset -1 + 1/n rounded once from double, then plus float32(2/n) * i).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

Array = Any


def pixel_centers(n: int) -> np.ndarray:
    """Float32 pixel-centre coordinates of an axis of `n` samples, shape [n] (numpy)."""
    r = 1.0 / n
    return np.float32(-1.0 + r) + np.float32(2.0 * r) * np.arange(n, dtype=np.float32)


def coordinate_grid(height: int, width: int) -> Array:
    """Pixel-centre coordinates of a height x width grid, [height, width, 2], row first."""
    ys = pixel_centers(height)
    xs = pixel_centers(width)
    grid = np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1)
    return jnp.asarray(grid)


def nearest_cell_index(coord: Array, size: Any) -> Array:
    """Index of the cell nearest to `coord` on an axis of `size` cells.

    Equals `F.grid_sample(..., mode='nearest', align_corners=False)`'s choice: unnormalise
    to (coord + 1) * size / 2 - 0.5 and round half to even. Results are clipped into
    [0, size - 1] (the reference's inputs never leave that range because they are clamped
    to [-1 + 1e-6, 1 - 1e-6] first). Works on numpy (returns numpy) and on jax arrays.
    """
    xp = np if isinstance(coord, np.ndarray) else jnp
    half = xp.asarray(size, xp.float32) / 2 if xp is jnp else np.float32(size / 2)
    pos = (coord + xp.float32(1)) * half - xp.float32(0.5)
    return xp.clip(xp.rint(pos), 0, xp.asarray(size) - 1).astype(xp.int32)


def gather_nearest(feature: Array, coord: Array) -> Array:
    """Nearest-cell sampling (grid_sample nearest, align_corners=False) on NHWC features.

    Args:
      feature: [B, h, w, C].
      coord: [B, Q, 2] in [-1, 1], row first.

    Returns:
      [B, Q, C] feature vectors of the nearest cells.
    """
    h, w = feature.shape[1], feature.shape[2]
    iy = nearest_cell_index(coord[..., 0], h)
    ix = nearest_cell_index(coord[..., 1], w)
    batch = jnp.arange(feature.shape[0])[:, None]
    return feature[batch, iy, ix]
