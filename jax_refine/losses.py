"""Training losses, organised by model. Each returns the scalar total and its named terms.

CRM (reference `train.py`): with logits z, probabilities p = sigmoid(z) and a soft ground
truth g in [0, 1], all [B, H, W, 1],

    loss = 1.0 * BCE(z, g > 0.5) + 0.5 * L1(p, g) + 0.5 * MSE(p, g)
           + 2.0 * L1(sobel(g), sobel(p)),

every term a mean over all pixels (`jax_refine.ops.sobel`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jax_refine.ops.sobel import sobel

Array = Any

# ----------------------------------------------------------------------------- CRM

CRM_WEIGHTS = {"bce": 1.0, "l1": 0.5, "mse": 0.5, "sobel": 2.0}


def crm_loss_terms(logits: Array, gt: Array) -> dict[str, Array]:
    """Unweighted CRM loss terms (float32 scalars).

    Args:
      logits: [B, H, W, 1] decoder logits.
      gt: [B, H, W, 1] ground truth in [0, 1].
    """
    if logits.shape != gt.shape or logits.ndim != 4:
        raise ValueError(f"expected logits and gt of equal [B, H, W, C] shape, got "
                         f"{logits.shape} and {gt.shape}")
    logits = logits.astype(jnp.float32)
    gt = gt.astype(jnp.float32)
    prob = jax.nn.sigmoid(logits)
    hard = (gt > 0.5).astype(jnp.float32)
    return {
        "bce": optax.sigmoid_binary_cross_entropy(logits, hard).mean(),
        "l1": jnp.abs(prob - gt).mean(),
        "mse": jnp.square(prob - gt).mean(),
        "sobel": jnp.abs(sobel(gt) - sobel(prob)).mean(),
    }


def crm_loss(
    logits: Array, gt: Array, weights: dict[str, float] | None = None
) -> tuple[Array, dict[str, Array]]:
    """(weighted total, unweighted terms) of the CRM loss; see the module docstring."""
    weights = CRM_WEIGHTS if weights is None else weights
    terms = crm_loss_terms(logits, gt)
    total = sum(weights[k] * terms[k] for k in CRM_WEIGHTS)
    return total, terms
