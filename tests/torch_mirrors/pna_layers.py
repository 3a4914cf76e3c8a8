"""PyTorch mirrors of PNA's attention modules, for parity tests.

Written from the reference's parameter names, shapes and order of operations (liutinglt/PNA
`pna/pna.py`, `pna/restomer.py`, NATTEN's `NeighborhoodCrossAttention`), not copied. NCHW as
the reference. The NATTEN kernels are replaced by a brute-force loop over the window with
NATTEN's integer rules (`natten_qkrpb`, `natten_av`), and the cross-attention pads the value
map as well as the query map (the reference pads only the query and fails on maps smaller
than the window). `unfold_qkrpb` / `unfold_av` compute the same with `F.unfold` (fast, but
they materialise every window); benchmarks switch to them through
`NeighborhoodCrossAttention.neighbourhood_ops`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.natten_rules import natten_pb_start, natten_window_start


def _indices(n: int, k: int, d: int):
    starts = [(natten_window_start(i, n, k, d), natten_pb_start(i, n, k, d)) for i in range(n)]
    keys = torch.tensor([[key + a * d for a in range(k)] for key, _ in starts])
    bias = torch.tensor([[pb + a for a in range(k)] for _, pb in starts])
    return keys, bias  # [n, k] each


def natten_qkrpb(q, k, rpb, kernel_size, dilation):
    """q, k [B, heads, H, W, D], rpb [heads, 2L-1, 2L-1] -> logits [B, heads, H, W, L*L]."""
    _, _, H, W, _ = q.shape
    kr, br = _indices(H, kernel_size, dilation)
    kc, bc = _indices(W, kernel_size, dilation)
    out = []
    for a in range(kernel_size):
        for b in range(kernel_size):
            keys = k[:, :, kr[:, a]][:, :, :, kc[:, b]]
            logit = (q * keys).sum(-1)
            if rpb is not None:
                logit = logit + rpb[:, br[:, a]][:, :, bc[:, b]][None]
            out.append(logit)
    return torch.stack(out, dim=-1)


def natten_av(attn, v, kernel_size, dilation):
    """attn [B, heads, H, W, L*L], v [B, heads, H, W, D] -> [B, heads, H, W, D]."""
    _, _, H, W, _ = v.shape
    kr, _ = _indices(H, kernel_size, dilation)
    kc, _ = _indices(W, kernel_size, dilation)
    out = torch.zeros_like(v)
    for a in range(kernel_size):
        for b in range(kernel_size):
            out = out + attn[..., a * kernel_size + b, None] * v[:, :, kr[:, a]][:, :, :, kc[:, b]]
    return out


def _windows(x, kernel_size, dilation):
    """x [B, heads, H, W, D] -> [B, heads, H, W, L*L, D]: each query's window (F.unfold over
    every window start, then each query's NATTEN start)."""
    B, heads, H, W, D = x.shape
    L, span = kernel_size, (kernel_size - 1) * dilation
    rows, _ = _indices(H, L, dilation)
    cols, _ = _indices(W, L, dilation)
    unfolded = F.unfold(x.permute(0, 1, 4, 2, 3).reshape(B, heads * D, H, W), L,
                        dilation=dilation).reshape(B, heads, D, L * L, H - span, W - span)
    return unfolded[:, :, :, :, rows[:, 0]][:, :, :, :, :, cols[:, 0]].permute(0, 1, 4, 5, 3, 2)


def unfold_qkrpb(q, k, rpb, kernel_size, dilation):
    """`natten_qkrpb` through `F.unfold`."""
    _, heads, H, W, _ = q.shape
    logits = torch.einsum("bhijd,bhijnd->bhijn", q, _windows(k, kernel_size, dilation))
    if rpb is None:
        return logits
    _, br = _indices(H, kernel_size, dilation)
    _, bc = _indices(W, kernel_size, dilation)
    bias = rpb[:, br][:, :, :, bc]  # [heads, H, L, W, L]
    return logits + bias.permute(0, 1, 3, 2, 4).reshape(heads, H, W, kernel_size**2)


