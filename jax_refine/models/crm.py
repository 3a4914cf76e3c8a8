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
    ) -> Array:
        """Logits on a regular grid of queries (every pixel centre of a block of rows).

        Equal to `__call__` at coordinates (row_coord[i], col_coord[j]) for all i, j, but
        every per-row and per-column quantity is computed once (see `grid_tables`).

        Args:
          proj: [h, w, hidden[0]] projected latent (`project`) of one image.
          rows: (index [2, R] int32, rel [2, R], coord [R]) for the row shifts -1, +1.
          cols: (index [2, C] int32, rel [2, C], coord [C]) for the column shifts -1, +1.
          rel_cell: [2] the cell size times (h, w).

        Returns:
          [R, C] logits.
        """
        kernel = self.layers_0.position_kernel().astype(proj.dtype)
        bias = self.layers_0.bias.astype(proj.dtype)
        r_idx, r_rel, r_coord = rows
        c_idx, c_rel, c_coord = cols
        preds, areas = [], []
        for a in range(2):
            row_term = (
                r_rel[a][:, None] * kernel[0]
                + r_coord[:, None] * kernel[2]
                + rel_cell[0] * kernel[4]
                + bias
            )
            band = proj[r_idx[a]]  # [R, w, hidden]
            for b in range(2):
                col_term = (
                    c_rel[b][:, None] * kernel[1]
                    + c_coord[:, None] * kernel[3]
                    + rel_cell[1] * kernel[5]
                )
                pre = band[:, c_idx[b]] + row_term[:, None, :] + col_term[None, :, :]
                preds.append(self.head(pre))
                areas.append(jnp.abs(r_rel[a][:, None] * c_rel[b][None, :]) + AREA_EPS)
        return _ensemble(preds, areas)[..., 0]


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
        x = nn.Conv(
            self.features,
            (1, 1),
            padding=((0, 0), (0, 0)),
            use_bias=False,
            kernel_init=nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="atrous_conv",
        )(x)
        return nn.relu(_bn(self, train, "bn")(x))


def _bn(module: nn.Module, train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        axis_name=module.axis_name,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        name=name,
    )


# Branch names of the reference (they name the ResNet-50 channel counts of each level).
BRANCH_TAGS = ("128", "256", "1024")


class FusionHead(nn.Module):
    """The reference's ASPP_no4level: fuse three levels into the latent map.

    Attributes:
      channels: output channels of the three level branches (64, 64, 128).
      features: latent channels after the 3x3 fusion conv (256).
      level: which level's size the branches are resized to (0, 1 or 2 = x1, x2, x3).
      dropout_rate: dropout after every branch and after the fusion conv (0.5).
    """

    channels: Sequence[int] = (64, 64, 128)
    features: int = 256
    level: int = 0
    dropout_rate: float = 0.5
    axis_name: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        xs: Sequence[Array],
        *,
        train: bool = False,
        valid_sizes: Sequence[tuple[Size, Size]] | None = None,
    ) -> Array:
        """xs: three [B, h_i, w_i, C_i] maps; valid_sizes: their valid sizes (bucketing)."""
        outs = []
        for x, tag, ch in zip(xs, BRANCH_TAGS, self.channels, strict=True):
            y = _ConvBN(ch, self.axis_name, self.dtype, self.param_dtype, name=f"aspp1_{tag}")(
                x, train=train
            )
            y = nn.relu(_bn(self, train, f"bn1_{tag}")(y))
            outs.append(nn.Dropout(self.dropout_rate, deterministic=not train)(y))
        target = outs[self.level]
        length = target.shape[1:3]
        resized = []
        for i, y in enumerate(outs):
            if i == self.level:
                resized.append(y)
            elif valid_sizes is None:
                resized.append(resize.resize_bilinear(y, length, align_corners=True))
            else:
                resized.append(
                    resize.resize_bilinear_dynamic(
                        y, length, valid_sizes[i], valid_sizes[self.level], align_corners=True
                    )
                )
        x = jnp.concatenate(resized, axis=-1)
        x = resnet.mask_valid(x, None if valid_sizes is None else valid_sizes[self.level])
        x = nn.Conv(
            self.features,
            (3, 3),
            padding=((1, 1), (1, 1)),
            use_bias=False,
            kernel_init=nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="last_conv_0",
        )(x)
        x = nn.relu(_bn(self, train, "last_conv_1")(x))
        return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


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

    def decode(self, latent: Array, coord: Array, cell: Array) -> Array:
        """Logits [B, Q, 1] at query coordinates coord [B, Q, 2] with cells cell [B, Q, 2]."""
        return self.imnet(latent, coord, cell)

    def project(self, latent: Array) -> Array:
        """Latent [..., latent_channels] -> first-layer feature term [..., hidden[0]]."""
        return self.imnet.project(latent)

    def decode_grid(self, proj, rows, cols, rel_cell) -> Array:
        """Grid-query logits [R, C]; see `ImplicitDecoder.decode_grid`."""
        return self.imnet.decode_grid(proj, rows, cols, rel_cell)

    def __call__(
        self, image: Array, mask: Array, coord: Array, cell: Array, *, train: bool = False
    ) -> Array:
        """Logits [B, Q, 1] of the queries (coord, cell) given image and mask."""
        return self.decode(self.encode(image, mask, train=train), coord, cell)
