"""Swin Transformer backbone (NHWC, Flax linen) as mmsegmentation's `SwinTransformer`.

The PNA paper's Swin rows (Pascal VOC, `configs/pna/pna_psp_swin_{tiny,base}_512x512_20k_voc.py`
on the reference's mmsegmentation branch) use mmseg's `mmseg/models/backbones/swin.py`. This is
that forward pass, operation for operation:

* `patch_embed`: zero-pad H, W at the bottom/right to multiples of `patch_size` ("corner"
  padding), `projection` (a patch_size x patch_size conv with the same stride, with bias),
  LayerNorm `norm`.
* `stages_{i}` (i = 0..3, width C * 2**i): `blocks_{j}` SwinBlocks, block j shifted when j is
  odd; then, except in the last stage, `downsample` (PatchMerging) halves the resolution.
* SwinBlock: x = x + drop_path(attn(norm1(x))); x = x + drop_path(ffn(norm2(x))).
  `attn` (mmseg's ShiftWindowMSA) zero-pads the map at the bottom/right to multiples of the
  window (after `norm1`; padded tokens take part in the attention as they do in mmseg: only
  the shift mask is applied), rolls it by -window//2 when shifted, attends within
  `window_size`**2-token windows (`w_msa`: fused `qkv` with bias, q scaled by
  head_dim**-0.5, plus the relative position bias `relative_position_bias_table`
  [(2w-1)**2, heads] and, when shifted, mmseg's mask: -100 between tokens of different
  regions of the rolled map), `proj`, rolls back and crops. `ffn`: `layers_0_0` (C -> 4C),
  exact GELU, `layers_1` (4C -> C) — mmcv FFN's `layers.0.0` / `layers.1`.
* PatchMerging (`downsample`): zero-pad to even H, W; gather every 2x2 patch into 4C
  channels in `nn.Unfold` order (channel c, row offset ki, column offset kj at c*4 + 2*ki + kj
  — NOT the original Swin's x0,x1,x2,x3 concatenation, which `convert.swin` reorders);
  LayerNorm `norm` (4C); `reduction` (4C -> 2C, no bias).
* Outputs: stage i's output before its downsample, through LayerNorm `norm{i}`, as
  'res{i+2}' (strides 4, 8, 16, 32; channels C, 2C, 4C, 8C; sizes ceil(H/4), then halved
  and rounded up).

LayerNorms use PyTorch's eps 1e-5 and two-pass variance. Parameter paths mirror mmseg's
module names ('.' -> '/', list indices joined by '_': `stages.0.blocks.1.attn.w_msa.qkv` ->
`stages_0/blocks_1/attn/w_msa/qkv`), so name-based optimiser rules ('norm',
'relative_position_bias_table') select the same tensors as mmseg's `custom_keys`.
`convert.swin_variables` reads mmseg and original (Microsoft) checkpoints into this tree.

Stochastic depth (`drop_path_rate`, linearly increasing over all blocks, as mmseg) draws from
the 'dropout' rng when `train=True`. Window attention is one batched einsum over all windows
and heads (no loops over windows); dots run at the platform's default precision (set
`jax.default_matmul_precision('highest')` for float32 parity on GPUs/TPUs).
Not implemented (unused by the PNA configs): the absolute position embedding, dropout /
attention dropout rates other than 0, `out_indices` other than all four, frozen stages and
gradient checkpointing (`with_cp`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = Any
Dtype = Any

# mmseg's value for logits between tokens of different regions of a shifted window.
SHIFT_MASK_VALUE = -100.0


def _layer_norm(name: str, module: nn.Module) -> nn.LayerNorm:
    """PyTorch's LayerNorm (eps 1e-5, two-pass variance) with the module's dtypes."""
    return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=module.dtype,
                        param_dtype=module.param_dtype, name=name)


def _dense(features: int, name: str, module: nn.Module, use_bias: bool = True) -> nn.Dense:
    """Linear layer initialised as mmseg's Swin (truncated normal std 0.02, zero bias)."""
    return nn.Dense(features, use_bias=use_bias,
                    kernel_init=nn.initializers.truncated_normal(stddev=0.02),
                    dtype=module.dtype, param_dtype=module.param_dtype, name=name)


