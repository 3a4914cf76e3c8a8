"""detectron2's semantic-segmentation training transforms as TensorFlow graph ops (tf.data).

The PNA reference trains with `build_sem_seg_train_aug` (PNA repo `train_net.py`):
ResizeShortestEdge('choice' of short sides, max size) -> RandomCrop_CategoryAreaConstraint
('absolute' crop, single-category max area, ignore label) -> ColorAugSSDTransform -> RandomFlip
(horizontal, p 0.5); the batch is then padded at the bottom/right (image 0 after
normalisation, label 255). Each rule here is the reference's, to the integer:

* `shortest_edge_size`: `ResizeShortestEdge.get_output_shape` (float64, int(x + 0.5)).
* `resize_bilinear_pil`: detectron2 resizes uint8 images with PIL's BILINEAR, which
  antialiases when downsampling (triangle filter widened by the scale) and works in fixed
  point (22-bit coefficients, rounding, uint8 after each of the horizontal then vertical
  passes, `ImagingResampleInner` up to Pillow 12); reproduced bit for bit (tests compare with
  PIL). Pillow 13 runs the vertical pass first for some sizes that shrink the height: then
  some pixels differ by one grey level.
* `resize_nearest_pil`: PIL's NEAREST for label maps (source index = floor of a float64 running
  sum, as Pillow's `ImagingScaleAffine` accumulates it).
* `category_area_crop`: up to 10 crop windows; the first whose non-ignored labels number > 1
  with max count < sum * max_area is taken, else the 10th.
* `color_aug_ssd`: (below)

mmsegmentation's training pipeline (`mmseg/datasets/pipelines/transforms.py` of the PNA repo's
mmsegmentation branch; mmcv 1.x, whose source is not mirrored here — what is relied on):
Resize(img_scale, ratio_range) -> RandomCrop(crop, cat_max_ratio) -> RandomFlip ->
PhotoMetricDistortion -> Normalize -> Pad (image 0 after normalisation, label 255).

* `mmseg_ratio_scale`: ratio = U[0, 1) * (max - min) + min (float64), scale =
  (int(long * ratio), int(short * ratio)) (`Resize.random_sample_ratio`).
* `mmcv_rescale_size`: `mmcv.rescale_size` with keep_ratio: factor = min(max(scale) / long
  side, min(scale) / short side) in float64, new size int(w * f + 0.5), int(h * f + 0.5).
* `resize_cv2`: `mmcv.imresize` = `cv2.resize` with INTER_LINEAR (image) and INTER_NEAREST
  (label: source index floor(dst * in / out), OpenCV's `resizeNN`), run by OpenCV itself in
  a `tf.numpy_function` (OpenCV releases the GIL), so exact whatever OpenCV's SIMD path;
  `jax_refine.ops.image_resize` is the device port of the same INTER_LINEAR, for evaluation.
* `category_area_crop(rule='mmseg')`: `RandomCrop` with cat_max_ratio: the first window is
  checked, up to 10 checks, the 11th window is taken unchecked after 10 failures; accepted
  when more than one non-ignored label is present and max count / sum < cat_max_ratio;
  offsets randint(0, margin + 1) as `crop_windows`.
* PhotoMetricDistortion is `color_aug_ssd` with one difference (`ssd_draws(hue_inclusive=
  False)`): mmseg draws the hue shift with numpy's randint(-18, 18), which excludes 18
  (detectron2: Python's random.randint, inclusive). Brightness, contrast (first or last,
  p 0.5 each), saturation in cv2's 8-bit HSV (mmcv.bgr2hsv of the BGR image = cv2's RGB2HSV
  of the RGB one), float32 math and uint8 truncation are detectron2's, op for op.
* `reduce_zero_label` (LoadAnnotations(reduce_zero_label=True), numpy): 0 -> 255,
  k -> k - 1, 255 stays 255 (mmseg's uint8 ops: 0 set to 255, minus 1, 254 set to 255).
* `color_aug_ssd`: brightness (p 0.5, +U(-32, 32)), then in random order contrast
  (p 0.5, xU(0.5, 1.5)), saturation (p 0.5, S xU(0.5, 1.5) in cv2's 8-bit HSV) and hue (p 0.5,
  H + randint(-18, 18) mod 180); every step rounds to uint8 as the reference (float32 math,
  clip, truncate). `rgb_to_hsv_cv2` / `hsv_to_rgb_cv2` are OpenCV's 8-bit conversions
  (integer tables forward, float32 and truncation back, as OpenCV's vectorised code).

All functions but `reduce_zero_label` (numpy) take the `tensorflow` module first (the pipeline
imports it lazily), work on one example, draw from stateless seeds (int32 [2]) and accept any
integer image dtype; images are [H, W, 3] RGB with values 0..255, labels [H, W].
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

PIL_PRECISION_BITS = 22  # Pillow's 8-bit resampling: 32 - 8 - 2
_HSV_SHIFT = 12  # OpenCV's 8-bit RGB -> HSV fixed point
# cv2's sdiv_table / hdiv_table180 (saturate_cast<int> of doubles: round half to even).
_SDIV = np.rint([0.0] + [(255 << _HSV_SHIFT) / i for i in range(1, 256)]).astype(np.int32)
_HDIV = np.rint([0.0] + [(180 << _HSV_SHIFT) / (6.0 * i) for i in range(1, 256)]).astype(
    np.int32)


def shortest_edge_size(tf: Any, height: Any, width: Any, short: Any, max_size: int) -> Any:
    """int32 [2] (new_h, new_w): short side -> `short`, long side capped at `max_size`
    (0 = no cap), as detectron2's `ResizeShortestEdge.get_output_shape`."""
    h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    size = tf.cast(short, tf.float64)
    scale = size / tf.minimum(h, w)
    new_h = tf.where(h < w, size, scale * h)
    new_w = tf.where(h < w, scale * w, size)
    if max_size > 0:
        longest = tf.maximum(new_h, new_w)
        cap = tf.where(longest > max_size, max_size / longest, 1.0)
        new_h, new_w = new_h * cap, new_w * cap
    return tf.cast(tf.stack([new_h + 0.5, new_w + 0.5]), tf.int32)  # int(x + 0.5), x > 0


