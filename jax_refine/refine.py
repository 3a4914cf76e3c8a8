"""Refiner: CRM inference on images of any size, on the device end to end.

`Refiner.refine` reproduces the reference's multi-resolution inference (`test.py`):
normalise, reflect-pad by 32, then for each scale s resize image and current mask to
(round(Hp * s), round(Wp * s)) (bilinear, align_corners=True; Hp, Wp the padded size),
encode, query every padded full-resolution pixel centre, and feed the probability back as
the next mask ((p - 0.5) * 2); a mask with (m + 1).sum() < 2 yields zeros; crop the padding.

Device-resident cascade. Per batch of images, one explicit `jax.device_put` sends the uint8
images, the masks and the small per-axis decoder tables; normalisation, reflect padding,
every scale's resize, encode, decode, the empty-mask rule and the feedback run on the
device; one explicit `jax.device_get` brings the probabilities back (`refine` passes under
`jax.transfer_guard("disallow")`). The programs are one preparation program and one program
per scale, jitted over a data-axis `Mesh` of the local devices (`shard_map`): `refine_batch`
shards a batch over all devices, and each device refines its images one after another
inside the program (`lax.map`), so its memory is one image's.

Shape buckets. Everything that depends on the exact image size — the align_corners=True
resize weights, the valid size of every feature map, the query coordinates and nearest
latent cells — is computed from the true sizes (traced values, or host tables computed in
float32 exactly as the reference does); only array *shapes* are bucketed (`bucket_side`):
the real data occupies the top-left block, the backbone zeroes the filler before every
spatial convolution and the max-pool (`resnet.mask_valid`), which is exactly PyTorch's zero
padding at the true border, and the decoder skips filler rows (filler columns are computed
and cropped). Images whose padded sizes fall into the same buckets share programs and give
the same results as exact shapes (`bucket=None`), up to ~1 ulp where XLA vectorises other
widths differently. On accelerators the ladder is coarse (4 sides per octave), so a folder
of 2K-6K photos needs few programs; `enable_compilation_cache` keeps them across processes.

Backends. One code path; the loop shapes are chosen by the devices' platform while tracing
(`jax.lax.platform_dependent` when exporting): XLA:CPU decodes one image row per loop step
(the 32-wide MLP's intermediates stay in cache) and fuses 32 latent rows per band;
GPUs/TPUs decode ~2^20 queries per step and fuse 256 rows per band. The fusion never holds
the 256-channel latent at full size (`FusionHead.fuse_branches_project`); with the decoder's
factorised first layer each query gathers 4 x 32 values instead of 4 x 256.

Precision and dtype. `dtype` is the compute dtype (parameters stay float32; the decoder's
first-layer sum and the probabilities are float32); `precision` None is the platform's
default for float32 dots and convolutions (TF32 on recent NVIDIA GPUs, as the reference's
PyTorch defaults for convolutions), "highest" full float32 (what the parity tests use).

Checkpoint directory format (written by `save_checkpoint`, `python -m jax_refine.convert
crm`, and later by training):

    DIR/config.json   {"format": "jax_refine.crm", "version": 1,
                       "model": {CRM constructor arguments, e.g. "depth": 50, ...}}
    DIR/variables/    orbax (StandardCheckpointer) checkpoint of
                      {"params": ..., "batch_stats": ...}
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_refine.models import checkpoint_dir
from jax_refine.models.crm import CRM, grid_tables
from jax_refine.ops.resize import resize_bilinear_dynamic

IMAGENET_MEAN = np.asarray([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.asarray([0.229, 0.224, 0.225], np.float32)
PAD = 32
DEFAULT_SCALES = (0.125, 0.25, 0.5, 1.0)
CONFIG_FORMAT = "jax_refine.crm"
CONFIG_VERSION = 1
# CRM fields that describe the architecture (saved in config.json).
_MODEL_FIELDS = (
    "depth",
    "width",
    "fusion_channels",
    "latent_channels",
    "latent_level",
    "hidden",
    "dropout_rate",
)


# ----------------------------------------------------------------------------- checkpoints


def model_config(model: CRM) -> dict[str, Any]:
    """JSON-able constructor arguments of `model`."""
    config = {}
    for name in _MODEL_FIELDS:
        value = getattr(model, name)
        config[name] = list(value) if isinstance(value, tuple | list) else value
    return config


def save_checkpoint(directory: str | Path, model: CRM, variables: dict[str, Any]) -> Path:
    """Write `model`'s config and `variables` ({'params', 'batch_stats'}) to `directory`."""
    return checkpoint_dir.save(directory, CONFIG_FORMAT, model_config(model), variables,
                               version=CONFIG_VERSION)


