"""Refiner: CRM inference on images of any size with bounded memory, and its command line.

`Refiner.refine` reproduces the reference's multi-resolution inference (`test.py`):
normalise, reflect-pad by 32, then for each scale s resize image and current mask to
(round(Hp * s), round(Wp * s)) (bilinear, align_corners=True; Hp, Wp the padded size),
encode, query every padded full-resolution pixel centre, and feed the probability back as
the next mask ((p - 0.5) * 2); a mask with (m + 1).sum() < 2 yields zeros; crop the padding.

Compilation is reused across images (shape buckets). Everything that depends on the exact
image size — the align_corners=True resize weights, the valid size of every feature map,
the query coordinates and nearest latent cells — is computed from the true sizes, passed as
traced values or host-computed tables; only array *shapes* are bucketed:

* Encoder: inputs live in arrays whose sides are rounded up to a multiple of `bucket`; the
  real data occupies the top-left block. The backbone zeroes the filler before every
  spatial convolution and the max-pool (`resnet.mask_valid`), which is exactly PyTorch's
  zero padding at the true border, so the valid block of every feature map equals the
  unpadded computation; the fusion resizes read only valid cells.
* Decoder: queries are processed in calls of R full rows (R * bucketed width ~
  `chunk_queries`), one row per loop step inside the call (the 32-wide MLP stays in cache);
  the number of real rows is a traced value, so filler rows cost nothing; filler columns
  (< bucket) are computed and cropped. Per-row and per-column tables (nearest latent cell
  for each shift, relative coordinate, coordinate) are computed on the host in float32
  exactly as the reference does.

A second image whose padded size stays within the same buckets therefore triggers no new
compilation and gives the same result as an unbucketed run (`bucket=None` disables
bucketing): the same float32 operations on the same values, up to ~1 ulp where XLA
vectorises arrays of other widths differently.

Memory: the encoder's fusion runs in bands of latent rows (`CRM.encode_project`), so the
256-channel latent never exists at full size; the decoder needs its output plus one row's
intermediates (with the factorised first layer each query gathers 4 x 32 values instead of
4 x 256).

Checkpoint directory format (written by `save_checkpoint`, `python -m jax_refine.convert
crm`, and later by training):

    DIR/config.json   {"format": "jax_refine.crm", "version": 1,
                       "model": {CRM constructor arguments, e.g. "depth": 50, ...}}
    DIR/variables/    orbax (StandardCheckpointer) checkpoint of
                      {"params": ..., "batch_stats": ...}
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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


def _round_up(n: int, bucket: int | None) -> int:
    return n if bucket is None else max(bucket, math.ceil(n / bucket) * bucket)


# ----------------------------------------------------------------------------- refiner


class Refiner:
    """CRM refinement of a coarse mask at any resolution.

    Attributes:
      model: a `CRM` module.
      variables: its {'params', 'batch_stats'}.
      bucket: array sides are rounded up to a multiple of this (None: exact shapes, one
        compilation per size). Results do not depend on it.
      chunk_queries: about this many queries are decoded per call (whole rows; the call's
        memory is its output, since rows are decoded one at a time inside it).
      band_rows: latent rows fused per step of the encoder's banded fusion (bounds memory).
      trace_count: how many times the jitted encoder/decoder were traced (compilations).
    """

    def __init__(
        self,
        model: CRM,
        variables: dict[str, Any],
        *,
        bucket: int | None = 64,
        chunk_queries: int = 1 << 20,
        band_rows: int = 32,
    ):
        self.model = model
        self.variables = {k: variables[k] for k in ("params", "batch_stats")}
        self.bucket = bucket
        self.chunk_queries = int(chunk_queries)
        self.band_rows = int(band_rows)
        self.trace_count = 0
        self._encode = jax.jit(self._encode_impl, static_argnames=("length",))
        self._decode = jax.jit(self._decode_impl)

    @classmethod
    def from_checkpoint(cls, directory: str | Path, **kwargs: Any) -> Refiner:
        """A Refiner for a checkpoint directory (see the module docstring for the format)."""
        model, variables = load_checkpoint(directory)
        return cls(model, variables, **kwargs)

    # -- jitted pieces (trace_count counts their traces) --

    def _encode_impl(self, variables, image, mask, sizes, *, length):
        """Resize (padded full size sizes[0:2] -> sizes[2:4]), encode, project: [h, w, 32].

        Uses `CRM.encode_project` (banded fusion, see `FusionHead.fuse_project`).
        """
        self.trace_count += 1
        full, size = (sizes[0], sizes[1]), (sizes[2], sizes[3])
        image = resize_bilinear_dynamic(image, length, full, size, align_corners=True)
        mask = resize_bilinear_dynamic(mask, length, full, size, align_corners=True)
        proj = self.model.apply(
            variables, image, mask, valid_size=size, band_rows=self.band_rows,
            method=CRM.encode_project,
        )
        return proj[0]

    def _decode_impl(self, variables, proj, rows, cols, rel_cell, num_rows):
        """Probabilities [R, C] of the first num_rows rows (one row per loop step)."""
        self.trace_count += 1
        logits = self.model.apply(
            variables, proj, rows, cols, rel_cell, rows_per_step=1, num_rows=num_rows,
            method=CRM.decode_grid,
        )
        return jax.nn.sigmoid(logits)

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
        return self._refine(self._prepare_image(rgb), unit, scales)[-1]

    def refine_steps(
        self, image: Any, mask: Any, scales: Sequence[float] = DEFAULT_SCALES
    ) -> list[np.ndarray]:
        """The probability after each scale of the schedule, float32 [H, W] per scale.

        Same arguments as `refine`, whose output is the last entry; the earlier ones show
        what each step of the cascade did (`jax_refine.train.evaluate` scores them). Holds
        one float32 [H, W] per scale (4 x 96 MB at 6000 x 4000); `refine` keeps only one.
        """
        rgb, unit, scales = self._checked(image, mask, scales)
        return self._refine(self._prepare_image(rgb), unit, scales, keep_steps=True)

    def refine_labels(
        self, image: Any, label_map: Any, scales: Sequence[float] = DEFAULT_SCALES
    ) -> np.ndarray:
        """Refine every class of an integer label map one-vs-rest; recombine by argmax.

        Returns a label map of the same shape and dtype; ties go to the smaller class id.
        """
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
        prepared = self._prepare_image(rgb)
        probs = np.stack([
            self._refine(prepared, (label_map == c).astype(np.float32), scales)[-1]
            for c in classes
        ])
        return classes[np.argmax(probs, axis=0)].astype(label_map.dtype)

    # -- internals --

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
        if not scales or any(not s > 0 for s in scales):
            raise ValueError(f"scales must be a non-empty sequence of positive numbers, "
                             f"got {scales}")
        return scales

    def _prepare_image(self, rgb: np.ndarray) -> tuple[Any, tuple[int, int]]:
        padded = np.pad(normalise_image(rgb), ((PAD, PAD), (PAD, PAD), (0, 0)), mode="reflect")
        return self._to_device(padded), padded.shape[:2]

    def _to_device(self, array: np.ndarray) -> Any:
        hp, wp = array.shape[:2]
        out = np.zeros((1, _round_up(hp, self.bucket), _round_up(wp, self.bucket),
                        array.shape[2]), np.float32)
        out[0, :hp, :wp] = array
        return jnp.asarray(out)

    def _refine(
        self, prepared, unit_mask: np.ndarray, scales: tuple[float, ...], keep_steps: bool = False
    ) -> list[np.ndarray]:
        """Probabilities [H, W] after every scale if keep_steps, else after the last only."""
        image_dev, (hp, wp) = prepared
        seg = np.pad((unit_mask - np.float32(0.5)) / np.float32(0.5), PAD, mode="reflect")
        prob = np.zeros((hp, wp), np.float32)
        steps = []
        for s in scales:
            size = (round(hp * s), round(wp * s))
            if min(size) < 1:
                raise ValueError(f"scale {s} gives an empty image for padded size {(hp, wp)}")
            if (seg.astype(np.float64) + 1).sum() < 2:  # the reference's empty-mask rule
                prob = np.zeros((hp, wp), np.float32)
            else:
                prob = self._forward(image_dev, self._to_device(seg[:, :, None]), (hp, wp), size)
            seg = (prob - np.float32(0.5)) * np.float32(2)
            if keep_steps:
                steps.append(prob[PAD:-PAD, PAD:-PAD])
        return steps if keep_steps else [prob[PAD:-PAD, PAD:-PAD]]

    def _forward(self, image_dev, mask_dev, full: tuple[int, int], size: tuple[int, int]):
        """Probabilities [hp, wp] of one scale: encode at `size`, query every pixel."""
        hp, wp = full
        length = (_round_up(size[0], self.bucket), _round_up(size[1], self.bucket))
        sizes = jnp.asarray([hp, wp, size[0], size[1]], jnp.int32)
        proj = self._encode(self.variables, image_dev, mask_dev, sizes, length=length)
        h, w = (int(n) for n in self.model.latent_size(size))
        width = image_dev.shape[2]
        rows_per_chunk = max(1, self.chunk_queries // width)
        n_chunks = math.ceil(hp / rows_per_chunk)
        r_idx, r_rel, r_coord = grid_tables(hp, h, 0, n_chunks * rows_per_chunk)
        cols = tuple(jnp.asarray(t) for t in grid_tables(wp, w, 0, width))
        rel_cell = np.asarray(
            [np.float32(2 / hp) * np.float32(h), np.float32(2 / wp) * np.float32(w)], np.float32
        )
        outs = []
        for k in range(n_chunks):
            sl = slice(k * rows_per_chunk, (k + 1) * rows_per_chunk)
            rows = (r_idx[:, sl], r_rel[:, sl], r_coord[sl])
            num_rows = np.int32(min(rows_per_chunk, hp - k * rows_per_chunk))
            outs.append(self._decode(self.variables, proj, rows, cols, rel_cell, num_rows))
        prob = np.concatenate([np.asarray(o) for o in outs], axis=0)
        return prob[:hp, :wp]


if __name__ == "__main__":
    from jax_refine.cli import main

    sys.exit(main())