def pad_bottom_right(x: Array, multiple: int) -> Array:
    """Zero-pad [B, H, W, C] at the bottom/right to multiples of `multiple` (mmseg's
    "corner" padding and the window padding of ShiftWindowMSA)."""
    h, w = x.shape[1:3]
    return jnp.pad(x, ((0, 0), (0, -h % multiple), (0, -w % multiple), (0, 0)))


def drop_path(x: Array, rate: float, rng: Array | None) -> Array:
    """Stochastic depth: zero each sample of x [B, ...] with probability `rate` and scale
    the kept ones by 1 / (1 - rate) (mmcv's DropPath); identity when rng is None or rate 0."""
    if rng is None or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


def relative_position_index(window: int) -> np.ndarray:
    """[w*w, w*w] index into the bias table of (query, key) token pairs of a window
    (tokens row-major): (dy + w - 1) * (2w - 1) + (dx + w - 1), d = query - key."""
    rows, cols = np.divmod(np.arange(window * window), window)
    dy = rows[:, None] - rows[None, :] + window - 1
    dx = cols[:, None] - cols[None, :] + window - 1
    return dy * (2 * window - 1) + dx


def shift_attention_mask(height: int, width: int, window: int, shift: int) -> Array:
    """mmseg's SW-MSA mask [num_windows, w*w, w*w] for a padded map of height x width rolled
    by -shift: each axis is split into [0, -window), [-window, -shift), [-shift, end), the
    3 x 3 products are regions, and a (query, key) pair in different regions gets -100.

    Built in the graph from per-axis tables ([windows along the axis, w*w, w*w] booleans: do
    two tokens of a window lie in different parts of that axis?), so a large map does not
    embed a [num_windows, w*w, w*w] constant in the program (100 MB at 2048 x 2048).
    """

    def differs(n: int, tile: bool) -> np.ndarray:
        part = np.zeros(n, np.int8)
        part[n - window:] = 1
        part[n - shift:] = 2
        part = part.reshape(n // window, window)
        # Token t of a window sits at row t // w and column t % w.
        token = np.tile(part, (1, window)) if tile else np.repeat(part, window, axis=1)
        return token[:, :, None] != token[:, None, :]

    rows, cols = differs(height, tile=False), differs(width, tile=True)
    different = jnp.asarray(rows)[:, None] | jnp.asarray(cols)[None, :]
    mask = jnp.where(different, jnp.float32(SHIFT_MASK_VALUE), jnp.float32(0.0))
    return mask.reshape(-1, window * window, window * window)


def window_partition(x: Array, window: int) -> Array:
    """[B, H, W, C] (H, W multiples of window) -> [B, num_windows, window*window, C];
    windows row-major over the map, tokens row-major within a window."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // window) * (w // window), window * window, c)


def window_merge(windows: Array, window: int, height: int, width: int) -> Array:
    """Inverse of `window_partition`: [B, num_windows, w*w, C] -> [B, height, width, C]."""
    b, _, _, c = windows.shape
    x = windows.reshape(b, height // window, width // window, window, window, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height, width, c)


class WindowMSA(nn.Module):
    """Multi-head self-attention within windows, with relative position bias (mmseg WindowMSA).

    Attributes:
      num_heads: attention heads (C must be divisible).
      window_size: window side w.
      qkv_bias: bias of the fused `qkv` projection.
    Call (windows [B, nW, w*w, C], mask [nW, w*w, w*w] or None) -> [B, nW, w*w, C].
    """

    num_heads: int
    window_size: int
    qkv_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        b, nw, n, c = x.shape
        heads, w = self.num_heads, self.window_size
        if c % heads or n != w * w:
            raise ValueError(f"WindowMSA: {c} channels / {heads} heads, {n} tokens for a "
                             f"{w}x{w} window")
        table = self.param("relative_position_bias_table",
                           nn.initializers.truncated_normal(stddev=0.02),
                           ((2 * w - 1) ** 2, heads), self.param_dtype)
        qkv = _dense(3 * c, "qkv", self, self.qkv_bias)(x).reshape(b, nw, n, 3, heads, c // heads)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        q = q * jnp.asarray((c // heads) ** -0.5, q.dtype)
        logits = jnp.einsum("bwnhd,bwmhd->bwhnm", q, k)
        bias = table[relative_position_index(w).reshape(-1)].reshape(n, n, heads)
        logits = logits + bias.transpose(2, 0, 1).astype(logits.dtype)
        if mask is not None:
            logits = logits + jnp.asarray(mask, logits.dtype)[None, :, None]
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bwhnm,bwmhd->bwnhd", attn, v).reshape(b, nw, n, c)
        return _dense(c, "proj", self)(out)


class ShiftWindowMSA(nn.Module):
    """Pad to window multiples, (roll), window attention `w_msa`, (roll back), crop
    (mmseg ShiftWindowMSA, without its drop path, which `SwinBlock` applies).

    Attributes:
      num_heads: attention heads.
      window_size: window side w.
      shift_size: roll (0 = regular windows; mmseg uses w // 2 in odd blocks).
    Call x [B, H, W, C] -> [B, H, W, C].
    """

    num_heads: int
    window_size: int
    shift_size: int = 0
    qkv_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h, w = x.shape[1:3]
        ws, shift = self.window_size, self.shift_size
        if not 0 <= shift < ws:
            raise ValueError(f"ShiftWindowMSA: shift_size {shift} not in [0, {ws})")
        x = pad_bottom_right(x, ws)
        hp, wp = x.shape[1:3]
        mask = None
        if shift:
            x = jnp.roll(x, (-shift, -shift), axis=(1, 2))
            mask = shift_attention_mask(hp, wp, ws, shift)
        out = WindowMSA(self.num_heads, ws, self.qkv_bias, self.dtype, self.param_dtype,
                        name="w_msa")(window_partition(x, ws), mask)
        out = window_merge(out, ws, hp, wp)
        if shift:
            out = jnp.roll(out, (shift, shift), axis=(1, 2))
        return out[:, :h, :w]


class SwinBlock(nn.Module):
    """x + drop_path(attn(norm1(x))), then x + drop_path(ffn(norm2(x))) on [B, H, W, C].

    Attributes:
      num_heads: attention heads.
      window_size: window side.
      shift: shifted windows (shift window_size // 2).
      mlp_ratio: FFN hidden width = int(mlp_ratio * C).
      drop_path_rate: stochastic depth probability of both residual branches.
    """

    num_heads: int
    window_size: int = 7
    shift: bool = False
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        c = x.shape[-1]

        def drop(y):
            rng = self.make_rng("dropout") if train and self.drop_path_rate else None
            return drop_path(y, self.drop_path_rate, rng)

        y = _layer_norm("norm1", self)(x)
        y = ShiftWindowMSA(self.num_heads, self.window_size,
                           self.window_size // 2 if self.shift else 0, self.qkv_bias,
                           self.dtype, self.param_dtype, name="attn")(y)
        x = x + drop(y)
        y = _layer_norm("norm2", self)(x)
        y = FFN(int(self.mlp_ratio * c), self.dtype, self.param_dtype, name="ffn")(y)
        return x + drop(y)


class FFN(nn.Module):
    """mmcv FFN without its residual: `layers_0_0` (C -> hidden), exact GELU, `layers_1`."""

    hidden: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        y = nn.gelu(_dense(self.hidden, "layers_0_0", self)(x), approximate=False)
        return _dense(x.shape[-1], "layers_1", self)(y)


class PatchMerging(nn.Module):
    """[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), out_channels] (mmseg's nn.Unfold version).

    Zero-pad to even sizes, gather each 2x2 patch in Unfold channel order
    (c * 4 + 2 * row offset + column offset), LayerNorm `norm` (4C), `reduction` (no bias).
    """

    out_channels: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = pad_bottom_right(x, 2)
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
        x = x.reshape(b, h // 2, w // 2, 4 * c)
        x = _layer_norm("norm", self)(x)
        return _dense(self.out_channels, "reduction", self, use_bias=False)(x)


class PatchEmbed(nn.Module):
    """[B, H, W, Cin] -> [B, ceil(H/p), ceil(W/p), embed_dims]: corner padding, p x p conv
    with stride p (`projection`, with bias), LayerNorm `norm`."""

    embed_dims: int
    patch_size: int = 4
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        p = self.patch_size
        x = nn.Conv(self.embed_dims, (p, p), strides=(p, p), padding="VALID",
                    dtype=self.dtype, param_dtype=self.param_dtype,
                    name="projection")(pad_bottom_right(x, p))
        return _layer_norm("norm", self)(x)


class SwinStage(nn.Module):
    """`depth` SwinBlocks `blocks_{j}` (odd ones shifted), then PatchMerging `downsample`.

    Returns (the blocks' output [B, H, W, C], the next stage's input: the downsampled
    [B, ceil(H/2), ceil(W/2), 2C], or the blocks' output when `downsample` is False).
    """

    depth: int
    num_heads: int
    window_size: int
    mlp_ratio: float
    qkv_bias: bool
    drop_path_rates: Sequence[float]
    downsample: bool
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> tuple[Array, Array]:
        types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.depth):
            x = SwinBlock(self.num_heads, self.window_size, j % 2 == 1, self.mlp_ratio,
                          self.qkv_bias, self.drop_path_rates[j], name=f"blocks_{j}",
                          **types)(x, train=train)
        if not self.downsample:
            return x, x
        return x, PatchMerging(2 * x.shape[-1], name="downsample", **types)(x)


class SwinTransformer(nn.Module):
    """mmsegmentation's Swin Transformer backbone (see the module docstring).

    Attributes:
      embed_dims: C, the width of stage 0 (Swin-T 96, Swin-B 128); stage i has C * 2**i.
      depths: blocks per stage (Swin-T (2, 2, 6, 2), Swin-B (2, 2, 18, 2)).
      num_heads: heads per stage (Swin-T (3, 6, 12, 24), Swin-B (4, 8, 16, 32)).
      window_size: attention window side (7).
      patch_size: patch embedding size and stride (4).
      mlp_ratio: FFN hidden width / C (4).
      qkv_bias: biases of the qkv projections.
      drop_path_rate: stochastic depth of the last block; block k of all n blocks uses
        drop_path_rate * k / (n - 1) (mmseg's linspace; mmseg default 0.1, PNA configs 0.3).
      in_channels: input channels (3).
      dtype, param_dtype: computation and parameter dtypes.
    Called as model(x [B, H, W, in_channels], train=False) for any H, W; returns
    {'res2': [B, H2, W2, C], 'res3': [.., 2C], 'res4': [.., 4C], 'res5': [.., 8C]} at strides
    4, 8, 16, 32 (H2 = ceil(H / 4), each next size ceil(previous / 2)), after the output
    LayerNorms `norm0..norm3`.
    """

    embed_dims: int = 96
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.1
    in_channels: int = 3
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> dict[str, Array]:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"SwinTransformer (models/backbones/swin.py) expects images "
                             f"[B, H, W, {self.in_channels}], got shape {x.shape}")
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"SwinTransformer: depths {self.depths} and num_heads "
                             f"{self.num_heads} differ in length")
        types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = PatchEmbed(self.embed_dims, self.patch_size, name="patch_embed", **types)(x)
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
        features = {}
        block = 0
        for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads, strict=True)):
            stage = SwinStage(depth, heads, self.window_size, self.mlp_ratio, self.qkv_bias,
                              tuple(float(r) for r in rates[block:block + depth]),
                              downsample=i < len(self.depths) - 1, name=f"stages_{i}",
                              **types)
            out, x = stage(x, train=train)
            block += depth
            features[f"res{i + 2}"] = _layer_norm(f"norm{i}", self)(out)
        return features


# The PNA configs' settings (pna_psp_swin_{tiny,base}_512x512_20k_voc.py).
SWIN_T = dict(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7,
              drop_path_rate=0.3)
SWIN_B = dict(embed_dims=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=7,
              drop_path_rate=0.3)


def swin_tiny(**kwargs: Any) -> SwinTransformer:
    """Swin-T as in the PNA config: C 96, depths (2, 2, 6, 2), heads (3, 6, 12, 24),
    window 7, drop_path_rate 0.3; keyword arguments override any field."""
    return SwinTransformer(**{**SWIN_T, **kwargs})


def swin_base(**kwargs: Any) -> SwinTransformer:
    """Swin-B as in the PNA config: C 128, depths (2, 2, 18, 2), heads (4, 8, 16, 32),
    window 7, drop_path_rate 0.3; keyword arguments override any field."""
    return SwinTransformer(**{**SWIN_B, **kwargs})

