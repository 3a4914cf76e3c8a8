"""Neighborhood cross-attention (PNA's NAM; NATTEN's `NeighborhoodCrossAttention`)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_refine.ops.neighborhood import na2d, na2d_av, na2d_qk

Dtype = Any


class NeighborhoodCrossAttention(nn.Module):
    """Each query pixel attends to the L x L (dilated) neighbourhood of the value map.

    q, k = split(Dense(x) -> 2*dim); v = Dense(value); per head q is scaled by
    head_dim^-0.5 (or `qk_scale`) *before* the relative position bias is added; softmax over
    the L*L neighbours; weighted sum of v; Dense `proj`. Windows follow NATTEN (clamped at the
    borders, every query sees L*L real keys). Maps smaller than L*dilation are zero-padded at
    the bottom/right (both x and value) and cropped back after the attention.

    Attributes:
      dim: channels C (in and out).
      num_heads: heads; C must be divisible by it.
      kernel_size: odd window size L.
      dilation: window dilation.
      qkv_bias: biases in `qk` and `embed_v`.
      qk_scale: query scale (default head_dim^-0.5).
      use_rpb: learn the relative position bias `rpb` [heads, 2L-1, 2L-1].
      attn_dropout_rate: dropout on the attention weights.
      proj_dropout_rate: dropout after `proj`.
      dtype, param_dtype: computation and parameter dtypes (softmax in float32).
      implementation: `na2d`'s kernel: None (the backend's best), "xla" or "pallas".
    Call `(x, value, *, deterministic=True)` with x, value `[B, H, W, C]` -> `[B, H, W, C]`.
    """

    dim: int
    num_heads: int
    kernel_size: int
    dilation: int = 1
    qkv_bias: bool = True
    qk_scale: float | None = None
    use_rpb: bool = True
    attn_dropout_rate: float = 0.0
    proj_dropout_rate: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, value: jax.Array, *, deterministic: bool = True) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != self.dim or value.shape != x.shape:
            raise ValueError(
                f"x and value must both be [B, H, W, {self.dim}], got {x.shape}, {value.shape}."
            )
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} not divisible by num_heads {self.num_heads}.")
        L, heads = self.kernel_size, self.num_heads
        head_dim = self.dim // heads
        scale = self.qk_scale or head_dim**-0.5
        B, H0, W0, C = x.shape
        window = L * self.dilation
        pad = ((0, 0), (0, max(window - H0, 0)), (0, max(window - W0, 0)), (0, 0))
        if pad[1][1] or pad[2][1]:
            x, value = jnp.pad(x, pad), jnp.pad(value, pad)
        _, H, W, _ = x.shape

        dense = dict(use_bias=self.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        qk = nn.Dense(2 * C, name="qk", **dense)(x).reshape(B, H, W, 2, heads, head_dim)
        v = nn.Dense(C, name="embed_v", **dense)(value).reshape(B, H, W, heads, head_dim)
        q, k = qk[:, :, :, 0], qk[:, :, :, 1]
        rpb = None
        if self.use_rpb:
            rpb = self.param(
                "rpb",
                nn.initializers.truncated_normal(stddev=0.02),
                (heads, 2 * L - 1, 2 * L - 1),
                self.param_dtype,
            )
        if self.attn_dropout_rate and not deterministic:
            q = q * scale
            rpb = None if rpb is None else rpb.astype(q.dtype)
            logits = na2d_qk(q, k, rpb, L, self.dilation)
            attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
            attn = nn.Dropout(self.attn_dropout_rate)(attn, deterministic=False)
            out = na2d_av(attn, v, L, self.dilation)
        else:
            out = na2d(
                q, k, v, L, dilation=self.dilation, rpb=rpb, scale=scale,
                implementation=self.implementation,
            )  # fmt: skip
        out = out.reshape(B, H, W, C)[:, :H0, :W0]
        out = nn.Dense(C, name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(out)
        return nn.Dropout(self.proj_dropout_rate)(out, deterministic=deterministic)