def unfold_av(attn, v, kernel_size, dilation):
    """`natten_av` through `F.unfold`."""
    return torch.einsum("bhijn,bhijnd->bhijd", attn, _windows(v, kernel_size, dilation))


class NeighborhoodCrossAttention(nn.Module):
    """Input and output NHWC (as NATTEN's module).

    `neighbourhood_ops` = (qk + rpb, av) implementation, shared by all instances.
    """

    neighbourhood_ops = (natten_qkrpb, natten_av)

    def __init__(self, dim, num_heads, kernel_size, dilation=1, qkv_bias=True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.kernel_size, self.dilation = kernel_size, dilation
        self.qk = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.embed_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        nn.init.trunc_normal_(self.rpb, std=0.02)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, v):
        B, H0, W0, C = x.shape
        window = self.kernel_size * self.dilation
        pad_b, pad_r = max(window - H0, 0), max(window - W0, 0)
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        v = F.pad(v, (0, 0, 0, pad_r, 0, pad_b))
        _, H, W, _ = x.shape
        heads, hd = self.num_heads, self.head_dim
        v = self.embed_v(v).reshape(B, H, W, heads, hd).permute(0, 3, 1, 2, 4)
        qk = self.qk(x).reshape(B, H, W, 2, heads, hd).permute(3, 0, 4, 1, 2, 5)
        q, k = qk[0] * self.scale, qk[1]
        qkrpb, av = self.neighbourhood_ops
        attn = qkrpb(q, k, self.rpb, self.kernel_size, self.dilation).softmax(dim=-1)
        x = av(attn, v, self.kernel_size, self.dilation)
        x = x.permute(0, 2, 3, 1, 4).reshape(B, H, W, C)[:, :H0, :W0]
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class WithBiasLayerNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True, unbiased=False)
        return (x - mu) / torch.sqrt(var + 1e-5) * self.weight + self.bias


class RestormerLayerNorm(nn.Module):
    """Channel LayerNorm of an NCHW map (module `.body`)."""

    def __init__(self, dim):
        super().__init__()
        self.body = WithBiasLayerNorm(dim)

    def forward(self, x):
        return self.body(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MDTA(nn.Module):
    def __init__(self, dim, num_heads, bias=False):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(3 * dim, 3 * dim, 3, padding=1, groups=3 * dim, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        q, k, v = (t.reshape(b, self.num_heads, c // self.num_heads, h * w) for t in (q, k, v))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)
        return self.project_out((attn @ v).reshape(b, c, h, w))


class GDFN(nn.Module):
    def __init__(self, dim, expansion=2.66, bias=False):
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = nn.Conv2d(dim, 2 * hidden, 1, bias=bias)
        self.dwconv = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=bias)

    def forward(self, x):
        x1, x2 = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)


class TransformerBlock(nn.Module):
    def __init__(self, dim, num_heads, expansion=2.66, bias=False):
        super().__init__()
        self.norm1 = RestormerLayerNorm(dim)
        self.attn = MDTA(dim, num_heads, bias)
        self.norm2 = RestormerLayerNorm(dim)
        self.ffn = GDFN(dim, expansion, bias)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class PNALayer(nn.Module):
    """x, v NCHW -> NCHW."""

    def __init__(self, dim, num_heads, kernel_size, mlp_ratio=1.0, use_sa=True, dilation=1):
        super().__init__()
        self.atten1 = TransformerBlock(dim, num_heads) if use_sa else nn.Identity()
        self.norm1, self.norm1_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = NeighborhoodCrossAttention(dim, num_heads, kernel_size, dilation)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.out_norm = nn.LayerNorm(dim)

    def forward(self, x, v):
        shortcut = self.atten1(x).permute(0, 2, 3, 1)
        x, v = x.permute(0, 2, 3, 1), v.permute(0, 2, 3, 1)
        x = shortcut + self.attn(self.norm1(x), self.norm1_2(v))
        x = x + self.mlp(self.norm2(x))
        return self.out_norm(x).permute(0, 3, 1, 2)


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter (incl. LayerNorm weights/biases, temperature, rpb) set at random."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return module
