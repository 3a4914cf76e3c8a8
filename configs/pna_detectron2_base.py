"""Base of the detectron2-recipe PNA configs (pna_cityscapes_*, pna_deepglobe, pna_trans10k,
pna_synthetic): configs/pna_voc_r50_fcn.py's blocks with its mmsegmentation-only settings
undone — detectron2's ResNet ('R-52' DeepLab stem), detectron2's PNA head (embeddings without
bias), no auxiliary head, AdamW weight decay 0.01, full-gradient clipping by L2 norm 0.01,
no warmup, no name-based decay exemptions, evaluation at native size. Not a paper setting by
itself (its coarse head stays FCN at output stride 32); the derived files set the rest.
"""

from pathlib import Path

import ml_collections

from jax_refine.train.loop import load_config_file


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(Path(__file__).with_name("pna_voc_r50_fcn.py"))
    config.model.backbone = "resnet"
    config.model.pna_head = "detectron2"
    config.model.auxiliary_head = False
    config.loss.coarse_loss = "cross_entropy"
    config.loss.stage_loss = "cross_entropy"
    config.loss.aux_weight = 0.0
    config.weight_decay = 0.01
    config.clip_norm = 0.01
    config.warmup_steps = 0
    config.no_decay_keys = ()
    config.eval.resize.mode = "none"
    return config
