"""Official PNA checkpoints (liutinglt/PNA: detectron2 and mmsegmentation branches) -> Flax
variables of `PNASegmentor`; `checkpoint_layout` tells the two apart.

detectron2 layout (`PNASemanticSegmentor`) -> our tree:

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

mmseg layout (`CascadeEncoderDecoder`, mmcv 'state_dict' wrapper) -> our tree:

    backbone.*                 -> backbone/...      (convert.mmseg.resnet_v1c_tree, or
                                                     convert.swin.swin_params for a Swin)
    decode_head.0.*            -> coarse_head/...   (mmseg FCN / PSP / ASPP head, convert.mmseg)
    decode_head.1.{patch_embeds,value_embeds}.pna{i}.{weight,bias}
                               -> pna_head/{patch,value}_embeds_res{i+2}/{kernel,bias}
    decode_head.1.stages.pna{i}.blocks.{j}.* / conv_seg_layers.pna{i}.*
                               -> pna_head/stages_res{i+2}/blocks_{j}/... / conv_seg_layers_res{i+2}
    auxiliary_head.*           -> auxiliary_head/... (mmseg FCNHead)

Settings that are not stored in a checkpoint and must come from the config: the output
stride and multi-grid of the backbone, the ASPP pooling kernel, the upsample mode.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from jax_refine.convert.attention import pna_layer_tree
from jax_refine.convert.common import StateDictReader, key_indices
from jax_refine.convert.detectron2 import (
    conv_tree,
    deeplabv3_head_tree,
    fpn_tree,
    resnet_tree,
    sem_seg_fpn_head_tree,
    unwrap_checkpoint,
)
from jax_refine.convert.mmseg import (
    MMSEG_HEAD_TREES,
    fcn_head_tree,
    mmseg_head_kind,
    resnet_v1c_tree,
    unwrap_mmcv_checkpoint,
)
from jax_refine.convert.swin import IGNORE as SWIN_IGNORE
from jax_refine.convert.swin import swin_config, swin_params
from jax_refine.models.backbones.swin import SWIN_B, SWIN_T

Tree = dict[str, Any]
IGNORE = (r"(^|\.)num_batches_tracked$",)
COARSE_HEADS = ("deeplabv3", "semantic_fpn", "fcn", "psp", "aspp")
MMSEG_STAGES = {f"pna{i}": f"res{i + 2}" for i in range(4)}  # mmseg PNAHead stage names


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
    tree = {"deeplabv3": deeplabv3_head_tree, **MMSEG_HEAD_TREES}[kind]
    reader = StateDictReader(state_dict, prefix, where="coarse_head_variables", ignore=IGNORE)
    params, stats = tree(reader)
    reader.finish()
    return {"params": params, "batch_stats": stats}


def _features(reader: StateDictReader, prefix: str) -> list[str]:
    pattern = re.compile(rf"^{re.escape(prefix)}patch_embeds\.([^.]+)\.weight$")
    return sorted({m.group(1) for k in reader.keys() if (m := pattern.match(k))})


def _embed_tree(reader: StateDictReader, key: str, bias: bool | None) -> Tree:
    """A 1x1 embedding conv: bias in mmseg's head (True), none in detectron2's (False; a
    bias key is then unexpected), or as found (None)."""
    tree = {"kernel": reader.conv(f"{key}.weight")}
    if bias or (bias is None and reader.has(f"{key}.bias")):
        tree["bias"] = reader.get(f"{key}.bias")
    return tree


def pna_head_tree(reader: StateDictReader, prefix: str = "",
                  embed_bias: bool | None = None) -> Tree:
    """PNA head keys under `prefix` -> params of `models.pna.PNAHead`.

    detectron2's head names its stages by feature (`res2`..`res5`); mmseg's by input index
    (`pna0`..`pna3`, pna{i} = res{i+2}, `MMSEG_STAGES`) and its embeddings have a bias
    (`embed_bias`: True / False = required / absent, None = as found).
    """
    params: Tree = {}
    features = _features(reader, prefix) or ["res2", "res3", "res4", "res5"]
    for key in features:
        f = MMSEG_STAGES.get(key, key)
        params[f"patch_embeds_{f}"] = _embed_tree(reader, f"{prefix}patch_embeds.{key}",
                                                  embed_bias)
        params[f"value_embeds_{f}"] = _embed_tree(reader, f"{prefix}value_embeds.{key}",
                                                  embed_bias)
        params[f"conv_seg_layers_{f}"] = conv_tree(reader, f"{prefix}conv_seg_layers.{key}")
        stage: Tree = {}
        blocks = key_indices(reader.keys(),
                             rf"^{re.escape(prefix)}stages\.{re.escape(key)}\.blocks\.(\d+)\.")
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


MMSEG_PNA = "decode_head.1."  # mmseg CascadeEncoderDecoder: decode_head.0 = coarse head


def checkpoint_layout(state_dict: Mapping[str, Any]) -> str:
    """'mmseg' (the reference's mmsegmentation branch: decode_head.1 = PNAHead) or
    'detectron2' (sem_seg_head.pna_head) for a full PNA checkpoint (already unwrapped)."""
    if any(k.startswith(f"{MMSEG_PNA}patch_embeds.") for k in state_dict):
        return "mmseg"
    if any(k.startswith("sem_seg_head.pna_head.") for k in state_dict):
        return "detectron2"
    raise ValueError("not a PNA checkpoint: neither detectron2 (sem_seg_head.pna_head.*) nor "
                     f"mmseg (decode_head.1.patch_embeds.*) keys; first keys "
                     f"{sorted(state_dict)[:5]}")


def _unwrap_any(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """detectron2 ('model') or mmcv ('state_dict') checkpoint -> its state_dict."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        return unwrap_mmcv_checkpoint(state_dict)
    return unwrap_checkpoint(state_dict)


def _swin_kind(state_dict: Mapping[str, Any]) -> str | None:
    """'swin' for an mmseg Swin backbone under 'backbone.', None for a ResNet."""
    return "swin" if "backbone.patch_embed.projection.weight" in state_dict else None


def _swin_build(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """build_pna's `backbone` ('swin_t' / 'swin_b') and, for a non-standard network,
    `backbone_kwargs` (the fields `convert.swin.swin_config` reads off the keys)."""
    found = swin_config(state_dict)
    for name, settings in (("swin_t", SWIN_T), ("swin_b", SWIN_B)):
        if all(found[k] == settings[k] for k in ("embed_dims", "depths", "num_heads",
                                                 "window_size")):
            return {"backbone": name}
    keys = ("embed_dims", "depths", "num_heads", "window_size")
    return {"backbone": "swin_t", "backbone_kwargs": {k: found[k] for k in keys}}


def mmseg_pna_variables(state_dict: Mapping[str, Any]) -> dict[str, Tree]:
    """A full mmseg PNA checkpoint (`CascadeEncoderDecoder`: backbone.* a ResNetV1c or a Swin,
    decode_head.0.* the coarse FCN / PSP / ASPP head, decode_head.1.* the PNA head,
    auxiliary_head.* the auxiliary FCN) -> {'params', 'batch_stats'} of
    `build_pna(..., pna_head='mmseg')`.

    Every key must be used: unknown or missing keys raise one `KeyMismatchError` listing them.
    """
    sd = _unwrap_any(state_dict)
    params: Tree = {}
    stats: Tree = {}
    if _swin_kind(sd):
        backbone = StateDictReader(sd, "backbone.", where="mmseg_pna_variables (Swin)",
                                   ignore=SWIN_IGNORE)
        params["backbone"] = swin_params(backbone)
        backbone.finish()
        reader = StateDictReader(sd, where="mmseg_pna_variables",
                                 ignore=IGNORE + (r"^backbone\.",))
    else:
        reader = StateDictReader(sd, where="mmseg_pna_variables", ignore=IGNORE)
        params["backbone"], stats["backbone"] = resnet_v1c_tree(reader, "backbone.")
    kind = mmseg_head_kind(sd, "decode_head.0.")
    params["coarse_head"], stats["coarse_head"] = MMSEG_HEAD_TREES[kind](reader,
                                                                         "decode_head.0.")
    params["pna_head"] = pna_head_tree(reader, MMSEG_PNA, embed_bias=True)
    if any(k.startswith("auxiliary_head.") for k in sd):
        params["auxiliary_head"], stats["auxiliary_head"] = fcn_head_tree(reader,
                                                                          "auxiliary_head.")
    reader.finish()
    return {"params": params, "batch_stats": stats}


def pna_variables(state_dict: Mapping[str, Any]) -> dict[str, Tree]:
    """A full official PNA checkpoint -> {'params', 'batch_stats'} of
    `models.pna.PNASegmentor` (backbone, coarse_head, pna_head[, auxiliary_head]).

    Both references' layouts are read (`checkpoint_layout`): detectron2 (DeepLabV3 or
    Semantic FPN variant) and mmseg (`mmseg_pna_variables`). Every key must be used: unknown
    or missing keys raise one `KeyMismatchError` listing them.
    """
    state_dict = _unwrap_any(state_dict)
    if checkpoint_layout(state_dict) == "mmseg":
        return mmseg_pna_variables(state_dict)
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
    pna = pna_head_tree(reader, "sem_seg_head.pna_head.", embed_bias=False)
    reader.finish()
    params = {"backbone": backbone[0], "coarse_head": head_p, "pna_head": pna}
    stats: Tree = {"backbone": backbone[1]}
    if head_s:
        stats["coarse_head"] = head_s
    return {"params": params, "batch_stats": stats}


def _windows(sd: Mapping[str, Any], head: str, stages: Sequence[str]) -> tuple[int | None, ...]:
    """PNA windows from the relative-position-bias shapes (2L - 1) of each stage."""
    rpb = [k for k in sd if k.startswith(f"{head}stages.") and k.endswith(".rpb")]
    windows = []
    for f in stages:
        keys = [k for k in rpb if k.startswith(f"{head}stages.{f}.blocks.0.")]
        windows.append((int(sd[keys[0]].shape[-1]) + 1) // 2 if keys else None)
    return tuple(windows)


def _resnet_depth(sd: Mapping[str, Any], res4_prefix: str) -> int:
    res4_re = re.compile(rf"^{re.escape(res4_prefix)}(\d+)\.")
    res4 = {m.group(1) for k in sd if (m := res4_re.match(k))}
    return 50 if len(res4) == 6 else 101 if len(res4) == 23 else len(res4)


def _v1c_config(sd: Mapping[str, Any]) -> dict[str, Any]:
    """depth, width (mmseg stem_channels) and, for a non-standard network, stage_sizes of an
    mmseg ResNetV1c under 'backbone.'."""
    sizes = []
    for i in range(1, 5):
        block_re = re.compile(rf"^backbone\.layer{i}\.(\d+)\.")
        sizes.append(len({m.group(1) for k in sd if (m := block_re.match(k))}))
    bottleneck = "backbone.layer1.0.conv3.weight" in sd
    official = {(3, 4, 6, 3): 50 if bottleneck else 34, (3, 4, 23, 3): 101, (2, 2, 2, 2): 18}
    found: dict[str, Any] = {"depth": official.get(tuple(sizes), 50 if bottleneck else 18),
                             "width": int(sd["backbone.stem.6.weight"].shape[0])}
    if tuple(sizes) not in official:
        found["backbone_kwargs"] = {"stage_sizes": tuple(sizes)}
    return found


def _mmseg_widths(sd: Mapping[str, Any], kind: str, auxiliary: bool) -> dict[str, Any]:
    """Coarse / auxiliary head widths (`channels`) where they differ from the official ones
    (512 / 256), as `head_kwargs` / `aux_head_kwargs`."""
    found: dict[str, Any] = {}
    channels = int(sd["decode_head.0.conv_seg.weight"].shape[1])
    if channels != 512:
        found["head_kwargs"] = {"channels": channels}
    if auxiliary:
        aux = int(sd["auxiliary_head.conv_seg.weight"].shape[1])
        if aux != 256:
            found["aux_head_kwargs"] = {"channels": aux}
    return found


def _head_config(sd: Mapping[str, Any], head: str, stages: Sequence[str]) -> dict[str, Any]:
    predictor = [k for k in sd if k.startswith(f"{head}conv_seg_layers.") and k.endswith("bias")]
    return {
        "num_classes": int(sd[predictor[0]].shape[0]) if predictor else None,
        "embed_dims": tuple(int(sd[f"{head}patch_embeds.{f}.weight"].shape[0]) for f in stages),
        "window_sizes": _windows(sd, head, stages),
        "use_sa": any(".atten1." in k for k in sd if k.startswith(f"{head}stages.")),
    }


def pna_config(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """What a full checkpoint tells about its model, as `build_pna` keyword arguments:
    coarse head kind, backbone (and ResNet depth, stem), num_classes, embed_dims and window
    sizes (from the relative-position-bias shapes), whether the self-aggregation module is
    present; for mmseg checkpoints also pna_head='mmseg' and auxiliary_head. Output stride,
    multi-grid, ASPP pooling kernel and upsample mode are NOT stored: they follow the
    variant (`models.pna.VARIANTS`) or must be taken from the config."""
    sd = _unwrap_any(state_dict)
    if checkpoint_layout(sd) == "mmseg":
        found = {
            "coarse_head": mmseg_head_kind(sd, "decode_head.0."),
            "pna_head": "mmseg",
            "auxiliary_head": any(k.startswith("auxiliary_head.") for k in sd),
            **_head_config(sd, MMSEG_PNA, list(MMSEG_STAGES)),
        }
        found.update(_swin_build(sd) if _swin_kind(sd) else
                     {"backbone": "resnet_v1c", **_v1c_config(sd)})
        found.update(_mmseg_widths(sd, found["coarse_head"], found["auxiliary_head"]))
        return found
    kind = coarse_head_kind(sd)
    base = "backbone." if kind == "deeplabv3" else "backbone.bottom_up."
    return {
        "coarse_head": kind,
        "depth": _resnet_depth(sd, f"{base}res4."),
        "stem": "deeplab" if f"{base}stem.conv3.weight" in sd else "torchvision",
        **_head_config(sd, "sem_seg_head.pna_head.", ["res2", "res3", "res4", "res5"]),
    }
