"""CRM — Continuous Refinement Model (Shen et al., CVPR 2022), Flax linen, NHWC.

Encoder: a 4-channel ResNet (image + mask) with layer3 dilated (stride 8) and layer4 never
computed. Fusion ('ASPP_no4level' in the reference): per level a 1x1 conv -> BN -> ReLU ->
BN -> ReLU -> Dropout branch, all levels resized (bilinear, align_corners=True) to one
level's size, concatenated, 3x3 conv -> BN -> ReLU -> Dropout. Decoder: a LIIF-style local
ensemble of an MLP over [nearest latent vector, relative coordinate, coordinate, cell].

Module and parameter names mirror the reference (`feats`, `aspp_`, `imnet/layers_{0,2,..}`)
so that `jax_refine.convert.crm` is a readable table.

The decoder's first layer is linear, so W1 . [f; p] = W1_f . f + W1_p . p: `project`
computes W1_f . f once per latent cell (32 values), and each query gathers those instead of
the 256-channel latent vector. The algebra is exact (only float32 summation order
changes); the parity tests check it against the per-query reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax_refine.models.backbones import resnet
from jax_refine.ops import grid, resize

Array = Any
Size = Any

# Local-ensemble constants of the reference decoder.
SHIFT_EPS = 1e-6
CLAMP = (np.float32(-1 + 1e-6), np.float32(1 - 1e-6))
AREA_EPS = np.float32(1e-9)


def shift_offset(direction: int, size: int) -> np.float32:
    """The reference's coordinate shift direction * (2 / size / 2) + 1e-6, in float32."""
    return np.float32(direction * (2 / size / 2) + SHIFT_EPS)


def _torch_linear_init(fan_in: int):
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class FactorisedDense(nn.Module):
    """A Dense layer on [feature; position] whose two parts can be applied separately.

    Parameters are `kernel` [in_features, features] and `bias` [features] (a Dense layer's).

    Attributes:
      features: output width.
      in_features: total input width (feature channels + position channels).
      position_features: the trailing input channels that form the position part.
    """

    features: int
    in_features: int
    position_features: int = 6
    param_dtype: Any = jnp.float32

    def setup(self):
        fan_in = self.in_features
        self.kernel = self.param(
            "kernel",
            nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
            (fan_in, self.features),
            self.param_dtype,
        )
        self.bias = self.param(
            "bias", _torch_linear_init(fan_in), (self.features,), self.param_dtype
        )

    def project(self, feature: Array) -> Array:
        """[..., C] -> [..., features]: the feature part, without bias."""
        split = self.in_features - self.position_features
        return jnp.dot(feature, self.kernel[:split].astype(feature.dtype))

    def position_kernel(self) -> Array:
        """[position_features, features] rows of the kernel for the position inputs."""
        return self.kernel[self.in_features - self.position_features :]

    def __call__(self, x: Array) -> Array:
        return jnp.dot(x, self.kernel.astype(x.dtype)) + self.bias.astype(x.dtype)


