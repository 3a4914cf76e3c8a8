"""PyTorch mirror of mmsegmentation's `ResNetV1c` (the PNA reference's mmsegmentation branch,
`mmseg/models/backbones/resnet.py` and `mmseg/models/utils/res_layer.py`).

Written from the reference's module order and parameter names (not copied; mmcv is not
installed): the deep stem `stem` = Sequential(conv 3x3/2, BN, ReLU, conv, BN, ReLU, conv, BN,
ReLU) with stem_channels // 2, // 2, stem_channels; the max-pool 3x3/2/1; `layer1..4` of
`BasicBlock` (`conv1`/`bn1`, `conv2`/`bn2`; only conv1 dilated) or `Bottleneck` (`conv1..3`,
`bn1..3`; style 'pytorch': stride on conv2), `downsample` = Sequential(1x1 strided conv, BN)
on a block whose stride or width changes (avg_down False); `contract_dilation` (a stage's
first block uses dilation // 2 when dilation > 1). forward returns the four stage outputs
(out_indices (0, 1, 2, 3)).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

ARCH = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
        50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3))}


def conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


def res_layer(block, cin, planes, blocks, stride, dilation, contract_dilation) -> nn.Sequential:
    """mmseg's ResLayer (multi_grid None, avg_down False)."""
    cout = planes * block.expansion
    downsample = None
    if stride != 1 or cin != cout:
        downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                   nn.BatchNorm2d(cout))
    first = dilation // 2 if contract_dilation and dilation > 1 else dilation
    layers = [block(cin, planes, stride, first, downsample)]
    layers += [block(cout, planes, 1, dilation) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class ResNetV1c(nn.Module):
    """mmseg `ResNetV1c(depth, stem_channels, base_channels, strides, dilations,
    contract_dilation)`; `blocks` overrides the depth's blocks per stage."""

    def __init__(self, depth=50, stem_channels=64, base_channels=64, strides=(1, 2, 2, 2),
                 dilations=(1, 1, 1, 1), contract_dilation=True, blocks=None, in_channels=3):
        super().__init__()
        kind, sizes = ARCH[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        half = stem_channels // 2
        self.stem = nn.Sequential(
            conv3x3(in_channels, half, 2), nn.BatchNorm2d(half), nn.ReLU(),
            conv3x3(half, half), nn.BatchNorm2d(half), nn.ReLU(),
            conv3x3(half, stem_channels), nn.BatchNorm2d(stem_channels), nn.ReLU(),
        )
        cin = stem_channels
        for i, n in enumerate(blocks or sizes):
            planes = base_channels * 2**i
            self.add_module(f"layer{i + 1}", res_layer(
                block, cin, planes, n, strides[i], dilations[i], contract_dilation))
            cin = planes * block.expansion

    def forward(self, x):
        x = F.max_pool2d(self.stem(x), 3, stride=2, padding=1)
        outs = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            outs.append(x)
        return tuple(outs)
