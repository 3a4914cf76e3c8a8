"""PNA on Pascal VOC with a Swin-B backbone and the PSP coarse head (paper Tables 2 / 3): the
reference's mmsegmentation config configs/pna/pna_psp_swin_base_512x512_20k_voc.py. As
configs/pna_voc_swin_t.py except the backbone: Swin-B (C 128, depths 2/2/18/2, heads
4/8/16/32, window 7, drop path 0.3; 128..1024 channels), ImageNet weights
swin_base_patch4_window7_224_20220317-e9b98025.pth (or Microsoft's
swin_base_patch4_window7_224.pth).

    python train.py --config configs/pna_voc_swin_b.py --workdir runs/pna_voc_swin_b \
      --config.init_from=/data/swin_base_patch4_window7_224.pth  # + pna_voc_r50_fcn's data flags
"""

from pathlib import Path

import ml_collections

from jax_refine.train.loop import load_config_file


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(Path(__file__).with_name("pna_voc_swin_t.py"))
    config.model.backbone = "swin_b"  # models.backbones.swin.swin_base (drop_path_rate 0.3)
    return config
