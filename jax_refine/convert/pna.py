"""Official PNA checkpoints (liutinglt/PNA, detectron2) -> Flax variables of `PNASegmentor`.

Full-model key layout (detectron2 `PNASemanticSegmentor`) -> our tree:

    DeepLabV3 variant
    backbone.{stem,res2..res5}.*               -> backbone/...   (convert.detectron2.resnet_tree)
    sem_seg_head.coarse_sem_seg_head.aspp.*    -> coarse_head/aspp/...
    sem_seg_head.coarse_sem_seg_head.predictor -> coarse_head/predictor
    Semantic FPN variant
    backbone.bottom_up.{stem,res*}.*           -> backbone/...
    backbone.fpn_{lateral,output}{k}.*         -> coarse_head/fpn/fpn_{lateral,output}{k}
    sem_seg_head.coarse_sem_seg_head.p{k}.{i}.* -> coarse_head/head/p{k}_{i}
    sem_seg_head.coarse_sem_seg_head.predictor -> coarse_head/head/predictor
    Both
    sem_seg_head.pna_head.patch_embeds.{f}.weight    -> pna_head/patch_embeds_{f}/kernel
    sem_seg_head.pna_head.value_embeds.{f}.weight    -> pna_head/value_embeds_{f}/kernel
    sem_seg_head.pna_head.stages.{f}.blocks.{i}.*    -> pna_head/stages_{f}/blocks_{i}/...
                                                        (convert.attention.pna_layer_tree)
    sem_seg_head.pna_head.conv_seg_layers.{f}.*      -> pna_head/conv_seg_layers_{f}/{kernel,bias}

mmsegmentation-named FCN / PSP heads (the reference's mmsegmentation branch; ConvModule =
`conv` + `bn`): convs.{i} -> convs_{i}, conv_cat -> conv_cat, psp_modules.{i}.1 ->
psp_modules_{i}, bottleneck -> bottleneck, conv_seg -> conv_seg (`.bn` -> `norm`).

Settings that are not stored in a checkpoint and must come from the config: the output
stride and multi-grid of the backbone, the ASPP pooling kernel, the upsample mode.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from jax_refine.convert.attention import pna_layer_tree
from jax_refine.convert.common import StateDictReader
from jax_refine.convert.detectron2 import (
    conv_tree,
    deeplabv3_head_tree,
    fpn_tree,
    norm_tree,
    resnet_tree,
    sem_seg_fpn_head_tree,
    unwrap_checkpoint,
)

Tree = dict[str, Any]
IGNORE = (r"(^|\.)num_batches_tracked$",)
COARSE_HEADS = ("deeplabv3", "semantic_fpn", "fcn", "psp", "aspp")
MMSEG_STAGES = {f"pna{i}": f"res{i + 2}" for i in range(4)}  # mmseg PNAHead stage names


def _conv_module(reader: StateDictReader, key: str) -> tuple[Tree, Tree]:
    """mmcv ConvModule (`conv` without bias, `bn`) -> ConvNorm (params, stats)."""
    norm_params, norm_stats = norm_tree(reader, f"{key}.bn")
    params = {"conv": {"kernel": reader.conv(f"{key}.conv.weight")}, "norm": norm_params}
    return params, {"norm": norm_stats}


def fcn_head_tree(reader: StateDictReader, prefix: str = "") -> tuple[Tree, Tree]:
    """mmsegmentation `FCNHead` keys -> `models.heads.FCNHead` tree."""
    params: Tree = {}
    stats: Tree = {}
    convs = sorted({int(m.group(1)) for k in reader.keys()
                    if (m := re.match(rf"^{re.escape(prefix)}convs\.(\d+)\.conv\.weight$", k))})
    for i in convs or [0]:
        params[f"convs_{i}"], stats[f"convs_{i}"] = _conv_module(reader, f"{prefix}convs.{i}")
    if reader.has(f"{prefix}conv_cat.conv.weight"):
        params["conv_cat"], stats["conv_cat"] = _conv_module(reader, f"{prefix}conv_cat")
    params["conv_seg"] = conv_tree(reader, f"{prefix}conv_seg")
    return params, stats


def psp_head_tree(reader: StateDictReader, prefix: str = "") -> tuple[Tree, Tree]:
    """mmsegmentation `PSPHead` keys -> `models.heads.PSPHead` tree."""
    params: Tree = {}
    stats: Tree = {}
    scales = sorted({int(m.group(1)) for k in reader.keys()
                     if (m := re.match(rf"^{re.escape(prefix)}psp_modules\.(\d+)\.1\.", k))})
    for i in scales or [0]:
        name = f"psp_modules_{i}"
        params[name], stats[name] = _conv_module(reader, f"{prefix}psp_modules.{i}.1")
    params["bottleneck"], stats["bottleneck"] = _conv_module(reader, f"{prefix}bottleneck")
    params["conv_seg"] = conv_tree(reader, f"{prefix}conv_seg")
    return params, stats


def aspp_head_tree(reader: StateDictReader, prefix: str = "") -> tuple[Tree, Tree]:
    """mmsegmentation `ASPPHead` keys -> `models.heads.ASPPHead` tree (image_pool.1 ->
    image_pool: index 0 of mmseg's Sequential is the parameter-free pooling)."""
    params: Tree = {}
    stats: Tree = {}
    params["image_pool"], stats["image_pool"] = _conv_module(reader, f"{prefix}image_pool.1")
    branches = sorted({int(m.group(1)) for k in reader.keys()
                       if (m := re.match(rf"^{re.escape(prefix)}aspp_modules\.(\d+)\.", k))})
    for i in branches or [0]:
        name = f"aspp_modules_{i}"
        params[name], stats[name] = _conv_module(reader, f"{prefix}aspp_modules.{i}")
    params["bottleneck"], stats["bottleneck"] = _conv_module(reader, f"{prefix}bottleneck")
    params["conv_seg"] = conv_tree(reader, f"{prefix}conv_seg")
    return params, stats


def coarse_head_variables(
    state_dict: Mapping[str, Any], kind: str, prefix: str = "", fpn_prefix: str | None = None
) -> dict[str, Tree]:
    """A coarse head's state_dict -> {'params', 'batch_stats'} of the matching head.

    Args:
      state_dict: keys of the head under `prefix` (others are ignored).
      kind: 'deeplabv3' (`DeepLabV3Head`), 'semantic_fpn' (`SemanticFPNHead`: the FPN keys
        `fpn_lateral{k}`/`fpn_output{k}` under `fpn_prefix`, default `prefix`), 'fcn'
        (`FCNHead`), 'psp' (`PSPHead`) or 'aspp' (mmseg `ASPPHead`).
    """
    if kind not in COARSE_HEADS:
        raise ValueError(f"kind must be one of {COARSE_HEADS}, got {kind!r}")
    state_dict = unwrap_checkpoint(state_dict)
    if kind == "semantic_fpn":
        fpn_prefix = prefix if fpn_prefix is None else fpn_prefix
        fpn_reader = StateDictReader(state_dict, fpn_prefix, where="coarse_head_variables",
                                     ignore=IGNORE + (r"^(?!fpn_)",))
        fpn_p, fpn_s = fpn_tree(fpn_reader)
        fpn_reader.finish()
        reader = StateDictReader(state_dict, prefix, where="coarse_head_variables",
                                 ignore=IGNORE + (r"^fpn_",))
        head_p, head_s = sem_seg_fpn_head_tree(reader)
        reader.finish()
        params = {"fpn": fpn_p, "head": head_p}
        stats = {k: v for k, v in (("fpn", fpn_s), ("head", head_s)) if v}
        return {"params": params, "batch_stats": stats}
    tree = {"deeplabv3": deeplabv3_head_tree, "fcn": fcn_head_tree, "psp": psp_head_tree,
            "aspp": aspp_head_tree}[kind]
    reader = StateDictReader(state_dict, prefix, where="coarse_head_variables", ignore=IGNORE)
    params, stats = tree(reader)
    reader.finish()
    return {"params": params, "batch_stats": stats}


def _features(reader: StateDictReader, prefix: str) -> list[str]:
    pattern = re.compile(rf"^{re.escape(prefix)}patch_embeds\.([^.]+)\.weight$")
    return sorted({m.group(1) for k in reader.keys() if (m := pattern.match(k))})


def _embed_tree(reader: StateDictReader, key: str) -> Tree:
    """A 1x1 embedding conv (bias in mmseg's head, none in detectron2's)."""
    tree = {"kernel": reader.conv(f"{key}.weight")}
    if reader.has(f"{key}.bias"):
        tree["bias"] = reader.get(f"{key}.bias")
    return tree


def pna_head_tree(reader: StateDictReader, prefix: str = "") -> Tree:
    """PNA head keys under `prefix` -> params of `models.pna.PNAHead`.

    detectron2's head names its stages by feature (`res2`..`res5`); mmseg's by input index
    (`pna0`..`pna3`, pna{i} = res{i+2}, `MMSEG_STAGES`) and its embeddings have a bias.
    """
    params: Tree = {}
    features = _features(reader, prefix) or ["res2", "res3", "res4", "res5"]
    for key in features:
        f = MMSEG_STAGES.get(key, key)
        params[f"patch_embeds_{f}"] = _embed_tree(reader, f"{prefix}patch_embeds.{key}")
        params[f"value_embeds_{f}"] = _embed_tree(reader, f"{prefix}value_embeds.{key}")
        params[f"conv_seg_layers_{f}"] = conv_tree(reader, f"{prefix}conv_seg_layers.{key}")
        stage: Tree = {}
        block_re = re.compile(rf"^{re.escape(prefix)}stages\.{re.escape(key)}\.blocks\.(\d+)\.")
        blocks = sorted({int(m.group(1)) for k in reader.keys() if (m := block_re.match(k))})
        if not blocks:
            reader.get(f"{prefix}stages.{key}.blocks.0.*")  # recorded as missing
        for i in blocks:
            stage[f"blocks_{i}"] = pna_layer_tree(reader, f"{prefix}stages.{key}.blocks.{i}.")
        params[f"stages_{f}"] = stage
    return params


def pna_head_params(state_dict: Mapping[str, Any], prefix: str = "") -> Tree:
    """The PNA head part of a state_dict (keys `{prefix}patch_embeds.res2.weight`, ...;
    `prefix='sem_seg_head.pna_head.'` inside a full checkpoint) -> `PNAHead` params.

    Unknown or missing keys below `prefix` raise `KeyMismatchError`.
    """
    state_dict = unwrap_checkpoint(state_dict)
    reader = StateDictReader(
        {k: v for k, v in state_dict.items() if k.startswith(prefix)},
        where="pna_head_params",
        ignore=IGNORE,
    )
    params = pna_head_tree(reader, prefix)
    reader.finish()
    return params


def coarse_head_kind(state_dict: Mapping[str, Any]) -> str:
    """'deeplabv3' or 'semantic_fpn' for a full official checkpoint."""
    keys = unwrap_checkpoint(state_dict)
    if "sem_seg_head.coarse_sem_seg_head.aspp.project.weight" in keys:
        return "deeplabv3"
    if any(k.startswith("backbone.fpn_lateral") for k in keys):
        return "semantic_fpn"
    raise ValueError("cannot tell the coarse head (neither ASPP nor FPN keys found)")


def pna_variables(state_dict: Mapping[str, Any]) -> dict[str, Tree]:
    """A full official PNA checkpoint (DeepLabV3 or Semantic FPN variant) ->
    {'params', 'batch_stats'} of `models.pna.PNASegmentor` (backbone, coarse_head, pna_head).

    Every key must be used: unknown or missing keys raise one `KeyMismatchError` listing them.
    """
    state_dict = unwrap_checkpoint(state_dict)
    kind = coarse_head_kind(state_dict)
    reader = StateDictReader(state_dict, where="pna_variables", ignore=IGNORE)
    coarse = "sem_seg_head.coarse_sem_seg_head."
    if kind == "deeplabv3":
        backbone = resnet_tree(reader, "backbone.")
        head_p, head_s = deeplabv3_head_tree(reader, coarse)
    else:
        backbone = resnet_tree(reader, "backbone.bottom_up.")
        fpn_p, fpn_s = fpn_tree(reader, "backbone.")
        sem_p, sem_s = sem_seg_fpn_head_tree(reader, coarse)
        head_p = {"fpn": fpn_p, "head": sem_p}
        head_s = {k: v for k, v in (("fpn", fpn_s), ("head", sem_s)) if v}
    pna = pna_head_tree(reader, "sem_seg_head.pna_head.")
    reader.finish()
    params = {"backbone": backbone[0], "coarse_head": head_p, "pna_head": pna}
    stats: Tree = {"backbone": backbone[1]}
    if head_s:
        stats["coarse_head"] = head_s
    return {"params": params, "batch_stats": stats}


def pna_config(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """What a full checkpoint tells about its model: coarse head kind, ResNet depth, stem,
    num_classes, embed_dims and window sizes (from the relative-position-bias shapes) and
    whether the self-aggregation module is present. Output stride, multi-grid, ASPP pooling
    kernel and upsample mode are NOT stored and must be taken from the config."""
    sd = unwrap_checkpoint(state_dict)
    kind = coarse_head_kind(sd)
    base = "backbone." if kind == "deeplabv3" else "backbone.bottom_up."
    res4_re = re.compile(rf"^{re.escape(base)}res4\.(\d+)\.")
    res4 = {m.group(1) for k in sd if (m := res4_re.match(k))}
    head = "sem_seg_head.pna_head."
    features = ["res2", "res3", "res4", "res5"]
    rpb = [k for k in sd if k.startswith(f"{head}stages.") and k.endswith(".rpb")]
    windows = []
    for f in features:
        keys = [k for k in rpb if k.startswith(f"{head}stages.{f}.blocks.0.")]
        windows.append((int(sd[keys[0]].shape[-1]) + 1) // 2 if keys else None)
    predictor = [k for k in sd if k.startswith(f"{head}conv_seg_layers.") and k.endswith("bias")]
    return {
        "coarse_head": kind,
        "depth": 50 if len(res4) == 6 else 101 if len(res4) == 23 else len(res4),
        "stem": "deeplab" if f"{base}stem.conv3.weight" in sd else "torchvision",
        "num_classes": int(sd[predictor[0]].shape[0]) if predictor else None,
        "embed_dims": tuple(int(sd[f"{head}patch_embeds.{f}.weight"].shape[0]) for f in features),
        "window_sizes": tuple(windows),
        "use_sa": any(".atten1." in k for k in sd if k.startswith(f"{head}stages.")),
    }
