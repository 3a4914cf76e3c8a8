"""PNA on Pascal VOC with a Swin-T backbone and the PSP coarse head (paper Tables 2 / 3): the
reference's mmsegmentation config configs/pna/pna_psp_swin_tiny_512x512_20k_voc.py. As
configs/pna_voc_r50_fcn.py except:

* backbone: mmseg's SwinTransformer, Swin-T (C 96, depths 2/2/6/2, heads 3/6/12/24,
  window 7, drop path 0.3, patch 4; outputs at strides 4..32 with 96..768 channels), PSPHead
  on res5 (stride 32), auxiliary FCNHead on res4 (384 channels in); PNA head unchanged
  (D = 96/192/384/768, window 9, embeddings with bias).
* optimiser: AdamW lr 6e-5, weight decay 0.01 (no decay on the names of mmseg's custom_keys:
  every LayerNorm of the backbone and of the PNA head, the relative position bias tables,
  'rpb'), poly power 1.0, linear warmup 200 iterations from 1e-6 * lr, no clipping, 20k
  iterations, batch 16 (4 per GPU x 4 GPUs).
* init: the ImageNet Swin-T weights of the reference
  (swin_tiny_patch4_window7_224_20220317-1cdeb081.pth, mmseg layout) or Microsoft's
  swin_tiny_patch4_window7_224.pth (`convert.swin_variables` reads both).

    python train.py --config configs/pna_voc_swin_t.py --workdir runs/pna_voc_swin_t \
      --config.init_from=/data/swin_tiny_patch4_window7_224.pth  # + pna_voc_r50_fcn's data flags
"""

from pathlib import Path

import ml_collections

from jax_refine.train.loop import load_config_file


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(Path(__file__).with_name("pna_voc_r50_fcn.py"))
    config.model.backbone = "swin_t"  # models.backbones.swin.swin_tiny (drop_path_rate 0.3)
    config.model.coarse_head = "psp"
    config.learning_rate = 6e-5
    config.weight_decay = 0.01
    config.lr_power = 1.0
    return config
