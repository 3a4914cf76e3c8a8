"""PyTorch mirror of the PNA reference's mmsegmentation branch (heads and segmentor).

Written from the reference's parameter names and order of operations (mmseg
`decode_heads/aspp_head.py`, `fcn_head.py`, `psp_head.py`, `pna_head.py`,
`segmentors/cascade_encoder_decoder.py` on the PNA repo's `mmsegmentation` branch), not
copied; mmcv is not installed. mmseg's FCN / PSP heads are `tests.torch_mirrors.detectron2`'s
(`ConvModule` = `conv` + `bn`; Dropout2d is the identity in eval mode), the PNA layers
`tests.torch_mirrors.pna_layers` (NATTEN replaced by a brute-force window loop).
State-dict keys equal mmseg's: `backbone.*`, `decode_head.0.*` (coarse head),
`decode_head.1.*` (PNA head, stages named `pna{i}`, i = 0 for res2), `auxiliary_head.*`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.torch_mirrors.detectron2 import ConvModule, FCNHead, PSPHead
from tests.torch_mirrors.pna import PNABlock

__all__ = ["ASPPHead", "FCNHead", "PSPHead", "PNAHead", "CascadeSegmentor", "aux_fcn_head"]


class ASPPHead(nn.Module):
    """mmseg ASPPHead: image_pool (pool, ConvModule), aspp_modules, bottleneck, conv_seg."""

    def __init__(self, num_classes, cin=2048, channels=512, dilations=(1, 12, 24, 36)):
        super().__init__()
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(cin, channels, 1))
        self.aspp_modules = nn.ModuleList(
            [ConvModule(cin, channels, 1 if d == 1 else 3, dilation=d) for d in dilations]
        )
        self.bottleneck = ConvModule((len(dilations) + 1) * channels, channels, 3)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x):
        outs = [F.interpolate(self.image_pool(x), size=x.shape[2:], mode="bilinear",
                              align_corners=False)]
        outs.extend(m(x) for m in self.aspp_modules)
        return self.conv_seg(self.bottleneck(torch.cat(outs, dim=1)))


def aux_fcn_head(num_classes, cin=1024, channels=256):
    """The auxiliary head of every PNA mmseg config (on res4)."""
    return FCNHead(num_classes, cin=cin, channels=channels, num_convs=1, concat_input=False)


class PNAHead(nn.Module):
    """mmseg PNAHead: embeddings WITH bias, stages keyed `pna{i}`; forward(features, P0)."""

    def __init__(self, in_channels, num_classes, embed_dims=(96, 192, 384, 768),
                 window_sizes=(9, 9, 9, 9), mlp_ratio=1.0, upsample_mode="nearest"):
        super().__init__()
        self.upsample_mode = upsample_mode
        self.patch_embeds = nn.ModuleDict()
        self.value_embeds = nn.ModuleDict()
        self.stages = nn.ModuleDict()
        self.conv_seg_layers = nn.ModuleDict()
        for i in reversed(range(len(in_channels))):
            f, dim = f"pna{i}", embed_dims[i]
            self.patch_embeds[f] = nn.Conv2d(in_channels[i], dim, 1)
            self.value_embeds[f] = nn.Conv2d(num_classes, dim, 1)
            self.stages[f] = PNABlock(dim, dim // 32, window_sizes[i], 1, mlp_ratio, True)
            self.conv_seg_layers[f] = nn.Conv2d(dim, num_classes, 1)

    def forward(self, inputs, prev_output):
        value = prev_output
        outs = []
        for i in reversed(range(len(inputs))):
            x, f = inputs[i], f"pna{i}"
            if self.upsample_mode == "bilinear":
                value = F.interpolate(value, size=x.shape[2:], mode="bilinear",
                                      align_corners=False)
            else:
                value = F.interpolate(value, size=x.shape[2:], mode="nearest")
            out = self.stages[f](self.patch_embeds[f](x), self.value_embeds[f](value))
            value = self.conv_seg_layers[f](out)
            outs.append(value)
        return outs


class CascadeSegmentor(nn.Module):
    """mmseg `CascadeEncoderDecoder` (2 stages) at inference on normalised NCHW images:
    returns [P0, P1..P4] and the mmseg output (P4 resized bilinearly to the input size)."""

    def __init__(self, backbone, coarse_head, pna_head, auxiliary_head=None):
        super().__init__()
        self.backbone = backbone
        self.decode_head = nn.ModuleList([coarse_head, pna_head])
        if auxiliary_head is not None:
            self.auxiliary_head = auxiliary_head

    def forward(self, x):
        feats = self.backbone(x)
        feats = [feats[k] for k in sorted(feats)] if isinstance(feats, dict) else list(feats)
        coarse = self.decode_head[0](feats[-1])
        outs = self.decode_head[1](feats, coarse)
        final = F.interpolate(outs[-1], size=x.shape[2:], mode="bilinear", align_corners=False)
        return [coarse, *outs], final
