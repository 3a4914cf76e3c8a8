"""PyTorch mirrors of the detectron2 / mmsegmentation pieces PNA is built from.

Written from the references' parameter names, shapes and order of operations (not copied;
detectron2 is not installed): detectron2's `Conv2d` with `norm` and activation, the DeepLab
ResNet (`build_resnet_deeplab_backbone`: `stem` = BasicStem or DeepLabStem, `res2..res5` of
`BottleneckBlock`s with the stride in the 3x3 conv, res4/res5 dilation and the res5
multi-grid), `ASPP`, PNA's `DeepLabV3_PNA_Head`, PNA's `FPN_PNA` (`fpn_lateral{k}`,
`fpn_output{k}`, `bottom_up`), `SemSegFPNHead`, and mmsegmentation's `FCNHead` / `PSPHead`
(`ConvModule` = `conv` + `bn`). Norms: 'BN' (eval-mode BatchNorm = SyncBN/FrozenBN at
inference), 'GN' (GroupNorm(32)), '' (conv with bias).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def get_norm(norm: str, channels: int):
    if norm == "":
        return None
    if norm in ("BN", "SyncBN", "FrozenBN"):
        return nn.BatchNorm2d(channels)
    if norm == "GN":
        return nn.GroupNorm(32, channels)
    raise ValueError(norm)


class Conv2d(nn.Conv2d):
    """detectron2's Conv2d: conv, then optional `norm`, then optional activation."""

    def __init__(self, *args, norm=None, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x):
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def conv(cin, cout, k, *, stride=1, dilation=1, norm="BN", act=False, bias=None):
    return Conv2d(
        cin,
        cout,
        k,
        stride=stride,
        padding=dilation * (k // 2),
        dilation=dilation,
        bias=(norm == "") if bias is None else bias,
        norm=get_norm(norm, cout),
        activation=F.relu if act else None,
    )


class BasicStem(nn.Module):
    def __init__(self, cin=3, cout=64, norm="BN"):
        super().__init__()
        self.conv1 = conv(cin, cout, 7, stride=2, norm=norm)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        return F.max_pool2d(x, 3, stride=2, padding=1)


class DeepLabStem(nn.Module):
    def __init__(self, cin=3, cout=128, norm="BN"):
        super().__init__()
        self.conv1 = conv(cin, cout // 2, 3, stride=2, norm=norm)
        self.conv2 = conv(cout // 2, cout // 2, 3, norm=norm)
        self.conv3 = conv(cout // 2, cout, 3, norm=norm)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return F.max_pool2d(x, 3, stride=2, padding=1)


class BottleneckBlock(nn.Module):
    def __init__(self, cin, cout, bottleneck, stride=1, dilation=1, norm="BN"):
        super().__init__()
        self.shortcut = conv(cin, cout, 1, stride=stride, norm=norm) if cin != cout else None
        self.conv1 = conv(cin, bottleneck, 1, norm=norm)
        self.conv2 = conv(bottleneck, bottleneck, 3, stride=stride, dilation=dilation, norm=norm)
        self.conv3 = conv(bottleneck, cout, 1, norm=norm)

    def forward(self, x):
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + shortcut)


class DeepLabResNet(nn.Module):
    """`build_resnet_deeplab_backbone` (stride in the 3x3 conv); forward -> {'res2'..'res5'}."""

    def __init__(
        self,
        depth=50,
        stem="deeplab",
        res4_dilation=1,
        res5_dilation=2,
        multi_grid=(1, 2, 4),
        norm="BN",
        stem_out=None,
        blocks=None,
    ):
        super().__init__()
        stem_out = stem_out or (128 if stem == "deeplab" else 64)
        self.stem = (DeepLabStem if stem == "deeplab" else BasicStem)(3, stem_out, norm)
        blocks = blocks or {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}[depth]
        cin, cout, width = stem_out, 256, 64
        for idx, stage in enumerate(range(2, 6)):
            dilation = {4: res4_dilation, 5: res5_dilation}.get(stage, 1)
            first_stride = 1 if idx == 0 or dilation > 1 else 2
            layers = []
            for j in range(blocks[idx]):
                d = dilation * multi_grid[j] if stage == 5 else dilation
                layers.append(
                    BottleneckBlock(cin, cout, width, first_stride if j == 0 else 1, d, norm)
                )
                cin = cout
            self.add_module(f"res{stage}", nn.Sequential(*layers))
            cout, width = cout * 2, width * 2

    def forward(self, x):
        x = self.stem(x)
        out = {}
        for k in range(2, 6):
            x = getattr(self, f"res{k}")(x)
            out[f"res{k}"] = x
        return out


class ASPP(nn.Module):
    def __init__(self, cin, cout, dilations, norm="BN", pool_kernel_size=None, dropout=0.1):
        super().__init__()
        self.pool_kernel_size = pool_kernel_size
        self.dropout = dropout
        self.convs = nn.ModuleList([conv(cin, cout, 1, norm=norm, act=True)])
        for d in dilations:
            self.convs.append(conv(cin, cout, 3, dilation=d, norm=norm, act=True))
        pool = nn.AdaptiveAvgPool2d(1) if pool_kernel_size is None else nn.AvgPool2d(
            pool_kernel_size, stride=1
        )
        self.convs.append(nn.Sequential(pool, conv(cin, cout, 1, norm="", act=True, bias=True)))
        self.project = conv(5 * cout, cout, 1, norm=norm, act=True)

    def forward(self, x):
        size = x.shape[-2:]
        res = [c(x) for c in self.convs]
        res[-1] = F.interpolate(res[-1], size=size, mode="bilinear", align_corners=False)
        res = self.project(torch.cat(res, dim=1))
        return F.dropout(res, self.dropout, training=self.training)


class DeepLabV3Head(nn.Module):
    """PNA's `DeepLabV3_PNA_Head`; `layers(features)` -> logits at the res5 stride."""

    def __init__(self, num_classes, cin=2048, channels=256, dilations=(6, 12, 18), norm="BN",
                 pool_kernel_size=None):
        super().__init__()
        self.aspp = ASPP(cin, channels, dilations, norm, pool_kernel_size)
        self.predictor = Conv2d(channels, num_classes, 1)

    def layers(self, features):
        return self.predictor(self.aspp(features["res5"]))


class FPN(nn.Module):
    """PNA's `FPN_PNA` with `return_input=True`: p2..p6 plus the bottom-up res2..res5."""

    def __init__(self, bottom_up, in_channels=(256, 512, 1024, 2048), out_channels=256, norm=""):
        super().__init__()
        self.bottom_up = bottom_up
        for k, cin in zip(range(2, 6), in_channels, strict=True):
            self.add_module(f"fpn_lateral{k}", conv(cin, out_channels, 1, norm=norm))
            self.add_module(f"fpn_output{k}", conv(out_channels, out_channels, 3, norm=norm))

    def forward(self, x):
        bottom = self.bottom_up(x)
        prev = self.fpn_lateral5(bottom["res5"])
        out = {"p5": self.fpn_output5(prev)}
        for k in (4, 3, 2):
            top_down = F.interpolate(prev, scale_factor=2.0, mode="nearest")
            prev = getattr(self, f"fpn_lateral{k}")(bottom[f"res{k}"]) + top_down
            out[f"p{k}"] = getattr(self, f"fpn_output{k}")(prev)
        out["p6"] = F.max_pool2d(out["p5"], kernel_size=1, stride=2, padding=0)
        out.update(bottom)
        return out


class SemSegFPNHead(nn.Module):
    def __init__(self, num_classes, channels=256, conv_dims=128, common_stride=4, norm="GN"):
        super().__init__()
        self.in_features = ["p2", "p3", "p4", "p5"]
        self.common_stride = common_stride
        for f in self.in_features:
            stride = 2 ** int(f[1:])
            ops = []
            for k in range(max(1, int(math.log2(stride) - math.log2(common_stride)))):
                ops.append(conv(channels if k == 0 else conv_dims, conv_dims, 3, norm=norm,
                                act=True, bias=not norm))
                if stride != common_stride:
                    ops.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.add_module(f, nn.Sequential(*ops))
        self.predictor = Conv2d(conv_dims, num_classes, 1)

    def layers(self, features):
        x = None
        for f in self.in_features:
            y = getattr(self, f)(features[f])
            x = y if x is None else x + y
        return self.predictor(x)


class ConvModule(nn.Module):
    """mmcv ConvModule with BN: `conv` (no bias), `bn`, ReLU."""

    def __init__(self, cin, cout, k, dilation=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation,
                              bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class FCNHead(nn.Module):
    def __init__(self, num_classes, cin=2048, channels=512, num_convs=2, concat_input=True):
        super().__init__()
        self.convs = nn.Sequential(
            *[ConvModule(cin if i == 0 else channels, channels, 3) for i in range(num_convs)]
        )
        self.concat_input = concat_input
        if concat_input:
            self.conv_cat = ConvModule(cin + channels, channels, 3)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x):
        y = self.convs(x)
        if self.concat_input:
            y = self.conv_cat(torch.cat([x, y], dim=1))
        return self.conv_seg(y)


class PSPHead(nn.Module):
    def __init__(self, num_classes, cin=2048, channels=512, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        self.psp_modules = nn.ModuleList(
            [nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(cin, channels, 1))
             for s in pool_scales]
        )
        self.bottleneck = ConvModule(cin + len(pool_scales) * channels, channels, 3)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x):
        outs = [x]
        for m in self.psp_modules:
            outs.append(F.interpolate(m(x), size=x.shape[2:], mode="bilinear",
                                      align_corners=False))
        return self.conv_seg(self.bottleneck(torch.cat(outs, dim=1)))


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics (so that BN is not the identity), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight") and p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 4:
                fan_in = p.shape[1] * p.shape[2] * p.shape[3]
                p.copy_(torch.randn(p.shape, generator=g) * math.sqrt(2.0 / fan_in))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return module.eval()


def calibrate_bn(module: nn.Module, *inputs, gain: float = 0.5, floor: float = 0.5) -> nn.Module:
    """Set every BatchNorm's running statistics to the statistics of one forward of `inputs`
    and scale its weight by `gain`: deep random networks then stay at O(1) activations and
    well conditioned (float64 and float32 PyTorch agree to ~1e-6), so absolute tolerances
    are meaningful."""
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, exactly that batch's stats
    module.train()
    with torch.no_grad():
        module(*inputs)
    for m in bns:
        m.momentum = 0.1
        # Channels with (near) zero variance would amplify float32 rounding without bound.
        with torch.no_grad():
            m.running_var.clamp_(min=floor)
            m.weight.mul_(gain)
    return module.eval()
