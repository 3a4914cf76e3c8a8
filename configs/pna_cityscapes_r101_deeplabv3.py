"""PNA, the official Cityscapes DeepLabV3 setting (`configs/cityscapes/
pna_deeplab_v3_R_103_os16_poly_90k_bs16.yaml`): detectron2 "R-103" (ResNet-101, DeepLab
stem, output stride 16, res5 multi-grid 1-2-4), DeepLabV3 coarse head (ASPP 6/12/18, image
pooling 32x64 for 512x1024 crops), PNA head window 9; 19 classes (train ids, 255 = ignore);
90k steps, batch 16. Training protocol exactly the reference's (train_net.py, the yamls and
detectron2's defaults): short side one of 512, 768, ..., 2048 (long side <= 4096, PIL
bilinear), 512x1024 crops where no class covers >= 75% (10 tries), SSD colour augmentation,
flip; hard-pixel mining (top 20%) for P0 and P1..P4; AdamW 1e-4, weight decay 0.01 but 0 on
norm layers, poly 0.9 without warmup, full-model gradient clipping 0.01 (torch's
clip_grad_norm_). Model and data fields other than these as pna_detectron2_base.py.

    python train.py --config configs/pna_cityscapes_r101_deeplabv3.py --workdir runs/pna_cs \
      --config.dataset.data_dir=/data/tfds \
      --config.dataset.builder_kwargs.images=/data/cityscapes/train/images \
      --config.dataset.builder_kwargs.labels=/data/cityscapes/train/labelTrainIds
    python evaluate.py --config configs/pna_cityscapes_r101_deeplabv3.py --workdir runs/pna_cs \
      --config.eval.builder_kwargs.images=/data/cityscapes/val/images \
      --config.eval.builder_kwargs.labels=/data/cityscapes/val/labelTrainIds

(`semantic_folder` pairs name.* with name.png across the two folders: flatten Cityscapes'
city subfolders and give images and label maps the same stem.)

Test protocol (the reference's): ResizeShortestEdge(1024, max 2048) — the identity on
Cityscapes' 1024x2048 images, so nothing is resampled; the mIoU counts classes present in the
labels or the predictions, as the official cityscapesscripts evaluator does (on the val set
every class occurs, so detectron2's rule gives the same number).
"""

from pathlib import Path

import ml_collections

from jax_refine.train.loop import load_config_file

CITYSCAPES_CLASSES = (
    "road,sidewalk,building,wall,fence,pole,traffic light,traffic sign,vegetation,terrain,"
    "sky,person,rider,car,truck,bus,train,motorcycle,bicycle"
)


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(Path(__file__).with_name("pna_detectron2_base.py"))
    config.model.coarse_head = "deeplabv3"
    config.model.num_classes = 19
    config.model.depth = 101
    config.model.pool_kernel_size = (32, 64)  # crop 512x1024 / output stride 16
    config.dataset.builder_kwargs.class_names = CITYSCAPES_CLASSES
    config.eval.builder_kwargs.class_names = CITYSCAPES_CLASSES
    config.loss.coarse_loss = "hard_pixel_mining"  # SEM_SEG_HEAD.LOSS_TYPE (DeepLabV3 head)
    config.loss.stage_loss = "hard_pixel_mining"  # PNA_HEAD.LOSS_TYPE
    config.eval.resize = ml_collections.ConfigDict(dict(
        mode="shortest_edge", min_size=1024, max_size=2048, scale=(0, 0)))
    config.eval.iou_classes = "gt_or_pred"
    config.crop_size = (512, 1024)
    config.total_steps = 90_000
    config.checkpoint_every = 9_000
    return config
