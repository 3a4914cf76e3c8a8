"""Procedural scenes with exact labels, at any resolution, for training, tests and benchmarks.

A scene is drawn from its seed alone, in continuous coordinates (x to the right and y down,
both in [0, 1], whatever the aspect ratio), and only then rasterised at the requested size:
the same seed gives the same geometry at 224 px and at 6K, so a model trained on small
renders is tested on large ones from the same distribution.

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

from dataclasses import dataclass, field

import cv2
import numpy as np

# Width of thin structures, in pixels of a 4096-px render (continuous width x 4096).
THIN_WIDTH_PX_AT_4K = (1.0, 4.0)
_REFERENCE_SIZE = 4096
_SUBPIXEL_BITS = 4  # cv2 drawing precision: 1/16 px.
_TEXTURE_GRIDS = (6, 24, 96)  # Noise-field grid sizes: coarse, medium and fine texture.


@dataclass
class _Region:
    """A region of the scene: its label and its appearance."""

    label: int
    colour: np.ndarray  # RGB base colour in [0, 255].
    texture: np.ndarray  # Weight of each texture field, [len(_TEXTURE_GRIDS)].
    tint: np.ndarray  # RGB direction the texture moves the colour in, amplitude in [0, 255].


@dataclass
class _Shape:
    """A drawable: filled polygons (with holes) or a stroke, in continuous coordinates."""

    region: int
    outline: np.ndarray | None = None  # [N, 2] (x, y) polygon.
    holes: list[np.ndarray] = field(default_factory=list)
    stroke: np.ndarray | None = None  # [N, 2] (x, y) polyline.
    width: float = 0.0  # Stroke width as a fraction of the 4K reference size.


def make_scene(
    seed: int, height: int, width: int, num_classes: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Render scene `seed` at `height` x `width`.

    Args:
      seed: any non-negative integer; the scene is a pure function of it.
      height, width: render size in pixels (>= 8 each).
      num_classes: number of object classes (1 = binary).

    Returns:
      image: uint8 [height, width, 3] RGB.
      label: uint8 [height, width], values in {0, ..., num_classes}.
    """
    if height < 8 or width < 8:
        raise ValueError(f"scene size must be at least 8x8, got {height}x{width}")
    if not 1 <= num_classes <= 254:
        raise ValueError(f"num_classes must be in 1..254, got {num_classes}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    rng = np.random.default_rng([seed, num_classes])
    regions, shapes = _compose(rng, num_classes)
    fields = _noise_fields(rng)
    region_map = _rasterise(shapes, height, width)
    label = np.array([r.label for r in regions], np.uint8)[region_map]
    image = _paint(regions, region_map, fields, rng, height, width)
    return image, label


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
        regions.append(appearance)
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


def _rasterise(shapes: list[_Shape], height: int, width: int) -> np.ndarray:
    """Region index of every pixel (uint8 [H, W]); region 0 is the background."""
    region_map = np.zeros((height, width), np.uint8)
    size = (height + width) / 2
    for shape in shapes:
        if shape.outline is not None:
            cv2.fillPoly(
                region_map,
                [_to_pixels(shape.outline, height, width)],
                int(shape.region),
                lineType=cv2.LINE_8,
                shift=_SUBPIXEL_BITS,
            )
            for hole in shape.holes:
                cv2.fillPoly(
                    region_map,
                    [_to_pixels(hole, height, width)],
                    0,
                    lineType=cv2.LINE_8,
                    shift=_SUBPIXEL_BITS,
                )
        else:
            thickness = max(1, int(round(shape.width * size)))
            cv2.polylines(
                region_map,
                [_to_pixels(shape.stroke, height, width)],
                False,
                int(shape.region),
                thickness=thickness,
                lineType=cv2.LINE_8,
                shift=_SUBPIXEL_BITS,
            )
    return region_map


# --- Appearance ----------------------------------------------------------------------------


def _noise_fields(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Low-resolution random grids, upsampled smoothly at render time (resolution independent)."""
    fields = {f"texture{i}": rng.standard_normal((g, g)) for i, g in enumerate(_TEXTURE_GRIDS)}
    fields["illumination"] = rng.standard_normal((4, 4)) * 0.08
    fields["gradient"] = np.array([*_unit(rng.normal(size=2)), rng.uniform(0.1, 0.35)])
    return fields


def _upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Smooth float32 upsampling: bicubic up to at most 512 px, then bilinear (cheap at 4K)."""
    mid = (min(width, 512), min(height, 512))
    field_mid = cv2.resize(grid.astype(np.float32), mid, interpolation=cv2.INTER_CUBIC)
    if mid == (width, height):
        return field_mid
    return cv2.resize(field_mid, (width, height), interpolation=cv2.INTER_LINEAR)


def _lookup(region_map: np.ndarray, values: np.ndarray) -> np.ndarray:
    """values[region_map] for a uint8 map and a per-region float table (cv2.LUT: fast)."""
    table = np.zeros(256, np.float32)
    table[: len(values)] = values
    return cv2.LUT(region_map, table)


def _paint(
    regions: list[_Region],
    region_map: np.ndarray,
    fields: dict[str, np.ndarray],
    rng: np.random.Generator,
    height: int,
    width: int,
) -> np.ndarray:
    """Colour, texture, illumination, blur and noise -> uint8 RGB image."""
    weights = np.stack([r.texture for r in regions])  # [R, T]
    texture = np.zeros((height, width), np.float32)
    for i in range(len(_TEXTURE_GRIDS)):
        texture += _lookup(region_map, weights[:, i]) * _upsample(
            fields[f"texture{i}"], height, width
        )

    gx, gy, strength = fields["gradient"]
    ramp = np.linspace(-0.5, 0.5, 8)
    illumination = 1.0 + strength * (gy * ramp[:, None] + gx * ramp[None, :])
    illumination += cv2.resize(fields["illumination"], (8, 8), interpolation=cv2.INTER_CUBIC)
    illumination = _upsample(illumination, height, width)

    image = np.empty((height, width, 3), np.uint8)
    for channel in range(3):
        value = _lookup(region_map, np.array([r.tint[channel] for r in regions]))
        value *= texture
        value += _lookup(region_map, np.array([r.colour[channel] for r in regions]))
        value *= illumination
        image[..., channel] = np.clip(value, 0, 255)  # float -> uint8 on assignment

    sigma = 0.7 * min(1.0, (height + width) / 2 / 1024)  # Camera blur: 0.7 px from 1K up.
    if sigma > 0.3:
        image = cv2.GaussianBlur(image, (0, 0), sigmaX=sigma)
    noise = rng.integers(-6, 7, size=image.shape, dtype=np.int8)
    return cv2.add(image, noise, dtype=cv2.CV_8U)


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    """OpenCV 8-bit HSV (hue 0..180) -> RGB float [3]."""
    hsv = np.array([[[hue, saturation, value]]], np.float32)
    hsv = np.clip(hsv, 0, [179, 255, 255]).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float64)


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / (np.linalg.norm(vector) + 1e-12)
