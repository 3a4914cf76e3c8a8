"""PyTorch-compatible resizes of NHWC arrays (`F.interpolate` bilinear and nearest).

`jax.image.resize` matches neither PyTorch convention exactly (it antialiases when
downsampling and has no `align_corners=True`), so the two conventions are written out:
source positions, floor indices and interpolation weights are computed in float32 with the
same operations and in the same order as PyTorch's CPU kernels, and the separable
interpolation runs along the width first, then the height (PyTorch's order), so results
agree to float32 rounding.

Sizes may be Python ints or traced int32 scalars. The `*_weights` / `*_indices` helpers take
a static `length` >= the output size: entries past the output size are valid indices with
arbitrary weights, which lets a caller keep a fixed (bucketed) array shape while the true
sizes vary at run time.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

Array = Any
Size = Any  # a Python int or a traced int32 scalar


def _as_f32(value: Size) -> Array:
    return jnp.asarray(value, jnp.float32)


def linear_weights(
    in_size: Size, out_size: Size, length: int, align_corners: bool
) -> tuple[Array, Array, Array, Array]:
    """Indices and weights of 1-D linear interpolation, PyTorch's rule.

    Args:
      in_size: number of input samples (int or traced int32).
      out_size: number of output samples (int or traced int32).
      length: static number of output positions to compute (>= out_size).
      align_corners: PyTorch's `align_corners`.

    Returns:
      (i0, i1, w0, w1), each of shape [length]: output j = w0[j] * x[i0[j]] + w1[j] * x[i1[j]].
    """
    in_f = _as_f32(in_size)
    out_f = _as_f32(out_size)
    dst = jnp.arange(length, dtype=jnp.float32)
    if align_corners:
        scale = jnp.where(out_f > 1, (in_f - 1) / jnp.maximum(out_f - 1, 1), 0.0)
        src = scale * dst
    else:
        scale = in_f / out_f
        src = jnp.maximum(scale * (dst + 0.5) - 0.5, 0.0)
    last = jnp.asarray(in_size, jnp.int32) - 1
    i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), last)
    w1 = jnp.clip(src - i0.astype(jnp.float32), 0.0, 1.0)
    w0 = 1.0 - w1
    i1 = i0 + (i0 < last).astype(jnp.int32)
    return i0, i1, w0, w1


def nearest_indices(in_size: Size, out_size: Size, length: int) -> Array:
    """PyTorch 'nearest' source indices: min(floor(j * in / out), in - 1), shape [length]."""
    scale = _as_f32(in_size) / _as_f32(out_size)
    dst = jnp.arange(length, dtype=jnp.float32)
    last = jnp.asarray(in_size, jnp.int32) - 1
    return jnp.minimum(jnp.floor(dst * scale).astype(jnp.int32), last)


def _interp_axis(x: Array, axis: int, weights: tuple[Array, Array, Array, Array]) -> Array:
    i0, i1, w0, w1 = weights
    shape = [1] * x.ndim
    shape[axis] = -1
    w0 = w0.astype(x.dtype).reshape(shape)
    w1 = w1.astype(x.dtype).reshape(shape)
    return jnp.take(x, i0, axis=axis) * w0 + jnp.take(x, i1, axis=axis) * w1


def resize_bilinear_dynamic(
    x: Array,
    length: tuple[int, int],
    in_size: tuple[Size, Size],
    out_size: tuple[Size, Size],
    align_corners: bool,
) -> Array:
    """Bilinear resize of the top-left `in_size` region of `x` to `out_size`.

    Args:
      x: [..., H, W, C] with H >= in_size[0], W >= in_size[1] (extra rows/columns ignored).
      length: static (rows, cols) of the result, >= out_size.
      in_size, out_size: (rows, cols), ints or traced int32 scalars.
      align_corners: PyTorch's `align_corners`.

    Returns:
      [..., length[0], length[1], C]; the top-left `out_size` block equals
      `F.interpolate(x[:in_size], out_size, mode='bilinear', align_corners=...)`, the rest is
      finite filler.
    """
    rows = linear_weights(in_size[0], out_size[0], length[0], align_corners)
    cols = linear_weights(in_size[1], out_size[1], length[1], align_corners)
    x = _interp_axis(x, x.ndim - 2, cols)
    return _interp_axis(x, x.ndim - 3, rows)


def resize_bilinear(x: Array, size: tuple[int, int], align_corners: bool) -> Array:
    """`F.interpolate(mode='bilinear', align_corners=...)` on NHWC (or any [..., H, W, C]).

    Args:
      x: [..., H, W, C], any float dtype.
      size: (out_h, out_w).
      align_corners: PyTorch's `align_corners` (True and False are different functions).

    Returns:
      [..., out_h, out_w, C] in x's dtype. No antialiasing (PyTorch's default).
    """
    out_h, out_w = (int(s) for s in size)
    in_h, in_w = x.shape[-3], x.shape[-2]
    if (in_h, in_w) == (out_h, out_w):
        return x  # scale 1 under both conventions: every weight is exactly (1, 0)
    return resize_bilinear_dynamic(x, (out_h, out_w), (in_h, in_w), (out_h, out_w), align_corners)


def resize_nearest(x: Array, size: tuple[int, int]) -> Array:
    """`F.interpolate(mode='nearest')` (floor indexing, not 'nearest-exact') on [..., H, W, C]."""
    out_h, out_w = (int(s) for s in size)
    in_h, in_w = x.shape[-3], x.shape[-2]
    x = jnp.take(x, nearest_indices(in_w, out_w, out_w), axis=x.ndim - 2)
    return jnp.take(x, nearest_indices(in_h, out_h, out_h), axis=x.ndim - 3)
