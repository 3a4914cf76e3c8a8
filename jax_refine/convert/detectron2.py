"""detectron2-layout state_dicts -> Flax trees (ResNet backbones, ASPP/DeepLabV3, FPN heads).

ResNet (`build_resnet_deeplab_backbone` / `build_resnet_backbone` keys) -> our
`models.backbones.resnet.ResNet` (torchvision-style names); conv weights OIHW -> HWIO,
norm weight -> scale, running_mean/var -> batch_stats mean/var:

    stem.conv1.weight (+ .norm.*)          -> conv1/kernel, bn1   (BasicStem 7x7, or DeepLab
    stem.conv{2,3}.weight (+ .norm.*)      -> conv{2,3}, bn{2,3}   stem's three 3x3 convs)
    res{k}.{j}.conv{c}.weight (+ .norm.*)  -> layer{k-1}_{j}/conv{c}/kernel, bn{c}
    res{k}.{j}.shortcut.weight (+ .norm.*) -> layer{k-1}_{j}/downsample_conv, downsample_bn

detectron2 `Conv2d(norm=...)` modules -> our `models.heads.ConvNorm` (`<name>/conv`,
`<name>/norm`):

    {key}.weight / {key}.bias              -> {name}/conv/kernel / bias
    {key}.norm.{weight,bias}               -> {name}/norm/{scale,bias}   (BN or GN)
    {key}.norm.{running_mean,running_var}  -> batch_stats {name}/norm/{mean,var}   (BN)

DeepLabV3 head (`models.heads.DeepLabV3Head`): aspp.convs.{0..3} -> aspp/convs_{i};
aspp.convs.4.1 (the image-pooling conv after the pool at index 0) -> aspp/convs_4;
aspp.project -> aspp/project; predictor -> predictor.
FPN (`models.heads.FPN`): fpn_lateral{k} / fpn_output{k} -> same names.
SemSegFPNHead (`models.heads.SemSegFPNHead`): p{k}.{i} -> p{k}_{i}; predictor -> predictor.

FrozenBatchNorm2d, BatchNorm2d and SyncBatchNorm share the key names; detectron2's
`DetectionCheckpointer` files hold the state_dict under 'model' (see `unwrap_checkpoint`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from jax_refine.convert.common import StateDictReader, key_indices, strip_module_prefix

Tree = dict[str, Any]


def unwrap_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """A detectron2 checkpoint ({'model': state_dict, ...}) or a bare state_dict -> state_dict.

    Also drops a DataParallel `module.` prefix and detectron2 bookkeeping entries such as
    '__author__' / 'matching_heuristics' (non-array values).
    """
    if "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        checkpoint = checkpoint["model"]
    state_dict = {
        k: v for k, v in checkpoint.items() if hasattr(v, "shape") and not k.startswith("__")
    }
    return strip_module_prefix(state_dict)


def norm_tree(reader: StateDictReader, key: str) -> tuple[Tree, Tree]:
    """Norm at `key` (BatchNorm-like with running stats, or GroupNorm) -> (params, stats)."""
    params = {"scale": reader.get(f"{key}.weight"), "bias": reader.get(f"{key}.bias")}
    stats: Tree = {}
    if reader.has(f"{key}.running_mean"):
        stats = {"mean": reader.get(f"{key}.running_mean"), "var": reader.get(f"{key}.running_var")}
    return params, stats


def conv_norm_tree(reader: StateDictReader, key: str) -> tuple[Tree, Tree]:
    """detectron2 `Conv2d` at `key` (weight, optional bias, optional `.norm`) -> ConvNorm tree."""
    conv = {"kernel": reader.conv(f"{key}.weight")}
    if reader.has(f"{key}.bias"):
        conv["bias"] = reader.get(f"{key}.bias")
    params: Tree = {"conv": conv}
    stats: Tree = {}
    if reader.has(f"{key}.norm.weight"):
        params["norm"], norm_stats = norm_tree(reader, f"{key}.norm")
        if norm_stats:
            stats["norm"] = norm_stats
    return params, stats


def conv_tree(reader: StateDictReader, key: str) -> Tree:
    """A plain conv with bias (`predictor`) -> {'kernel', 'bias'}."""
    return {"kernel": reader.conv(f"{key}.weight"), "bias": reader.get(f"{key}.bias")}


def _put(params: Tree, stats: Tree, name: str, tree: tuple[Tree, Tree]) -> None:
    params[name] = tree[0]
    if tree[1]:
        stats[name] = tree[1]


def _resnet_conv(reader: StateDictReader, key: str) -> tuple[Tree, Tree]:
    """A ResNet conv with its `.norm` -> (kernel, (norm params, norm stats))."""
    kernel = reader.conv(f"{key}.weight")
    return kernel, norm_tree(reader, f"{key}.norm")


def resnet_tree(reader: StateDictReader, prefix: str = "") -> tuple[Tree, Tree]:
    """detectron2 ResNet keys under `prefix` -> (params, batch_stats) of our ResNet.

    The stem type (basic: `stem.conv1` only; deeplab: `stem.conv1..3`) and the number of
    blocks per stage are read off the keys; a stage without blocks is reported missing.
    """
    p = re.escape(prefix)
    params: Tree = {}
    stats: Tree = {}
    stem_convs = key_indices(reader.keys(), rf"^{p}stem\.conv(\d+)\.weight$") or [1]
    for c in stem_convs:
        kernel, (norm_p, norm_s) = _resnet_conv(reader, f"{prefix}stem.conv{c}")
        params[f"conv{c}"] = {"kernel": kernel}
        params[f"bn{c}"], stats[f"bn{c}"] = norm_p, norm_s
    for k in range(2, 6):
        blocks = key_indices(reader.keys(), rf"^{p}res{k}\.(\d+)\.conv1\.weight$") or [0]
        for j in range(max(blocks) + 1):
            src, dst = f"{prefix}res{k}.{j}", f"layer{k - 1}_{j}"
            bp: Tree = {}
            bs: Tree = {}
            for c in (1, 2, 3):
                kernel, (bp[f"bn{c}"], bs[f"bn{c}"]) = _resnet_conv(reader, f"{src}.conv{c}")
                bp[f"conv{c}"] = {"kernel": kernel}
            if reader.has(f"{src}.shortcut.weight"):
                kernel, (bp["downsample_bn"], bs["downsample_bn"]) = _resnet_conv(
                    reader, f"{src}.shortcut"
                )
                bp["downsample_conv"] = {"kernel": kernel}
            params[dst], stats[dst] = bp, bs
    return params, stats


def resnet_from_detectron2(state_dict: Mapping[str, Any], prefix: str = "") -> dict[str, Tree]:
    """detectron2 ResNet weights (e.g. DeepLab's R-52/R-103 ImageNet files, or the
    `backbone.` / `backbone.bottom_up.` part of a trained model: pass that `prefix`) ->
    {'params', 'batch_stats'} for `models.pna.deeplab_resnet(...)` / our `ResNet`.

    Keys outside the ResNet (other prefixes; `linear.*`/`fc.*` classifiers) are ignored;
    missing or unknown ResNet keys raise `KeyMismatchError`.
    """
    state_dict = unwrap_checkpoint(state_dict)
    # Below `prefix` only the ResNet's own keys are checked ('backbone.' also holds the FPN).
    ignore = [r"(^|\.)num_batches_tracked$", r"^(?!(stem|res[2-5])\.)"]
    reader = StateDictReader(state_dict, prefix, where="resnet_from_detectron2", ignore=ignore)
    params, stats = resnet_tree(reader)
    reader.finish()
    return {"params": params, "batch_stats": stats}


def deeplabv3_head_tree(reader: StateDictReader, prefix: str = "") -> tuple[Tree, Tree]:
    """PNA's `DeepLabV3_PNA_Head` keys under `prefix` -> `models.heads.DeepLabV3Head` tree."""
    aspp_p: Tree = {}
    aspp_s: Tree = {}
    for i in range(4):
        _put(aspp_p, aspp_s, f"convs_{i}", conv_norm_tree(reader, f"{prefix}aspp.convs.{i}"))
    _put(aspp_p, aspp_s, "convs_4", conv_norm_tree(reader, f"{prefix}aspp.convs.4.1"))
    _put(aspp_p, aspp_s, "project", conv_norm_tree(reader, f"{prefix}aspp.project"))
    params = {"aspp": aspp_p, "predictor": conv_tree(reader, f"{prefix}predictor")}
    return params, ({"aspp": aspp_s} if aspp_s else {})


