"""PNA, the official DeepGlobe land-cover setting (`configs/deep_globe/
pna_fpn_R_52_poly_4k_bs16.yaml`): "R-52" Semantic FPN, PNA window 7; batch 16, 4k steps;
the 2448x2448 images resized to a short side of 512, 768, ..., 2048 (PIL bilinear), 508x508
crops where no class covers >= 75%, SSD colour, flip; plain cross-entropy for P0
(SemSegFPNHead), hard-pixel mining for P1..P4; the detectron2 solver as
pna_cityscapes_r101_deeplabv3.py. Other fields as pna_detectron2_base.py.

Classes: the reference's 7 (NUM_CLASSES: 7; `jax_refine.data.deepglobe`): 0 unknown,
1 urban, 2 agriculture, 3 rangeland, 4 forest, 5 water, 6 barren — so an official DeepGlobe
checkpoint converts and loads with this model block. Convert the DeepGlobe RGB masks to
label maps first (python -m jax_refine.data.deepglobe SRC DST; the ID_mask.png files left in
the image folder are reported as images without labels and skipped).

Test protocol (the reference's): ResizeShortestEdge(1024, max 2048) — 2448 -> 1024, Pillow
bilinear — logits resized back to 2448 (bilinear); detectron2's SemSegEvaluator counting
(classes present in the labels); the paper's mIoU and mACC over the 6 land-cover classes
1..6 (unknown excluded; P4 mIoU over all 7 is in per_class_iou).

    python -m jax_refine.data.deepglobe /data/deepglobe/train /data/deepglobe/train_labels
    python train.py --config configs/pna_deepglobe.py --workdir runs/pna_deepglobe \
      --config.dataset.data_dir=/data/tfds \
      --config.dataset.builder_kwargs.images=/data/deepglobe/train \
      --config.dataset.builder_kwargs.labels=/data/deepglobe/train_labels
    python evaluate.py --config configs/pna_deepglobe.py --workdir runs/pna_deepglobe \
      --config.eval.builder_kwargs.images=/data/deepglobe/test \
      --config.eval.builder_kwargs.labels=/data/deepglobe/test_labels
"""

from pathlib import Path

import ml_collections

from jax_refine.data import deepglobe
from jax_refine.train.loop import load_config_file

DEEPGLOBE_CLASSES = ",".join(deepglobe.CLASS_NAMES)  # 7: unknown first, as the reference


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(Path(__file__).with_name("pna_detectron2_base.py"))
    config.model.coarse_head = "semantic_fpn"
    config.model.num_classes = len(deepglobe.CLASS_NAMES)
    config.model.window_sizes = (7, 7, 7, 7)
    config.dataset.builder_kwargs.class_names = DEEPGLOBE_CLASSES
    config.eval.builder_kwargs.class_names = DEEPGLOBE_CLASSES
    # Augmentation: pna_detectron2_base's (the yaml's INPUT is Cityscapes').
    config.loss.coarse_loss = "cross_entropy"  # SemSegFPNHead.losses: F.cross_entropy
    config.loss.stage_loss = "hard_pixel_mining"  # PNA_HEAD.LOSS_TYPE
    config.eval.resize = ml_collections.ConfigDict(dict(
        mode="shortest_edge", min_size=1024, max_size=2048, scale=(0, 0)))
    config.eval.iou_classes = "gt"
    config.eval.mean_classes = deepglobe.LAND_COVER_CLASSES
    config.crop_size = (508, 508)
    config.total_steps = 4_000
    config.checkpoint_every = 400
    return config
