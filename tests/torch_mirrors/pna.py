"""PyTorch mirror of the official PNA head and segmentor (liutinglt/PNA, detectron2 branch).

Written from the reference's parameter names and order of operations (`pna/pna.py`
`PNABlock`/`PNAHead.layers`, `pna/semantic_seg.py` `PNASemanticSegmentor`/`PNASemSegHead`),
not copied. The PNA layers come from `tests.torch_mirrors.pna_layers` (NATTEN replaced by
a brute-force window loop that also pads maps smaller than the window); backbone and coarse
heads from `tests.torch_mirrors.detectron2`. State-dict keys equal the official ones:
`backbone.*`, `sem_seg_head.coarse_sem_seg_head.*`, `sem_seg_head.pna_head.*`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.torch_mirrors.pna_layers import PNALayer

PIXEL_MEAN = (123.675, 116.280, 103.530)
PIXEL_STD = (58.395, 57.120, 57.375)


class PNABlock(nn.Module):
    def __init__(self, dim, num_heads, kernel_size, depth=1, mlp_ratio=1.0, use_sa=True):
        super().__init__()
        self.blocks = nn.ModuleList(
            [PNALayer(dim, num_heads, kernel_size, mlp_ratio, use_sa) for _ in range(depth)]
        )

    def forward(self, q, v):
        x = q
        for blk in self.blocks:
            x = blk(q, v)  # every layer sees the original query; only the value is chained
            v = x
        return x


class PNAHead(nn.Module):
    def __init__(self, in_channels, num_classes, embed_dims=(96, 192, 384, 768),
                 window_sizes=(9, 9, 9, 9), mlp_ratio=1.0, upsample_mode="nearest",
                 use_sa=True, in_features=("res2", "res3", "res4", "res5")):
        super().__init__()
        self.in_features = list(in_features)
        self.upsample_mode = upsample_mode
        self.patch_embeds = nn.ModuleDict()
        self.value_embeds = nn.ModuleDict()
        self.stages = nn.ModuleDict()
        self.conv_seg_layers = nn.ModuleDict()
        for f, cin, dim, window in zip(in_features, in_channels, embed_dims, window_sizes,
                                       strict=True):
            self.patch_embeds[f] = nn.Conv2d(cin, dim, 1, bias=False)
            self.value_embeds[f] = nn.Conv2d(num_classes, dim, 1, bias=False)
            self.stages[f] = PNABlock(dim, dim // 32, window, 1, mlp_ratio, use_sa)
            self.conv_seg_layers[f] = nn.Conv2d(dim, num_classes, 1)

    def layers(self, coarse, features):
        value = coarse
        outs = []
        for f in self.in_features[::-1]:
            x = features[f]
            if self.upsample_mode == "bilinear":
                value = F.interpolate(value, size=x.shape[2:], mode="bilinear",
                                      align_corners=False)
            else:
                value = F.interpolate(value, size=x.shape[2:], mode="nearest")
            query = self.patch_embeds[f](x)
            value = self.value_embeds[f](value)
            pred = self.conv_seg_layers[f](self.stages[f](query, value))
            outs.append(pred)
            value = pred
        return outs


class SemSegHead(nn.Module):
    """PNA's `PNASemSegHead`: holds `coarse_sem_seg_head` and `pna_head`."""

    def __init__(self, coarse_sem_seg_head, pna_head):
        super().__init__()
        self.coarse_sem_seg_head = coarse_sem_seg_head
        self.pna_head = pna_head

    def forward(self, features):
        coarse = self.coarse_sem_seg_head.layers(features)
        return [coarse, *self.pna_head.layers(coarse, features)]


class PNASegmentor(nn.Module):
    """`PNASemanticSegmentor` at inference: normalise, zero-pad to `size_divisibility`,
    backbone, heads; returns [P0, P1..P4] (NCHW logits) and `final` (x4 bilinear, cropped)."""

    def __init__(self, backbone, coarse_head, pna_head, size_divisibility=0):
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = SemSegHead(coarse_head, pna_head)
        self.size_divisibility = size_divisibility
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), False)

    def forward(self, images):
        h, w = images.shape[-2:]
        x = (images - self.pixel_mean) / self.pixel_std
        d = self.size_divisibility
        if d > 1:
            x = F.pad(x, (0, -w % d, 0, -h % d))
        outs = self.sem_seg_head(self.backbone(x))
        final = F.interpolate(outs[-1], scale_factor=4, mode="bilinear", align_corners=False)
        return outs, final[:, :, :h, :w]