def fpn_tree(reader: StateDictReader, prefix: str = "") -> tuple[Tree, Tree]:
    """FPN keys `{prefix}fpn_lateral{k}` / `fpn_output{k}` -> `models.heads.FPN` tree."""
    params: Tree = {}
    stats: Tree = {}
    levels = (key_indices(reader.keys(), rf"^{re.escape(prefix)}fpn_lateral(\d+)\.weight$")
              or [2, 3, 4, 5])
    for k in levels:
        for kind in ("lateral", "output"):
            name = f"fpn_{kind}{k}"
            _put(params, stats, name, conv_norm_tree(reader, f"{prefix}{name}"))
    return params, stats


def sem_seg_fpn_head_tree(reader: StateDictReader, prefix: str = "") -> tuple[Tree, Tree]:
    """detectron2 `SemSegFPNHead` keys under `prefix` -> `models.heads.SemSegFPNHead` tree."""
    params: Tree = {}
    stats: Tree = {}
    for k in (2, 3, 4, 5):
        indices = key_indices(reader.keys(), rf"^{re.escape(prefix)}p{k}\.(\d+)\.weight$") or [0]
        for i in indices:
            _put(params, stats, f"p{k}_{i}", conv_norm_tree(reader, f"{prefix}p{k}.{i}"))
    params["predictor"] = conv_tree(reader, f"{prefix}predictor")
    return params, stats