def load_checkpoint(directory: str | Path) -> tuple[CRM, dict[str, Any]]:
    """Read a checkpoint directory written by `save_checkpoint` -> (model, variables)."""
    kwargs, variables = checkpoint_dir.load(directory, CONFIG_FORMAT)
    return CRM(**kwargs), variables


# ----------------------------------------------------------------------------- inputs


def _describe(array: Any) -> str:
    if isinstance(array, np.ndarray):
        return f"array of shape {array.shape} and dtype {array.dtype}"
    return f"object of type {type(array).__name__}"


def image_to_rgb(image: Any) -> np.ndarray:
    """uint8 RGB [H, W, 3], RGBA [H, W, 4] (alpha dropped) or grayscale [H, W] / [H, W, 1]
    -> uint8 [H, W, 3]. Anything else raises ValueError."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"image must be a uint8 numpy array (RGB, RGBA or grayscale), "
                         f"got {_describe(image)}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], "
                         f"got shape {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image is empty: shape {image.shape}")
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return image[:, :, :3]


def mask_to_unit(mask: Any) -> np.ndarray:
    """A mask -> float32 [H, W] in [0, 1].

    Accepted: uint8 0..255 as [H, W], [H, W, 1] or [H, W, 3] (3 channels are converted to
    luma like PIL's `convert('L')`, as the reference reads masks), bool [H, W], or floating
    [H, W] with values in [0, 1]. Anything else raises ValueError.
    """
    if not isinstance(mask, np.ndarray):
        raise ValueError(f"mask must be a numpy array, got {_describe(mask)}")
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[:, :, 0]
    if mask.dtype == np.uint8:
        if mask.ndim == 3 and mask.shape[2] == 3:
            rgb = mask.astype(np.uint32)
            mask = ((rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000)
                    >> 16).astype(np.uint8)
        if mask.ndim != 2:
            raise ValueError(f"uint8 mask must be [H, W], [H, W, 1] or [H, W, 3], "
                             f"got shape {mask.shape}")
        return mask.astype(np.float32) / np.float32(255)
    if mask.ndim != 2:
        raise ValueError(f"bool/float mask must be [H, W], got {_describe(mask)}")
    if mask.dtype == np.bool_:
        return mask.astype(np.float32)
    if np.issubdtype(mask.dtype, np.floating):
        if not np.all(np.isfinite(mask)) or mask.min() < 0 or mask.max() > 1:
            raise ValueError(f"float mask values must lie in [0, 1], got range "
                             f"[{np.nanmin(mask)}, {np.nanmax(mask)}]")
        return mask.astype(np.float32)
    raise ValueError(f"mask must be uint8 (0..255), bool or float in [0, 1], "
                     f"got {_describe(mask)}")


def normalise_image(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 ImageNet-normalised (ToTensor + Normalize of the reference)."""
    return (rgb.astype(np.float32) / np.float32(255) - IMAGENET_MEAN) / IMAGENET_STD


# ----------------------------------------------------------------------------- shapes

# Loop shapes by backend (module docstring, "Backends"): XLA:CPU decodes one image row per
# loop step (the 32-wide MLP's intermediates stay in cache) and fuses 32 latent rows per
# band; GPUs and TPUs decode ~2^20 queries per step and fuse 256 rows per band.
CPU_BAND_ROWS = 32
ACCELERATOR_BAND_ROWS = 256
ACCELERATOR_DECODE_QUERIES = 1 << 20
# Bucketed pixels per device uploaded at once by `refine_batch` (11 bytes each on the device).
CPU_BATCH_PIXELS = 1 << 24
ACCELERATOR_BATCH_PIXELS = 1 << 27
PRECISIONS = ("default", "high", "highest")


def bucket_side(n: int, bucket: int | str | None) -> int:
    """The array side that holds a true side `n`.

    bucket: None (n itself: one program per size), an int (the next multiple of it), or
    "ladder" (4 sides per octave: ..., 1024, 1280, 1536, 1792, 2048, 2560, ...; multiples of
    64 below 512; at most 25% filler per side, about 19% more pixels on average for photos
    of 2K-4K, so that a folder of 2K-6K photos needs few programs).
    """
    if bucket is None:
        return n
    step = max(64, 1 << max(0, (n - 1).bit_length() - 3)) if bucket == "ladder" else bucket
    return max(step, -(-n // step) * step)


def decode_block_rows(height: int, width: int) -> int:
    """Image rows per decoder step on accelerators for a [height, width] query grid."""
    return max(1, min(height, ACCELERATOR_DECODE_QUERIES // width))


def enable_compilation_cache(directory: str | Path) -> None:
    """Turn on JAX's persistent compilation cache in `directory` (created if missing).

    Every program is cached, however fast it compiled, so a second process that refines
    images of the same shape buckets loads its programs instead of compiling them.
    """
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def _reflect_index(length: int, n: Any, pad: int) -> Any:
    """Source index of positions 0..length-1 of `np.pad(x, pad, mode='reflect')` for an axis of
    n samples (n traced; positions past n + 2 * pad are filler and stay in range)."""
    period = jnp.maximum(2 * (n - 1), 1)
    k = jnp.abs(jnp.arange(length) - pad) % period
    return jnp.clip(jnp.where(k >= n, period - k, k), 0, n - 1)


# ----------------------------------------------------------------------------- refiner


class Refiner:
    """CRM refinement of a coarse mask at any resolution, on the device end to end.

    Attributes:
      model: the `CRM` module, with `dtype` set to the compute dtype.
      variables: its {'params', 'batch_stats'} (float32 whatever the compute dtype).
      precision: None (the platform's default for float32 dots and convolutions: TF32 on
        recent NVIDIA GPUs, bf16 passes on TPUs, full float32 on CPUs) or "default" /
        "high" / "highest" (`jax.default_matmul_precision`), for every dot and convolution.
      bucket: array sides are rounded up with `bucket_side` (None: exact shapes); "auto"
        resolves to 64 on CPU and "ladder" on accelerators. Results do not depend on it.
      batch_pixels: bucketed pixels per device in one `refine_batch` batch.
      trace_count: how many times the jitted programs were traced (compilations).
    """

    def __init__(
        self,
        model: CRM,
        variables: dict[str, Any],
        *,
        dtype: Any = jnp.float32,
        precision: str | None = None,
        bucket: int | str | None = "auto",
        batch_pixels: int | None = None,
    ):
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"precision must be None or one of {PRECISIONS}, got {precision!r}")
        dtype = jnp.dtype(dtype)
        if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        self._platform = jax.local_devices()[0].platform
        accelerator = self._platform != "cpu"
        if bucket == "auto":
            bucket = "ladder" if accelerator else 64
        if not (bucket is None or bucket == "ladder" or (isinstance(bucket, int) and bucket > 0)):
            raise ValueError(f"bucket must be None, a positive int, 'ladder' or 'auto', "
                             f"got {bucket!r}")
        self.model = model.clone(dtype=dtype)
        self.variables = {k: variables[k] for k in ("params", "batch_stats")}
        self.precision = precision
        self.bucket = bucket
        default_pixels = ACCELERATOR_BATCH_PIXELS if accelerator else CPU_BATCH_PIXELS
        self.batch_pixels = int(batch_pixels or default_pixels)
        self.trace_count = 0
        self._programs: dict[int, tuple[Any, Any, Any, Any]] = {}
        self._compiled: dict[tuple, Any] = {}

    @classmethod
    def from_checkpoint(cls, directory: str | Path, **kwargs: Any) -> Refiner:
        """A Refiner for a checkpoint directory (see the module docstring for the format)."""
        model, variables = load_checkpoint(directory)
        return cls(model, variables, **kwargs)

    # -- public API --

    def refine(
        self, image: Any, mask: Any, scales: Sequence[float] = DEFAULT_SCALES
    ) -> np.ndarray:
        """Refined foreground probability, float32 [H, W].

        Args:
          image: uint8 RGB [H, W, 3], RGBA [H, W, 4] or grayscale [H, W] ([H, W, 1]).
          mask: coarse mask, uint8 0..255 ([H, W], [H, W, 1], [H, W, 3]), bool [H, W] or
            float [H, W] in [0, 1].
          scales: the multi-resolution schedule (one entry = single forward).
        """
        rgb, unit, scales = self._checked(image, mask, scales)
        return self._run([(rgb, unit)], scales)[0][-1]

    def refine_batch(
        self,
        images: Sequence[Any],
        masks: Sequence[Any],
        scales: Sequence[float] = DEFAULT_SCALES,
    ) -> list[np.ndarray]:
        """`refine` of many images (any mix of sizes): float32 [H_i, W_i] each, in order.

        Images are grouped by shape bucket; each group runs in batches sharded over the
        local devices along a data axis (at most `batch_pixels` bucketed pixels per device;
        a power of two images per device, filled up with empty masks, which cost nothing, so
        that few batch sizes are compiled). On each device the images of a batch are refined
        one after another inside one program, so its memory is one image's. Results equal
        per-image `refine`.
        """
        if len(images) != len(masks):
            raise ValueError(f"got {len(images)} images and {len(masks)} masks")
        scales = self._checked_scales(scales)
        items = []
        for k, (image, mask) in enumerate(zip(images, masks, strict=True)):
            try:
                items.append(self._checked(image, mask, scales)[:2])
            except ValueError as err:
                raise ValueError(f"item {k}: {err}") from None
        return [steps[-1] for steps in self._run(items, scales)]

    def refine_steps(
        self, image: Any, mask: Any, scales: Sequence[float] = DEFAULT_SCALES
    ) -> list[np.ndarray]:
        """The probability after each scale of the schedule, float32 [H, W] per scale.

        Same arguments as `refine`, whose output is the last entry; the earlier ones show
        what each step of the cascade did (`jax_refine.train.evaluate` scores them). Holds
        one float32 [H, W] per scale on the device and the host.
        """
        rgb, unit, scales = self._checked(image, mask, scales)
        return self._run([(rgb, unit)], scales, keep_steps=True)[0]

    def refine_labels(
        self, image: Any, label_map: Any, scales: Sequence[float] = DEFAULT_SCALES
    ) -> np.ndarray:
        """Refine every class of an integer label map one-vs-rest (one batch); recombine by
        argmax. Returns a label map of the same shape and dtype; ties go to the smaller id."""
        rgb = image_to_rgb(image)
        scales = self._checked_scales(scales)
        if not isinstance(label_map, np.ndarray) or label_map.ndim != 2 or not (
            np.issubdtype(label_map.dtype, np.integer)
        ):
            raise ValueError(f"label_map must be an integer [H, W] array, "
                             f"got {_describe(label_map)}")
        if rgb.shape[:2] != label_map.shape:
            raise ValueError(f"image size {rgb.shape[:2]} and label map size "
                             f"{label_map.shape} differ")
        classes = np.unique(label_map)
        if len(classes) < 2:
            return label_map.copy()
        items = [(rgb, (label_map == c).astype(np.float32)) for c in classes]
        probs = np.stack([steps[-1] for steps in self._run(items, scales)])
        return classes[np.argmax(probs, axis=0)].astype(label_map.dtype)

    def export(
        self, size: tuple[int, int], scales: Sequence[float] = DEFAULT_SCALES,
        platforms: Sequence[str] = ("cuda", "tpu"),
    ) -> list[jax.export.Exported]:
        """The refinement programs of one image `size` (H, W) lowered for `platforms` with
        `jax.export` (serialisable): the input preparation, then one program per scale.

        The loop shapes follow each platform (`jax.lax.platform_dependent`), so a CPU host
        can lower the GPU/TPU programs.
        """
        scales = self._checked_scales(scales)
        programs = []
        for scale in (None, *scales):
            program, args, static = self._program_inputs(1, self._shape(size), 1, scale, None)
            with self._precision():
                programs.append(jax.export.export(program, platforms=tuple(platforms))(
                    *args, **static))
        return programs

    # -- validation --

    @staticmethod
    def _checked(
        image: Any, mask: Any, scales: Sequence[float]
    ) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
        """(uint8 RGB, float [H, W] mask in [0, 1], scales) after validating the inputs."""
        rgb = image_to_rgb(image)
        unit = mask_to_unit(mask)
        if rgb.shape[:2] != unit.shape:
            raise ValueError(f"image size {rgb.shape[:2]} and mask size {unit.shape} differ")
        return rgb, unit, Refiner._checked_scales(scales)

    @staticmethod
    def _checked_scales(scales: Sequence[float]) -> tuple[float, ...]:
        scales = tuple(float(s) for s in scales)
        if not scales or any(not (s > 0 and math.isfinite(s)) for s in scales):
            raise ValueError(f"scales must be a non-empty sequence of finite positive numbers, "
                             f"got {scales}")
        return scales

    # -- host side: grouping and the one upload / one download per batch --

    def _shape(self, size: tuple[int, int]) -> tuple[int, int]:
        """Bucketed array shape (Hb, Wb) of the padded image of true size `size`."""
        return tuple(bucket_side(n + 2 * PAD, self.bucket) for n in size)

    def _lengths(self, shape: tuple[int, int], scale: float) -> tuple[int, int]:
        """Static encoder input shape at `scale` for images of bucketed shape `shape`."""
        if self.bucket is None:
            return tuple(round(n * scale) for n in shape)
        return tuple(bucket_side(math.ceil(n * scale), self.bucket) for n in shape)

    def _run(
        self, items: list[tuple[np.ndarray, np.ndarray]], scales: tuple[float, ...],
        keep_steps: bool = False,
    ) -> list[list[np.ndarray]]:
        """Per item, the probabilities [H, W] after every scale (keep_steps) or the last."""
        for rgb, _ in items:
            hp, wp = (n + 2 * PAD for n in rgb.shape[:2])
            for s in scales:
                if min(round(hp * s), round(wp * s)) < 1:
                    raise ValueError(f"scale {s} gives an empty image for padded size "
                                     f"{(hp, wp)}")
        plans = self._plan([rgb.shape[:2] for rgb, _ in items])
        self._compile([(used * per_used, shape, used) for _, shape, used, per_used in plans],
                      scales)
        results: list[list[np.ndarray]] = [[] for _ in items]
        for chunk, shape, used, per_used in plans:
            # Filler entries have an empty mask: the empty-mask rule skips their work.
            rgb, unit = items[chunk[-1]]
            filler = [(rgb, np.zeros_like(unit))] * (per_used * used - len(chunk))
            probs = self._run_batch([items[i] for i in chunk] + filler, shape, scales, used,
                                    keep_steps)
            for j, i in enumerate(chunk):
                h, w = items[i][0].shape[:2]
                results[i] = [p[j, PAD : PAD + h, PAD : PAD + w] for p in probs]
        return results

    def _plan(self, sizes: list[tuple[int, int]]) -> list[tuple[list[int], tuple, int, int]]:
        """Batches for images of `sizes`: (indices, bucketed shape, devices used, images per
        device: a power of two, so that few batch sizes are compiled)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(sizes):
            groups.setdefault(self._shape(size), []).append(i)
        devices = jax.local_device_count()
        plans = []
        for shape, members in groups.items():
            capacity = max(1, self.batch_pixels // (shape[0] * shape[1])) * devices
            for start in range(0, len(members), capacity):
                chunk = members[start : start + capacity]
                used = min(len(chunk), devices)
                per_used = 1 << (math.ceil(len(chunk) / used) - 1).bit_length()
                plans.append((chunk, shape, used, per_used))
        return plans

    def _run_batch(self, items, shape, scales, used, keep_steps) -> list[np.ndarray]:
        """One batch of images of one bucket on `used` devices -> probabilities [B, Hb, Wb]
        after each scale (or the last); one explicit upload, one explicit download."""
        hb, wb = shape
        batch = len(items)
        image = np.zeros((batch, hb, wb, 3), np.uint8)
        unit = np.zeros((batch, hb, wb), np.float32)
        for j, (rgb, mask) in enumerate(items):
            image[j, : rgb.shape[0], : rgb.shape[1]] = rgb
            unit[j, : mask.shape[0], : mask.shape[1]] = mask
        sizes = np.asarray([rgb.shape[:2] for rgb, _ in items], np.int32)
        steps = [self._scale_tables(sizes, s, self._rows_len(shape), wb) for s in scales]
        variables, _, _, sharding = self._program(used)
        image, unit, sizes, steps = jax.device_put((image, unit, sizes, steps), sharding)
        prepare = self._compiled[self._key(batch, shape, used)]
        image, prob = prepare(image, unit, sizes)
        probs = []
        for s, step in zip(scales, steps, strict=True):
            prob = self._compiled[self._key(batch, shape, used, s)](variables, image, prob, step)
            probs.append(prob)
        return jax.device_get(probs if keep_steps else probs[-1:])

    # -- compilation: ahead of the run, in parallel --

    def _key(self, batch: int, shape: tuple[int, int], used: int, scale: float | None = None):
        """The compiled program's key: the preparation (scale None) or a scale's program."""
        return (batch, shape, used, None if scale is None else self._lengths(shape, scale))

    def _rows_len(self, shape: tuple[int, int]) -> int:
        """Rows of the decoder's row tables: the bucket height rounded up to whole blocks."""
        block = decode_block_rows(*shape)
        return -(-shape[0] // block) * block

    def _program_inputs(self, batch, shape, used, scale, platform):
        """(jitted program, abstract arguments, static keywords) of the preparation (scale
        None) or of a scale's program, for a batch of `batch` images of bucketed `shape`."""
        hb, wb = shape
        variables, prepare, scale_step, sharding = self._program(used)
        spec = lambda *shape_dtype: jax.ShapeDtypeStruct(*shape_dtype, sharding=sharding)
        if scale is None:
            return prepare, (spec((batch, hb, wb, 3), jnp.uint8),
                             spec((batch, hb, wb), jnp.float32), spec((batch, 2), jnp.int32)), {}
        table = lambda length: (spec((batch, 2, length), jnp.int32),
                                spec((batch, 2, length), jnp.float32),
                                spec((batch, length), jnp.float32))
        step = {"sizes": spec((batch, 4), jnp.int32), "rows": table(self._rows_len(shape)),
                "cols": table(wb), "rel_cell": spec((batch, 2), jnp.float32)}
        image, prob = spec((batch, hb, wb, 3), jnp.float32), spec((batch, hb, wb), jnp.float32)
        static = {"length": self._lengths(shape, scale), "platform": platform}
        return scale_step, (variables, image, prob, step), static

    def _compile(self, batches: list[tuple[int, tuple[int, int], int]], scales) -> None:
        """Compile the missing programs of `batches` ((batch size, shape, devices used)).

        Tracing and lowering run here one after another; XLA's compilations run in parallel
        threads (they release the GIL), so a folder of many shape buckets compiles in about
        the time of its longest program per core.
        """
        lowered = {}
        for batch, shape, used in batches:
            for scale in (None, *scales):
                key = self._key(batch, shape, used, scale)
                if key not in self._compiled and key not in lowered:
                    program, args, static = self._program_inputs(batch, shape, used, scale,
                                                                 self._platform)
                    with self._precision():
                        lowered[key] = program.lower(*args, **static)
        if len(lowered) > 1:
            workers = min(len(lowered), os.cpu_count() or 1)
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                compiled = list(pool.map(lambda low: low.compile(), lowered.values()))
        else:
            compiled = [low.compile() for low in lowered.values()]
        self._compiled.update(zip(lowered, compiled, strict=True))

    def _scale_tables(self, sizes: np.ndarray, scale: float, rows_len: int, width: int) -> dict:
        """Per image of the batch: the padded and scaled sizes and the decoder's grid tables
        (`grid_tables`, computed on the host in float32 exactly as the reference)."""
        out: dict[str, list] = {"sizes": [], "rows": [], "cols": [], "rel_cell": []}
        for h, w in sizes:
            hp, wp = int(h) + 2 * PAD, int(w) + 2 * PAD
            size = (round(hp * scale), round(wp * scale))
            lh, lw = (int(n) for n in self.model.latent_size(size))
            out["sizes"].append((hp, wp, *size))
            out["rows"].append(grid_tables(hp, lh, 0, rows_len))
            out["cols"].append(grid_tables(wp, lw, 0, width))
            out["rel_cell"].append((np.float32(2 / hp) * np.float32(lh),
                                    np.float32(2 / wp) * np.float32(lw)))
        return {
            "sizes": np.asarray(out["sizes"], np.int32),
            "rows": tuple(np.stack(t) for t in zip(*out["rows"], strict=True)),
            "cols": tuple(np.stack(t) for t in zip(*out["cols"], strict=True)),
            "rel_cell": np.asarray(out["rel_cell"], np.float32),
        }

    def _precision(self):
        if self.precision is None:
            return contextlib.nullcontext()
        return jax.default_matmul_precision(self.precision)

    # -- device side --

    def _program(self, used: int):
        """(variables, prepare, scale_step, data_sharding) for batches sharded over the first
        `used` local devices; variables replicated there. Cached per `used` (jit caches its
        compilations per input shape)."""
        if used not in self._programs:
            mesh = Mesh(np.asarray(jax.local_devices()[:used]), ("data",))
            data, replicated = P("data"), P()
            variables = jax.device_put(self.variables, NamedSharding(mesh, replicated))

            def prepare(image, unit, sizes):
                return jax.shard_map(self._prepare_impl, mesh=mesh, in_specs=data, check_vma=False,
                                     out_specs=data)(image, unit, sizes)

            def scale_step(variables, image, prob, step, *, length, platform):
                impl = functools.partial(self._scale_impl, length=length, platform=platform)
                return jax.shard_map(impl, mesh=mesh, in_specs=(replicated, data, data, data),
                                     out_specs=data, check_vma=False)(variables, image, prob, step)

            self._programs[used] = (
                variables,
                jax.jit(prepare),
                jax.jit(scale_step, static_argnames=("length", "platform")),
                NamedSharding(mesh, data),
            )
        return self._programs[used]

    def _prepare_impl(self, image, unit, sizes):
        """uint8 [B, Hb, Wb, 3], mask in [0, 1] [B, Hb, Wb] (true size `sizes` [B, 2] at the
        top left) -> the reference's inputs reflect-padded by PAD: the ImageNet-normalised
        image [B, Hb, Wb, 3] and the mask [B, Hb, Wb] (filler beyond the padded size)."""
        self.trace_count += 1

        def one(image, unit, size):
            rows = _reflect_index(image.shape[0], size[0], PAD)
            cols = _reflect_index(image.shape[1], size[1], PAD)
            x = (image.astype(jnp.float32) / np.float32(255) - IMAGENET_MEAN) / IMAGENET_STD
            pad = lambda a: jnp.take(jnp.take(a, rows, axis=0), cols, axis=1)
            return pad(x), pad(unit)

        return jax.vmap(one)(image, unit, sizes)

    def _scale_impl(self, variables, image, prob, step, *, length, platform):
        """One scale of the cascade for a batch: probabilities [B, Hb, Wb] from the previous
        ones (or the coarse mask), feeding back (p - 0.5) * 2 as the reference does.

        platform: the devices' platform, which picks the loop shapes while tracing; None
        traces both and lets `jax.lax.platform_dependent` pick at lowering (export)."""
        self.trace_count += 1
        model = self.model
        hb, wb = image.shape[1:3]
        rows_per_block = decode_block_rows(hb, wb)

        def one(image, prob, step):
            sizes = step["sizes"]
            full, size = (sizes[0], sizes[1]), (sizes[2], sizes[3])
            seg = (prob - np.float32(0.5)) * np.float32(2)
            valid = (jnp.arange(hb) < sizes[0])[:, None] & (jnp.arange(wb) < sizes[1])[None]
            empty = jnp.sum(jnp.where(valid, seg + 1, 0)) < 2  # the reference's empty rule

            def refine_scale():
                resize = functools.partial(resize_bilinear_dynamic, length=length,
                                           in_size=full, out_size=size, align_corners=True)
                branches = model.apply(
                    variables, resize(image[None]), resize(seg[None, :, :, None]),
                    valid_size=size, method=CRM.encode_branches,
                )

                def fuse_decode(band_rows: int, rows_per_step: int):
                    proj = model.apply(variables, branches, valid_size=size,
                                       band_rows=band_rows, method=CRM.fuse_project)
                    return model.apply(
                        variables, proj[0], step["rows"], step["cols"], step["rel_cell"],
                        rows_per_step=rows_per_step, num_rows=sizes[0], method=CRM.decode_grid,
                    )

                cpu = lambda: fuse_decode(CPU_BAND_ROWS, 1)
                accelerator = lambda: fuse_decode(ACCELERATOR_BAND_ROWS, rows_per_block)
                if platform is None:
                    logits = jax.lax.platform_dependent(cpu=cpu, default=accelerator)
                else:
                    logits = cpu() if platform == "cpu" else accelerator()
                return jax.nn.sigmoid(logits[:hb])

            return jax.lax.cond(empty, lambda: jnp.zeros((hb, wb), jnp.float32), refine_scale)

        return jax.lax.map(lambda args: one(*args), (image, prob, step))


if __name__ == "__main__":
    from jax_refine.cli import main

    sys.exit(main())