def _pil_bilinear_coeffs(tf: Any, in_size: Any, out_size: Any) -> tuple[Any, Any]:
    """Pillow's `precompute_coeffs` (bilinear) and `normalize_coeffs_8bpc`: the first source
    index [out] and the integer weights [out, taps] of every output pixel."""
    f64 = tf.float64
    scale = tf.cast(in_size, f64) / tf.cast(out_size, f64)
    filterscale = tf.maximum(scale, 1.0)
    support = filterscale  # bilinear support 1.0
    taps = 2 * tf.cast(tf.math.ceil(support), tf.int32) + 1
    center = (tf.cast(tf.range(out_size), f64) + 0.5) * scale
    xmin = tf.maximum(tf.cast(center - support + 0.5, tf.int32), 0)  # C (int): truncation
    xmax = tf.minimum(tf.cast(center + support + 0.5, tf.int32), in_size) - xmin
    x = tf.range(taps)[None, :]
    d = (tf.cast(x + xmin[:, None], f64) - center[:, None] + 0.5) * (1.0 / filterscale)
    weights = tf.where(x < xmax[:, None], tf.maximum(1.0 - tf.abs(d), 0.0), 0.0)
    total = tf.math.cumsum(weights, axis=1)[:, -1:]  # Pillow sums the taps in order
    weights = tf.where(total != 0.0, weights / total, weights)
    ints = tf.cast(0.5 + weights * (1 << PIL_PRECISION_BITS), tf.int32)  # weights >= 0
    return xmin, ints


def _pil_bilinear_pass(tf: Any, image: Any, out_size: Any, axis: int) -> Any:
    """One Pillow 8-bit resampling pass of int32 `image` [H, W, C] along `axis` (0 or 1)."""
    in_size = tf.shape(image)[axis]
    xmin, weights = _pil_bilinear_coeffs(tf, in_size, out_size)
    taps = tf.shape(weights)[1]
    acc_shape = tf.tensor_scatter_nd_update(tf.shape(image), [[axis]], [out_size])
    weight_shape = [-1, 1, 1] if axis == 0 else [1, -1, 1]

    def tap(k, acc):
        source = tf.gather(image, tf.minimum(xmin + k, in_size - 1), axis=axis)
        return k + 1, acc + source * tf.reshape(weights[:, k], weight_shape)

    start = tf.fill(acc_shape, tf.constant(1 << (PIL_PRECISION_BITS - 1), tf.int32))
    _, acc = tf.while_loop(lambda k, _: k < taps, tap, (tf.constant(0), start))
    # clip8: fits in int32 (255 * 2^22 plus rounding < 2^31)
    return tf.clip_by_value(tf.bitwise.right_shift(acc, PIL_PRECISION_BITS), 0, 255)


