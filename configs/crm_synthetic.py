"""CRM on synthetic scenes, small enough for a 2-core CPU (`make demo` trains this).

    python train.py --config configs/crm_synthetic.py --workdir runs/crm_synthetic
    python evaluate.py --config configs/crm_synthetic.py --workdir runs/crm_synthetic

The paper recipe (configs/crm_paper.py) shrunk for a CPU budget and synthetic data:
* backbone ResNet-18 at width 16, fusion widths (16, 16, 32), latent 64 channels;
* batch 8, 1450 steps, lr 1e-3 (x0.1 at 70% and 90%), no ImageNet initialisation;
* 160-px crops, each a random window of a fresh synthetic scene of side 256..2048
  (log-uniform; only the window is rendered), so every scale of the 4-scale schedule is seen;
* the decoder supervised on 16 windows of 28 x 28 pixels per crop, 8 of them centred on
  ground-truth boundary pixels (where mBA scores) instead of at every pixel;
* coarse masks: perturb_mask (IoU with the GT, not the reference's thinned mask, stopped
  below a target ~ U[0.8, 1)) in 60% of the examples,
  coarse_from_lowres (factor ~ U[2, 16]) in 40%, half of them blurred (the later scales
  receive soft probabilities);
* in 25% of the examples the target is a random half of the scene's objects.
Why each choice, with the measurements behind it: docs/experiments/crm_synthetic_demo.md.
"""

from pathlib import Path

import ml_collections

from jax_refine.train.loop import load_config_file


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(Path(__file__).with_name("crm_paper.py"))
    config.model.depth = 18
    config.model.width = 16
    config.model.fusion_channels = (16, 16, 32)
    config.model.latent_channels = 64

    config.dataset.name = "synthetic"
    config.dataset.builder_kwargs = ml_collections.ConfigDict()
    config.dataset.min_size = 256
    config.dataset.max_size = 2048
    config.dataset.coarse.iou_against = "gt"  # as measured (docs/experiments)
    config.dataset.coarse.lowres_prob = 0.4
    config.dataset.coarse.lowres_factors = (2.0, 16.0)
    config.dataset.coarse.soft_prob = 0.5
    config.dataset.subset_prob = 0.25

    config.batch_size = 8
    config.crop_size = 160
    config.query_size = 28
    config.query_windows = 16
    config.boundary_windows = 8
    config.total_steps = 1450
    config.learning_rate = 1e-3
    config.lr_boundaries = (0.7, 0.9)
    config.log_every = 10
    config.checkpoint_every = 100

    # evaluate.py on held-out synthetic scenes when eval.folder is empty.
    config.eval.synthetic_size = 2048
    # Per coarse-mask kind. Scores move by several points from scene to scene, so 3 scenes
    # (the earlier setting) did not measure a model; 8 keep the demo under 20 minutes (each
    # 2048-px scene costs ~6.5 s per kind; 10 took the fresh-clone demo to 19 min 21 s).
    config.eval.num_images = 8
    # The demo also reports these schedules, e.g. '((0.5, 1.0),)' (none by default: each
    # costs ~4 s per 2048-px scene).
    config.eval.extra_schedules = ()
    return config
