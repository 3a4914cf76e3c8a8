"""Swin Transformer checkpoints -> Flax params of `models.backbones.swin.SwinTransformer`.

Two layouts are read (torch never required):

* mmsegmentation (`SwinTransformer` in a segmentor checkpoint under `backbone.`, or bare, e.g.
  openmmlab's converted `swin_{tiny,base}_patch4_window7_224_*.pth` pretrain files);
* the original Microsoft ImageNet checkpoints (`swin_tiny_patch4_window7_224.pth`: keys under
  'model', `layers.{i}.blocks.{j}.attn.qkv.weight`, ...), first renamed to the mmseg layout by
  `swin_from_microsoft` — the mapping of mmseg's `tools/model_converters/swin2mmseg.py`.

mmseg key -> Flax path (Linear weight (O, I) -> Dense kernel (I, O); conv OIHW -> HWIO;
LayerNorm weight -> scale):

    patch_embed.projection.{weight,bias}          -> patch_embed/projection/{kernel,bias}
    patch_embed.norm.*                             -> patch_embed/norm/*
    stages.{i}.blocks.{j}.norm{1,2}.*              -> stages_{i}/blocks_{j}/norm{1,2}/*
    stages.{i}.blocks.{j}.attn.w_msa.relative_position_bias_table
                                                   -> .../attn/w_msa/relative_position_bias_table
    stages.{i}.blocks.{j}.attn.w_msa.{qkv,proj}.*  -> .../attn/w_msa/{qkv,proj}/*
    stages.{i}.blocks.{j}.ffn.layers.0.0.*         -> .../ffn/layers_0_0/*
    stages.{i}.blocks.{j}.ffn.layers.1.*           -> .../ffn/layers_1/*
    stages.{i}.downsample.{norm,reduction}.*       -> stages_{i}/downsample/{norm,reduction}/*
    norm{i}.*                                      -> norm{i}/*

Skipped: the `relative_position_index` buffers (fixed by the window size), the original's
`attn_mask` buffers, its classifier `head.*` and its final `norm.*` (mmseg has no such module).
ImageNet checkpoints have no output norms `norm0..norm3`: when none is present they are set to
the identity (scale 1, bias 0), which is what mmseg's non-strict loading leaves them at.
Any other missing or unexpected key raises `KeyMismatchError`. A relative position bias table
of another window size is not interpolated (mmseg resizes it bicubically): `check_shapes`
against the model then reports it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jax_refine.convert.common import StateDictReader, key_indices, strip_module_prefix

Tree = dict[str, Any]
IGNORE = (r"\.relative_position_index$", r"\.attn_mask$", r"^head\.", r"^norm\.")


def unfold_order(x: np.ndarray) -> np.ndarray:
    """Reorder the 4C axis (the last) of an original-Swin PatchMerging tensor to mmseg's.

    The original concatenates the 2x2 patch as x0 (row 0, col 0), x1 (row 1, col 0),
    x2 (row 0, col 1), x3 (row 1, col 1): index k * C + c. mmseg's nn.Unfold orders it
    c * 4 + 2 * row + col. Works on the `reduction` weight [2C, 4C] and `norm` vectors [4C].
    """
    *lead, four_c = x.shape
    parts = x.reshape(*lead, 4, four_c // 4)[..., [0, 2, 1, 3], :]  # (row, col) row-major
    return np.swapaxes(parts, -1, -2).reshape(*lead, four_c)


def swin_from_microsoft(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Original Swin (Microsoft) keys -> mmseg keys, as mmseg's `swin2mmseg.py` converts them.

    layers.{i} -> stages.{i}; blocks' attn.* -> attn.w_msa.*; mlp.fc1 -> ffn.layers.0.0;
    mlp.fc2 -> ffn.layers.1; downsample.reduction / downsample.norm reordered by
    `unfold_order`; patch_embed.proj -> patch_embed.projection; head.* dropped; the rest
    (norm.*, attn_mask buffers) keep their names. Values become numpy arrays.
    """
    from jax_refine.convert.common import to_numpy

    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        value = to_numpy(value)
        if key.startswith("head."):
            continue
        if key.startswith("layers."):
            key = key.replace("layers.", "stages.", 1)
            key = re.sub(r"\.attn\.", ".attn.w_msa.", key)
            key = key.replace(".mlp.fc1.", ".ffn.layers.0.0.")
            key = key.replace(".mlp.fc2.", ".ffn.layers.1.")
            if re.search(r"\.downsample\.(reduction|norm)\.", key):
                value = unfold_order(value)
        elif key.startswith("patch_embed.proj."):
            key = key.replace("patch_embed.proj.", "patch_embed.projection.", 1)
        out[key] = value
    return out


