"""Coarse semantic-segmentation heads for PNA (NHWC, Flax linen): FCN, DeepLabV3, PSP, FPN.

Every head is called as `head(features, train=...)` with `features` a dict of backbone
maps ('res2'..'res5', [B, h, w, C]) and returns coarse logits [B, h', w', num_classes] at the
head's own stride (the reference's `layers(features)`; no final upsampling).

Sources of each head (parameter names follow them, so a checkpoint converts through a
readable table, see `jax_refine.convert.detectron2` and `jax_refine.convert.pna`):

* `DeepLabV3Head` — detectron2 `ASPP` + PNA's `DeepLabV3_PNA_Head`: `aspp/convs_0` (1x1),
  `aspp/convs_1..3` (3x3, dilations 6/12/18), `aspp/convs_4` (image pooling: average pool,
  1x1 conv with bias, ReLU, no norm, bilinear back to the map size), `aspp/project` (1x1),
  dropout 0.1, `predictor` (1x1 with bias). Each conv is conv (no bias) -> norm -> ReLU.
  Image pooling: `pool_kernel_size=None` is global average pooling (detectron2 when the
  training crop is disabled); a (kh, kw) kernel is `AvgPool2d(kernel, stride=1)` without
  padding, followed by the bilinear resize — the official Cityscapes models were built with
  the crop enabled, i.e. kernel = crop // 16 = (32, 64), and keep that kernel at test time.
* `SemanticFPNHead` — detectron2 FPN (`fpn/fpn_lateral{k}`, `fpn/fpn_output{k}`: 1x1 and
  3x3 convs with bias, no norm; nearest 2x top-down) + `SemSegFPNHead` (`head/p{k}_{i}`:
  per level max(1, k - 2) conv3x3-GroupNorm(32)-ReLU, each followed by a 2x bilinear
  upsampling (align_corners=False) unless the level is already at stride 4; the levels are
  summed; `head/predictor` 1x1 with bias). `i` is the index in detectron2's Sequential
  (0, 2, 4: the upsamplings sit at the odd indices). Needs sizes divisible by 32 (the
  reference pads the image; `PNASegmentor(size_divisibility=32)` does the same).
* mmsegmentation heads (the reference's mmsegmentation branch, mmseg `BaseDecodeHead`:
  every conv is mmcv's `ConvModule` = conv (no bias) -> BN -> ReLU, Kaiming-initialised
  (fan_out, normal); `Dropout2d(0.1)` — whole channels dropped — before the 1x1 classifier
  `conv_seg` (normal std 0.01); every bilinear resize with align_corners=False):
  * `FCNHead` — "FCN-OS-32" of the paper (Table 1, `pna_fcn_r50-d32`): on res5 (stride 32)
    `num_convs` 3x3 convs of `channels` (`convs_{i}`; 2 x 512), the input concatenated with
    their output and fused by a 3x3 conv (`conv_cat`, `concat_input`), dropout, `conv_seg`.
    The same class is mmseg's training-only auxiliary head on res4 (`auxiliary_fcn_head`:
    one 3x3 conv of 256, no concat, loss weight 0.4 in every PNA mmseg config).
  * `PSPHead` — for each pool scale s in (1, 2, 3, 6) PyTorch's adaptive average pooling to
    s x s, 1x1 conv (`psp_modules_{i}`), bilinear back; concat [x, pooled...], 3x3 conv
    (`bottleneck`), dropout, `conv_seg`.
  * `ASPPHead` — mmseg's DeepLabV3 head (NOT detectron2's `DeepLabV3Head`): `image_pool`
    (global average pool, 1x1 ConvModule WITH BN and ReLU, bilinear back), `aspp_modules_{i}`
    per dilation (1x1 conv for dilation 1, else 3x3 with that dilation; (1, 12, 24, 36) of
    512 channels in the PNA configs), concat [image_pool, aspp...], 3x3 `bottleneck`,
    dropout, `conv_seg`.

Norms (`norm`): 'BN'/'SyncBN' = BatchNorm (eps 1e-5, PyTorch momentum 0.1; statistics are
averaged over `axis_name` when given — under `jit` with a sharded batch the statistics are
global anyway), 'FrozenBN' = BatchNorm that always uses its running statistics, 'GN' =
GroupNorm(32, eps 1e-5), '' = none (the conv then has a bias). Convolutions pad
symmetrically (PyTorch's `padding=dilation * (k // 2)`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jax_refine.ops.pooling import adaptive_avg_pool, avg_pool_valid
from jax_refine.ops.resize import resize_bilinear

Array = Any
NORMS = ("BN", "SyncBN", "FrozenBN", "GN", "")

# detectron2 / fvcore initialisers.
c2_xavier_fill = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
c2_msra_fill = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def make_norm(
    norm: str,
    *,
    train: bool,
    axis_name: str | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    name: str = "norm",
) -> nn.Module | None:
    """The normalisation layer for a `norm` string (see the module docstring); '' -> None."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
    if norm == "":
        return None
    if norm == "GN":
        return nn.GroupNorm(
            num_groups=32,
            epsilon=1e-5,
            use_fast_variance=False,
            dtype=dtype,
            param_dtype=param_dtype,
            name=name,
        )
    return nn.BatchNorm(
        use_running_average=norm == "FrozenBN" or not train,
        momentum=0.9,
        epsilon=1e-5,
        axis_name=axis_name,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class ConvNorm(nn.Module):
    """detectron2's `Conv2d(norm=..., activation=...)` / mmcv's `ConvModule`: conv -> norm -> ReLU.

    Attributes:
      features: output channels.
      kernel_size: square kernel size; padding is dilation * (kernel_size // 2).
      dilation: kernel dilation.
      norm: see the module docstring.
      activation: apply ReLU at the end.
      use_bias: conv bias; None = bias exactly when there is no norm (detectron2's rule).
      kernel_init: initialiser of the conv kernel.
    Params: `conv/kernel` [k, k, C_in, features] (+ `conv/bias`), `norm/*`.
    """

    features: int
    kernel_size: int = 1
    dilation: int = 1
    norm: str = "BN"
    activation: bool = True
    use_bias: bool | None = None
    kernel_init: Any = c2_xavier_fill
    axis_name: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        """x: [B, H, W, C_in] -> [B, H, W, features]."""
        pad = self.dilation * (self.kernel_size // 2)
        x = nn.Conv(
            self.features,
            (self.kernel_size, self.kernel_size),
            padding=((pad, pad), (pad, pad)),
            kernel_dilation=(self.dilation, self.dilation),
            use_bias=(self.norm == "") if self.use_bias is None else self.use_bias,
            kernel_init=self.kernel_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(x)
        norm = make_norm(
            self.norm,
            train=train,
            axis_name=self.axis_name,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        if norm is not None:
            x = norm(x)
        return nn.relu(x) if self.activation else x


def _layer_kwargs(module: nn.Module, **extra: Any) -> dict[str, Any]:
    """The sync axis and dtypes every head passes to its sub-layers, plus `extra`."""
    return dict(axis_name=module.axis_name, dtype=module.dtype, param_dtype=module.param_dtype,
                **extra)


def _classifier(module: nn.Module, std: float, name: str) -> nn.Conv:
    """The 1x1 classifier (with bias) of `module.num_classes`; std 0 = MSRA fill."""
    return nn.Conv(
        module.num_classes,
        (1, 1),
        kernel_init=nn.initializers.normal(std) if std else c2_msra_fill,
        bias_init=nn.initializers.zeros,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        name=name,
    )


def _upsample_pooled(y: Array, size: tuple[int, int]) -> Array:
    """A pooled map [B, h, w, C] bilinearly resized (align_corners=False) to `size`."""
    if y.shape[1:3] == (1, 1):  # a constant map: broadcasting is the same and free
        return jnp.broadcast_to(y, (y.shape[0], *size, y.shape[-1]))
    return resize_bilinear(y, size, align_corners=False)


def _feature(features: Mapping[str, Array], name: str, head: str) -> Array:
    if name not in features:
        raise KeyError(f"{head} needs feature {name!r}; got {sorted(features)}")
    return features[name]


class ASPP(nn.Module):
    """detectron2 `ASPP` (see the module docstring for the branches and names).

    Attributes:
      channels: output channels of every branch and of the projection.
      dilations: dilations of the three 3x3 branches.
      norm: norm of every conv except the image-pooling conv.
      pool_kernel_size: None = global average pooling; (kh, kw) = stride-1 average pooling
        with that kernel (the input size must be divisible by it, as in detectron2).
      dropout: dropout rate after the projection (training only).
    Returns [B, H, W, channels] for an input [B, H, W, C].
    """

    channels: int = 256
    dilations: Sequence[int] = (6, 12, 18)
    norm: str = "BN"
    pool_kernel_size: tuple[int, int] | None = None
    dropout: float = 0.1
    axis_name: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        if len(self.dilations) != 3:
            raise ValueError(f"ASPP expects 3 dilations, got {self.dilations}")
        size = x.shape[1:3]
        kw = _layer_kwargs(self)
        outs = [ConvNorm(self.channels, 1, norm=self.norm, name="convs_0", **kw)(x, train=train)]
        for i, d in enumerate(self.dilations, start=1):
            conv = ConvNorm(self.channels, 3, d, norm=self.norm, name=f"convs_{i}", **kw)
            outs.append(conv(x, train=train))
        if self.pool_kernel_size is None:
            pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
        else:
            kh, kw_ = self.pool_kernel_size
            if size[0] % kh or size[1] % kw_:
                raise ValueError(
                    f"pool_kernel_size must divide the input size: input {size}, "
                    f"pool_kernel_size {self.pool_kernel_size}"
                )
            pooled = avg_pool_valid(x, self.pool_kernel_size)
        pooled = ConvNorm(self.channels, 1, norm="", name="convs_4", **kw)(pooled)
        pooled = _upsample_pooled(pooled, size)
        x = jnp.concatenate(outs + [pooled], axis=-1)
        x = ConvNorm(self.channels, 1, norm=self.norm, name="project", **kw)(x, train=train)
        return nn.Dropout(self.dropout, deterministic=not train)(x)


class DeepLabV3Head(nn.Module):
    """DeepLabV3 coarse head (detectron2 ASPP + `predictor`), see the module docstring.

    Attributes:
      num_classes: output classes.
      in_feature: backbone feature to read (res5, stride 16 in the official configs).
      aspp_channels, aspp_dilations, aspp_dropout, pool_kernel_size: of the `ASPP`.
      norm: norm of the ASPP convs ('SyncBN' in the official configs).
    Returns [B, h, w, num_classes] at the stride of `in_feature`.
    """

    num_classes: int
    in_feature: str = "res5"
    aspp_channels: int = 256
    aspp_dilations: Sequence[int] = (6, 12, 18)
    aspp_dropout: float = 0.1
    pool_kernel_size: tuple[int, int] | None = None
    norm: str = "BN"
    axis_name: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Mapping[str, Array], *, train: bool = False) -> Array:
        x = _feature(features, self.in_feature, "DeepLabV3Head")
        x = ASPP(
            self.aspp_channels,
            self.aspp_dilations,
            norm=self.norm,
            pool_kernel_size=self.pool_kernel_size,
            dropout=self.aspp_dropout,
            name="aspp",
            **_layer_kwargs(self),
        )(x, train=train)
        return _classifier(self, 0.001, "predictor")(x)


def _mmseg_cls_seg(module: nn.Module, x: Array, train: bool) -> Array:
    """mmseg `BaseDecodeHead.cls_seg`: Dropout2d (whole channels, training only), `conv_seg`."""
    x = nn.Dropout(module.dropout, broadcast_dims=(1, 2), deterministic=not train)(x)
    return _classifier(module, 0.01, "conv_seg")(x)


def _mmseg_conv_kwargs(module: nn.Module) -> dict[str, Any]:
    """mmcv ConvModule settings of an mmseg head's convs (norm, Kaiming init, sync axis, dtypes)."""
    return _layer_kwargs(module, norm=module.norm, kernel_init=c2_msra_fill)


class FCNHead(nn.Module):
    """mmsegmentation `FCNHead` (see the module docstring).

    Attributes:
      num_classes: output classes.
      in_feature: backbone feature to read.
      channels: width of the head's convs (512; 256 for the auxiliary head).
      num_convs: number of stacked 3x3 conv-norm-ReLU (`convs_{i}`); 0 = none (the input
        must then have `channels` channels, as mmseg asserts).
      concat_input: concatenate the input with the convs' output and fuse (`conv_cat`).
      dropout: Dropout2d rate before `conv_seg` (training only).
      norm: norm of the convs.
    Returns [B, h, w, num_classes] at the stride of `in_feature`.
    """

    num_classes: int
    in_feature: str = "res5"
    channels: int = 512
    num_convs: int = 2
    concat_input: bool = True
    dropout: float = 0.1
    norm: str = "BN"
    axis_name: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Mapping[str, Array], *, train: bool = False) -> Array:
        x = _feature(features, self.in_feature, "FCNHead")
        if self.num_convs < 0:
            raise ValueError(f"FCNHead: num_convs must be >= 0, got {self.num_convs}")
        if self.num_convs == 0 and x.shape[-1] != self.channels:
            raise ValueError(f"FCNHead: num_convs=0 needs {self.in_feature} with "
                             f"channels={self.channels} channels, got {x.shape[-1]}")
        kw = _mmseg_conv_kwargs(self)
        y = x
        for i in range(self.num_convs):
            y = ConvNorm(self.channels, 3, name=f"convs_{i}", **kw)(y, train=train)
        if self.concat_input:
            y = jnp.concatenate([x, y], axis=-1)
            y = ConvNorm(self.channels, 3, name="conv_cat", **kw)(y, train=train)
        return _mmseg_cls_seg(self, y, train)


class PSPHead(nn.Module):
    """mmsegmentation `PSPHead` (see the module docstring; PyTorch-exact adaptive pooling).

    Attributes:
      num_classes: output classes.
      in_feature: backbone feature to read.
      channels: width of the pyramid branches and of the bottleneck (512).
      pool_scales: adaptive pooling output sizes (1, 2, 3, 6).
      dropout: Dropout2d rate before `conv_seg` (training only).
      norm: norm of the convs.
    Returns [B, h, w, num_classes] at the stride of `in_feature`.
    """

    num_classes: int
    in_feature: str = "res5"
    channels: int = 512
    pool_scales: Sequence[int] = (1, 2, 3, 6)
    dropout: float = 0.1
    norm: str = "BN"
    axis_name: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Mapping[str, Array], *, train: bool = False) -> Array:
        x = _feature(features, self.in_feature, "PSPHead")
        kw = _mmseg_conv_kwargs(self)
        outs = [x]
        for i, scale in enumerate(self.pool_scales):
            y = adaptive_avg_pool(x, scale)
            y = ConvNorm(self.channels, 1, name=f"psp_modules_{i}", **kw)(y, train=train)
            outs.append(_upsample_pooled(y, x.shape[1:3]))
        y = jnp.concatenate(outs, axis=-1)
        y = ConvNorm(self.channels, 3, name="bottleneck", **kw)(y, train=train)
        return _mmseg_cls_seg(self, y, train)


class ASPPHead(nn.Module):
    """mmsegmentation `ASPPHead` (DeepLabV3; see the module docstring).

    Attributes:
      num_classes: output classes.
      in_feature: backbone feature to read (res5, stride 16 in the PNA configs).
      channels: width of every branch and of the bottleneck (512).
      dilations: one branch per dilation; 1 = a 1x1 conv, d > 1 = a 3x3 conv dilated d.
      dropout: Dropout2d rate before `conv_seg` (training only).
      norm: norm of every conv (the image-pooling conv included).
    Returns [B, h, w, num_classes] at the stride of `in_feature`.
    """

    num_classes: int
    in_feature: str = "res5"
    channels: int = 512
    dilations: Sequence[int] = (1, 12, 24, 36)
    dropout: float = 0.1
    norm: str = "BN"
    axis_name: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Mapping[str, Array], *, train: bool = False) -> Array:
        x = _feature(features, self.in_feature, "ASPPHead")
        kw = _mmseg_conv_kwargs(self)
        pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
        pooled = ConvNorm(self.channels, 1, name="image_pool", **kw)(pooled, train=train)
        outs = [_upsample_pooled(pooled, x.shape[1:3])]
        for i, d in enumerate(self.dilations):
            conv = ConvNorm(self.channels, 1 if d == 1 else 3, d, name=f"aspp_modules_{i}", **kw)
            outs.append(conv(x, train=train))
        y = jnp.concatenate(outs, axis=-1)
        y = ConvNorm(self.channels, 3, name="bottleneck", **kw)(y, train=train)
        return _mmseg_cls_seg(self, y, train)


