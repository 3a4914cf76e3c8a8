"""PNA — Progressive Neighborhood Aggregation (Liu, Wei, Zhang, AAAI 2023), NHWC Flax linen.

Pieces (names follow the official detectron2 code, `liutinglt/PNA`):

* `deeplab_resnet(depth, ...)` — detectron2's `build_resnet_deeplab_backbone` as our
  `ResNet`: DeepLab stem (three 3x3 convs 64-64-128, the first with stride 2; the "R-52" /
  "R-103" ImageNet weights) or the torchvision 7x7 stem; bottlenecks with the stride in the
  3x3 conv; output stride 32 / 16 / 8 by dilating res5 (and res4), and res5's multi-grid:
  block j of res5 has dilation RES5_DILATION * multi_grid[j] (detectron2 DeepLab's
  RES5_MULTI_GRID = (1, 2, 4)). The official DeepLabV3 configs use output stride 16
  (res5 dilations 2, 4, 8); the official FPN configs output stride 32 with the same
  multi-grid, so res5's blocks are dilated 1, 2, 4 at stride 32. `res_features` renames
  `layer1..4` to `res2..res5`.
* `resnet_v1c(depth, ...)` — mmsegmentation's `ResNetV1c` (the backbone of the paper's
  Pascal VOC / COCO-Stuff models, `configs/pna/*_r{50,101}-d*` on the reference's
  mmsegmentation branch) as our `ResNet`: deep stem 3x3 conv 32 (stride 2) - 32 - 64,
  style 'pytorch' (stride in the 3x3 conv), strided 1x1 downsample conv (no avg_down), d8 /
  d16 / d32 by dilation, `contract_dilation` (a dilated stage's first block uses half the
  dilation), mmseg's BasicBlock for depth 18 / 34 (only conv1 dilated).
* `PNAHead` — the progressive head: stages run res5 -> res2; stage f upsamples the previous
  prediction (P0 = the coarse logits for the first stage) to F_f's size (PyTorch 'nearest'
  = floor indexing, or bilinear with align_corners=False), embeds the features with the 1x1
  conv `patch_embeds_{f}` (query, no bias) and the prediction with `value_embeds_{f}`
  (value, no bias), runs `stages_{f}` (a `PNABlock` of `PNALayer`s: every layer gets the
  ORIGINAL query, only the value is chained — the reference's quirk) and predicts with
  `conv_seg_layers_{f}` (1x1, bias). Heads per stage = embed_dim // 32.
* `PNASegmentor` — image normalisation, optional zero padding to `size_divisibility`,
  backbone, coarse head (`models.heads`), PNA head; returns [P0, P1, P2, P3, P4].
  Defaults: the official configs' PIXEL_MEAN (123.675, 116.280, 103.530) and PIXEL_STD
  (58.395, 57.120, 57.375) on RGB images in [0, 255] (ImageNet mean/std x 255).
  `final_logits` gives the reference's inference output (last stage x4 bilinear, cropped);
  `pad_to_divisibility(labels, 32, 255)` pads training labels as the reference does.
* `build_pna(coarse_head, num_classes, ...)` — the official variants in one call (and small
  CPU variants: ResNet-18/34, narrower backbone, head and embed_dims).
* `save_checkpoint` / `load_checkpoint` — the inference checkpoint (`build_pna` arguments in
  config.json + orbax variables) that training exports to WORKDIR/pna.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jax_refine.layers import PNALayer
from jax_refine.models import checkpoint_dir
from jax_refine.models.backbones.resnet import (
    MMSegBasicBlock,
    ResNet18,
    ResNet34,
    ResNet50,
    ResNet101,
)
from jax_refine.models.backbones.swin import swin_base, swin_tiny
from jax_refine.models.heads import (
    ASPPHead,
    DeepLabV3Head,
    FCNHead,
    PSPHead,
    SemanticFPNHead,
    c2_xavier_fill,
)
from jax_refine.ops.resize import resize_bilinear, resize_nearest

Array = Any

PIXEL_MEAN = (123.675, 116.280, 103.530)
PIXEL_STD = (58.395, 57.120, 57.375)
UPSAMPLE_MODES = ("nearest", "bilinear")
RESNETS = {18: ResNet18, 34: ResNet34, 50: ResNet50, 101: ResNet101}
# Output stride -> (first-block stride, dilation) of layer1..4 (detectron2's RES4/RES5_DILATION
# and mmseg's d8 / d16 / d32 configs agree).
OUTPUT_STRIDES = {
    32: ((1, 2, 2, 2), (1, 1, 1, 1)),
    16: ((1, 2, 2, 1), (1, 1, 1, 2)),
    8: ((1, 2, 1, 1), (1, 1, 2, 4)),
}


def _resnet_maker(depth: int, stage_sizes: Sequence[int] | None):
    """The `ResNet` partial of `depth` (ValueError if unknown), with `stage_sizes` overridden."""
    if depth not in RESNETS:
        raise ValueError(f"depth must be one of {sorted(RESNETS)}, got {depth}")
    make = RESNETS[depth]
    if stage_sizes is not None:
        make = functools.partial(make, stage_sizes=tuple(stage_sizes))
    return make


def _output_stride(output_stride: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    return OUTPUT_STRIDES[output_stride]


def deeplab_resnet(
    depth: int = 50,
    *,
    width: int = 64,
    stem: str = "deeplab",
    output_stride: int = 16,
    multi_grid: Sequence[int] | None = (1, 2, 4),
    axis_name: str | None = None,
    stage_sizes: Sequence[int] | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
) -> nn.Module:
    """detectron2's DeepLab ResNet (see the module docstring) as a `ResNet`.

    Args:
      depth: 50 or 101 ("R-52" / "R-103" with the DeepLab stem); 18 or 34 (basic blocks,
        not an official PNA backbone) for small CPU models.
      width: stem / first-stage width (64 in every official model).
      stem: 'deeplab' (3x3 x 3, 128 channels) or 'torchvision' (= detectron2 BasicStem).
      output_stride: 32 (RES5_DILATION 1), 16 (RES5_DILATION 2) or 8 (res4 dilated 2, res5 4).
      multi_grid: res5 per-block multipliers; None = all 1.
      axis_name: BatchNorm statistics axis (SyncBN) in training.
      stage_sizes: blocks per stage, overriding `depth`'s (small test networks).

    Returns:
      A `ResNet` whose output 'layer{i}' is detectron2's 'res{i+1}' (see `res_features`).
    """
    make = _resnet_maker(depth, stage_sizes)
    strides, dilations = _output_stride(output_stride)
    return make(
        width=width,
        in_channels=3,
        stem=stem,
        strides=strides,
        dilations=dilations,
        first_dilations=dilations,
        multi_grid=tuple(multi_grid) if multi_grid is not None else None,
        axis_name=axis_name,
        dtype=dtype,
        param_dtype=param_dtype,
    )


def resnet_v1c(
    depth: int = 50,
    *,
    width: int = 64,
    output_stride: int = 16,
    contract_dilation: bool = True,
    axis_name: str | None = None,
    stage_sizes: Sequence[int] | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
) -> nn.Module:
    """mmsegmentation's `ResNetV1c` (see the module docstring) as a `ResNet`.

    Flax names are the torchvision ones of `ResNet` (stem 'conv1..3' / 'bn1..3', blocks
    'layer{i}_{j}'); `convert.mmseg.resnet_v1c_tree` maps mmseg's names onto them.

    Args:
      depth: 18, 34 (mmseg BasicBlock), 50 or 101 (Bottleneck); PNA's models: 50 / 101.
      width: mmseg's stem_channels = base_channels (64 in every official model; the stem
        is width // 2, width // 2, width channels; small CPU models use less).
      output_stride: 32 (d32: FCN), 16 (d16: PSP, ASPP; layer4 dilation 2) or 8 (d8;
        layer3 dilation 2, layer4 4).
      contract_dilation: the first block of a stage with dilation d > 1 uses d // 2
        (every official PNA config: True).
      axis_name: BatchNorm statistics axis (SyncBN) in training.
      stage_sizes: blocks per stage, overriding `depth`'s (small test networks).

    Returns:
      A `ResNet` whose 'layer1..4' are mmseg's out_indices 0..3 (`res_features` -> res2..5).
    """
    make = _resnet_maker(depth, stage_sizes)
    strides, dilations = _output_stride(output_stride)
    first_dilations = tuple(d // 2 if contract_dilation and d > 1 else d for d in dilations)
    if depth in (18, 34):
        make = functools.partial(make, block=MMSegBasicBlock)
    return make(
        width=width,
        in_channels=3,
        stem="v1c",
        strides=strides,
        dilations=dilations,
        first_dilations=first_dilations,
        axis_name=axis_name,
        dtype=dtype,
        param_dtype=param_dtype,
    )


R52 = functools.partial(deeplab_resnet, 50)  # detectron2 "R-52": ResNet-50, DeepLab stem
R103 = functools.partial(deeplab_resnet, 101)  # detectron2 "R-103": ResNet-101, DeepLab stem


def res_features(features: Mapping[str, Array]) -> dict[str, Array]:
    """{'layer1'..'layer4', ...} (our ResNet) -> {'res2'..'res5'}; res* dicts pass through."""
    if "res5" in features:
        return {f"res{k}": features[f"res{k}"] for k in range(2, 6)}
    return {f"res{i + 1}": features[f"layer{i}"] for i in range(1, 5)}


class PNABlock(nn.Module):
    """`depth` PNALayers (`blocks_{i}`); each sees the original query, the value is chained.

    Attributes:
      dim: channels D of query and value.
      num_heads: attention heads (D // 32 in PNA).
      kernel_size: neighbourhood window L.
      depth: number of layers (1 in PNA).
      mlp_ratio: MLP hidden = int(D * mlp_ratio).
      use_sa: use the self-aggregation module (Restormer block) as the shortcut.
    Returns [B, H, W, D] for query and value [B, H, W, D].
    """

    dim: int
    num_heads: int
    kernel_size: int
    depth: int = 1
    mlp_ratio: float = 1.0
    use_sa: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, query: Array, value: Array, *, deterministic: bool = True) -> Array:
        x = query
        for i in range(self.depth):
            x = PNALayer(
                self.dim,
                self.num_heads,
                self.kernel_size,
                self.mlp_ratio,
                self.use_sa,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"blocks_{i}",
            )(query, value, deterministic=deterministic)
            value = x
        return x


class PNAHead(nn.Module):
    """The progressive refinement head (see the module docstring).

    Attributes:
      num_classes: classes K.
      embed_dims: D per feature, in `in_features` order (res2..res5).
      window_sizes: neighbourhood window per feature.
      mlp_ratio: PNALayer MLP ratio (1).
      upsample_mode: 'nearest' (PyTorch floor nearest) or 'bilinear' (align_corners=False).
      use_sa: use the self-aggregation module in every layer.
      in_features: feature names, high to low resolution.
      depth: PNALayers per stage (1).
      embed_bias: the 1x1 query/value embeddings have a bias (mmseg's head: True;
        detectron2's: False). Nothing else differs between the two references' heads.
      dtype, param_dtype: computation and parameter dtypes.
    Called as head(coarse_logits [B, h5, w5, K], {'res2': [B, h2, w2, C2], ...}); returns
    the stage logits [P1 (res5 size), P2 (res4), P3 (res3), P4 (res2)], each [B, h, w, K].
    """

    num_classes: int
    embed_dims: Sequence[int] = (96, 192, 384, 768)
    window_sizes: Sequence[int] = (9, 9, 9, 9)
    mlp_ratio: float = 1.0
    upsample_mode: str = "nearest"
    use_sa: bool = True
    in_features: Sequence[str] = ("res2", "res3", "res4", "res5")
    depth: int = 1
    embed_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, coarse_logits: Array, features: Mapping[str, Array], *, train: bool = False
    ) -> list[Array]:
        # (The reference's PNA layers have zero dropout: `train` changes nothing here.)
        types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.upsample_mode not in UPSAMPLE_MODES:
            raise ValueError(f"upsample_mode must be one of {UPSAMPLE_MODES}")
        if not len(self.embed_dims) == len(self.window_sizes) == len(self.in_features):
            raise ValueError("embed_dims, window_sizes and in_features must have equal lengths")
        if coarse_logits.shape[-1] != self.num_classes:
            raise ValueError(f"coarse logits have {coarse_logits.shape[-1]} classes, "
                             f"expected {self.num_classes}")
        value = coarse_logits
        outs = []
        for i in reversed(range(len(self.in_features))):
            f, dim = self.in_features[i], self.embed_dims[i]
            x = features[f]
            size = x.shape[1:3]
            if self.upsample_mode == "bilinear":
                value = resize_bilinear(value, size, align_corners=False)
            elif value.shape[1:3] != size:
                value = resize_nearest(value, size)
            embed = functools.partial(nn.Conv, dim, (1, 1), use_bias=self.embed_bias,
                                      kernel_init=c2_xavier_fill, **types)
            query = embed(name=f"patch_embeds_{f}")(x)
            value = embed(name=f"value_embeds_{f}")(value)
            out = PNABlock(
                dim,
                dim // 32,
                self.window_sizes[i],
                self.depth,
                self.mlp_ratio,
                self.use_sa,
                name=f"stages_{f}",
                **types,
            )(query, value, deterministic=not train)
            pred = nn.Conv(
                self.num_classes,
                (1, 1),
                kernel_init=nn.initializers.normal(0.001),
                bias_init=nn.initializers.zeros,
                name=f"conv_seg_layers_{f}",
                **types,
            )(out)
            outs.append(pred)
            value = pred
        return outs


class PNASegmentor(nn.Module):
    """Backbone + coarse head + PNA head (detectron2's `PNASemanticSegmentor`, mmseg's
    `CascadeEncoderDecoder` with an `FCNHead` then the `PNAHead`).

    Attributes:
      backbone: returns res2..res5 (or layer1..layer4, e.g. `deeplab_resnet(...)`).
      coarse_head: a `models.heads` head: features -> P0.
      pna_head: a `PNAHead`.
      auxiliary_head: None, or mmseg's training-only auxiliary head (a `heads.FCNHead` on
        res4). Its logits are NOT returned: in training they are sown into the
        'intermediates' collection as 'aux_logits' (read them with
        `mutable=['intermediates']`; the train step adds their loss); at inference the head
        is not run (its parameters exist so that mmseg checkpoints convert whole).
      pixel_mean, pixel_std: per-channel normalisation of RGB [0, 255] images.
      size_divisibility: zero-pad the normalised image at the bottom/right to a multiple of
        this (the reference: 32 for FPN backbones, 0 = none for plain ResNets).
      freeze_backbone_bn: FrozenBN — the backbone always uses its running statistics.
      recompute_coarse: mmseg's `CascadeEncoderDecoder` in training: the coarse head runs a
        second time (a fresh dropout mask, a second BatchNorm statistics update, gradients
        through both) and that second output, not the returned P0, is the PNA head's input.
        detectron2's segmentor (False) feeds P0 itself. Inference is the same either way.
    Called as model(images [B, H, W, 3], train=...); returns [P0, P1, P2, P3, P4] (logits
    at their own strides of the padded image; P4 at stride 4).
    """

    backbone: nn.Module
    coarse_head: nn.Module
    pna_head: nn.Module
    auxiliary_head: nn.Module | None = None
    pixel_mean: Sequence[float] = PIXEL_MEAN
    pixel_std: Sequence[float] = PIXEL_STD
    size_divisibility: int = 0
    freeze_backbone_bn: bool = False
    recompute_coarse: bool = False

    @nn.compact
    def __call__(self, images: Array, *, train: bool = False) -> list[Array]:
        if images.ndim != 4 or images.shape[-1] != len(self.pixel_mean):
            channels = len(self.pixel_mean)
            raise ValueError(f"images must be [B, H, W, {channels}], got {images.shape}")
        mean = jnp.asarray(self.pixel_mean, images.dtype)
        std = jnp.asarray(self.pixel_std, images.dtype)
        x = (images - mean) / std
        x = pad_to_divisibility(x, self.size_divisibility)
        features = res_features(self.backbone(x, train=train and not self.freeze_backbone_bn))
        coarse = self.coarse_head(features, train=train)
        if self.auxiliary_head is not None and (train or self.is_initializing()):
            aux = self.auxiliary_head(features, train=train)
            if train:
                self.sow("intermediates", "aux_logits", aux)
        value = coarse
        if train and self.recompute_coarse:
            value = self.coarse_head(features, train=train)
        return [coarse, *self.pna_head(value, features, train=train)]


def pad_to_divisibility(x: Array, divisibility: int, value: float | int = 0) -> Array:
    """Pad [B, H, W, ...] at the bottom/right with `value` to multiples of `divisibility`.

    detectron2's `ImageList.from_tensors`: images are padded with 0 after normalisation
    (what `PNASegmentor` does), label maps [B, H, W] with the ignore value (255) — pad the
    training labels this way so that the losses see the same pixels as the reference's.
    `divisibility` <= 1 returns `x` unchanged.
    """
    if divisibility <= 1:
        return x
    h, w = x.shape[1:3]
    pad = [(0, 0), (0, -h % divisibility), (0, -w % divisibility)] + [(0, 0)] * (x.ndim - 3)
    return jnp.pad(x, pad, constant_values=value)


OUTPUT_MODES = ("detectron2", "mmseg")


def final_logits(
    stage_logits: Array, image_size: tuple[int, int], common_stride: int = 4,
    mode: str = "detectron2",
) -> Array:
    """The reference's inference output [B, H, W, K] from the last stage's logits.

    mode 'detectron2' (`PNASemSegHead`): upsample by `common_stride` (bilinear,
    align_corners=False), then crop the padding away. mode 'mmseg'
    (`CascadeEncoderDecoder.encode_decode`): resize straight to `image_size` (bilinear,
    align_corners=False) — different numbers unless the image size is a multiple of 4.
    """
    if mode not in OUTPUT_MODES:
        raise ValueError(f"mode must be one of {OUTPUT_MODES}, got {mode!r}")
    if mode == "mmseg":
        return resize_bilinear(stage_logits, tuple(image_size), False)
    h, w = stage_logits.shape[1:3]
    up = resize_bilinear(stage_logits, (h * common_stride, w * common_stride), False)
    return up[:, : image_size[0], : image_size[1]]


# Official settings per coarse head: backbone output stride, res5 multi-grid (detectron2
# ResNet only), input padding and PNA window. detectron2 configs: 'deeplabv3' (ASPP of
# detectron2), 'semantic_fpn'; the paper's mmseg configs: 'fcn' (d32), 'psp' (d16),
# 'aspp' (mmseg's ASPPHead, d16).
VARIANTS = {
    "deeplabv3": dict(output_stride=16, multi_grid=(1, 2, 4), size_divisibility=0, window=9),
    "semantic_fpn": dict(output_stride=32, multi_grid=(1, 2, 4), size_divisibility=32, window=7),
    "fcn": dict(output_stride=32, multi_grid=None, size_divisibility=0, window=9),
    "psp": dict(output_stride=16, multi_grid=None, size_divisibility=0, window=9),
    "aspp": dict(output_stride=16, multi_grid=None, size_divisibility=0, window=9),
}
SWINS = {"swin_t": swin_tiny, "swin_b": swin_base}
BACKBONES = ("resnet", "resnet_v1c", *SWINS)
PNA_HEADS = ("detectron2", "mmseg")


def _build_backbone(
    backbone: str, depth: int, width: int, stem: str, variant: Mapping[str, Any],
    backbone_kwargs: Mapping[str, Any], axis_name: str | None, dtype: Any,
) -> nn.Module:
    """The backbone of `build_pna` (see there)."""
    if backbone in SWINS:  # always output stride 32; LayerNorms, no BatchNorm axis
        return SWINS[backbone](**backbone_kwargs, dtype=dtype)
    kw = dict(backbone_kwargs, axis_name=axis_name, dtype=dtype)
    if backbone == "resnet":
        return deeplab_resnet(depth, width=width, stem=stem, output_stride=variant["output_stride"],
                              multi_grid=variant["multi_grid"], **kw)
    if backbone == "resnet_v1c":
        return resnet_v1c(depth, width=width, output_stride=variant["output_stride"], **kw)
    raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")


def _build_coarse_head(
    coarse_head: str, num_classes: int, pool_kernel_size: tuple[int, int] | None,
    kwargs: dict[str, Any],
) -> nn.Module:
    if coarse_head == "deeplabv3":
        return DeepLabV3Head(num_classes, pool_kernel_size=pool_kernel_size, **kwargs)
    if coarse_head == "aspp":
        return ASPPHead(num_classes, **kwargs)
    if coarse_head == "semantic_fpn":
        return SemanticFPNHead(num_classes, **kwargs)
    if coarse_head == "fcn":
        return FCNHead(num_classes, **kwargs)
    return PSPHead(num_classes, **kwargs)


def auxiliary_fcn_head(num_classes: int, **kwargs: Any) -> FCNHead:
    """mmseg's auxiliary head of every PNA config: `FCNHead` on res4 (stride 16 at d16 and
    d32 alike), one 3x3 conv of 256 channels, no input concat, Dropout2d 0.1; its loss
    weight (0.4) is `config.loss.aux_weight`. `kwargs` override (e.g. `channels`)."""
    settings = dict(in_feature="res4", channels=256, num_convs=1, concat_input=False,
                    dropout=0.1)
    return FCNHead(num_classes, **{**settings, **kwargs})


def build_pna(
    coarse_head: str,
    num_classes: int,
    *,
    backbone: str = "resnet",
    pna_head: str = "detectron2",
    auxiliary_head: bool = False,
    depth: int = 50,
    width: int = 64,
    stem: str = "deeplab",
    embed_dims: Sequence[int] = (96, 192, 384, 768),
    window_sizes: Sequence[int] | None = None,
    upsample_mode: str = "nearest",
    use_sa: bool = True,
    pool_kernel_size: tuple[int, int] | None = None,
    head_kwargs: Mapping[str, Any] | None = None,
    aux_head_kwargs: Mapping[str, Any] | None = None,
    backbone_kwargs: Mapping[str, Any] | None = None,
    freeze_backbone_bn: bool = False,
    axis_name: str | None = None,
    dtype: Any = jnp.float32,
) -> PNASegmentor:
    """A `PNASegmentor` with the official settings of one coarse head (see `VARIANTS`).

    Args:
      coarse_head: 'deeplabv3' (detectron2's ASPP), 'semantic_fpn', 'fcn', 'psp' or 'aspp'
        (mmseg's ASPPHead, the paper's VOC / COCO-Stuff DeepLabV3).
      num_classes: classes of every prediction.
      backbone: 'resnet' (detectron2/torchvision-style ResNet, `deeplab_resnet`),
        'resnet_v1c' (mmseg's ResNetV1c, `resnet_v1c`: the paper's VOC / COCO-Stuff
        ResNets), 'swin_t' or 'swin_b' (mmseg's Swin, `backbones.swin.swin_tiny` /
        `swin_base`, output stride 32 whatever the coarse head; `depth`, `width`, `stem`
        unused).
      pna_head: 'detectron2' (embeddings without bias) or 'mmseg' (with bias).
      auxiliary_head: add mmseg's training-only auxiliary FCN on res4
        (`auxiliary_fcn_head`, sown as 'aux_logits' in training).
      depth, width, stem: the ResNet (official: 50/101, width 64; stem 'deeplab' =
        detectron2's R-52/R-103, ResNetV1c always has its own deep stem; depth 18/34 and a
        smaller width give small CPU models).
      embed_dims: PNA widths D for res2..res5 (official 96/192/384/768; multiples of 32,
        since every stage has D // 32 heads).
      window_sizes: PNA windows (default: 7 for Semantic FPN, 9 otherwise).
      upsample_mode: 'nearest' (default) or 'bilinear' (the Trans10k config).
      use_sa: self-aggregation module on.
      pool_kernel_size: DeepLabV3's ASPP image pooling; None = global. The official
        Cityscapes DeepLabV3 models need (32, 64) (crop 512x1024 / output stride 16).
      head_kwargs: extra constructor arguments of the coarse head (e.g. FCN's `channels`,
        `num_convs`; DeepLabV3's `aspp_channels`); None = the official widths.
      aux_head_kwargs: overrides of the auxiliary head's arguments (e.g. `channels`).
      backbone_kwargs: extra arguments of the backbone factory (e.g. a ResNet's
        `stage_sizes`, a Swin's widths and depths) for small test models.
      freeze_backbone_bn: FrozenBN backbone.
      axis_name: SyncBN axis.
      dtype: computation dtype (parameters stay float32).
    """
    if coarse_head not in VARIANTS:
        raise ValueError(f"coarse_head must be one of {sorted(VARIANTS)}, got {coarse_head!r}")
    if pna_head not in PNA_HEADS:
        raise ValueError(f"pna_head must be one of {PNA_HEADS}, got {pna_head!r}")
    if any(d % 32 for d in embed_dims):
        raise ValueError(f"embed_dims must be multiples of 32 (D // 32 heads), got {embed_dims}")
    v = VARIANTS[coarse_head]
    net = _build_backbone(backbone, depth, width, stem, v, backbone_kwargs or {}, axis_name,
                          dtype)
    kwargs = dict(head_kwargs or {}, axis_name=axis_name, dtype=dtype)
    head = _build_coarse_head(coarse_head, num_classes, pool_kernel_size, kwargs)
    aux = None
    if auxiliary_head:
        aux = auxiliary_fcn_head(num_classes, **dict(aux_head_kwargs or {}, axis_name=axis_name,
                                                     dtype=dtype))
    pna = PNAHead(
        num_classes,
        embed_dims=tuple(embed_dims),
        window_sizes=tuple(window_sizes or (v["window"],) * 4),
        upsample_mode=upsample_mode,
        use_sa=use_sa,
        embed_bias=pna_head == "mmseg",
        dtype=dtype,
    )
    return PNASegmentor(
        net,
        head,
        pna,
        aux,
        size_divisibility=v["size_divisibility"],
        freeze_backbone_bn=freeze_backbone_bn,
        recompute_coarse=pna_head == "mmseg",
    )


# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT_FORMAT = "jax_refine.pna"


def save_checkpoint(
    directory: str | Path, build_kwargs: Mapping[str, Any], variables: Mapping[str, Any]
) -> Path:
    """Write a PNA inference checkpoint (`models.checkpoint_dir`; the model entry holds the
    `build_pna` keyword arguments). Read it with `load_checkpoint`."""
    return checkpoint_dir.save(directory, CHECKPOINT_FORMAT, build_kwargs, variables)


def load_checkpoint(directory: str | Path) -> tuple[PNASegmentor, dict[str, Any], dict[str, Any]]:
    """Read a `save_checkpoint` directory -> (model, variables, build_pna kwargs)."""
    kwargs, variables = checkpoint_dir.load(directory, CHECKPOINT_FORMAT)
    return build_pna(**kwargs), variables, kwargs
