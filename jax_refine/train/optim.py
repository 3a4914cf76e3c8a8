"""Optimiser recipes (hyperparameters come from the config, never from the step).

CRM (paper / reference `train.py`): PyTorch `Adam(weight_decay=wd)`, i.e. L2 decay *added to
the gradient before* Adam's moment scaling (not AdamW), with a piecewise-constant learning
rate multiplied by `lr_decay_factor` at each boundary.

PNA: AdamW with polynomial decay, global-norm clipping and a smaller learning rate for the
backbone (`optax.multi_transform` over a parameter label function).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax


def piecewise_boundaries(total_steps: int, fractions: Sequence[float]) -> list[int]:
    """Boundaries at fractions of the run (the paper's 22,500 / 37,500 of 45,000 = 0.5, 5/6)."""
    return [int(round(f * total_steps)) for f in fractions]


def crm_schedule(
    learning_rate: float, total_steps: int, boundary_fractions: Sequence[float],
    decay_factor: float = 0.1,
) -> optax.Schedule:
    """Piecewise-constant learning rate: x decay_factor at each boundary."""
    boundaries = piecewise_boundaries(total_steps, boundary_fractions)
    return optax.piecewise_constant_schedule(
        learning_rate, {b: decay_factor for b in boundaries if b > 0}
    )


def crm_optimizer(
    learning_rate: float,
    total_steps: int,
    boundary_fractions: Sequence[float] = (0.5, 37_500 / 45_000),
    decay_factor: float = 0.1,
    weight_decay: float = 1e-4,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule) of the CRM recipe: PyTorch-style Adam with L2 weight decay."""
    schedule = crm_schedule(learning_rate, total_steps, boundary_fractions, decay_factor)
    tx = optax.chain(
        optax.add_decayed_weights(weight_decay),  # grad += wd * param, as torch.optim.Adam
        optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
        optax.scale_by_learning_rate(schedule),
    )
    return tx, schedule


def backbone_label_fn(backbone_keys: Sequence[str] = ("backbone",)) -> Callable[[Any], Any]:
    """Label params 'backbone' if their top-level module name is in backbone_keys, else 'head'."""

    def label(params):
        return {
            k: jax.tree_util.tree_map(lambda _, k=k: "backbone" if k in backbone_keys else "head",
                                      v)
            for k, v in params.items()
        }

    return label


def pna_optimizer(
    learning_rate: float,
    total_steps: int,
    *,
    weight_decay: float = 0.01,
    power: float = 0.9,
    clip_norm: float = 0.01,
    backbone_multiplier: float = 0.1,
    label_fn: Callable[[Any], Any] | None = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, head schedule) of the PNA recipe.

    Global-norm clipping on the full gradient, then AdamW whose learning rate follows
    lr * (1 - step / total_steps) ** power; parameters labelled 'backbone' by `label_fn`
    (default: top-level key 'backbone') use lr * backbone_multiplier.
    """
    def poly(lr: float) -> optax.Schedule:
        return optax.polynomial_schedule(lr, 0.0, power, total_steps)

    label_fn = label_fn or backbone_label_fn()
    schedule = poly(learning_rate)
    tx = optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.multi_transform(
            {
                "head": optax.adamw(schedule, weight_decay=weight_decay),
                "backbone": optax.adamw(
                    poly(learning_rate * backbone_multiplier), weight_decay=weight_decay
                ),
            },
            label_fn,
        ),
    )
    return tx, schedule
