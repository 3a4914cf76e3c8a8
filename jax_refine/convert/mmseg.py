"""mmsegmentation-layout state_dicts -> Flax trees (the PNA reference's mmsegmentation branch).

ResNetV1c (`mmseg.models.backbones.ResNetV1c`) -> our `models.backbones.resnet.ResNet` with
stem='v1c' (`models.pna.resnet_v1c`); conv weights OIHW -> HWIO, BN weight -> scale,
running_mean/var -> batch_stats mean/var:

    stem.0.weight, stem.1.*   -> conv1/kernel, bn1   (the deep stem is a Sequential:
    stem.3.weight, stem.4.*   -> conv2/kernel, bn2    conv, BN, ReLU three times, so the
    stem.6.weight, stem.7.*   -> conv3/kernel, bn3    ReLUs take indices 2, 5, 8)
    layer{i}.{j}.conv{k}.weight, .bn{k}.*   -> layer{i}_{j}/conv{k}, bn{k}   (torchvision's names)
    layer{i}.{j}.downsample.{0,1}.*         -> layer{i}_{j}/downsample_conv, downsample_bn

Inside a segmentor checkpoint the backbone sits under 'backbone.'; open-mmlab's ImageNet
weights (`open-mmlab://resnet50_v1c`, `resnet101_v1c`: the `pretrained` of every ResNet PNA
config) have no prefix, possibly a 'state_dict' wrapper (`read_checkpoint_file` unwraps it)
and a classifier `fc.*` (ignored).

Heads (mmseg `decode_heads`; every `ConvModule` is `conv` (no bias) + `bn` -> our
`models.heads.ConvNorm` `conv` + `norm`; `conv_seg` is the 1x1 classifier with bias):

    FCNHead   convs.{i}, conv_cat, conv_seg            -> convs_{i}, conv_cat, conv_seg
    PSPHead   psp_modules.{i}.1, bottleneck, conv_seg  -> psp_modules_{i}, bottleneck, conv_seg
    ASPPHead  image_pool.1, aspp_modules.{i}, bottleneck, conv_seg
                                                       -> image_pool, aspp_modules_{i}, ...
    (index 0 of `image_pool` / `psp_modules.{i}` is the parameter-free pooling)

mmcv checkpoints hold the state_dict under 'state_dict' next to 'meta' (and 'optimizer');
`unwrap_mmcv_checkpoint` takes it out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from jax_refine.convert.common import StateDictReader, key_indices, strip_module_prefix
from jax_refine.convert.detectron2 import conv_tree, norm_tree
from jax_refine.convert.resnet import batch_norm, stages_tree

Tree = dict[str, Any]

# Our stem conv/BN index (1..3) -> the indices of mmseg's `stem` Sequential (conv, BN).
V1C_STEM = {1: (0, 1), 2: (3, 4), 3: (6, 7)}


def resnet_v1c_tree(reader: StateDictReader, prefix: str = "backbone.") -> tuple[Tree, Tree]:
    """mmseg ResNetV1c keys under `prefix` -> (params, batch_stats) of `resnet_v1c`.

    Blocks per stage and the block type (Bottleneck when `layer1.0.conv3` exists) are read
    off the keys; a stage without blocks is reported missing by `reader.finish()`.
    """
    params: Tree = {}
    stats: Tree = {}
    for ours, (conv, bn) in V1C_STEM.items():
        params[f"conv{ours}"] = {"kernel": reader.conv(f"{prefix}stem.{conv}.weight")}
        params[f"bn{ours}"], stats[f"bn{ours}"] = batch_norm(reader, f"{prefix}stem.{bn}")
    stages_tree(reader, prefix, 4, params, stats)
    return params, stats


def resnet_from_mmseg(state_dict: Mapping[str, Any], prefix: str = "") -> dict[str, Tree]:
    """mmseg ResNetV1c weights -> {'params', 'batch_stats'} for `models.pna.resnet_v1c`.

    Args:
      state_dict: open-mmlab ImageNet weights (prefix '', `fc.*` ignored) or a segmentor
        state_dict (prefix 'backbone.'; keys outside the prefix are not read).
      prefix: key prefix of the backbone.
    Raises `KeyMismatchError` listing every missing and every unexpected key.
    """
    reader = StateDictReader(
        strip_module_prefix(state_dict), prefix, where="resnet_from_mmseg",
        ignore=[r"(^|\.)num_batches_tracked$", r"^fc\."],
    )
    params, stats = resnet_v1c_tree(reader, "")
    reader.finish()
    return {"params": params, "batch_stats": stats}


def unwrap_mmcv_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """An mmcv checkpoint ({'meta', 'state_dict', ...}) or a bare state_dict -> the arrays of
    the state_dict, without a DataParallel `module.` prefix."""
    if "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], Mapping):
        checkpoint = checkpoint["state_dict"]
    return strip_module_prefix({k: v for k, v in checkpoint.items() if hasattr(v, "shape")})


def _conv_module(reader: StateDictReader, key: str) -> tuple[Tree, Tree]:
    """mmcv ConvModule (`conv` without bias, `bn`) -> ConvNorm (params, stats)."""
    norm_params, norm_stats = norm_tree(reader, f"{key}.bn")
    params = {"conv": {"kernel": reader.conv(f"{key}.conv.weight")}, "norm": norm_params}
    return params, {"norm": norm_stats}


def _conv_module_list(reader: StateDictReader, prefix: str, group: str,
                      suffix: str = "") -> tuple[Tree, Tree]:
    """An mmseg ModuleList of ConvModules, keys `{prefix}{group}.{i}{suffix}.*` ->
    ({'{group}_{i}': params}, {...: stats}); none found: entry 0, recorded as missing."""
    params: Tree = {}
    stats: Tree = {}
    pattern = rf"^{re.escape(prefix + group)}\.(\d+){re.escape(suffix)}\."
    for i in key_indices(reader.keys(), pattern) or [0]:
        name = f"{group}_{i}"
        params[name], stats[name] = _conv_module(reader, f"{prefix}{group}.{i}{suffix}")
    return params, stats


def fcn_head_tree(reader: StateDictReader, prefix: str = "") -> tuple[Tree, Tree]:
    """mmsegmentation `FCNHead` keys -> `models.heads.FCNHead` tree."""
    params, stats = _conv_module_list(reader, prefix, "convs")
    if reader.has(f"{prefix}conv_cat.conv.weight"):
        params["conv_cat"], stats["conv_cat"] = _conv_module(reader, f"{prefix}conv_cat")
    params["conv_seg"] = conv_tree(reader, f"{prefix}conv_seg")
    return params, stats


def psp_head_tree(reader: StateDictReader, prefix: str = "") -> tuple[Tree, Tree]:
    """mmsegmentation `PSPHead` keys -> `models.heads.PSPHead` tree (psp_modules.i.1 ->
    psp_modules_i: index 0 of each Sequential is the parameter-free pooling)."""
    params, stats = _conv_module_list(reader, prefix, "psp_modules", ".1")
    params["bottleneck"], stats["bottleneck"] = _conv_module(reader, f"{prefix}bottleneck")
    params["conv_seg"] = conv_tree(reader, f"{prefix}conv_seg")
    return params, stats


def aspp_head_tree(reader: StateDictReader, prefix: str = "") -> tuple[Tree, Tree]:
    """mmsegmentation `ASPPHead` keys -> `models.heads.ASPPHead` tree (image_pool.1 ->
    image_pool: index 0 of mmseg's Sequential is the parameter-free pooling)."""
    params, stats = _conv_module_list(reader, prefix, "aspp_modules")
    params["image_pool"], stats["image_pool"] = _conv_module(reader, f"{prefix}image_pool.1")
    params["bottleneck"], stats["bottleneck"] = _conv_module(reader, f"{prefix}bottleneck")
    params["conv_seg"] = conv_tree(reader, f"{prefix}conv_seg")
    return params, stats


MMSEG_HEAD_TREES = {"fcn": fcn_head_tree, "psp": psp_head_tree, "aspp": aspp_head_tree}


def mmseg_head_kind(keys: Any, prefix: str) -> str:
    """'aspp', 'psp' or 'fcn' from the keys of an mmseg head under `prefix`."""
    keys = list(keys)
    for kind, probe in (("aspp", "image_pool."), ("psp", "psp_modules."), ("fcn", "convs.")):
        if any(k.startswith(prefix + probe) for k in keys):
            return kind
    raise ValueError(f"cannot tell the mmseg head under {prefix!r} (no image_pool / "
                     f"psp_modules / convs keys)")
