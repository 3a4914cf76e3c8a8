"""PNA, the official Trans10k setting (`configs/trans10k/pna_fpn_R_52_poly_8k_bs16.yaml`):
"R-52" Semantic FPN, PNA window 7 with BILINEAR upsampling of the previous prediction;
3 classes (background, things, stuff; the paper's mIoU is over the two transparent
classes); 512x512 crops at scale [0.5, 2] (short side 256..1024), batch 16, 8k steps;
hard-pixel mining for P0 and P1..P4. Other fields as pna_detectron2_base.py.

    python train.py --config configs/pna_trans10k.py --workdir runs/pna_trans10k \
      --config.dataset.data_dir=/data/tfds \
      --config.dataset.builder_kwargs.images=/data/trans10k/train/images \
      --config.dataset.builder_kwargs.labels=/data/trans10k/train/labels
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
    config.loss.coarse_loss = "hard_pixel_mining"
    config.loss.stage_loss = "hard_pixel_mining"
    config.total_steps = 8_000
    config.checkpoint_every = 800
    return config