class ImplicitDecoder(nn.Module):
    """LIIF local-ensemble decoder ('imnet' in the reference).

    Attributes:
      latent_channels: channels of the latent map (256).
      hidden: hidden widths of the MLP (32, 32, 32, 32); the output is 1 logit.
    """

    latent_channels: int = 256
    hidden: Sequence[int] = (32, 32, 32, 32)
    param_dtype: Any = jnp.float32

    def setup(self):
        # Names follow the reference's nn.Sequential indices (ReLUs sit at odd indices).
        self.layers_0 = FactorisedDense(
            self.hidden[0], self.latent_channels + 6, param_dtype=self.param_dtype
        )
        widths = list(self.hidden[1:]) + [1]
        fan_ins = list(self.hidden)
        for k, (width, fan_in) in enumerate(zip(widths, fan_ins, strict=True)):
            layer = nn.Dense(
                width,
                kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                bias_init=_torch_linear_init(fan_in),
                param_dtype=self.param_dtype,
            )
            setattr(self, f"layers_{2 * (k + 1)}", layer)

    def project(self, latent: Array) -> Array:
        """[..., latent_channels] -> [..., hidden[0]]: W1_f . latent, once per latent cell."""
        return self.layers_0.project(latent)

    def feature_kernel(self) -> Array:
        """[latent_channels, hidden[0]]: the first layer's kernel rows for the feature."""
        return self.layers_0.kernel[: self.latent_channels]

    def head(self, pre: Array) -> Array:
        """First-layer pre-activations [..., hidden[0]] -> logits [..., 1]."""
        x = nn.relu(pre)
        n = len(self.hidden)
        for k in range(1, n + 1):
            x = getattr(self, f"layers_{2 * k}")(x)
            if k < n:
                x = nn.relu(x)
        return x

    def __call__(self, latent: Array, coord: Array, cell: Array) -> Array:
        """Logits at arbitrary query points.

        Args:
          latent: [B, h, w, latent_channels].
          coord: [B, Q, 2] pixel-centre coordinates in (-1, 1), row first.
          cell: [B, Q, 2] target cell size (2 / H, 2 / W).

        Returns:
          [B, Q, 1] logits.
        """
        _, h, w, _ = latent.shape
        proj = self.project(latent)
        kernel = self.layers_0.position_kernel().astype(proj.dtype)
        bias = self.layers_0.bias.astype(proj.dtype)
        centers = (jnp.asarray(grid.pixel_centers(h)), jnp.asarray(grid.pixel_centers(w)))
        batch = jnp.arange(latent.shape[0])[:, None]
        rel_cell = cell * jnp.asarray([h, w], cell.dtype)
        preds, areas = [], []
        for vy in (-1, 1):  # the reference's outer loop shifts the row
            for vx in (-1, 1):
                shifted = coord + jnp.asarray([shift_offset(vy, h), shift_offset(vx, w)])
                shifted = jnp.clip(shifted, *CLAMP)
                iy = grid.nearest_cell_index(shifted[..., 0], h)
                ix = grid.nearest_cell_index(shifted[..., 1], w)
                q_coord = jnp.stack([centers[0][iy], centers[1][ix]], axis=-1)
                rel = (coord - q_coord) * jnp.asarray([h, w], coord.dtype)
                pos = jnp.concatenate([rel, coord, rel_cell], axis=-1)
                pre = proj[batch, iy, ix] + jnp.dot(pos, kernel) + bias
                preds.append(self.head(pre))
                areas.append(jnp.abs(rel[..., 0] * rel[..., 1]) + AREA_EPS)
        return _ensemble(preds, areas)

    def decode_grid(
        self,
        proj: Array,
        rows: tuple[Array, Array, Array],
        cols: tuple[Array, Array, Array],
        rel_cell: Array,
        *,
        rows_per_step: int | None = None,
        num_rows: Any = None,
    ) -> Array:
        """Logits on a regular grid of queries (every pixel centre of a block of rows).

        Equal to `__call__` at coordinates (row_coord[i], col_coord[j]) for all i, j, but
        every per-row and per-column quantity is computed once (see `grid_tables`).

        Args:
          proj: [h, w, hidden[0]] projected latent (`project`) of one image.
          rows: (index [2, R] int32, rel [2, R], coord [R]) for the row shifts -1, +1.
          cols: (index [2, C] int32, rel [2, C], coord [C]) for the column shifts -1, +1.
          rel_cell: [2] the cell size times (h, w).
          rows_per_step: if set (it must divide R), rows are decoded this many at a time in
            a loop, so the MLP's intermediates stay in cache (much faster on CPU: the
            32-wide layers are memory-bound); None decodes all R rows at once.
          num_rows: with rows_per_step, only the first num_rows rows (int or traced) are
            decoded; the remaining rows of the result are zero (filler rows cost nothing).

        Returns:
          [R, C] logits (float32). The first layer's position terms and sum are float32;
          the MLP after it runs in proj's dtype.
        """
        kernel = self.layers_0.position_kernel().astype(jnp.float32)
        bias = self.layers_0.bias.astype(jnp.float32)
        layers = [
            getattr(self, f"layers_{2 * k}").variables["params"]
            for k in range(1, len(self.hidden) + 1)
        ]
        layers = [(p["kernel"].astype(proj.dtype), p["bias"].astype(proj.dtype)) for p in layers]
        c_idx, c_rel, c_coord = cols
        col_terms = [
            c_rel[b][:, None] * kernel[1] + c_coord[:, None] * kernel[3] + rel_cell[1] * kernel[5]
            for b in range(2)
        ]

        def block(r_idx: Array, r_rel: Array, r_coord: Array) -> Array:
            preds, areas = [], []
            for a in range(2):
                row_term = (
                    r_rel[a][:, None] * kernel[0]
                    + r_coord[:, None] * kernel[2]
                    + rel_cell[0] * kernel[4]
                    + bias
                )
                band = proj[r_idx[a]]  # [r, w, hidden]
                for b in range(2):
                    pre = band[:, c_idx[b]] + row_term[:, None, :] + col_terms[b][None, :, :]
                    preds.append(_mlp_head(pre.astype(proj.dtype), layers))
                    areas.append(jnp.abs(r_rel[a][:, None] * c_rel[b][None, :]) + AREA_EPS)
            return _ensemble(preds, areas)[..., 0]

        r_idx, r_rel, r_coord = rows
        n = r_coord.shape[0]
        if rows_per_step is None:
            return block(r_idx, r_rel, r_coord).astype(jnp.float32)
        if n % rows_per_step:
            raise ValueError(f"rows_per_step={rows_per_step} must divide the {n} rows")
        steps = n // rows_per_step if num_rows is None else -(-num_rows // rows_per_step)

        def body(i: Array, out: Array) -> Array:
            r0 = i * rows_per_step
            take = lambda t: jax.lax.dynamic_slice_in_dim(t, r0, rows_per_step, axis=-1)
            value = block(take(r_idx), take(r_rel), take(r_coord))
            return jax.lax.dynamic_update_slice_in_dim(out, value.astype(out.dtype), r0, 0)

        out = jnp.zeros((n, c_coord.shape[0]), jnp.float32)
        return jax.lax.fori_loop(0, steps, body, out)