def resize_bilinear_pil(tf: Any, image: Any, size: Any) -> Any:
    """int32 [h, w, C] in 0..255: `PIL.Image.resize(size[::-1], BILINEAR)` of a uint8 image
    [H, W, C] (horizontal pass first, each pass only where the size changes)."""
    image = tf.cast(image, tf.int32)
    shape = tf.shape(image)
    image = tf.cond(size[1] != shape[1],
                    lambda: _pil_bilinear_pass(tf, image, size[1], axis=1), lambda: image)
    return tf.cond(size[0] != shape[0],
                   lambda: _pil_bilinear_pass(tf, image, size[0], axis=0), lambda: image)


def _pil_nearest_index(tf: Any, in_size: Any, out_size: Any) -> Any:
    step = tf.cast(in_size, tf.float64) / tf.cast(out_size, tf.float64)
    steps = tf.concat([[0.5 * step], tf.fill([out_size - 1], step)], axis=0)
    return tf.minimum(tf.cast(tf.math.cumsum(steps), tf.int32), in_size - 1)


def resize_nearest_pil(tf: Any, label: Any, size: Any) -> Any:
    """`PIL.Image.resize(size[::-1], NEAREST)` of a label map [H, W] (same dtype)."""
    shape = tf.shape(label)
    rows = tf.gather(label, _pil_nearest_index(tf, shape[0], size[0]), axis=0)
    return tf.gather(rows, _pil_nearest_index(tf, shape[1], size[1]), axis=1)


def mmseg_ratio_scale(tf: Any, img_scale: tuple[int, int], ratio_range: tuple[float, float],
                      seed: Any) -> Any:
    """int32 [2]: mmseg `Resize.random_sample_ratio` of `img_scale` (long, short) with a
    ratio ~ U[ratio_range) drawn in float64 from `seed`; int() truncates (positive values)."""
    u = tf.random.stateless_uniform([], seed, dtype=tf.float64)
    ratio = u * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
    return tf.cast(tf.constant(img_scale, tf.float64) * ratio, tf.int32)


def mmcv_rescale_size(tf: Any, height: Any, width: Any, scale: Any) -> Any:
    """int32 [2] (new_h, new_w): `mmcv.rescale_size((w, h), scale)`, the keep-ratio size that
    fits the long side in max(scale) and the short side in min(scale) (float64)."""
    h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    scale = tf.cast(scale, tf.float64)
    factor = tf.minimum(tf.reduce_max(scale) / tf.maximum(h, w),
                        tf.reduce_min(scale) / tf.minimum(h, w))
    return tf.cast(tf.stack([h * factor + 0.5, w * factor + 0.5]), tf.int32)


def _cv2_resize_pair(image: np.ndarray, label: np.ndarray, size: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    dsize = (int(size[1]), int(size[0]))  # OpenCV: (width, height)
    return (cv2.resize(image, dsize, interpolation=cv2.INTER_LINEAR),
            cv2.resize(label, dsize, interpolation=cv2.INTER_NEAREST))


def resize_cv2(tf: Any, image: Any, label: Any, size: Any) -> tuple[Any, Any]:
    """(uint8 [h, w, 3], uint8 [h, w]) for size (h, w): `mmcv.imresize` of the uint8 image
    [H, W, 3] (cv2 INTER_LINEAR) and of the uint8 label map [H, W] (cv2 INTER_NEAREST)."""
    image, label = tf.numpy_function(
        _cv2_resize_pair, [tf.cast(image, tf.uint8), tf.cast(label, tf.uint8), size],
        [tf.uint8, tf.uint8], stateful=False)
    return (tf.ensure_shape(image, [None, None, 3]), tf.ensure_shape(label, [None, None]))


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """uint8 label map: mmseg's `LoadAnnotations(reduce_zero_label=True)`, 0 -> 255 (ignore),
    k -> k - 1 for 1..254, 255 -> 255."""
    label = np.asarray(label, np.uint8)
    return np.where((label == 0) | (label == 255), np.uint8(255), label - np.uint8(1)).astype(
        np.uint8)


def crop_windows(tf: Any, shape: Any, crop: tuple[int, int], seed: Any, count: int) -> Any:
    """int32 [count, 4] (y0, x0, crop_h, crop_w): `count` independent uniform windows of
    min(crop, image) per side (detectron2 RandomCrop 'absolute') in an image of `shape`;
    window i is drawn from fold_in(seed, i)."""
    ch, cw = tf.minimum(crop[0], shape[0]), tf.minimum(crop[1], shape[1])

    def draw(i):
        s = tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(seed, i), 2)
        y0 = tf.random.stateless_uniform([], s[0], 0, shape[0] - ch + 1, dtype=tf.int32)
        x0 = tf.random.stateless_uniform([], s[1], 0, shape[1] - cw + 1, dtype=tf.int32)
        return tf.stack([y0, x0, ch, cw])

    return tf.map_fn(draw, tf.range(count), fn_output_signature=tf.int32)


