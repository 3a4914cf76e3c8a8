"""PNA, the official Trans10k setting (`configs/trans10k/pna_fpn_R_52_poly_8k_bs16.yaml`):
"R-52" Semantic FPN, PNA window 7 with BILINEAR upsampling of the previous prediction;
3 classes (background, things, stuff; the paper's mIoU is over the two transparent
classes); batch 16, 8k steps; short side one of 256, 307, ..., 1024 (long side <= 2048, PIL
bilinear), 512x512 crops where no class covers >= 75%, SSD colour, flip; plain
cross-entropy for P0 (SemSegFPNHead), hard-pixel mining for P1..P4; the detectron2 solver
as pna_cityscapes_r101_deeplabv3.py. Other fields as pna_detectron2_base.py.

Test protocol (the reference's): ResizeShortestEdge(512, max 2048) with Pillow bilinear,
logits resized back to the original size (bilinear); detectron2's SemSegEvaluator counting
(classes present in the labels); the paper's mIoU and mACC over the two transparent classes
(things, stuff; background excluded).

    python train.py --config configs/pna_trans10k.py --workdir runs/pna_trans10k \
      --config.dataset.data_dir=/data/tfds \
      --config.dataset.builder_kwargs.images=/data/trans10k/train/images \
      --config.dataset.builder_kwargs.labels=/data/trans10k/train/labels
    python evaluate.py --config configs/pna_trans10k.py --workdir runs/pna_trans10k \
      --config.eval.builder_kwargs.images=/data/trans10k/test/images \
      --config.eval.builder_kwargs.labels=/data/trans10k/test/labels
"""

from pathlib import Path

import ml_collections

from jax_refine.train.loop import load_config_file

TRANS10K_CLASSES = "background,things,stuff"


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(Path(__file__).with_name("pna_detectron2_base.py"))
    config.model.coarse_head = "semantic_fpn"
    config.model.num_classes = 3
    config.model.window_sizes = (7, 7, 7, 7)
    config.model.upsample_mode = "bilinear"
    config.dataset.builder_kwargs.class_names = TRANS10K_CLASSES
    config.eval.builder_kwargs.class_names = TRANS10K_CLASSES
    config.loss.coarse_loss = "cross_entropy"  # SemSegFPNHead.losses: F.cross_entropy
    config.loss.stage_loss = "hard_pixel_mining"  # PNA_HEAD.LOSS_TYPE (Base-Semantic-FPN)
    # Augmentation: pna_detectron2_base's with this yaml's INPUT sizes:
    # MIN_SIZE_TRAIN, the yaml's `eval` (256, 307, ..., 972, 1024); MAX_SIZE_TRAIN 2048.
    config.augment.min_sizes = tuple(int(x * 0.1 * 512) for x in range(5, 21))
    config.augment.max_size = 2048
    config.eval.resize = ml_collections.ConfigDict(dict(
        mode="shortest_edge", min_size=512, max_size=2048, scale=(0, 0)))
    config.eval.iou_classes = "gt"
    config.eval.mean_classes = (1, 2)  # things, stuff
    config.total_steps = 8_000
    config.checkpoint_every = 800
    return config
