"""A PyTorch mirror of the official CRM (dvlab-research/Entity, High-Quality-Segmention).

Written from the reference's parameter names, shapes and order of operations (not copied):
`CRMNet` with `feats` (4-channel ResNet-50 incl. the unused layer4), `aspp_`
(ASPP_no4level) and `imnet` (the 262 -> 32 x 4 -> 1 MLP applied per query), the official
`test.py` multi-resolution loop (`refine_multiscale`), and a torchvision-layout ResNet
(`TorchvisionResNet`) for the ImageNet-initialisation converter. BatchNorm is plain
`nn.BatchNorm2d` (the reference's synchronised BN is identical in eval mode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MEMORY_CHUNK = 50176 * 16  # queries per decoder call in the official test.py


def make_coord(shape, flatten=True):
    """Pixel-centre coordinates in (-1, 1), 'ij' order, as the reference computes them."""
    seqs = []
    for n in shape:
        r = 1.0 / n
        seqs.append(-1 + r + (2 * r) * torch.arange(n).float())
    ret = torch.stack(torch.meshgrid(*seqs, indexing="ij"), dim=-1)
    return ret.view(-1, ret.shape[-1]) if flatten else ret


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, 3, stride=stride, dilation=dilation, padding=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


class ResNet(nn.Module):
    """ResNet with the reference's / torchvision's parameter names.

    `crm=True`: the CRM extractor (4 input channels, layer3 stride 1 with dilation 2 after
    its first block, layer4 stride 1 dilation 4); forward returns (x1, x2, x3) and still
    runs layer4, as the reference does. `crm=False`: torchvision's ResNet (strides 2,
    no dilation) with `fc`; forward returns a dict of stage outputs.
    """

    def __init__(self, layers=(3, 4, 6, 3), in_channels=4, crm=True, num_classes=1000):
        super().__init__()
        self.crm = crm
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        if crm:
            self.layer3 = self._make_layer(256, layers[2], stride=1, dilation=2)
            self.layer4 = self._make_layer(512, layers[3], stride=1, dilation=4)
        else:
            self.layer3 = self._make_layer(256, layers[2], stride=2)
            self.layer4 = self._make_layer(512, layers[3], stride=2)
            self.fc = nn.Linear(2048, num_classes)

    def _make_layer(self, planes, blocks, stride=1, dilation=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * 4),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x1 = self.relu(self.bn1(self.conv1(x)))
        x2 = self.layer1(self.maxpool(x1))
        x = self.layer2(x2)
        x3 = self.layer3(x)
        x4 = self.layer4(x3)  # the CRM reference computes it and throws it away
        if self.crm:
            return x1, x2, x3
        return {"stem": x1, "layer1": x2, "layer2": x, "layer3": x3, "layer4": x4}


class _ASPPModule(nn.Module):
    def __init__(self, inplanes, planes):
        super().__init__()
        self.atrous_conv = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.atrous_conv(x)))


class ASPP_no4level(nn.Module):  # noqa: N801 (reference name)
    def __init__(self):
        super().__init__()
        self.aspp1_128 = _ASPPModule(64, 64)
        self.aspp1_256 = _ASPPModule(256, 64)
        self.aspp1_1024 = _ASPPModule(1024, 128)
        self.bn1_128 = nn.BatchNorm2d(64)
        self.bn1_256 = nn.BatchNorm2d(64)
        self.bn1_1024 = nn.BatchNorm2d(128)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(0.5)
        self.last_conv = nn.Sequential(
            nn.Conv2d(256, 256, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
        )

    def forward(self, x1, x2, x3):
        x1 = self.dropout(self.relu(self.bn1_128(self.aspp1_128(x1))))
        x2 = self.dropout(self.relu(self.bn1_256(self.aspp1_256(x2))))
        x3 = self.dropout(self.relu(self.bn1_1024(self.aspp1_1024(x3))))
        size = x1.shape[2:]
        x2 = F.interpolate(x2, size=size, mode="bilinear", align_corners=True)
        x3 = F.interpolate(x3, size=size, mode="bilinear", align_corners=True)
        return self.last_conv(torch.cat((x1, x2, x3), dim=1))


class MLP(nn.Module):
    def __init__(self, in_dim=262, out_dim=1, hidden_list=(32, 32, 32, 32)):
        super().__init__()
        layers, last = [], in_dim
        for hidden in hidden_list:
            layers += [nn.Linear(last, hidden), nn.ReLU()]
            last = hidden
        layers.append(nn.Linear(last, out_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        shape = x.shape[:-1]
        return self.layers(x.view(-1, x.shape[-1])).view(*shape, -1)


class CRMNet(nn.Module):
    """The official model. `forward` returns logits [B, Q, 1] ('out_224' in the reference)."""

    def __init__(self):
        super().__init__()
        self.feats = ResNet()
        self.aspp_ = ASPP_no4level()
        self.imnet = MLP()

    def encode(self, x, seg):
        return self.aspp_(*self.feats(torch.cat((x, seg), 1)))

    def decode(self, feat, coord, cell):
        h, w = feat.shape[-2:]
        feat_coord = make_coord((h, w), flatten=False).permute(2, 0, 1).unsqueeze(0)
        feat_coord = feat_coord.expand(feat.shape[0], 2, h, w)
        rx, ry = 2 / h / 2, 2 / w / 2
        preds, areas = [], []
        for vx in (-1, 1):
            for vy in (-1, 1):
                coord_ = coord.clone()
                coord_[:, :, 0] += vx * rx + 1e-6
                coord_[:, :, 1] += vy * ry + 1e-6
                coord_.clamp_(-1 + 1e-6, 1 - 1e-6)
                sample_grid = coord_.flip(-1).unsqueeze(1)
                q_feat = F.grid_sample(feat, sample_grid, mode="nearest", align_corners=False)
                q_feat = q_feat[:, :, 0, :].permute(0, 2, 1)
                q_coord = F.grid_sample(
                    feat_coord, sample_grid, mode="nearest", align_corners=False
                )[:, :, 0, :].permute(0, 2, 1)
                rel_coord = coord - q_coord
                rel_coord[:, :, 0] *= h
                rel_coord[:, :, 1] *= w
                rel_cell = cell.clone()
                rel_cell[:, :, 0] *= h
                rel_cell[:, :, 1] *= w
                inp = torch.cat([q_feat, rel_coord, coord, rel_cell], dim=-1)
                bs, q = coord.shape[:2]
                preds.append(self.imnet(inp.view(bs * q, -1)).view(bs, q, -1))
                areas.append(torch.abs(rel_coord[:, :, 0] * rel_coord[:, :, 1]) + 1e-9)
        tot_area = torch.stack(areas).sum(dim=0)
        areas[0], areas[3] = areas[3], areas[0]
        areas[1], areas[2] = areas[2], areas[1]
        ret = 0
        for pred, area in zip(preds, areas, strict=True):
            ret = ret + pred * (area / tot_area).unsqueeze(-1)
        return ret

    def forward(self, x, seg, coord, cell):
        return self.decode(self.encode(x, seg), coord, cell)


def normalise(image_uint8, mask_uint8):
    """HWC uint8 RGB + HW uint8 mask -> the reference's [1,3,H,W] and [1,1,H,W] tensors."""
    im = torch.from_numpy(image_uint8).permute(2, 0, 1).float().div(255)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    im = (im - mean) / std
    seg = torch.from_numpy(mask_uint8)[None].float().div(255)
    seg = (seg - 0.5) / 0.5
    return im[None], seg[None]


