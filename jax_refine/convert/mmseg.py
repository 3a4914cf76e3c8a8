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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jax_refine.convert.common import StateDictReader, strip_module_prefix
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
