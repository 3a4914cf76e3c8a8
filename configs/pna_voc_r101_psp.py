"""PNA on Pascal VOC with the PSP coarse head, ResNet-101 (paper Tables 2 / 3): the reference's
mmsegmentation config configs/pna/pna_psp_r101-d16_512x512_20k_voc.py. As
configs/pna_voc_r50_fcn.py except: ResNetV1c-101 at output stride 16 (d16: strides 1/2/2/1,
layer4 dilated 2 with contract_dilation), PSPHead on res5 (pool scales 1/2/3/6, 512 channels).
Same optimiser (AdamW 1e-4, wd 1e-4, warmup 200, poly 0.9, 20k iterations), batch 16
(4 per GPU x 4 GPUs), auxiliary head, losses and test mode.

    python train.py --config configs/pna_voc_r101_psp.py --workdir runs/pna_voc_r101_psp \
      --config.init_from=/data/resnet101_v1c.pth  # + the dataset flags of pna_voc_r50_fcn.py
"""

from pathlib import Path

import ml_collections

from jax_refine.train.loop import load_config_file


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(Path(__file__).with_name("pna_voc_r50_fcn.py"))
    config.model.coarse_head = "psp"  # models.pna.VARIANTS: output stride 16
    config.model.depth = 101
    return config
