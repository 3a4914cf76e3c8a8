"""Two-layer MLP of the PNA layer (reference `pna.pna.Mlp`)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class Mlp(nn.Module):
    """Dense -> exact GELU -> dropout -> Dense -> dropout, over the last axis.

    Attributes:
      hidden_features: width of the hidden layer.
      out_features: output width (default: the input width).
      dropout_rate: dropout after the activation and after `fc2`.
      dtype: computation dtype; param_dtype: parameter dtype.
    Input `[..., C]`, output `[..., out_features or C]`. Parameters `fc1`, `fc2`.
    """

    hidden_features: int
    out_features: int | None = None
    dropout_rate: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        out_features = self.out_features or x.shape[-1]
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Dense(self.hidden_features, name="fc1", **dense)(x)
        x = nn.gelu(x, approximate=False)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        x = nn.Dense(out_features, name="fc2", **dense)(x)
        return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