CROP_RULES = ("detectron2", "mmseg")


def category_area_crop(tf: Any, label: Any, crop: tuple[int, int], seed: Any,
                       max_area: float, ignore_label: int, tries: int = 10,
                       rule: str = "detectron2") -> Any:
    """int32 [4] (y0, x0, crop_h, crop_w) of a crop window on label [H, W] (values 0..255)
    that no single non-ignored label dominates; max_area >= 1 takes the first window.

    rule 'detectron2' (RandomCrop_CategoryAreaConstraint): of `crop_windows(..., tries)` the
    first holding more than one non-ignored label with max count < sum * max_area, else
    the last. 'mmseg' (RandomCrop(cat_max_ratio=max_area)): the first of `tries` checked
    windows with more than one non-ignored label and max count / sum < max_area, else
    window tries + 1, unchecked.
    """
    if rule not in CROP_RULES:
        raise ValueError(f"seg_transforms.category_area_crop: rule must be one of "
                         f"{CROP_RULES}, got {rule!r}")
    drawn = tries + (rule == "mmseg") if max_area < 1.0 else 1
    windows = crop_windows(tf, tf.shape(label), crop, seed, drawn)
    if max_area >= 1.0:
        return windows[0]

    def accepted(window):
        y0, x0, ch, cw = tf.unstack(window)
        pixels = tf.cast(tf.reshape(label[y0:y0 + ch, x0:x0 + cw], [-1]), tf.int32)
        counts = tf.math.bincount(pixels, minlength=256, maxlength=256, dtype=tf.int64)
        counts = counts * tf.cast(tf.range(256) != ignore_label, tf.int64)
        largest = tf.cast(tf.reduce_max(counts), tf.float64)
        total = tf.cast(tf.reduce_sum(counts), tf.float64)
        small = largest / total < max_area if rule == "mmseg" else largest < total * max_area
        return (tf.math.count_nonzero(counts) > 1) & small

    # The last window is returned without a check (detectron2 checks it but takes it anyway).
    (i,) = tf.while_loop(lambda i: (i < drawn - 1) & tf.logical_not(accepted(windows[i])),
                         lambda i: (i + 1,), (tf.constant(0),))
    return windows[i]


