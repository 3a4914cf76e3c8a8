"""PNA attention modules (liutinglt/PNA `pna/pna.py`, `pna/restomer.py`, NATTEN) -> Flax params.

Key layout -> our tree (`layers.PNALayer`, `layers.RestormerBlock`):

    PNALayer
    atten1.*                       -> atten1/...  (RestormerBlock, absent when use_sa=False)
    norm1 / norm1_2 / norm2 / out_norm .{weight,bias}  -> same name /{scale,bias}
    attn.qk / attn.embed_v / attn.proj .{weight,bias}  -> attn/same name/{kernel (transposed),bias}
    attn.rpb                       -> attn/rpb   ([heads, 2L-1, 2L-1], unchanged)
    mlp.fc1 / mlp.fc2 .{weight,bias}                   -> mlp/fc1, mlp/fc2
    RestormerBlock (TransformerBlock)
    norm1.body / norm2.body .{weight,bias}             -> norm1, norm2 /{scale,bias}
    attn.temperature               -> attn/temperature ([heads, 1, 1], unchanged)
    attn.qkv / attn.qkv_dwconv / attn.project_out .weight (+ .bias)
                                   -> attn/same name/kernel (OIHW -> HWIO) (+ bias)
    ffn.project_in / ffn.dwconv / ffn.project_out .weight (+ .bias)
                                   -> ffn/same name/kernel (+ bias)

Public converters return the layer's `params` collection (apply with `{"params": tree}`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jax_refine.convert.common import StateDictReader

Tree = dict[str, Any]


def layer_norm_tree(reader: StateDictReader, key: str) -> Tree:
    """nn.LayerNorm (or Restormer's `.body`) at `key` -> {'scale', 'bias'}."""
    return {"scale": reader.get(f"{key}.weight"), "bias": reader.get(f"{key}.bias")}


def linear_tree(reader: StateDictReader, key: str) -> Tree:
    """nn.Linear at `key` -> Dense {'kernel' (I, O), 'bias' if present}."""
    tree = {"kernel": reader.dense(f"{key}.weight")}
    if reader.has(f"{key}.bias"):
        tree["bias"] = reader.get(f"{key}.bias")
    return tree


def conv_tree(reader: StateDictReader, key: str) -> Tree:
    """nn.Conv2d at `key` (incl. depthwise) -> Conv {'kernel' HWIO, 'bias' if present}."""
    tree = {"kernel": reader.conv(f"{key}.weight")}
    if reader.has(f"{key}.bias"):
        tree["bias"] = reader.get(f"{key}.bias")
    return tree


def channel_attention_tree(reader: StateDictReader, prefix: str = "") -> Tree:
    """Restormer `Attention` (MDTA) keys under `prefix` -> `ChannelAttention` params."""
    return {
        "temperature": reader.get(f"{prefix}temperature"),
        "qkv": conv_tree(reader, f"{prefix}qkv"),
        "qkv_dwconv": conv_tree(reader, f"{prefix}qkv_dwconv"),
        "project_out": conv_tree(reader, f"{prefix}project_out"),
    }


def feed_forward_tree(reader: StateDictReader, prefix: str = "") -> Tree:
    """Restormer `FeedForward` (GDFN) keys under `prefix` -> `GatedDconvFeedForward` params."""
    return {
        name: conv_tree(reader, prefix + name) for name in ("project_in", "dwconv", "project_out")
    }


def restormer_block_tree(reader: StateDictReader, prefix: str = "") -> Tree:
    """Restormer `TransformerBlock` keys under `prefix` -> `RestormerBlock` params."""
    return {
        "norm1": layer_norm_tree(reader, f"{prefix}norm1.body"),
        "attn": channel_attention_tree(reader, f"{prefix}attn."),
        "norm2": layer_norm_tree(reader, f"{prefix}norm2.body"),
        "ffn": feed_forward_tree(reader, f"{prefix}ffn."),
    }


def neighborhood_attention_tree(
    reader: StateDictReader, prefix: str = "", *, use_rpb: bool = True
) -> Tree:
    """NATTEN `NeighborhoodCrossAttention` keys -> `NeighborhoodCrossAttention` params."""
    tree = {name: linear_tree(reader, prefix + name) for name in ("qk", "embed_v", "proj")}
    if use_rpb:
        tree["rpb"] = reader.get(f"{prefix}rpb")
    return tree


def pna_layer_tree(reader: StateDictReader, prefix: str = "", *, use_rpb: bool = True) -> Tree:
    """`PNALayer` keys under `prefix` -> `layers.PNALayer` params (SAM iff `atten1.*` exists)."""
    tree: Tree = {}
    if any(key.startswith(f"{prefix}atten1.") for key in reader.keys()):
        tree["atten1"] = restormer_block_tree(reader, f"{prefix}atten1.")
    for name in ("norm1", "norm1_2", "norm2", "out_norm"):
        tree[name] = layer_norm_tree(reader, prefix + name)
    tree["attn"] = neighborhood_attention_tree(reader, f"{prefix}attn.", use_rpb=use_rpb)
    tree["mlp"] = {
        "fc1": linear_tree(reader, f"{prefix}mlp.fc1"),
        "fc2": linear_tree(reader, f"{prefix}mlp.fc2"),
    }
    return tree


def _convert(state_dict: Mapping[str, Any], prefix: str, tree_fn, where: str) -> Tree:
    reader = StateDictReader(state_dict, prefix, where=where)
    if not reader.keys():
        raise KeyError(f"{where}: no state_dict key starts with prefix {prefix!r}.")
    tree = tree_fn(reader)  # keys are read relative to `prefix` (the reader strips it)
    reader.finish()
    return tree


def restormer_block_params(state_dict: Mapping[str, Any], prefix: str = "") -> Tree:
    """Restormer `TransformerBlock` state_dict (keys below `prefix`) -> `RestormerBlock` params.

    Raises `KeyMismatchError` listing missing and unexpected keys below `prefix`.
    """
    return _convert(state_dict, prefix, restormer_block_tree, "restormer_block_params")


def pna_layer_params(
    state_dict: Mapping[str, Any], prefix: str = "", *, use_rpb: bool = True
) -> Tree:
    """PNA `PNALayer` state_dict (keys below `prefix`, e.g. 'stages.res2.blocks.0.') ->
    `layers.PNALayer` params. `use_sa` is read off the keys (the `atten1.*` SAM present or
    not); `use_rpb=False` for a NATTEN attention built with `bias=False` (PNA always has one).

    Raises `KeyMismatchError` listing missing and unexpected keys below `prefix`.
    """
    return _convert(
        state_dict,
        prefix,
        lambda reader: pna_layer_tree(reader, use_rpb=use_rpb),
        "pna_layer_params",
    )