def _level(name: str, prefix: str) -> int:
    if not (name.startswith(prefix) and name[len(prefix):].isdigit()):
        raise ValueError(f"feature name {name!r} is not {prefix}<level>")
    return int(name[len(prefix):])


class FPN(nn.Module):
    """detectron2 FPN neck: res{k} -> p{k} (and p6 = p5 subsampled by 2, LastLevelMaxPool).

    Attributes:
      out_channels: channels of every p{k} (256).
      in_features: backbone features, high to low resolution ('res2'..'res5').
      norm: norm of the lateral/output convs ('' in the official configs: convs with bias).
    Returns {'p2': [B, H/4, W/4, out_channels], ..., 'p6'}; each level must be exactly twice
    the size of the next (inputs divisible by 32).
    """

    out_channels: int = 256
    in_features: Sequence[str] = ("res2", "res3", "res4", "res5")
    norm: str = ""
    axis_name: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Mapping[str, Array], *, train: bool = False) -> dict[str, Array]:
        kw = _layer_kwargs(self, norm=self.norm, activation=False)
        levels = [_level(f, "res") for f in self.in_features]
        results: dict[str, Array] = {}
        prev = None
        for name, k in reversed(list(zip(self.in_features, levels, strict=True))):
            x = _feature(features, name, "FPN")
            lateral = ConvNorm(self.out_channels, 1, name=f"fpn_lateral{k}", **kw)(x, train=train)
            if prev is None:
                prev = lateral
            else:
                top_down = jnp.repeat(jnp.repeat(prev, 2, axis=1), 2, axis=2)
                if top_down.shape[1:3] != lateral.shape[1:3]:
                    raise ValueError(
                        f"FPN: {name} is {lateral.shape[1:3]} but the upsampled level above is "
                        f"{top_down.shape[1:3]}; pad the input to a multiple of "
                        f"{2 ** max(levels)} (size_divisibility)"
                    )
                prev = lateral + top_down
            output = ConvNorm(self.out_channels, 3, name=f"fpn_output{k}", **kw)
            results[f"p{k}"] = output(prev, train=train)
        top = max(levels)
        results[f"p{top + 1}"] = results[f"p{top}"][:, ::2, ::2]
        return dict(sorted(results.items()))


