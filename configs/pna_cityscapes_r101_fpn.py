"""PNA, the official Cityscapes Semantic FPN setting (`configs/cityscapes/
pna_fpn_R_103_poly_90k_bs16.yaml`): "R-103" (output stride 32, res5 multi-grid 1-2-4, inputs
padded to multiples of 32), FPN + SemSegFPNHead coarse head, PNA head window 7; 19 classes;
detectron2 augmentation and solver as pna_cityscapes_r101_deeplabv3.py, 90k steps; P0 and
P1..P4 with plain cross-entropy (detectron2's SemSegFPNHead ignores LOSS_TYPE: always plain
cross-entropy; PNA_HEAD.LOSS_TYPE cross_entropy).

    python train.py --config configs/pna_cityscapes_r101_fpn.py --workdir runs/pna_cs_fpn \
      --config.dataset.data_dir=/data/tfds \
      --config.dataset.builder_kwargs.images=/data/cityscapes/train/images \
      --config.dataset.builder_kwargs.labels=/data/cityscapes/train/labelTrainIds
"""

from pathlib import Path

import ml_collections

from jax_refine.train.loop import load_config_file


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(Path(__file__).with_name("pna_cityscapes_r101_deeplabv3.py"))
    config.model.coarse_head = "semantic_fpn"
    config.model.window_sizes = (7, 7, 7, 7)
    config.model.pool_kernel_size = None
    config.loss.coarse_loss = "cross_entropy"  # SemSegFPNHead.losses: F.cross_entropy
    config.loss.stage_loss = "cross_entropy"
    return config
