"""Sobel edge magnitude of the CRM reference loss (`models/sobel_op.py`), NHWC, no parameters.

sobel(x) = sqrt(gx^2 + gy^2 + 1e-4) where, per channel, x is first smoothed by a 3x3
average pool (stride 1, zero padding 1, count_include_pad=True, i.e. a plain sum / 9) and gx,
gy are cross-correlations (zero padding 1) with

    gx = [[1, 0, -1], [2, 0, -2], [1, 0, -1]] / 4,  gy = [[1, 2, 1], [0, 0, 0], [-1, -2, -1]] / 4.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any

GX = np.asarray([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float32) / 4
GY = np.asarray([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], np.float32) / 4
EPS = 1e-4


def _correlate3x3(x: Array, kernel: np.ndarray) -> Array:
    """Per-channel 3x3 cross-correlation with zero padding 1: [B, H, W, C] -> same shape."""
    channels = x.shape[-1]
    k = jnp.asarray(np.tile(kernel[:, :, None, None], (1, 1, 1, channels)), x.dtype)
    return jax.lax.conv_general_dilated(
        x, k, (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels,
    )


def avg_pool3x3(x: Array) -> Array:
    """3x3 average pool, stride 1, padding 1, count_include_pad=True: [B, H, W, C]."""
    return _correlate3x3(x, np.full((3, 3), 1 / 9, np.float32))


def sobel(x: Array) -> Array:
    """Edge magnitude [B, H, W, C] of x [B, H, W, C] (see the module docstring)."""
    x = avg_pool3x3(x)
    gx = _correlate3x3(x, GX)
    gy = _correlate3x3(x, GY)
    return jnp.sqrt(gx * gx + gy * gy + EPS)
