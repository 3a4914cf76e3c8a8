"""Base of the detectron2-recipe PNA configs (pna_cityscapes_*, pna_deepglobe, pna_trans10k,
pna_synthetic): configs/pna_voc_r50_fcn.py's blocks with its mmsegmentation-only settings
undone — detectron2's ResNet ('R-52' DeepLab stem), detectron2's PNA head (embeddings without
bias), no auxiliary head, detectron2's augmentation (train_net.py's: shortest-edge resize,
category-area crop, SSD colour, flip; Cityscapes' sizes), and the reference's
detectron2 solver (AdamW 1e-4, poly 0.9 without warmup, weight decay 0.01 but 0 on norm
layers, full-gradient clipping by L2 norm 0.01, batch 16), evaluation at native size. Not a
paper setting by itself (its coarse head stays FCN at output stride 32); the derived files
set the rest.
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
    # Solver (detectron2 `Trainer.build_optimizer` of the PNA repo's train_net.py and
    # Base-{DeepLabV3-OS16-Semantic,Semantic-FPN}.yaml SOLVER; detectron2's defaults):
    config.learning_rate = 1e-4  # BASE_LR, AdamW (OPTIMIZER 'ADAMW', betas 0.9 / 0.999)
    # Biases: the weights' lr and decay (build_optimizer reads no BIAS_LR_FACTOR or
    # WEIGHT_DECAY_BIAS). AMP (fp16 autocast) there: config.dtype here.
    config.lr_power = 0.9  # WarmupPolyLR, POLY_LR_POWER (POLY_LR_CONSTANT_ENDING 0)
    config.warmup_steps = 0  # WARMUP_ITERS 0 (WARMUP_FACTOR 1.0): no warmup
    config.warmup_ratio = 1.0  # WARMUP_FACTOR
    config.weight_decay = 0.01  # WEIGHT_DECAY, decoupled (AdamW)
    config.weight_decay_norm = 0.0  # WEIGHT_DECAY_NORM: BN / GN / LN (not the SAM LNs, see optim)
    # The reference also zeroes the decay of parameters named relative_position_bias_table,
    # absolute_pos_embed or rpn: none exists in these models (its 'rpb' decays).
    config.no_decay_keys = ()
    config.clip_norm = 0.01  # CLIP_GRADIENTS: 'full_model', L2 norm 0.01
    config.backbone_multiplier = 1.0  # BACKBONE_MULTIPLIER
    config.batch_size = 16  # IMS_PER_BATCH
    config.eval.resize.mode = "none"
    # Augmentation (detectron2 `build_sem_seg_train_aug` of train_net.py; INPUT of the
    # Cityscapes Base-PNA-{DeepLabV3-OS16,FPN}.yaml and of DeepGlobe; Trans10k sets its sizes):
    config.augment = ml_collections.ConfigDict(dict(
        resize="shortest_edge",  # ResizeShortestEdge, MIN_SIZE_TRAIN_SAMPLING 'choice'
        min_sizes=(512, 768, 1024, 1280, 1536, 1792, 2048),  # MIN_SIZE_TRAIN
        max_size=4096,  # MAX_SIZE_TRAIN
        single_category_max_area=0.75,  # CROP (TYPE 'absolute') SINGLE_CATEGORY_MAX_AREA
        colour="ssd",  # COLOR_AUG_SSD: ColorAugSSDTransform
    ))  # then RandomFlip (horizontal, p 0.5)
    return config
