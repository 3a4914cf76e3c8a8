"""The PNA layer (reference `pna.pna.PNALayer`)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_refine.layers.mlp import Mlp
from jax_refine.layers.neighborhood_attention import NeighborhoodCrossAttention
from jax_refine.layers.restormer import RestormerBlock, layer_norm

Dtype = Any


class PNALayer(nn.Module):
    """Neighbourhood aggregation of a value map guided by a query map.

    shortcut = SAM(x) (a `RestormerBlock`, if `use_sa`) or x;
    x = shortcut + NAM(LN1(x), LN1_2(v)); x = x + Mlp(LN2(x)); out = LN_out(x).
    All LayerNorms eps 1e-5 over channels.

    Attributes:
      dim: channels C of x and v.
      num_heads: heads of the SAM and the NAM (C // 32 in PNA).
      kernel_size: neighbourhood window L.
      mlp_ratio: Mlp hidden = int(C * mlp_ratio).
      use_sa: use the self-aggregation module as the shortcut.
      dilation: NAM window dilation.
      qkv_bias: biases of the NAM projections.
      dropout_rate: dropout after the NAM projection and in the Mlp.
      attn_dropout_rate: dropout on the NAM attention weights.
      dtype, param_dtype: computation and parameter dtypes.
      attention_implementation: the NAM's `na2d` kernel (None: the backend's best).
    Call `(x, v, *, deterministic=True)` with `[B, H, W, C]` each -> `[B, H, W, C]`.
    Submodules (reference names): `atten1`, `norm1`, `norm1_2`, `attn`, `norm2`, `mlp`,
    `out_norm`.
    """

    dim: int
    num_heads: int
    kernel_size: int
    mlp_ratio: float = 1.0
    use_sa: bool = True
    dilation: int = 1
    qkv_bias: bool = True
    dropout_rate: float = 0.0
    attn_dropout_rate: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    attention_implementation: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, v: jax.Array, *, deterministic: bool = True) -> jax.Array:
        types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shortcut = RestormerBlock(self.num_heads, name="atten1", **types)(x) if self.use_sa else x
        x = layer_norm("norm1", **types)(x)
        v = layer_norm("norm1_2", **types)(v)
        x = shortcut + NeighborhoodCrossAttention(
            self.dim,
            self.num_heads,
            self.kernel_size,
            dilation=self.dilation,
            qkv_bias=self.qkv_bias,
            attn_dropout_rate=self.attn_dropout_rate,
            proj_dropout_rate=self.dropout_rate,
            implementation=self.attention_implementation,
            name="attn",
            **types,
        )(x, v, deterministic=deterministic)
        mlp = Mlp(
            int(self.dim * self.mlp_ratio), dropout_rate=self.dropout_rate, name="mlp", **types
        )
        x = x + mlp(layer_norm("norm2", **types)(x), deterministic=deterministic)
        return layer_norm("out_norm", **types)(x)
