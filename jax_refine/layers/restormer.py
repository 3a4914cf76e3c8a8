"""Restormer building blocks used as PNA's self-aggregation module (reference `pna/restomer.py`).

NHWC throughout. Channel order of every split follows the reference's NCHW `chunk` and
`'b (head c) h w'` rearranges, so converted PyTorch weights give the same numbers.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def layer_norm(name: str, dtype: Dtype | None, param_dtype: Dtype) -> nn.LayerNorm:
    """LayerNorm over channels as PyTorch computes it (eps 1e-5, two-pass variance)."""
    return nn.LayerNorm(
        epsilon=1e-5, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, name=name
    )


def _conv(features: int, kernel: int, groups: int, use_bias: bool, name: str, dtype, param_dtype):
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class ChannelAttention(nn.Module):
    """MDTA: multi-Dconv-head transposed attention (attention across channels).

    qkv = 3x3 depthwise(1x1 conv(x)); per head, q and k are L2-normalised over the pixels
    (eps 1e-12), attn = softmax(q k^T * temperature[head]) is a (C/heads)^2 matrix, out = attn v,
    then a 1x1 `project_out`.

    Attributes:
      num_heads: heads; the channel count must be divisible by it.
      use_bias: biases in the three convs (False in PNA / Restormer).
      dtype, param_dtype: computation and parameter dtypes.
    Input and output `[B, H, W, C]`. Parameters `qkv`, `qkv_dwconv`, `project_out`,
    `temperature` `[heads, 1, 1]` (initialised to 1).
    """

    num_heads: int
    use_bias: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        B, H, W, C = x.shape
        if C % self.num_heads:
            raise ValueError(f"channels {C} not divisible by num_heads {self.num_heads}.")
        conv = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        temperature = self.param(
            "temperature", nn.initializers.ones, (self.num_heads, 1, 1), self.param_dtype
        )
        qkv = _conv(3 * C, 1, 1, name="qkv", **conv)(x)
        qkv = _conv(3 * C, 3, 3 * C, name="qkv_dwconv", **conv)(qkv)
        # [B, H, W, 3C] -> 3 x [B, heads, C/heads, H*W]
        qkv = qkv.reshape(B, H * W, 3, self.num_heads, C // self.num_heads)
        q, k, v = (jnp.transpose(qkv[:, :, i], (0, 2, 3, 1)) for i in range(3))
        q = q.astype(jnp.float32)
        k = k.astype(jnp.float32)
        q = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
        k = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
        attn = jnp.einsum("bhcn,bhen->bhce", q, k) * temperature.astype(jnp.float32)
        attn = jax.nn.softmax(attn, axis=-1)
        out = jnp.einsum("bhce,bhen->bhcn", attn.astype(v.dtype), v)
        out = jnp.transpose(out, (0, 3, 1, 2)).reshape(B, H, W, C)
        return _conv(C, 1, 1, name="project_out", **conv)(out)


class GatedDconvFeedForward(nn.Module):
    """GDFN: 1x1 conv to 2*hidden, 3x3 depthwise, split, gelu(x1) * x2, 1x1 conv back.

    Attributes:
      expansion: hidden = int(C * expansion) (2.66 in Restormer / PNA).
      use_bias: biases in the convs (False in PNA).
      dtype, param_dtype: computation and parameter dtypes.
    Input and output `[B, H, W, C]`. Parameters `project_in`, `dwconv`, `project_out`.
    """

    expansion: float = 2.66
    use_bias: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        C = x.shape[-1]
        hidden = int(C * self.expansion)
        conv = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        x = _conv(2 * hidden, 1, 1, name="project_in", **conv)(x)
        x = _conv(2 * hidden, 3, 2 * hidden, name="dwconv", **conv)(x)
        x1, x2 = jnp.split(x, 2, axis=-1)
        x = nn.gelu(x1, approximate=False) * x2
        return _conv(C, 1, 1, name="project_out", **conv)(x)


class RestormerBlock(nn.Module):
    """Restormer TransformerBlock: x + MDTA(LN(x)), then + GDFN(LN(x)).

    Attributes:
      num_heads: MDTA heads.
      expansion: GDFN expansion (2.66).
      use_bias: conv biases (False).
      dtype, param_dtype: computation and parameter dtypes.
    Input and output `[B, H, W, C]`. Submodules `norm1`, `attn`, `norm2`, `ffn` (the
    reference's "WithBias" LayerNorm over channels, eps 1e-5).
    """

    num_heads: int
    expansion: float = 2.66
    use_bias: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x + ChannelAttention(self.num_heads, self.use_bias, name="attn", **types)(
            layer_norm("norm1", **types)(x)
        )
        ffn = GatedDconvFeedForward(self.expansion, self.use_bias, name="ffn", **types)
        return x + ffn(layer_norm("norm2", **types)(x))
