"""Procedural scenes with exact labels, at any resolution, for training, tests and benchmarks.

A scene is drawn from its seed alone, in continuous coordinates (x to the right and y down,
both in [0, 1], whatever the aspect ratio), and only then rasterised at the requested size:
the same seed gives the same geometry at 224 px and at 6K, so a model trained on small
renders is tested on large ones from the same distribution. A `window` renders only a crop
of that render, at the crop's cost (training crops of large scenes).

What a scene holds, so that refinement is learnable and measurable:

* a textured background, and background "clutter" patches with their own appearance (label 0:
  not every edge in the image is an object boundary — the coarse mask says which object);
* objects with smooth curved outlines (radial Fourier blobs) and with sharp corners (star and
  convex polygons), some with holes;
* thin structures 1–4 px wide at 4K (wires across the scene, stems and hair-like strokes on
  objects), where boundary accuracy is decided;
* per-region colour and texture (boundaries are visible in the image), a smooth illumination
  gradient, a slight camera blur and sensor noise.

Labels: with `num_classes=1` the label is binary (0 background, 1 object). With
`num_classes=N > 1` the label is in {0, ..., N}: 0 is background and each object has a class
in 1..N whose appearance (hue sector and texture) is the same in every scene, so semantic
segmentation is learnable; the background stays label 0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import cv2
import numpy as np

# Width of thin structures, in pixels of a 4096-px render (continuous width x 4096).
THIN_WIDTH_PX_AT_4K = (1.0, 4.0)
_REFERENCE_SIZE = 4096
_SUBPIXEL_BITS = 4  # cv2 drawing precision: 1/16 px.
_TEXTURE_GRIDS = (6, 24, 96)  # Noise-field grid sizes: coarse, medium and fine texture.
# Camera blur: cv2's 5-tap kernel (sigma <= 0.7) reaches 2 px; a window is painted this much
# larger (within the scene) so that its blurred pixels equal the full render's.
_BLUR_MARGIN = 3
WIRE_ID = 255  # the wires' id in `make_scene(instances=True)` maps


@dataclass
class _Region:
    """A region of the scene: its label and its appearance."""

    label: int
    colour: np.ndarray  # RGB base colour in [0, 255].
    texture: np.ndarray  # Weight of each texture field, [len(_TEXTURE_GRIDS)].
    tint: np.ndarray  # RGB direction the texture moves the colour in, amplitude in [0, 255].
    wire: bool = False  # a wire across the scene (not an object's stem or hair)


@dataclass
class _Shape:
    """A drawable: filled polygons (with holes) or a stroke, in continuous coordinates."""

    region: int
    outline: np.ndarray | None = None  # [N, 2] (x, y) polygon.
    holes: list[np.ndarray] = field(default_factory=list)
    stroke: np.ndarray | None = None  # [N, 2] (x, y) polyline.
    width: float = 0.0  # Stroke width as a fraction of the 4K reference size.


def make_scene(
    seed: int,
    height: int,
    width: int,
    num_classes: int = 1,
    *,
    window: tuple[int, int, int, int] | None = None,
    instances: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Render scene `seed` at `height` x `width`, or only the `window` of that render.

    Args:
      seed: any non-negative integer; the scene is a pure function of it.
      height, width: render size in pixels (>= 8 each).
      num_classes: number of object classes (1 = binary).
      window: (top, left, h, w) in pixels, inside the scene: render only rows [top, top + h)
        and columns [left, left + w), at about the cost of an h x w render. The label equals
        the full render's label there, bit for bit. The image equals the full render's image
        there except for the sensor noise, which is drawn for the window alone (same
        distribution, other values), and for the float rounding of the smooth texture and
        illumination fields (a pixel may round one level differently).
        None renders the whole scene.
      instances: return the object map instead of the class map: 0 where the label is 0,
        k >= 1 on the k-th object in painting order (its stems and hairs included), WIRE_ID
        on the wires. Its nonzero pixels are exactly the class map's.

    Returns:
      image: uint8 [h, w, 3] RGB ([height, width, 3] without a window).
      label: uint8 [h, w], values in {0, ..., num_classes} (object ids with `instances`).
    """
    if height < 8 or width < 8:
        raise ValueError(f"scene size must be at least 8x8, got {height}x{width}")
    if not 1 <= num_classes <= 254:
        raise ValueError(f"num_classes must be in 1..254, got {num_classes}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    top, left, h, w = _check_window(window, height, width)
    rng = np.random.default_rng([seed, num_classes])
    regions, shapes = _compose(rng, num_classes)
    fields = _noise_fields(rng)
    # Paint the window grown by the camera blur's reach (within the scene), then cut it out.
    area_top, area_left = max(top - _BLUR_MARGIN, 0), max(left - _BLUR_MARGIN, 0)
    area = (
        area_top,
        area_left,
        min(top + h + _BLUR_MARGIN, height) - area_top,
        min(left + w + _BLUR_MARGIN, width) - area_left,
    )
    region_map = _rasterise(shapes, height, width, area)
    image = _paint(regions, region_map, fields, height, width, area)
    inner = (
        slice(top - area_top, top - area_top + h),
        slice(left - area_left, left - area_left + w),
    )
    labels = np.array([r.label for r in regions], np.uint8)
    if instances:
        is_object = (labels > 0) & ~np.array([r.wire for r in regions])
        labels = np.where(is_object, np.cumsum(is_object), np.where(labels > 0, WIRE_ID, 0))
        labels = labels.astype(np.uint8)
    label = labels[region_map[inner]]
    noise = rng.integers(-6, 7, size=(h, w, 3), dtype=np.int8)
    return cv2.add(image[inner], noise, dtype=cv2.CV_8U), label


def _check_window(
    window: tuple[int, int, int, int] | None, height: int, width: int
) -> tuple[int, int, int, int]:
    """`window` as (top, left, h, w) ints; the whole scene for None. Raises if not inside."""
    if window is None:
        return 0, 0, height, width
    if len(window) != 4:
        raise ValueError(f"window must be (top, left, h, w), got {window}")
    top, left, h, w = (int(v) for v in window)
    if top < 0 or left < 0 or h < 1 or w < 1 or top + h > height or left + w > width:
        raise ValueError(
            f"window (top, left, h, w) = {tuple(window)} must be non-empty and inside the "
            f"{height}x{width} scene"
        )
    return top, left, h, w


# --- Scene composition (continuous, resolution independent) -------------------------------


def _class_appearance(class_id: int, num_classes: int, rng: np.random.Generator) -> _Region:
    """Appearance of an object: per class (same in every scene) with a little jitter."""
    if num_classes == 1:
        hue = rng.uniform(0, 180)
        texture = rng.dirichlet(np.ones(len(_TEXTURE_GRIDS)))
    else:
        sector = 180.0 / num_classes
        hue = (class_id - 1) * sector + rng.uniform(0.2, 0.8) * sector
        texture = np.full(len(_TEXTURE_GRIDS), 0.15)
        texture[(class_id - 1) % len(_TEXTURE_GRIDS)] = 1.0
    saturation = rng.uniform(120, 230)
    value = rng.uniform(110, 240)
    colour = _hsv_to_rgb(hue, saturation, value)
    tint = rng.uniform(25, 55) * _unit(rng.normal(size=3) + 1.0)
    return _Region(class_id, colour, texture, tint)


def _background_appearance(rng: np.random.Generator, avoid: list[np.ndarray]) -> _Region:
    """A low-saturation background colour at least some distance from `avoid` colours."""
    for _ in range(50):
        colour = _hsv_to_rgb(rng.uniform(0, 180), rng.uniform(0, 60), rng.uniform(40, 220))
        if all(np.abs(colour - other).sum() > 90 for other in avoid):
            break
    texture = rng.dirichlet(np.ones(len(_TEXTURE_GRIDS)))
    tint = rng.uniform(15, 40) * _unit(rng.normal(size=3) + 1.0)
    return _Region(0, colour, texture, tint)


def _compose(rng: np.random.Generator, num_classes: int) -> tuple[list[_Region], list[_Shape]]:
    """Draw the scene's regions and shapes, in painting order (later shapes occlude)."""
    num_objects = int(rng.integers(2, 6))
    classes = rng.integers(1, num_classes + 1, size=num_objects)
    objects = [_class_appearance(int(c), num_classes, rng) for c in classes]
    background = _background_appearance(rng, [o.colour for o in objects])
    regions = [background]
    shapes: list[_Shape] = []

    # Background clutter: patches that look different but are still background.
    for _ in range(int(rng.integers(0, 3))):
        regions.append(_background_appearance(rng, [o.colour for o in objects]))
        centre = rng.uniform(0.1, 0.9, size=2)
        shapes.append(_Shape(len(regions) - 1, outline=_blob(rng, centre, rng.uniform(0.1, 0.3))))

    for appearance in objects:
        regions.append(appearance)
        index = len(regions) - 1
        centre = rng.uniform(0.15, 0.85, size=2)
        radius = rng.uniform(0.07, 0.2)
        kind = rng.choice(["blob", "star", "convex"], p=[0.45, 0.3, 0.25])
        if kind == "blob":
            outline = _blob(rng, centre, radius)
        elif kind == "star":
            outline = _star(rng, centre, radius)
        else:
            outline = _convex(rng, centre, radius)
        holes = []
        if rng.random() < 0.4:
            for _ in range(int(rng.integers(1, 3))):
                offset = rng.uniform(-0.3, 0.3, size=2) * radius
                holes.append(_blob(rng, centre + offset, radius * rng.uniform(0.12, 0.3)))
        shapes.append(_Shape(index, outline=outline, holes=holes))
        # Stems (long) and hair-like strokes (short, in tufts) growing out of the object.
        stems = int(rng.integers(0, 4))
        shapes += _radial_strokes(rng, index, centre, radius, stems, root=0.6, lengths=(0.6, 2.0))
        if rng.random() < 0.3:
            hairs = int(rng.integers(5, 15))
            shapes += _radial_strokes(
                rng, index, centre, radius, hairs, root=0.8, lengths=(0.2, 0.6)
            )

    # Wires: long thin curves across the scene, each an object of its own.
    for _ in range(int(rng.integers(1, 4))):
        appearance = _class_appearance(int(rng.integers(1, num_classes + 1)), num_classes, rng)
        regions.append(dataclasses.replace(appearance, wire=True))
        start = rng.uniform(0, 1, size=2)
        angle = rng.uniform(0, 2 * np.pi)
        shapes.append(
            _Shape(
                len(regions) - 1,
                stroke=_curve(rng, start, angle, rng.uniform(0.4, 1.2)),
                width=_thin_width(rng),
            )
        )
    return regions, shapes


def _radial_strokes(
    rng: np.random.Generator,
    region: int,
    centre: np.ndarray,
    radius: float,
    count: int,
    *,
    root: float,
    lengths: tuple[float, float],
) -> list[_Shape]:
    """`count` thin curves leaving an object outwards from `root` x radius off its centre.

    Lengths are drawn from `lengths`, in units of the object's radius.
    """
    strokes = []
    for _ in range(count):
        angle = rng.uniform(0, 2 * np.pi)
        start = centre + root * radius * np.array([np.cos(angle), np.sin(angle)])
        length = radius * rng.uniform(*lengths)
        strokes.append(
            _Shape(region, stroke=_curve(rng, start, angle, length), width=_thin_width(rng))
        )
    return strokes


def _thin_width(rng: np.random.Generator) -> float:
    return rng.uniform(*THIN_WIDTH_PX_AT_4K) / _REFERENCE_SIZE


def _blob(rng: np.random.Generator, centre: np.ndarray, radius: float) -> np.ndarray:
    """Smooth closed curve: radius modulated by a few low Fourier harmonics."""
    theta = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    r = np.ones_like(theta)
    for k in range(2, 6):
        r += rng.uniform(0, 0.3 / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return centre + radius * r[:, None] * np.stack([np.cos(theta), np.sin(theta)], 1)


def _star(rng: np.random.Generator, centre: np.ndarray, radius: float) -> np.ndarray:
    """Star polygon with sharp corners (alternating outer and inner vertices)."""
    points = int(rng.integers(3, 8))
    theta = np.linspace(0, 2 * np.pi, 2 * points, endpoint=False) + rng.uniform(0, np.pi)
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, rng.uniform(0.35, 0.7))
    r = r * rng.uniform(0.85, 1.15, size=r.shape)
    return centre + radius * r[:, None] * np.stack([np.cos(theta), np.sin(theta)], 1)


def _convex(rng: np.random.Generator, centre: np.ndarray, radius: float) -> np.ndarray:
    """Convex polygon (3–8 corners), e.g. triangles and rotated boxes."""
    sides = int(rng.integers(3, 9))
    theta = np.sort(rng.uniform(0, 2 * np.pi, size=sides))
    return centre + radius * np.stack([np.cos(theta), np.sin(theta)], 1)


def _curve(rng: np.random.Generator, start: np.ndarray, angle: float, length: float) -> np.ndarray:
    """A smooth open curve (cubic Bézier) leaving `start` roughly in direction `angle`."""
    direction = np.array([np.cos(angle), np.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    bend = rng.uniform(-0.4, 0.4, size=2) * length
    control = [
        start,
        start + direction * length / 3 + normal * bend[0],
        start + direction * 2 * length / 3 + normal * bend[1],
        start + direction * length + normal * rng.uniform(-0.2, 0.2) * length,
    ]
    t = np.linspace(0, 1, 200)[:, None]
    return (
        (1 - t) ** 3 * control[0]
        + 3 * (1 - t) ** 2 * t * control[1]
        + 3 * (1 - t) * t**2 * control[2]
        + t**3 * control[3]
    )


# --- Rasterisation -------------------------------------------------------------------------


def _to_pixels(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """Continuous (x, y) -> cv2 fixed-point pixel coordinates (pixel centres at integers)."""
    scale = np.array([width, height], np.float64)
    pixels = points * scale - 0.5
    return np.round(pixels * (1 << _SUBPIXEL_BITS)).astype(np.int32)


def _rasterise(
    shapes: list[_Shape], height: int, width: int, window: tuple[int, int, int, int]
) -> np.ndarray:
    """Region index of every pixel of `window` (top, left, h, w) of the scene: uint8 [h, w].

    Region 0 is the background. Drawing shifted by whole pixels gives the same pixels, except
    that cv2 clips each line segment to the canvas before drawing it, and a segment clipped
    elsewhere is drawn slightly differently. So the canvas is the window grown to hold every
    segment that reaches the window, cut by the scene (where the full render clips them).
    """
    top, left, h, w = window
    size = (height + width) / 2
    drawables = []  # (fixed-point points, closed, region, stroke thickness or 0 for a fill)
    for shape in shapes:
        if shape.outline is not None:
            drawables.append((_to_pixels(shape.outline, height, width), True, shape.region, 0))
            for hole in shape.holes:
                drawables.append((_to_pixels(hole, height, width), True, 0, 0))
        else:
            thickness = max(1, int(round(shape.width * size)))
            drawables.append(
                (_to_pixels(shape.stroke, height, width), False, shape.region, thickness)
            )

    lo, hi = np.array([top, left]), np.array([top + h, left + w])  # canvas (y, x), end excluded
    for points, closed, _, thickness in drawables:
        ends = np.roll(points, -1, axis=0) if closed else points[1:]
        starts = points if closed else points[:-1]
        reach = thickness // 2 + 2  # pixels a segment's drawing reaches beyond its end points
        seg_lo = (np.minimum(starts, ends)[:, ::-1] >> _SUBPIXEL_BITS) - reach
        seg_hi = (np.maximum(starts, ends)[:, ::-1] >> _SUBPIXEL_BITS) + 1 + reach
        near = np.all((seg_lo < [top + h, left + w]) & (seg_hi > [top, left]), axis=1)
        if near.any():
            lo = np.minimum(lo, seg_lo[near].min(0))
            hi = np.maximum(hi, seg_hi[near].max(0))
    lo, hi = np.maximum(lo, 0), np.minimum(hi, [height, width])

    region_map = np.zeros(hi - lo, np.uint8)
    shift = (lo[::-1] << _SUBPIXEL_BITS).astype(np.int32)  # canvas origin, fixed-point (x, y)
    for points, closed, region, thickness in drawables:
        if closed:
            cv2.fillPoly(
                region_map,
                [points - shift],
                int(region),
                lineType=cv2.LINE_8,
                shift=_SUBPIXEL_BITS,
            )
        else:
            cv2.polylines(
                region_map,
                [points - shift],
                False,
                int(region),
                thickness=thickness,
                lineType=cv2.LINE_8,
                shift=_SUBPIXEL_BITS,
            )
    return region_map[top - lo[0] : top - lo[0] + h, left - lo[1] : left - lo[1] + w]


# --- Appearance ----------------------------------------------------------------------------


def _noise_fields(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Low-resolution random grids, upsampled smoothly at render time (resolution independent)."""
    fields = {f"texture{i}": rng.standard_normal((g, g)) for i, g in enumerate(_TEXTURE_GRIDS)}
    fields["illumination"] = rng.standard_normal((4, 4)) * 0.08
    fields["gradient"] = np.array([*_unit(rng.normal(size=2)), rng.uniform(0.1, 0.35)])
    return fields


def _upsample(
    grid: np.ndarray, height: int, width: int, window: tuple[int, int, int, int]
) -> np.ndarray:
    """`grid` upsampled smoothly to `height` x `width`, on `window` only: float32 [h, w].

    Bicubic up to at most 512 px, then bilinear (cheap at 4K). A window smaller than the scene
    does the bilinear stage for its own rows and columns only (`_linear_taps`).
    """
    top, left, h, w = window
    mid_h, mid_w = min(height, 512), min(width, 512)
    field = cv2.resize(grid.astype(np.float32), (mid_w, mid_h), interpolation=cv2.INTER_CUBIC)
    if (mid_h, mid_w) == (height, width):
        return field[top : top + h, left : left + w]
    if (h, w) == (height, width):
        return cv2.resize(field, (width, height), interpolation=cv2.INTER_LINEAR)
    rows, row_weights = _linear_taps(top, h, mid_h, height)
    cols, col_weights = _linear_taps(left, w, mid_w, width)
    field = field[:, cols.min() : cols.max() + 1]  # the columns the window reads
    cols -= cols.min()
    field = field[rows[0]] * row_weights[0, :, None] + field[rows[1]] * row_weights[1, :, None]
    return field[:, cols[0]] * col_weights[0] + field[:, cols[1]] * col_weights[1]


def _linear_taps(
    start: int, count: int, size_in: int, size_out: int
) -> tuple[np.ndarray, np.ndarray]:
    """cv2.INTER_LINEAR's source indices and weights for outputs start..start + count - 1.

    Of a size_in -> size_out resize, along one axis: output x reads source position
    (x + 0.5) * size_in / size_out - 0.5 (pixel centres), clamped to the border pixels.
    Returns int64 [2, count] indices and float32 [2, count] weights.
    """
    src = ((np.arange(start, start + count) + 0.5) * (size_in / size_out) - 0.5).astype(np.float32)
    first = np.floor(src)
    frac = src - first
    first = first.astype(np.int64)
    frac[first < 0] = 0
    frac[first >= size_in - 1] = 0
    first = np.clip(first, 0, size_in - 1)
    second = np.minimum(first + 1, size_in - 1)
    return np.stack([first, second]), np.stack([1 - frac, frac])


def _lookup(region_map: np.ndarray, values: np.ndarray) -> np.ndarray:
    """values[region_map] for a uint8 map and a per-region float table (cv2.LUT: fast)."""
    table = np.zeros(256, np.float32)
    table[: len(values)] = values
    return cv2.LUT(region_map, table)


def _paint(
    regions: list[_Region],
    region_map: np.ndarray,
    fields: dict[str, np.ndarray],
    height: int,
    width: int,
    window: tuple[int, int, int, int],
) -> np.ndarray:
    """Colour, texture, illumination and blur of `window` (top, left, h, w) of the scene.

    `region_map` is the window's (uint8 [h, w]). Returns uint8 [h, w, 3] RGB, noise-free; the
    blur treats the window's edges as the scene's (exact only where they are the scene's).
    """
    h, w = window[2:]
    weights = np.stack([r.texture for r in regions])  # [R, T]
    texture = np.zeros((h, w), np.float32)
    for i in range(len(_TEXTURE_GRIDS)):
        texture += _lookup(region_map, weights[:, i]) * _upsample(
            fields[f"texture{i}"], height, width, window
        )

    gx, gy, strength = fields["gradient"]
    ramp = np.linspace(-0.5, 0.5, 8)
    illumination = 1.0 + strength * (gy * ramp[:, None] + gx * ramp[None, :])
    illumination += cv2.resize(fields["illumination"], (8, 8), interpolation=cv2.INTER_CUBIC)
    illumination = _upsample(illumination, height, width, window)

    image = np.empty((h, w, 3), np.uint8)
    for channel in range(3):
        value = _lookup(region_map, np.array([r.tint[channel] for r in regions]))
        value *= texture
        value += _lookup(region_map, np.array([r.colour[channel] for r in regions]))
        value *= illumination
        image[..., channel] = np.clip(value, 0, 255)  # float -> uint8 on assignment

    sigma = 0.7 * min(1.0, (height + width) / 2 / 1024)  # Camera blur: 0.7 px from 1K up.
    if sigma > 0.3:
        image = cv2.GaussianBlur(image, (0, 0), sigmaX=sigma)
    return image


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    """OpenCV 8-bit HSV (hue 0..180) -> RGB float [3]."""
    hsv = np.array([[[hue, saturation, value]]], np.float32)
    hsv = np.clip(hsv, 0, [179, 255, 255]).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float64)


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / (np.linalg.norm(vector) + 1e-12)
