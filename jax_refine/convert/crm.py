"""Official CRM checkpoint (PyTorch state_dict) -> Flax variables of `models.crm.CRM`.

Mapping (reference key -> Flax path; `module.` prefix optional; `feats.layer4.*` and
`num_batches_tracked` ignored because CRM never computes layer4):

    feats.*                              -> feats/...   (see convert.resnet)
    aspp_.aspp1_{T}.atrous_conv.weight   -> aspp_/aspp1_{T}/atrous_conv/kernel  (T: 128,256,1024)
    aspp_.aspp1_{T}.bn.*                 -> aspp_/aspp1_{T}/bn/*
    aspp_.bn1_{T}.*                      -> aspp_/bn1_{T}/*
    aspp_.last_conv.0.weight             -> aspp_/last_conv_0/kernel
    aspp_.last_conv.1.*                  -> aspp_/last_conv_1/*
    imnet.layers.{k}.{weight,bias}       -> imnet/layers_{k}/{kernel (transposed),bias}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jax_refine.convert.common import StateDictReader, strip_module_prefix
from jax_refine.convert.resnet import batch_norm, resnet_tree
from jax_refine.models.crm import BRANCH_TAGS

Tree = dict[str, Any]


def crm_variables(state_dict: Mapping[str, Any]) -> dict[str, Tree]:
    """The official CRMNet state_dict -> {'params', 'batch_stats'} for `CRM()`.

    Raises `KeyMismatchError` listing every missing or unexpected key.
    """
    state_dict = strip_module_prefix(state_dict)
    ignore = [r"(^|\.)num_batches_tracked$", r"^feats\.layer4\."]
    reader = StateDictReader(state_dict, where="crm_variables", ignore=ignore)

    params: Tree = {}
    stats: Tree = {}
    params["feats"], stats["feats"] = resnet_tree(reader, "feats.", num_stages=3)

    aspp_p: Tree = {}
    aspp_s: Tree = {}
    for tag in BRANCH_TAGS:
        branch = f"aspp_.aspp1_{tag}"
        bn_p, bn_s = batch_norm(reader, f"{branch}.bn")
        aspp_p[f"aspp1_{tag}"] = {
            "atrous_conv": {"kernel": reader.conv(f"{branch}.atrous_conv.weight")},
            "bn": bn_p,
        }
        aspp_s[f"aspp1_{tag}"] = {"bn": bn_s}
        aspp_p[f"bn1_{tag}"], aspp_s[f"bn1_{tag}"] = batch_norm(reader, f"aspp_.bn1_{tag}")
    aspp_p["last_conv_0"] = {"kernel": reader.conv("aspp_.last_conv.0.weight")}
    aspp_p["last_conv_1"], aspp_s["last_conv_1"] = batch_norm(reader, "aspp_.last_conv.1")
    params["aspp_"], stats["aspp_"] = aspp_p, aspp_s

    imnet: Tree = {}
    for k in (0, 2, 4, 6, 8):
        imnet[f"layers_{k}"] = {
            "kernel": reader.dense(f"imnet.layers.{k}.weight"),
            "bias": reader.get(f"imnet.layers.{k}.bias"),
        }
    params["imnet"] = imnet

    reader.finish()
    return {"params": params, "batch_stats": stats}