def _mlp_head(pre: Array, layers: list[tuple[Array, Array]]) -> Array:
    """ReLU(pre) -> (Dense -> ReLU)* -> Dense: the decoder MLP after its first layer."""
    x = nn.relu(pre)
    for k, (w, b) in enumerate(layers):
        x = jnp.dot(x, w) + b
        if k < len(layers) - 1:
            x = nn.relu(x)
    return x


def _ensemble(preds: list[Array], areas: list[Array]) -> Array:
    """Area-weighted sum with the diagonal swap (area 0 <-> 3, 1 <-> 2), as the reference."""
    total = ((areas[0] + areas[1]) + areas[2]) + areas[3]
    out = preds[0] * (areas[3] / total)[..., None]
    out = out + preds[1] * (areas[2] / total)[..., None]
    out = out + preds[2] * (areas[1] / total)[..., None]
    return out + preds[3] * (areas[0] / total)[..., None]


def grid_tables(
    target: int, latent: int, start: int = 0, length: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-axis decoder tables for pixel centres start..start+length of a `target` axis.

    Computed on the host in float32 exactly as the reference computes them (shift in
    double, rounded once; nearest cell of grid_sample). Positions past `target` repeat the
    last pixel (filler, cropped by the caller).

    Returns:
      index [2, length] int32 (nearest latent cell for shifts -1, +1), rel [2, length]
      float32 ((coord - cell centre) * latent), coord [length] float32.
    """
    length = target - start if length is None else length
    centers = grid.pixel_centers(target)
    pos = np.minimum(np.arange(start, start + length), target - 1)
    coord = centers[pos]
    latent_centers = grid.pixel_centers(latent)
    index = np.empty((2, length), np.int32)
    rel = np.empty((2, length), np.float32)
    for k, v in enumerate((-1, 1)):
        shifted = np.clip(coord + shift_offset(v, latent), *CLAMP)
        index[k] = grid.nearest_cell_index(shifted, latent)
        rel[k] = (coord - latent_centers[index[k]]) * np.float32(latent)
    return index, rel, coord


class _ConvBN(nn.Module):
    """1x1 conv (no bias) -> BN -> ReLU: the reference's `_ASPPModule` (atrous_conv, bn)."""

    features: int
    axis_name: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        x = resnet.Conv(
            self.features,
            1,
            kernel_init=nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="atrous_conv",
        )(x)
        return nn.relu(resnet.batch_norm(self, train, "bn")(x))


# Branch names of the reference (they name the ResNet-50 channel counts of each level).
BRANCH_TAGS = ("128", "256", "1024")


class FusionHead(nn.Module):
    """The reference's ASPP_no4level: fuse three levels into the latent map.

    Attributes:
      channels: output channels of the three level branches (64, 64, 128).
      features: latent channels after the 3x3 fusion conv (256).
      level: which level's size the branches are resized to (0, 1 or 2 = x1, x2, x3).
      level_ratios: size ratio between consecutive levels (2, 2); bounds the rows a band
        of `fuse_branches_project` reads.
      dropout_rate: dropout after every branch and after the fusion conv (0.5).
    """

    channels: Sequence[int] = (64, 64, 128)
    features: int = 256
    level: int = 0
    level_ratios: Sequence[int] = (2, 2)
    dropout_rate: float = 0.5
    axis_name: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        for tag, ch in zip(BRANCH_TAGS, self.channels, strict=True):
            setattr(self, f"aspp1_{tag}", _ConvBN(ch, self.axis_name, self.dtype, self.param_dtype))
            setattr(self, f"bn1_{tag}", self._norm())
        self.last_conv_0 = resnet.Conv(
            self.features,
            3,
            padding=1,
            kernel_init=nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.last_conv_1 = self._norm()
        self.dropout = nn.Dropout(self.dropout_rate)

    def _norm(self) -> nn.BatchNorm:
        return nn.BatchNorm(
            momentum=0.9,
            epsilon=1e-5,
            axis_name=self.axis_name,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def branch(self, level: int, x: Array, *, train: bool) -> Array:
        """Level `level`'s branch: 1x1 conv -> BN -> ReLU -> BN -> ReLU -> Dropout."""
        tag = BRANCH_TAGS[level]
        y = getattr(self, f"aspp1_{tag}")(x, train=train)
        y = nn.relu(getattr(self, f"bn1_{tag}")(y, use_running_average=not train))
        return self.dropout(y, deterministic=not train)

    def branches(self, xs: Sequence[Array], *, train: bool) -> list[Array]:
        """All three branches."""
        if len(xs) != len(BRANCH_TAGS):
            raise ValueError(f"expected {len(BRANCH_TAGS)} levels, got {len(xs)}")
        return [self.branch(i, x, train=train) for i, x in enumerate(xs)]

    def __call__(
        self,
        xs: Sequence[Array],
        *,
        train: bool = False,
        valid_sizes: Sequence[tuple[Size, Size]] | None = None,
    ) -> Array:
        """xs: three [B, h_i, w_i, C_i] maps; valid_sizes: their valid sizes (bucketing).

        Returns the latent [B, h_level, w_level, features].
        """
        outs = self.branches(xs, train=train)
        sizes = valid_sizes or [y.shape[1:3] for y in outs]
        length = outs[self.level].shape[1:3]
        resized = [
            y if i == self.level else resize.resize_bilinear_dynamic(
                y, length, sizes[i], sizes[self.level], align_corners=True
            )
            for i, y in enumerate(outs)
        ]
        x = jnp.concatenate(resized, axis=-1)
        x = resnet.mask_valid(x, None if valid_sizes is None else sizes[self.level])
        x = nn.relu(self.last_conv_1(self.last_conv_0(x), use_running_average=not train))
        return self.dropout(x, deterministic=not train)

    def fuse_branches_project(
        self,
        outs: Sequence[Array],
        project_kernel: Array,
        *,
        valid_sizes: Sequence[tuple[Size, Size]] | None = None,
        band_rows: int = 32,
    ) -> Array:
        """`self(xs) @ project_kernel` in eval mode from `branches(xs, train=False)`, in bands.

        Exact algebra, cheaper than the direct form: the fusion conv is linear, and a
        channel mix commutes with the per-channel bilinear upsampling, so for every level
        coarser than the target the 3x3 conv's nine channel mixes are applied at that
        level's resolution and the results are upsampled (columns, then rows) with shifted
        interpolation tables whose weights are zero outside the target's valid region (the
        conv's zero padding). Levels at (or resized down to) the target resolution use the
        direct convolution. Only `band_rows` target rows of 256-channel data exist at once.

        Args:
          outs: the three branch outputs (`branches(xs, train=False)`).
          project_kernel: [features, P], the decoder's first-layer feature kernel.
          valid_sizes: valid sizes of the levels (bucketed inputs), as in __call__.
          band_rows: latent rows computed per loop step.

        Returns:
          [B, h_level, w_level, P].
        """
        t = self.level
        sizes = valid_sizes or [y.shape[1:3] for y in outs]
        batch, height, width = outs[t].shape[:3]
        kernel = self.last_conv_0.variables["params"]["kernel"].astype(self.dtype)
        bounds = np.cumsum([0] + [y.shape[-1] for y in outs])
        same, same_k, taps = [], [], []
        for i, y in enumerate(outs):
            k = kernel[:, :, bounds[i] : bounds[i + 1], :]
            if i > t:
                taps.append((y, sizes[i], int(np.prod(self.level_ratios[t:i])), k))
                continue
            if i < t:
                y = resize.resize_bilinear_dynamic(
                    y, (height, width), sizes[i], sizes[t], align_corners=True
                )
            same.append(resnet.mask_valid(y, sizes[t]))
            same_k.append(k)
        same_x = jnp.concatenate(same, axis=-1)
        same_k = jnp.concatenate(same_k, axis=2)
        n_bands = -(-height // band_rows)
        total = n_bands * band_rows
        same_x = jnp.pad(same_x, ((0, 0), (1, total - height + 1), (0, 0), (0, 0)))
        tap_data = [
            _TapBranch.build(y, size, sizes[t], ratio, k, band_rows, total, width)
            for y, size, ratio, k in taps
        ]

        # Plain arrays for the loop body (Flax modules are not called inside lax loops).
        bn = self.last_conv_1.variables
        bn_mul = jax.lax.rsqrt(bn["batch_stats"]["var"] + self.last_conv_1.epsilon)
        bn_mul = (bn_mul * bn["params"]["scale"]).astype(self.dtype)
        bn_mean = bn["batch_stats"]["mean"].astype(self.dtype)
        bn_bias = bn["params"]["bias"].astype(self.dtype)
        project_kernel = project_kernel.astype(self.dtype)

        def band(b: Array, out: Array) -> Array:
            r0 = b * band_rows
            rows = jax.lax.dynamic_slice_in_dim(same_x, r0, band_rows + 2, axis=1)
            acc = jax.lax.conv_general_dilated(
                rows,
                same_k,
                (1, 1),
                ((0, 0), (1, 1)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
            for tap in tap_data:
                acc = acc + tap.band(r0, band_rows)
            y = nn.relu((acc - bn_mean) * bn_mul + bn_bias)  # BatchNorm, Flax's formula
            update = jnp.dot(y.astype(self.dtype), project_kernel)
            return jax.lax.dynamic_update_slice_in_dim(out, update, r0, 1)

        out = jnp.zeros((batch, total, width, project_kernel.shape[-1]), self.dtype)
        out = jax.lax.fori_loop(0, n_bands, band, out)
        return out[:, :height]


class _TapBranch:
    """A coarse level's share of the fusion conv, band by band (see `fuse_branches_project`)."""

    def __init__(self, src, rows, cols, kernel, src_rows, width):
        self.src, self.rows, self.cols = src, rows, cols
        self.kernel, self.src_rows, self.width = kernel, src_rows, width

    @classmethod
    def build(cls, y, size, target_size, ratio, kernel, band_rows, total, width):
        src_rows = -(-(band_rows + 2) // ratio) + 3
        src = jnp.pad(y, ((0, 0), (0, src_rows), (0, 0), (0, 0)))
        rows = _shifted_tables(size[0], target_size[0], total)
        cols = _shifted_tables(size[1], target_size[1], width)
        c_in, c_out = kernel.shape[2], kernel.shape[3]
        flat = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(c_in, 9 * c_out)
        return cls(src, rows, cols, flat, src_rows, width)

    def band(self, r0: Array, band_rows: int) -> Array:
        i0, i1, w0, w1 = self.rows
        start = i0[r0]  # source row of target row r0 - 1 (or of row 0 when r0 = 0)
        src = jax.lax.dynamic_slice_in_dim(self.src, start, self.src_rows, axis=1)
        y = jnp.dot(src, self.kernel)
        y = y.reshape(*y.shape[:-1], 3, 3, -1)  # [B, rows, w_src, dy, dx, C_out]
        ci0, ci1, cw0, cw1 = self.cols
        out = None
        for dy in range(3):
            z = None
            for dx in range(3):
                sl = slice(dx, dx + self.width)
                t = y[..., dy, dx, :]
                part = (
                    jnp.take(t, ci0[sl], axis=2) * cw0[sl][:, None]
                    + jnp.take(t, ci1[sl], axis=2) * cw1[sl][:, None]
                )
                z = part if z is None else z + part
            r_i0 = jax.lax.dynamic_slice_in_dim(i0, r0 + dy, band_rows)
            r_i1 = jax.lax.dynamic_slice_in_dim(i1, r0 + dy, band_rows)
            r_w0 = jax.lax.dynamic_slice_in_dim(w0, r0 + dy, band_rows)[:, None, None]
            r_w1 = jax.lax.dynamic_slice_in_dim(w1, r0 + dy, band_rows)[:, None, None]
            r_i0 = jnp.clip(r_i0 - start, 0, self.src_rows - 1)
            r_i1 = jnp.clip(r_i1 - start, 0, self.src_rows - 1)
            part = jnp.take(z, r_i0, axis=1) * r_w0 + jnp.take(z, r_i1, axis=1) * r_w1
            out = part if out is None else out + part
        return out


def _shifted_tables(in_size: Size, out_size: Size, length: int):
    """align_corners=True interpolation tables for target positions -1 .. length.

    Entry p describes target position p - 1; weights are zero outside [0, out_size) (the
    3x3 conv's zero padding around the valid target region).
    """
    i0, i1, w0, w1 = resize.linear_weights(in_size, out_size, length + 1, align_corners=True)
    pos = jnp.arange(length + 1)
    inside = (pos < out_size).astype(jnp.float32)
    zero_i = jnp.zeros((1,), jnp.int32)
    zero_w = jnp.zeros((1,), jnp.float32)
    return (
        jnp.concatenate([zero_i, i0]),
        jnp.concatenate([zero_i, i1]),
        jnp.concatenate([zero_w, w0 * inside]),
        jnp.concatenate([zero_w, w1 * inside]),
    )


# Encoder levels fused by CRM: x1 (stem, stride 2), x2 (layer1, stride 4), x3 (layer3, stride 8).
LEVELS = ("stem", "layer1", "layer3")


class CRM(nn.Module):
    """Continuous Refinement Model. `CRM()` is the paper's (and official checkpoint's) model.

    Attributes:
      depth: backbone ResNet depth (18, 34, 50, 101); 50 in the paper.
      width: backbone base width (64 in the paper; smaller for fast CPU demos).
      fusion_channels: channels of the three fusion branches (64, 64, 128).
      latent_channels: latent channels (256).
      latent_level: size at which levels are fused: 1 = x1 (stride 2, official),
        2 = x2 (stride 4), 3 = x3 (stride 8) — supplementary Table 1's three rows, finest
        first.
      hidden: decoder MLP hidden widths (32, 32, 32, 32).
      dropout_rate: fusion dropout (0.5, active only with train=True and a 'dropout' rng).
      axis_name: BatchNorm axis for synchronised BN in data-parallel training.

    Inputs: image [B, H, W, 3] ImageNet-normalised, mask [B, H, W, 1] in [-1, 1],
    coord / cell [B, Q, 2] row first (see `jax_refine.ops.grid`). Output: logits [B, Q, 1].
    """

    depth: int = 50
    width: int = 64
    fusion_channels: Sequence[int] = (64, 64, 128)
    latent_channels: int = 256
    latent_level: int = 1
    hidden: Sequence[int] = (32, 32, 32, 32)
    dropout_rate: float = 0.5
    axis_name: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    # Reference backbone layout: layer3 at stride 1 (dilation 2 after its first block).
    strides = (1, 2, 1, 2)
    dilations = (1, 1, 2, 4)

    def setup(self):
        if self.depth not in resnet.DEPTHS:
            raise ValueError(f"depth must be one of {sorted(resnet.DEPTHS)}, got {self.depth}")
        if self.latent_level not in (1, 2, 3):
            raise ValueError(f"latent_level must be 1, 2 or 3, got {self.latent_level}")
        self.feats = resnet.DEPTHS[self.depth](
            width=self.width,
            in_channels=4,
            strides=self.strides,
            dilations=self.dilations,
            num_stages=3,
            axis_name=self.axis_name,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.aspp_ = FusionHead(
            channels=self.fusion_channels,
            features=self.latent_channels,
            level=self.latent_level - 1,
            dropout_rate=self.dropout_rate,
            axis_name=self.axis_name,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.imnet = ImplicitDecoder(self.latent_channels, self.hidden, self.param_dtype)

    def latent_size(self, size: tuple[Size, Size]) -> tuple[Size, Size]:
        """(h, w) of the latent map for an input of `size` (works with traced sizes)."""
        sizes = resnet.feature_valid_sizes(size, self.strides, 3)
        return sizes[LEVELS[self.latent_level - 1]]

    def encode(
        self,
        image: Array,
        mask: Array,
        *,
        train: bool = False,
        valid_size: tuple[Size, Size] | None = None,
    ) -> Array:
        """Latent map [B, h, w, latent_channels] (h = ceil(H / 2) at latent_level 1).

        `valid_size` (rows, cols): only the top-left block of the inputs is real; the valid
        block of the result then equals encoding the unpadded inputs (see
        `jax_refine.models.backbones.resnet`).
        """
        if image.shape[:3] != mask.shape[:3] or image.shape[-1] != 3 or mask.shape[-1] != 1:
            raise ValueError(f"expected image [B,H,W,3] and mask [B,H,W,1], got "
                             f"{image.shape} and {mask.shape}")
        x = jnp.concatenate([image, mask.astype(image.dtype)], axis=-1)
        feats = self.feats(x, train=train, valid_size=valid_size)
        valid = None
        if valid_size is not None:
            sizes = resnet.feature_valid_sizes(valid_size, self.strides, 3)
            valid = [sizes[name] for name in LEVELS]
        return self.aspp_([feats[name] for name in LEVELS], train=train, valid_sizes=valid)

    def encode_branches(
        self, image: Array, mask: Array, *, valid_size: tuple[Size, Size] | None = None
    ) -> list[Array]:
        """The fusion's three branch outputs in eval mode (`FusionHead.branches`).

        The backbone runs each stage's identical blocks as one scan (`scan_blocks`, same
        results), which keeps XLA's heap for large inputs at about half the size of the
        unrolled program's.
        """
        x = jnp.concatenate([image, mask.astype(image.dtype)], axis=-1)
        feats = self.feats(x, train=False, valid_size=valid_size, scan_blocks=True)
        return self.aspp_.branches([feats[name] for name in LEVELS], train=False)

    def fuse_project(
        self,
        branches: Sequence[Array],
        *,
        valid_size: tuple[Size, Size] | None = None,
        band_rows: int = 32,
    ) -> Array:
        """`project` of the fused latent from `encode_branches`' outputs: [B, h, w, hidden[0]].

        Banded (`FusionHead.fuse_branches_project`): only `band_rows` latent rows of the
        256-channel map exist at once.
        """
        valid = None
        if valid_size is not None:
            sizes = resnet.feature_valid_sizes(valid_size, self.strides, 3)
            valid = [sizes[name] for name in LEVELS]
        return self.aspp_.fuse_branches_project(
            branches, self.imnet.feature_kernel(), valid_sizes=valid, band_rows=band_rows
        )

    def encode_project(
        self,
        image: Array,
        mask: Array,
        *,
        valid_size: tuple[Size, Size] | None = None,
        band_rows: int = 32,
    ) -> Array:
        """`project(encode(image, mask))` in eval mode with bounded memory: [B, h, w, hidden[0]].

        `encode_branches` followed by `fuse_project`.
        """
        branches = self.encode_branches(image, mask, valid_size=valid_size)
        return self.fuse_project(branches, valid_size=valid_size, band_rows=band_rows)

    def decode(self, latent: Array, coord: Array, cell: Array) -> Array:
        """Logits [B, Q, 1] at query coordinates coord [B, Q, 2] with cells cell [B, Q, 2]."""
        return self.imnet(latent, coord, cell)

    def project(self, latent: Array) -> Array:
        """Latent [..., latent_channels] -> first-layer feature term [..., hidden[0]]."""
        return self.imnet.project(latent)

    def decode_grid(
        self, proj, rows, cols, rel_cell, *, rows_per_step=None, num_rows=None
    ) -> Array:
        """Grid-query logits [R, C]; see `ImplicitDecoder.decode_grid`."""
        return self.imnet.decode_grid(
            proj, rows, cols, rel_cell, rows_per_step=rows_per_step, num_rows=num_rows
        )

    def __call__(
        self, image: Array, mask: Array, coord: Array, cell: Array, *, train: bool = False
    ) -> Array:
        """Logits [B, Q, 1] of the queries (coord, cell) given image and mask."""
        return self.decode(self.encode(image, mask, train=train), coord, cell)