def _unwrap(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """{'state_dict' | 'model': sd} or sd -> sd, without a DataParallel `module.` prefix."""
    for key in ("state_dict", "model"):
        if isinstance(state_dict.get(key), Mapping):
            state_dict = state_dict[key]
    return strip_module_prefix({k: v for k, v in state_dict.items() if hasattr(v, "shape")})


def swin_layout(state_dict: Mapping[str, Any]) -> str | None:
    """'mmseg' (also under `backbone.`), 'microsoft', or None if `state_dict` is no Swin."""
    keys = _unwrap(state_dict)
    if any(re.match(r"^(backbone\.)?stages\.\d+\.blocks\.\d+\.attn\.w_msa\.", k) for k in keys):
        return "mmseg"
    if any(re.match(r"^layers\.\d+\.blocks\.\d+\.attn\.qkv\.", k) for k in keys):
        return "microsoft"
    return None


def _mmseg_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Any supported checkpoint -> bare mmseg-layout Swin keys (prefix `backbone.` removed)."""
    layout = swin_layout(state_dict)
    state_dict = _unwrap(state_dict)
    if layout == "microsoft":
        return swin_from_microsoft(state_dict)
    if layout == "mmseg" and any(k.startswith("backbone.") for k in state_dict):
        return {k[len("backbone."):]: v for k, v in state_dict.items()
                if k.startswith("backbone.")}
    if layout is None:
        raise ValueError(f"not a Swin Transformer checkpoint (mmseg `stages.*.attn.w_msa` or "
                         f"Microsoft `layers.*.attn.qkv` keys); first keys: "
                         f"{sorted(state_dict)[:5]}")
    return state_dict


def swin_config(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The `SwinTransformer` fields a checkpoint determines: embed_dims, depths, num_heads,
    window_size, patch_size, in_channels (e.g. to check it against `swin_tiny()`)."""
    sd = _mmseg_state_dict(state_dict)
    out_ch, in_ch, patch, _ = np.shape(sd["patch_embed.projection.weight"])
    stages = key_indices(sd, r"^stages\.(\d+)\.")
    depths, heads = [], []
    for i in stages:
        depths.append(len(key_indices(sd, rf"^stages\.{i}\.blocks\.(\d+)\.norm1\.weight$")))
        table = np.shape(sd[f"stages.{i}.blocks.0.attn.w_msa.relative_position_bias_table"])
        heads.append(int(table[1]))
    window = (int(round(table[0] ** 0.5)) + 1) // 2
    return dict(embed_dims=int(out_ch), depths=tuple(depths), num_heads=tuple(heads),
                window_size=window, patch_size=int(patch), in_channels=int(in_ch))


def _linear(reader: StateDictReader, key: str, bias: bool = True) -> Tree:
    tree = {"kernel": reader.dense(f"{key}.weight")}
    if bias:
        tree["bias"] = reader.get(f"{key}.bias")
    return tree


def _norm(reader: StateDictReader, key: str) -> Tree:
    return {"scale": reader.get(f"{key}.weight"), "bias": reader.get(f"{key}.bias")}


def swin_params(reader: StateDictReader) -> Tree:
    """mmseg-layout Swin keys of `reader` -> the params tree (see the module docstring)."""
    keys = reader.keys()
    params: Tree = {
        "patch_embed": {
            "projection": {"kernel": reader.conv("patch_embed.projection.weight"),
                           "bias": reader.get("patch_embed.projection.bias")},
            "norm": _norm(reader, "patch_embed.norm"),
        }
    }
    stages = key_indices(keys, r"^stages\.(\d+)\.") or [0]
    for i in range(max(stages) + 1):
        stage: Tree = {}
        for j in key_indices(keys, rf"^stages\.{i}\.blocks\.(\d+)\.") or [0]:
            src = f"stages.{i}.blocks.{j}"
            stage[f"blocks_{j}"] = {
                "norm1": _norm(reader, f"{src}.norm1"),
                "attn": {"w_msa": {
                    "relative_position_bias_table":
                        reader.get(f"{src}.attn.w_msa.relative_position_bias_table"),
                    "qkv": _linear(reader, f"{src}.attn.w_msa.qkv"),
                    "proj": _linear(reader, f"{src}.attn.w_msa.proj"),
                }},
                "norm2": _norm(reader, f"{src}.norm2"),
                "ffn": {"layers_0_0": _linear(reader, f"{src}.ffn.layers.0.0"),
                        "layers_1": _linear(reader, f"{src}.ffn.layers.1")},
            }
        if i < max(stages):
            stage["downsample"] = {
                "norm": _norm(reader, f"stages.{i}.downsample.norm"),
                "reduction": _linear(reader, f"stages.{i}.downsample.reduction", bias=False),
            }
        params[f"stages_{i}"] = stage
    has_norms = bool(key_indices(keys, r"^norm(\d+)\.weight$"))
    for i in range(max(stages) + 1):
        if has_norms:
            params[f"norm{i}"] = _norm(reader, f"norm{i}")
        else:  # an ImageNet checkpoint: mmseg's fresh LayerNorms
            width = np.shape(params[f"stages_{i}"]["blocks_0"]["norm1"]["scale"])[0]
            params[f"norm{i}"] = {"scale": np.ones(width, np.float32),
                                  "bias": np.zeros(width, np.float32)}
    return params


def swin_variables(state_dict: Mapping[str, Any]) -> dict[str, Tree]:
    """A Swin checkpoint -> {'params': tree} for `SwinTransformer` (`swin_tiny()`, ...).

    Accepts an mmseg segmentor checkpoint (the `backbone.` part is read, other keys are
    ignored), a bare mmseg-layout backbone, or an original Microsoft ImageNet checkpoint
    (converted with `swin_from_microsoft`); a {'state_dict' | 'model': ...} wrapper and a
    `module.` prefix are removed. Architecture comes from the keys (`swin_config`). Missing or
    unexpected keys raise `KeyMismatchError` (see the module docstring for skipped keys and the
    output norms of ImageNet checkpoints).
    """
    layout = swin_layout(state_dict)
    reader = StateDictReader(_mmseg_state_dict(state_dict), where=f"swin_variables ({layout})",
                             ignore=IGNORE)
    params = swin_params(reader)
    reader.finish()
    return {"params": params}
