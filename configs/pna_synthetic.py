"""PNA on multi-class synthetic scenes, small enough for a 2-core CPU.

    python train.py --config configs/pna_synthetic.py --workdir runs/pna_synthetic
    python evaluate.py --config configs/pna_synthetic.py --workdir runs/pna_synthetic

The paper's structure (configs/pna_voc_r50_fcn.py: FCN coarse head at output stride 32, PNA
stages at strides 32, 16, 8, 4), shrunk for the CPU budget:
* backbone ResNet-18 (basic blocks, DeepLab stem) at width 16; FCN head of one 64-channel
  conv; PNA widths D = 32/32/64/64 (one or two heads), window 7;
* data: every example a fresh `make_scene` scene with 4 object classes (5 labels with the
  background) rendered at a side in [160, 320], random scale [0.75, 1.5], 128-px crops —
  thin strokes, wires and small objects that a stride-32 prediction cannot place;
* batch 8, lr 2e-3 (AdamW, poly 0.9, no decay on norm layers), clip norm 1.0 (the paper's
  0.01 is for a pretrained backbone; from scratch it would make training far longer), no
  ImageNet weights;
* losses: hard-pixel mining (top 20%) for P0..P4 as the official Cityscapes DeepLabV3 config.
Evaluation: held-out scenes (seeds 0.. below TRAIN_SCENE_SEED_OFFSET) at 256 px.
"""

from pathlib import Path

import ml_collections

from jax_refine.train.loop import load_config_file


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(Path(__file__).with_name("pna_detectron2_base.py"))
    config.model.num_classes = 5  # background + 4 object classes
    config.model.depth = 18
    config.model.width = 16
    config.model.embed_dims = (32, 32, 64, 64)
    config.model.window_sizes = (7, 7, 7, 7)
    config.model.head_kwargs = ml_collections.ConfigDict(dict(channels=64, num_convs=1))

    config.dataset.name = "synthetic"
    config.dataset.builder_kwargs = ml_collections.ConfigDict()
    config.dataset.min_size = 160
    config.dataset.max_size = 320
    config.dataset.num_classes = 4
    # jax_refine's own recipe for small synthetic scenes: scale ~ U[0.75, 1.5], CRM's jitter.
    config.augment = ml_collections.ConfigDict(dict(
        scale_range=(0.75, 1.5), brightness=0.2, contrast=0.05, saturation=0.05))
    config.loss.coarse_loss = "hard_pixel_mining"
    config.loss.stage_loss = "hard_pixel_mining"

    config.crop_size = (128, 128)
    config.batch_size = 8
    config.total_steps = 600
    config.learning_rate = 2e-3
    config.clip_norm = 1.0
    config.log_every = 10
    config.checkpoint_every = 100

    config.eval.builder_kwargs = ml_collections.ConfigDict()
    config.eval.synthetic_size = 256
    config.eval.num_images = 24
    config.eval.bucket = 64  # scene sizes vary: share compilations (see pna_voc_r50_fcn.py)
    return config
