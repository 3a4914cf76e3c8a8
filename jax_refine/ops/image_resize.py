"""Bit-exact uint8 image resizes of the two reference evaluation pipelines, on the device.

The references resize test images before the network, in 8-bit fixed point:
* detectron2 (`ResizeTransform`, `ResizeShortestEdge`): Pillow's `Image.resize(size,
  Image.BILINEAR)` — a triangle filter widened by the scale when downsampling (antialiased),
  22-bit integer coefficients, a horizontal pass rounded to uint8, then a vertical pass.
* mmsegmentation (`mmcv.imresize`): OpenCV's `cv2.resize(..., INTER_LINEAR)` — two taps
  (half-pixel centres, no antialiasing), 11-bit coefficients, the horizontal pass kept in
  int32, the vertical pass in OpenCV's SIMD arithmetic
  ((((row0 >> 4) * b0) >> 16) + (((row1 >> 4) * b1) >> 16) + 2) >> 2. OpenCV zeroes the
  fraction of a clamped column but not of a clamped row; so do these taps.

The taps of one axis (`pil_bilinear_taps`, `cv2_linear_taps`) are computed on the host with the
libraries' own float64 / float32 arithmetic: (index [n_out, K] int32, coefficient
[n_out, K] int32). `resize_uint8` applies them on the device in int32 (gathers, no matmul),
one image at a time (vmap it over a batch whose images have different sizes: the taps are
padded to a common length with zero coefficients). Both agree bit for bit with Pillow and
OpenCV 5.1 (tests/test_pna_eval_protocol.py; OpenCV: 60 random up/down scales).

Pillow's pass order: horizontal then vertical, as in every Pillow up to 12 (the references'
era). Pillow 13 (PR #9549) runs the vertical pass first when the height shrinks much more
than the width; such a resize then differs from this one by one level in some pixels.
Aspect-preserving resizes rarely qualify: 3 of 150 random test-time shortest-edge resizes
with Pillow 13.0 on this machine, none of DeepGlobe's 2448 -> 1024 or the tested Trans10k
sizes.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

Array = Any
RESAMPLERS = ("pil", "cv2")
_PIL_BITS = 22  # Pillow's PRECISION_BITS for 8-bit images (32 - 8 - 2)
_CV2_SCALE = 2048  # OpenCV's INTER_RESIZE_COEF_SCALE (11 bits)


def pil_bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's BILINEAR taps for one axis (`precompute_coeffs` + `normalize_coeffs_8bpc`).

    Returns (index, coefficient), each int32 [n_out, K] with K = 2 * ceil(support) + 1 and
    support = max(n_in / n_out, 1); unused taps have index 0 and coefficient 0.
    """
    _check_sizes(n_in, n_out)
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(n_out, dtype=np.float64) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), n_in) - xmin
    taps = np.arange(ksize)
    used = taps[None, :] < xmax[:, None]
    arg = np.abs(((taps[None, :] + xmin[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale))
    weight = np.where(used & (arg < 1.0), 1.0 - arg, 0.0)
    total = np.zeros(n_out)
    for k in range(ksize):  # Pillow sums in tap order; keep its float64 rounding
        total = total + weight[:, k]
    weight = np.where(total[:, None] != 0.0, weight / np.where(total == 0.0, 1.0, total)[:, None],
                      weight)
    coef = np.trunc(0.5 + weight * float(1 << _PIL_BITS)).astype(np.int32)
    index = np.where(used, taps[None, :] + xmin[:, None], 0).astype(np.int32)
    return index, coef


def cv2_linear_taps(n_in: int, n_out: int, *, rows: bool) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's INTER_LINEAR taps for one axis (`cv::resize`'s fixed-point tables).

    `rows`: the vertical axis (a clamped row keeps its fraction; a clamped column does not).
    Returns (index, coefficient), each int32 [n_out, 2].
    """
    _check_sizes(n_in, n_out)
    scale = 1.0 / (n_out / n_in)  # OpenCV: scale_x = 1 / inv_scale_x
    fx = ((np.arange(n_out) + 0.5) * scale - 0.5).astype(np.float32)
    sx = np.floor(fx).astype(np.int64)
    fx = (fx - sx.astype(np.float32)).astype(np.float32)
    if not rows:
        fx[(sx < 0) | (sx >= n_in - 1)] = 0
    coef = np.stack([np.rint((np.float32(1) - fx) * np.float32(_CV2_SCALE)),
                     np.rint(fx * np.float32(_CV2_SCALE))], axis=1).astype(np.int32)
    index = np.clip(np.stack([sx, sx + 1], axis=1), 0, n_in - 1).astype(np.int32)
    return index, coef


def resize_taps(resampler: str, in_size: tuple[int, int], out_size: tuple[int, int],
                length: tuple[int, int], num_taps: int) -> tuple[np.ndarray, ...]:
    """(row_index, row_coef, col_index, col_coef) of `resampler` ('pil' or 'cv2') from
    (H, W) to (h, w), padded to `length` = (rows, cols) >= (h, w) and `num_taps` taps with
    zero coefficients (padded outputs are 0)."""
    if resampler not in RESAMPLERS:
        raise ValueError(f"resampler must be one of {RESAMPLERS}, got {resampler!r}")
    out = []
    for axis in range(2):
        if resampler == "pil":
            index, coef = pil_bilinear_taps(in_size[axis], out_size[axis])
        else:
            index, coef = cv2_linear_taps(in_size[axis], out_size[axis], rows=axis == 0)
        if index.shape[1] > num_taps or out_size[axis] > length[axis]:
            raise ValueError(f"taps {index.shape} do not fit ({length[axis]}, {num_taps})")
        pad = ((0, length[axis] - out_size[axis]), (0, num_taps - index.shape[1]))
        out += [np.pad(index, pad), np.pad(coef, pad)]
    return tuple(out)


def num_taps(resampler: str, in_size: tuple[int, int], out_size: tuple[int, int]) -> int:
    """Taps per output pixel that `resize_taps` needs for this resize."""
    if resampler == "cv2":
        return 2
    return max(2 * math.ceil(max(i / o, 1.0)) + 1 for i, o in zip(in_size, out_size,
                                                                   strict=True))


def resize_uint8(image: Array, taps: tuple[Array, Array, Array, Array],
                 resampler: str) -> Array:
    """Resize one uint8 [H, W, C] image with `resize_taps` -> uint8 [rows, cols, C]."""
    row_index, row_coef, col_index, col_coef = taps
    x = image.astype(jnp.int32)
    h = _apply(x, col_index, col_coef, axis=1)
    if resampler == "pil":
        h = _round(h + (1 << (_PIL_BITS - 1)), _PIL_BITS)
        return _round(_apply(h, row_index, row_coef, axis=0) + (1 << (_PIL_BITS - 1)),
                      _PIL_BITS)
    h = h >> 4  # OpenCV's SIMD vertical pass (VResizeLinearVec_32s8u)
    out = jnp.zeros((row_index.shape[0],) + h.shape[1:], jnp.int32)
    for k in range(row_index.shape[1]):
        out = out + ((jnp.take(h, row_index[:, k], axis=0)
                      * row_coef[:, k][:, None, None]) >> 16)
    return _round(out + 2, 2)


def _apply(x: Array, index: Array, coef: Array, axis: int) -> Array:
    shape = [1] * x.ndim
    shape[axis] = -1
    out = 0
    for k in range(index.shape[1]):
        out = out + jnp.take(x, index[:, k], axis=axis) * coef[:, k].reshape(shape)
    return out


def _round(x: Array, bits: int) -> Array:
    return jnp.clip(x >> bits, 0, 255).astype(jnp.uint8)


def _check_sizes(n_in: int, n_out: int) -> None:
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be >= 1, got {n_in} -> {n_out}")