@torch.no_grad()
def refine_multiscale(model, im, seg, scales=(0.125, 0.25, 0.5, 1.0), chunk=MEMORY_CHUNK):
    """The official test.py loop: pad 32 (reflect), per-scale encode + chunked decode.

    Args:
      im: [1, 3, H, W] normalised image; seg: [1, 1, H, W] mask in [-1, 1].

    Returns:
      [H, W] float32 probabilities of the last scale.
    """
    im = F.pad(im, (32, 32, 32, 32), mode="reflect")
    seg = F.pad(seg, (32, 32, 32, 32), mode="reflect")
    hp, wp = im.shape[-2:]
    coord = make_coord((hp, wp)).to(im.device)[None]
    cell = torch.ones_like(coord)
    cell[..., 0] *= 2 / hp
    cell[..., 1] *= 2 / wp
    pred = None
    for s in scales:
        size = (round(hp * s), round(wp * s))
        im_ = F.interpolate(im, size=size, mode="bilinear", align_corners=True)
        seg_ = F.interpolate(seg, size=size, mode="bilinear", align_corners=True)
        feat = model.encode(im_, seg_)
        outs = [
            model.decode(feat, coord[:, i : i + chunk], cell[:, i : i + chunk])
            for i in range(0, hp * wp, chunk)
        ]
        pred = torch.sigmoid(torch.cat(outs, dim=1)).view(1, 1, hp, wp)
        if (seg[0] + 1).sum() < 2:
            pred[0] = 0
        seg = (pred - 0.5) * 2
    return pred[0, 0, 32:-32, 32:-32]


def randomise(model, seed=0):
    """Random weights and BatchNorm running statistics (so parity tests see them all)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                p.copy_(torch.rand(p.shape, generator=gen) * 1.5 + 0.5)
            elif name.endswith("running_mean"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            elif p.dim() == 1 and name.endswith("weight"):  # BatchNorm scale
                # Small scales on each block's last BN keep the random residual stack tame.
                low = 0.1 if ("bn3" in name or "downsample" in name) else 0.75
                p.copy_(torch.rand(p.shape, generator=gen) * 0.25 + low)
            elif p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()
