"""PyTorch-exact average pooling of NHWC arrays (no Flax).

`F.adaptive_avg_pool2d` splits an axis of length n into o windows [floor(i n / o),
ceil((i + 1) n / o)), which overlap and differ in size unless o divides n; `jax.image.resize`
(even with 'linear'/'area'-like methods) does something else. PSP's pyramid pooling
(scales 1/2/3/6) needs the PyTorch rule for arbitrary feature sizes, so the windows are
written out as a small averaging matrix per axis (shapes are static) and applied with two
contractions. Summation order differs from PyTorch's loop only by float32 rounding.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

Array = Any


def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] matrix whose row i averages PyTorch's adaptive window i."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size=} {out_size=}")
    matrix = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)  # ceil((i + 1) * in / out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix.astype(np.float32)


def adaptive_avg_pool(x: Array, output_size: int | tuple[int, int]) -> Array:
    """`F.adaptive_avg_pool2d(x, output_size)` on [B, H, W, C] -> [B, oh, ow, C].

    Args:
      x: [B, H, W, C] (any float dtype; accumulation follows jnp's default for that dtype).
      output_size: an int (square) or (oh, ow).
    """
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    out_h, out_w = output_size
    rows = jnp.asarray(adaptive_pool_matrix(x.shape[1], out_h), x.dtype)
    cols = jnp.asarray(adaptive_pool_matrix(x.shape[2], out_w), x.dtype)
    if (out_h, out_w) == (1, 1):
        return jnp.mean(x, axis=(1, 2), keepdims=True)
    y = jnp.einsum("oh,bhwc->bowc", rows, x)
    return jnp.einsum("pw,bowc->bopc", cols, y)


def avg_pool_valid(x: Array, kernel: tuple[int, int]) -> Array:
    """`nn.AvgPool2d(kernel, stride=1)` (no padding) on [B, H, W, C] -> [B, H-kh+1, W-kw+1, C]."""
    kh, kw = kernel
    if kh > x.shape[1] or kw > x.shape[2]:
        raise ValueError(f"pool kernel {kernel} larger than the input {x.shape[1:3]}")
    # Box sums by cumulative sums would lose precision on large maps; a banded matrix per
    # axis keeps every output an exact-window mean (separable, as the window is a box).
    def band(n: int, k: int) -> np.ndarray:
        m = np.zeros((n - k + 1, n), np.float32)
        for i in range(n - k + 1):
            m[i, i:i + k] = 1.0 / k
        return m

    y = jnp.einsum("oh,bhwc->bowc", jnp.asarray(band(x.shape[1], kh), x.dtype), x)
    return jnp.einsum("pw,bowc->bopc", jnp.asarray(band(x.shape[2], kw), x.dtype), y)
