"""PyTorch state_dict -> Flax variables: readable per-module mappings (torch never required).

Every public converter takes a state_dict (torch tensors or numpy arrays) and returns a
Flax tree; unknown or missing keys raise `KeyMismatchError` listing them. Files are read with
`read_checkpoint_file` (nothing in them runs: .pth weights-only, .pkl numpy-only via
`load_array_pickle`); `check_shapes` compares a converted tree with the model's shapes.
"""

from jax_refine.convert.attention import pna_layer_params, restormer_block_params
from jax_refine.convert.common import (
    KeyMismatchError,
    ShapeMismatchError,
    StateDictReader,
    check_shapes,
    load_array_pickle,
    read_checkpoint_file,
    recording_sources,
    strip_module_prefix,
)
from jax_refine.convert.crm import crm_variables
from jax_refine.convert.detectron2 import resnet_from_detectron2, unwrap_checkpoint
from jax_refine.convert.mmseg import resnet_from_mmseg
from jax_refine.convert.pna import (
    coarse_head_variables,
    pna_config,
    pna_head_params,
    pna_variables,
)
from jax_refine.convert.resnet import resnet_from_torchvision
from jax_refine.convert.swin import swin_config, swin_from_microsoft, swin_layout, swin_variables

__all__ = [
    "KeyMismatchError",
    "ShapeMismatchError",
    "StateDictReader",
    "check_shapes",
    "load_array_pickle",
    "read_checkpoint_file",
    "recording_sources",
    "strip_module_prefix",
    "crm_variables",
    "resnet_from_torchvision",
    "resnet_from_detectron2",
    "resnet_from_mmseg",
    "unwrap_checkpoint",
    "coarse_head_variables",
    "pna_config",
    "pna_head_params",
    "pna_variables",
    "pna_layer_params",
    "restormer_block_params",
    "swin_variables",
    "swin_config",
    "swin_layout",
    "swin_from_microsoft",
]
