"""CRM on synthetic scenes, small enough for a 2-core CPU (`make demo` trains this).

    python train.py --config configs/crm_synthetic.py --workdir runs/crm_synthetic
    python evaluate.py --config configs/crm_synthetic.py --workdir runs/crm_synthetic

Deviations from the paper recipe (configs/crm_paper.py), all for CPU budget or the data:
* backbone ResNet-18 at width 16 and fusion widths (16, 16, 32), latent 64 channels;
* batch 8, 240 steps, lr 1e-3 (x0.1 at 70% and 90%), no weight init from ImageNet;
* data: every example is a fresh synthetic scene rendered at a side in [448, 1024] (so thin
  structures appear at several scales), cropped to 224;
* coarse masks: perturb_mask (IoU target ~ U[0.8, 1)) in 60% of the examples and
  coarse_from_lowres (factor ~ U[4, 16]) in 40%, since evaluation also uses low-resolution
  coarse masks.
"""

import importlib.util
from pathlib import Path

import ml_collections


def _paper_config() -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(
        "crm_paper", Path(__file__).with_name("crm_paper.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config() -> ml_collections.ConfigDict:
    config = _paper_config()
    config.model.depth = 18
    config.model.width = 16
    config.model.fusion_channels = (16, 16, 32)
    config.model.latent_channels = 64

    config.dataset.name = "synthetic"
    config.dataset.builder_kwargs = ml_collections.ConfigDict()
    config.dataset.min_size = 448
    config.dataset.max_size = 1024
    config.dataset.coarse.lowres_prob = 0.4

    config.batch_size = 8
    config.total_steps = 240
    config.learning_rate = 1e-3
    config.lr_boundaries = (0.7, 0.9)
    config.log_every = 10
    config.checkpoint_every = 40

    # evaluate.py on held-out synthetic scenes when eval.folder is empty.
    config.eval.synthetic_size = 2048
    config.eval.num_images = 3  # per coarse-mask kind
    # The demo also reports these schedules: training scenes are >= 448 px, while scale 0.125
    # of a 2048-px image is a 264-px scene the model never saw.
    config.eval.extra_schedules = ((0.5, 1.0),)
    return config
