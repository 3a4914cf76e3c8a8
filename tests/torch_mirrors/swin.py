"""PyTorch mirror of mmsegmentation's Swin Transformer backbone, for parity tests.

Written from the module structure, parameter names and order of operations of the reference's
`mmseg/models/backbones/swin.py` and `mmseg/models/utils/embed.py` (PNA repository,
mmsegmentation branch), not copied. Tokens are kept as [B, H*W, C] with (H, W) passed
alongside, as there; NCHW input, NCHW outputs. Inference only: dropout and drop path are
identities (rates 0 in the PNA configs apart from drop path). `relative_position_index` is a
persistent buffer as in mmseg, so the state_dict holds it (converters must skip it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _pad_corner(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad NCHW x with zeros at the bottom/right to multiples of `multiple`."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, (-w) % multiple, 0, (-h) % multiple))


class WindowMSA(nn.Module):
    """Window attention on [num_windows*B, w*w, C] with a relative position bias table."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads, self.window = heads, window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        # mmseg builds the index with a "double step" sequence and a flip; restated here:
        # seq[i * w + j] = i * (2w - 1) + j, index[a, b] = seq[a] + seq[reversed b].
        seq = (torch.arange(window)[:, None] * (2 * window - 1)
               + torch.arange(window)[None, :]).reshape(1, -1)
        self.register_buffer("relative_position_index", (seq + seq.T).flip(1).contiguous())
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q = qkv[0] * (c // self.heads) ** -0.5
        attn = q @ qkv[1].transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1)[None]
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(bw // nw, nw, self.heads, n, n) + mask[None, :, None])
            attn = attn.view(bw, self.heads, n, n)
        out = attn.softmax(-1) @ qkv[2]
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class ShiftWindowMSA(nn.Module):
    """Window padding, cyclic shift + mask, `w_msa`, reverse shift, crop."""

    def __init__(self, dim: int, heads: int, window: int, shift: int):
        super().__init__()
        self.window, self.shift = window, shift
        self.w_msa = WindowMSA(dim, heads, window)

    def partition(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        s = self.window
        x = x.view(b, h // s, s, w // s, s, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(-1, s * s, c)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, _, c = x.shape
        h, w = hw
        s = self.window
        x = F.pad(x.view(b, h, w, c), (0, 0, 0, (-w) % s, 0, (-h) % s))
        hp, wp = x.shape[1:3]
        mask = None
        if self.shift:
            x = torch.roll(x, (-self.shift, -self.shift), dims=(1, 2))
            region = torch.zeros(1, hp, wp, 1)
            bounds = (slice(0, -s), slice(-s, -self.shift), slice(-self.shift, None))
            label = 0
            for rows in bounds:
                for cols in bounds:
                    region[:, rows, cols] = label
                    label += 1
            region = self.partition(region)[..., 0]  # [nW, s*s]
            diff = region[:, None, :] - region[:, :, None]
            mask = torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))
        out = self.w_msa(self.partition(x), mask)
        out = out.view(b, hp // s, wp // s, s, s, c).permute(0, 1, 3, 2, 4, 5)
        out = out.reshape(b, hp, wp, c)
        if self.shift:
            out = torch.roll(out, (self.shift, self.shift), dims=(1, 2))
        return out[:, :h, :w].reshape(b, h * w, c)


class FFN(nn.Module):
    """mmcv FFN layout: layers = [[Linear, GELU, Dropout], Linear, Dropout], plus identity."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0)),
            nn.Linear(hidden, dim),
            nn.Dropout(0.0),
        )

    def forward(self, x: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        return identity + self.layers(x)


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, window: int, shift: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ShiftWindowMSA(dim, heads, window, window // 2 if shift else 0)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FFN(dim, hidden)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), hw)
        return self.ffn(self.norm2(x), identity=x)


class PatchMerging(nn.Module):
    """nn.Unfold(2, stride 2) after corner padding, LayerNorm(4C), Linear(4C -> 2C, no bias)."""

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.sampler = nn.Unfold(kernel_size=2, stride=2)
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out, bias=False)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]):
        b, _, c = x.shape
        x = _pad_corner(x.view(b, *hw, c).permute(0, 3, 1, 2), 2)
        out_hw = (x.shape[2] // 2, x.shape[3] // 2)
        x = self.sampler(x).transpose(1, 2)
        return self.reduction(self.norm(x)), out_hw


class SwinBlockSequence(nn.Module):
    def __init__(self, dim, heads, hidden, depth, window, downsample):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, heads, hidden, window, shift=j % 2 == 1) for j in range(depth))
        self.downsample = PatchMerging(dim, 2 * dim) if downsample else None

    def forward(self, x, hw):
        for block in self.blocks:
            x = block(x, hw)
        if self.downsample is None:
            return x, hw, x, hw
        down, down_hw = self.downsample(x, hw)
        return down, down_hw, x, hw


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.patch = patch
        self.projection = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor):
        x = self.projection(_pad_corner(x, self.patch))
        hw = tuple(x.shape[2:])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class SwinTransformer(nn.Module):
    """mmseg SwinTransformer (patch_norm, all four outputs with norm0..norm3, no abs pos)."""

    def __init__(self, embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                 window_size=7, patch_size=4, mlp_ratio=4, in_channels=3):
        super().__init__()
        self.patch_embed = PatchEmbed(in_channels, embed_dims, patch_size)
        self.stages = nn.ModuleList()
        dim = embed_dims
        self.num_features = []
        for i, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
            last = i == len(depths) - 1
            self.stages.append(SwinBlockSequence(dim, heads, int(mlp_ratio * dim), depth,
                                                 window_size, downsample=not last))
            self.num_features.append(dim)
            dim = dim if last else 2 * dim
        for i, n in enumerate(self.num_features):
            self.add_module(f"norm{i}", nn.LayerNorm(n))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, hw = self.patch_embed(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x, hw, out, out_hw = stage(x, hw)
            out = getattr(self, f"norm{i}")(out)
            outs.append(out.view(-1, *out_hw, self.num_features[i]).permute(0, 3, 1, 2))
        return outs
