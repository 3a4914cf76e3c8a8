"""torchvision-layout ResNet state_dict -> Flax variables of `models.backbones.resnet.ResNet`.

Mapping (torchvision key -> Flax path; conv weights OIHW -> HWIO, BN weight -> scale):

    conv1.weight                         -> conv1/kernel
    bn1.{weight,bias}                    -> params bn1/{scale,bias}
    bn1.{running_mean,running_var}       -> batch_stats bn1/{mean,var}
    layer{i}.{j}.conv{k}.weight          -> layer{i}_{j}/conv{k}/kernel
    layer{i}.{j}.bn{k}.*                 -> layer{i}_{j}/bn{k}/*
    layer{i}.{j}.downsample.0.weight     -> layer{i}_{j}/downsample_conv/kernel
    layer{i}.{j}.downsample.1.*          -> layer{i}_{j}/downsample_bn/*

Stage sizes and the block type (bottleneck when `conv3` exists) are read off the keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jax_refine.convert.common import StateDictReader, strip_module_prefix

Tree = dict[str, Any]


def batch_norm(reader: StateDictReader, key: str) -> tuple[Tree, Tree]:
    """BatchNorm `key`.{weight,bias,running_mean,running_var} -> (params, batch_stats)."""
    params = {"scale": reader.get(f"{key}.weight"), "bias": reader.get(f"{key}.bias")}
    stats = {"mean": reader.get(f"{key}.running_mean"), "var": reader.get(f"{key}.running_var")}
    return params, stats


def stage_sizes(reader: StateDictReader, prefix: str = "", num_stages: int = 4) -> list[int]:
    """Number of blocks of {prefix}layer1..layer{num_stages} present in the state_dict."""
    sizes = []
    for i in range(1, num_stages + 1):
        pattern = re.compile(rf"^{re.escape(prefix)}layer{i}\.(\d+)\.conv1\.weight$")
        blocks = [int(m.group(1)) for k in reader.keys() if (m := pattern.match(k))]
        sizes.append(max(blocks) + 1 if blocks else 0)
    return sizes


def resnet_tree(
    reader: StateDictReader,
    prefix: str = "",
    *,
    num_stages: int = 4,
    in_channels: int | None = None,
) -> tuple[Tree, Tree]:
    """Read a torchvision-named ResNet under `prefix` -> (params, batch_stats).

    Args:
      reader: the state_dict reader.
      prefix: key prefix of the ResNet ('' for torchvision, 'feats.' inside CRM).
      num_stages: stages to read (CRM uses 3; layer4 keys must then be ignored by the reader).
      in_channels: if given, conv1's input channels are zero-filled up to this number.
    """
    params: Tree = {}
    stats: Tree = {}
    conv1 = reader.conv(f"{prefix}conv1.weight")
    if in_channels is not None and conv1.ndim == 4:
        have = conv1.shape[2]
        if have > in_channels:
            raise ValueError(f"conv1 has {have} input channels, more than {in_channels=}")
        pad = np.zeros(conv1.shape[:2] + (in_channels - have, conv1.shape[3]), conv1.dtype)
        conv1 = np.concatenate([conv1, pad], axis=2)
    params["conv1"] = {"kernel": conv1}
    params["bn1"], stats["bn1"] = batch_norm(reader, f"{prefix}bn1")
    stages_tree(reader, prefix, num_stages, params, stats)
    return params, stats


def stages_tree(
    reader: StateDictReader, prefix: str, num_stages: int, params: Tree, stats: Tree
) -> None:
    """Add {prefix}layer{i}.{j}.* (torchvision block names, also mmseg's) to params/stats.

    Bottleneck blocks when `layer1.0.conv3` exists, else basic blocks; a stage without
    blocks is reported missing.
    """
    bottleneck = reader.has(f"{prefix}layer1.0.conv3.weight")
    n_convs = 3 if bottleneck else 2
    for i, blocks in enumerate(stage_sizes(reader, prefix, num_stages), start=1):
        if blocks == 0:
            reader.get(f"{prefix}layer{i}.0.conv1.weight")  # recorded as missing
        for j in range(blocks):
            src, dst = f"{prefix}layer{i}.{j}", f"layer{i}_{j}"
            p: Tree = {}
            s: Tree = {}
            for k in range(1, n_convs + 1):
                p[f"conv{k}"] = {"kernel": reader.conv(f"{src}.conv{k}.weight")}
                p[f"bn{k}"], s[f"bn{k}"] = batch_norm(reader, f"{src}.bn{k}")
            if reader.has(f"{src}.downsample.0.weight"):
                p["downsample_conv"] = {"kernel": reader.conv(f"{src}.downsample.0.weight")}
                ds_p, ds_s = batch_norm(reader, f"{src}.downsample.1")
                p["downsample_bn"], s["downsample_bn"] = ds_p, ds_s
            params[dst], stats[dst] = p, s


def resnet_from_torchvision(
    state_dict: Mapping[str, Any], in_channels: int = 4, num_stages: int = 4
) -> dict[str, Tree]:
    """torchvision ResNet weights -> {'params', 'batch_stats'} for `ResNet(in_channels=...)`.

    The extra input channels of conv1 (CRM's mask channel) are zero-filled, as the reference
    does for ImageNet initialisation. `fc.*` is ignored, and so is layer4 when
    num_stages < 4 (CRM's backbone: `num_stages=3`). Unknown or missing keys raise
    `KeyMismatchError`.
    """
    ignore = [r"(^|\.)num_batches_tracked$", r"^fc\."]
    ignore += [rf"^layer{i}\." for i in range(num_stages + 1, 5)]
    reader = StateDictReader(
        strip_module_prefix(state_dict), where="resnet_from_torchvision", ignore=ignore
    )
    params, stats = resnet_tree(reader, num_stages=num_stages, in_channels=in_channels)
    reader.finish()
    return {"params": params, "batch_stats": stats}