class SemSegFPNHead(nn.Module):
    """detectron2 `SemSegFPNHead` on FPN levels (see the module docstring for names).

    Attributes:
      num_classes: output classes.
      conv_dims: channels of the scale heads (128).
      common_stride: stride all levels are brought to (4).
      in_features: FPN levels to use ('p2'..'p5'); level k has stride 2**k.
      norm: norm of the scale-head convs ('GN').
    Returns [B, H/common_stride, W/common_stride, num_classes].
    """

    num_classes: int
    conv_dims: int = 128
    common_stride: int = 4
    in_features: Sequence[str] = ("p2", "p3", "p4", "p5")
    norm: str = "GN"
    axis_name: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Mapping[str, Array], *, train: bool = False) -> Array:
        kw = _layer_kwargs(self, norm=self.norm, kernel_init=c2_msra_fill)
        common = int(math.log2(self.common_stride))
        total = None
        for name in self.in_features:
            k = _level(name, "p")
            y = _feature(features, name, "SemSegFPNHead")
            for i in range(max(1, k - common)):
                y = ConvNorm(self.conv_dims, 3, name=f"{name}_{2 * i}", **kw)(y, train=train)
                if k != common:
                    y = resize_bilinear(y, (2 * y.shape[1], 2 * y.shape[2]), align_corners=False)
            total = y if total is None else total + y
        return _classifier(self, 0.0, "predictor")(total)


class SemanticFPNHead(nn.Module):
    """Semantic FPN coarse head: `fpn` (FPN on res2..res5) then `head` (SemSegFPNHead).

    Attributes:
      num_classes: output classes.
      fpn_channels: FPN output channels (256).
      conv_dims: scale-head channels (128).
      common_stride: output stride of the logits (4).
      fpn_norm: FPN conv norm ('').
      norm: scale-head norm ('GN').
    Returns [B, H/4, W/4, num_classes] for res2..res5 of an input [B, H, W, 3], H, W % 32 == 0.
    """

    num_classes: int
    fpn_channels: int = 256
    conv_dims: int = 128
    common_stride: int = 4
    fpn_norm: str = ""
    norm: str = "GN"
    axis_name: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Mapping[str, Array], *, train: bool = False) -> Array:
        kw = _layer_kwargs(self)
        p = FPN(self.fpn_channels, norm=self.fpn_norm, name="fpn", **kw)(features, train=train)
        head = SemSegFPNHead(
            self.num_classes, self.conv_dims, self.common_stride, norm=self.norm, name="head", **kw
        )
        return head(p, train=train)