def rgb_to_hsv_cv2(tf: Any, rgb: Any) -> Any:
    """int32 [..., 3] (H in 0..179, S, V in 0..255): cv2.cvtColor(COLOR_RGB2HSV) of uint8."""
    rgb = tf.cast(rgb, tf.int32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = tf.maximum(tf.maximum(r, g), b)
    diff = v - tf.minimum(tf.minimum(r, g), b)
    half = 1 << (_HSV_SHIFT - 1)
    s = tf.bitwise.right_shift(diff * tf.gather(tf.constant(_SDIV), v) + half, _HSV_SHIFT)
    h = tf.where(v == r, g - b, tf.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = tf.bitwise.right_shift(h * tf.gather(tf.constant(_HDIV), diff) + half, _HSV_SHIFT)
    h = tf.where(h < 0, h + 180, h)  # (arithmetic shift: floor, as OpenCV's >>)
    return tf.stack([h, s, v], axis=-1)


def hsv_to_rgb_cv2(tf: Any, hsv: Any) -> Any:
    """int32 [..., 3] RGB: cv2.cvtColor(COLOR_HSV2RGB) of uint8 HSV (H range 180).

    OpenCV's vectorised 8-bit path (`HSV2RGB_b` with SIMD, which converts every full vector
    block of a row): float32 math with 1 - s * h fused (FMA, as the compiled library does),
    x * 255 truncated; equal to cv2 5.1 on all 180 * 256 * 256 inputs. Its scalar tail (the
    last width mod 4 * lanes pixels of each row) and older OpenCV releases round instead:
    <= 1 grey level.
    """
    f32 = tf.float32
    hsv = tf.cast(hsv, f32)
    h = hsv[..., 0] * np.float32(6.0 / 180.0)
    s = hsv[..., 1] * np.float32(1.0 / 255.0)
    v = hsv[..., 2] * np.float32(1.0 / 255.0)
    sector = tf.math.floor(h)
    h = h - sector
    sector = tf.cast(sector, tf.int32) % 6

    def one_minus(a, b):  # 1 - a * b as one fused multiply-add (as compiled in OpenCV)
        product = tf.cast(a, tf.float64) * tf.cast(b, tf.float64)  # exact
        return tf.cast(1.0 - product, f32)

    tab = tf.stack([v, v * (1.0 - s), v * one_minus(s, h), v * one_minus(s, 1.0 - h)], axis=-1)
    # OpenCV's sector_data, reordered to (r, g, b) indices into tab.
    order = tf.constant([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])
    rgb = tf.gather(tab, tf.gather(order, sector), batch_dims=sector.shape.rank)
    return tf.cast(tf.clip_by_value(rgb * 255.0, 0.0, 255.0), tf.int32)  # truncation


def _to_uint8(tf: Any, x: Any, alpha: Any = 1.0, beta: Any = 0.0) -> Any:
    """ColorAugSSDTransform.convert: float32 x * alpha + beta, clip to [0, 255], truncate."""
    y = tf.cast(x, tf.float32) * tf.cast(alpha, tf.float32) + tf.cast(beta, tf.float32)
    return tf.cast(tf.clip_by_value(y, 0.0, 255.0), tf.int32)


def ssd_draws(tf: Any, seed: Any, brightness_delta: float = 32.0,
              contrast: tuple[float, float] = (0.5, 1.5),
              saturation: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18,
              hue_inclusive: bool = True) -> dict[str, Any]:
    """The random choices of one ColorAugSSDTransform: bool on/off of 'brightness',
    'contrast', 'saturation', 'hue' (p 0.5 each) and 'contrast_first' (the order), float32
    'beta' ~ U(-delta, delta), 'alpha_contrast', 'alpha_saturation' ~ U(range), int32
    'hue_shift' uniform in [-hue_delta, hue_delta] (hue_inclusive=False: [-hue_delta,
    hue_delta - 1], mmseg's PhotoMetricDistortion)."""
    u = tf.random.stateless_uniform([9], seed, dtype=tf.float32)
    return {
        "brightness": u[0] < 0.5, "beta": -brightness_delta + 2.0 * brightness_delta * u[1],
        "contrast_first": u[2] < 0.5,
        "contrast": u[3] < 0.5, "alpha_contrast": contrast[0] + (contrast[1] - contrast[0]) * u[4],
        "saturation": u[5] < 0.5,
        "alpha_saturation": saturation[0] + (saturation[1] - saturation[0]) * u[6],
        "hue": u[7] < 0.5,
        "hue_shift": tf.cast(tf.math.floor(u[8] * (2 * hue_delta + int(hue_inclusive))),
                             tf.int32) - hue_delta,
    }


def color_aug_ssd(tf: Any, rgb: Any, draws: dict[str, Any]) -> Any:
    """int32 [H, W, 3]: detectron2's ColorAugSSDTransform (module docstring) of RGB `rgb`
    with the choices `draws` (`ssd_draws`)."""

    def maybe(key, fn, x):
        return tf.cond(draws[key], lambda: fn(x), lambda: x)

    def with_hsv(x, fn):
        hsv = rgb_to_hsv_cv2(tf, x)
        return hsv_to_rgb_cv2(tf, tf.concat([fn(hsv[..., :1], hsv[..., 1:2]), hsv[..., 2:]],
                                            axis=-1))

    def brighten(x):
        return _to_uint8(tf, x, beta=draws["beta"])

    def contrast(x):
        return _to_uint8(tf, x, alpha=draws["alpha_contrast"])

    def saturate(x):
        return with_hsv(x, lambda h, s: tf.concat(
            [h, _to_uint8(tf, s, draws["alpha_saturation"])], axis=-1))

    def shift_hue(x):
        return with_hsv(x, lambda h, s: tf.concat([(h + draws["hue_shift"]) % 180, s], axis=-1))

    def saturation_hue(x):
        return maybe("hue", shift_hue, maybe("saturation", saturate, x))

    rgb = maybe("brightness", brighten, tf.cast(rgb, tf.int32))
    return tf.cond(draws["contrast_first"],
                   lambda: saturation_hue(maybe("contrast", contrast, rgb)),
                   lambda: maybe("contrast", contrast, saturation_hue(rgb)))
