"""PNA on Pascal VOC with the DeepLabV3 coarse head, ResNet-101 (paper Tables 2 / 3): the
reference's mmsegmentation config configs/pna/pna_deeplabv3_r101-d16_512x512_20k_voc.py. As
configs/pna_voc_r50_fcn.py except: ResNetV1c-101 at output stride 16 (d16), mmseg's ASPPHead
on res5 (image pooling + dilations 1/12/24/36, 512 channels; coarse_head 'aspp', not
detectron2's 'deeplabv3'), batch 16 = 8 per GPU x 2 GPUs (the reference's train.sh runs this
config on 2 GPUs). Same optimiser, auxiliary head, losses and test mode.

    python train.py --config configs/pna_voc_r101_deeplabv3.py --workdir runs/pna_voc_r101_aspp \
      --config.init_from=/data/resnet101_v1c.pth  # + the dataset flags of pna_voc_r50_fcn.py
"""

from pathlib import Path

import ml_collections

from jax_refine.train.loop import load_config_file


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(Path(__file__).with_name("pna_voc_r50_fcn.py"))
    config.model.coarse_head = "aspp"  # mmseg ASPPHead; models.pna.VARIANTS: output stride 16
    config.model.depth = 101
    return config
