"""Optimiser recipes (hyperparameters come from the config, never from the step).

CRM (paper / reference `train.py`): PyTorch `Adam(weight_decay=wd)`, i.e. L2 decay *added to
the gradient before* Adam's moment scaling (not AdamW), with a piecewise-constant learning
rate multiplied by `lr_decay_factor` at each boundary: the reference's `MultiStepLR`, stepped
once per iteration, so 0-based step s runs at lr * factor ** (number of boundaries <= s),
which is optax's `piecewise_constant_schedule` on the step count. Its run length is
`whole_epoch_steps`.

PNA: AdamW with polynomial decay, global-norm clipping and a smaller learning rate for the
backbone (`optax.multi_transform` over a parameter label function).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax


def whole_epoch_steps(iterations: int, num_examples: int, batch_size: int) -> int:
    """The CRM reference's run length: `iterations` rounded to whole epochs.

    Its `train.py` runs total_epoch = int(iterations / len(loader) + 0.5) full epochs of
    len(loader) = num_examples // batch_size batches (`DataLoader(drop_last=True)`), so it
    stops at a multiple of the epoch, not at `iterations`: with its default 45,000 and its
    36,572 training pairs at batch 12, 15 epochs of 3,047 = 45,705 steps (its released
    model is `model_45705`).
    """
    per_epoch = num_examples // batch_size
    if per_epoch < 1:
        raise ValueError(f"{num_examples} examples hold no whole batch of {batch_size}")
    return int(iterations / per_epoch + 0.5) * per_epoch


def piecewise_boundaries(total_steps: int, fractions: Sequence[float]) -> list[int]:
    """Boundaries at fractions of the run, rounded to steps (the CRM reference's milestones
    22,500 and 37,500 of its 45,705 steps are the fractions 22,500 / 45,705 and
    37,500 / 45,705)."""
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
    boundary_fractions: Sequence[float] = (22_500 / 45_705, 37_500 / 45_705),
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
