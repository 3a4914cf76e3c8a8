"""Optimiser recipes (hyperparameters come from the config, never from the step).

CRM (paper / reference `train.py`): PyTorch `Adam(weight_decay=wd)`, i.e. L2 decay *added to
the gradient before* Adam's moment scaling (not AdamW), with a piecewise-constant learning
rate multiplied by `lr_decay_factor` at each boundary: the reference's `MultiStepLR`, stepped
once per iteration, so 0-based step s runs at lr * factor ** (number of boundaries <= s),
which is optax's `piecewise_constant_schedule` on the step count. Its run length is
`whole_epoch_steps`.

PNA (`pna_optimizer`): the detectron2 reference's `Trainer.build_optimizer` (PNA repo
`train_net.py`) and mmseg's AdamW + `paramwise_cfg`, one implementation:
* full-model gradient clipping as `torch.nn.utils.clip_grad_norm_` (`clip_grad_norm`; 0 = none);
* AdamW (torch defaults: betas 0.9 / 0.999, eps 1e-8, decoupled decay scaled by the lr);
* decay per parameter (`decay_labels`): `weight_decay`, or `weight_decay_norm` for the scale and
  bias of normalisation layers (detectron2's WEIGHT_DECAY_NORM: layers found by their Flax
  class, `norm_layer_paths`), or 0 for paths containing one of `no_decay_keys` (mmseg's
  `custom_keys` with decay_mult 0; detectron2's name rule);
* learning rate `warmup_poly_schedule` (detectron2 WarmupPolyLR, mmcv poly + linear warmup),
  times `backbone_multiplier` for the parameters under the top-level 'backbone'.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jax_refine.layers.restormer import RestormerBlock


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


# Flax classes of normalisation layers (PyTorch's BatchNorm*, SyncBatchNorm, GroupNorm,
# InstanceNorm*, LayerNorm: the types detectron2's and mmcv's optimiser builders test).
NORM_TYPES = (nn.BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.InstanceNorm)
# Norm layers directly inside these modules are custom `nn.Module`s in the reference
# (Restormer's `WithBias_LayerNorm`), which the type tests do not recognise: they decay as
# weights there, and so here.
PLAIN_NORM_PARENTS = (RestormerBlock,)


def norm_layer_paths(model: nn.Module, example: dict[str, Any]) -> frozenset[str]:
    """'/'-joined parameter paths of the model's normalisation layers (`NORM_TYPES`, except
    those directly inside `PLAIN_NORM_PARENTS`), e.g. 'backbone/stem/bn1'.

    Found by their Flax class during an abstract `model.init` on `example` (the model's
    positional inputs, shapes only, as `state.create_state` takes them): no compilation,
    no dependence on how layers are named.
    """
    found: set[str] = set()

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (context.method_name == "__call__" and isinstance(module, NORM_TYPES)
                and not isinstance(module.parent, PLAIN_NORM_PARENTS)):
            found.add("/".join(module.scope.path))
        return next_fun(*args, **kwargs)

    def init():
        inputs = [jnp.zeros(v.shape, v.dtype) for v in example.values()]
        return model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, *inputs,
                          train=False)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(init)
    return frozenset(found)


NormPaths = Collection[str] | Callable[[], Collection[str]]


def decay_labels(no_decay_keys: Sequence[str] = (), norm_paths: NormPaths = ()
                 ) -> Callable[[Any], Any]:
    """Params -> labels 'none' (path contains one of `no_decay_keys`), 'norm' (the parameter
    of a layer in `norm_paths`) or 'decay'; paths are '/'-joined ('pna_head/stages_res2/
    blocks_0/attn/rpb'). `norm_paths` may be a function (e.g. `norm_layer_paths` bound to the
    model), called once, when labels are first needed (the optimiser's init)."""
    no_decay_keys = tuple(no_decay_keys)

    @functools.cache
    def prefixes() -> tuple[str, ...]:
        return tuple(p + "/" for p in (norm_paths() if callable(norm_paths) else norm_paths))

    def one(path, _):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        if any(key in name for key in no_decay_keys):
            return "none"
        return "norm" if name.startswith(prefixes()) else "decay"

    return lambda params: jax.tree_util.tree_map_with_path(one, params)


def clip_grad_norm(max_norm: float) -> optax.GradientTransformation:
    """`torch.nn.utils.clip_grad_norm_`: g * min(1, max_norm / (||g|| + 1e-6)), ||g|| the
    global L2 norm (optax's `clip_by_global_norm` has no 1e-6, which matters when the norm is
    near max_norm = 0.01)."""

    def update(updates, state, params=None):
        del params
        coef = jnp.minimum(max_norm / (optax.tree.norm(updates) + 1e-6), 1.0)
        return jax.tree_util.tree_map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def warmup_poly_schedule(
    learning_rate: float, total_steps: int, power: float = 0.9, warmup_steps: int = 0,
    warmup_ratio: float = 1e-3,
) -> optax.Schedule:
    """lr_k = learning_rate * w_k * (1 - k / total_steps) ** power, with the linear warmup
    w_k = warmup_ratio + (1 - warmup_ratio) * k / warmup_steps for k < warmup_steps, else 1.

    This is detectron2's WarmupPolyLR (warmup_factor = warmup_ratio, 'linear', constant_ending
    0) and mmcv's poly policy with min_lr 0 and warmup='linear' (lr_k = regular_k * (1 - (1 -
    ratio) * (1 - k / warmup))): the same factor, applied to the decayed rate of step k.
    """
    poly = optax.polynomial_schedule(learning_rate, 0.0, power, total_steps)
    if warmup_steps <= 0:
        return poly

    def schedule(count):
        k = jnp.asarray(count, jnp.float32)
        warm = jnp.where(k < warmup_steps,
                         warmup_ratio + (1.0 - warmup_ratio) * k / warmup_steps, 1.0)
        return warm * poly(count)

    return schedule


def pna_optimizer(
    learning_rate: float,
    total_steps: int,
    *,
    weight_decay: float = 0.01,
    power: float = 0.9,
    clip_norm: float = 0.01,
    backbone_multiplier: float = 0.1,
    label_fn: Callable[[Any], Any] | None = None,
    warmup_steps: int = 0,
    warmup_ratio: float = 1e-3,
    weight_decay_norm: float | None = None,
    no_decay_keys: Sequence[str] = (),
    norm_paths: NormPaths = (),
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, head schedule) of the PNA recipe (module docstring).

    clip_grad_norm(clip_norm) (skipped if 0) -> Adam moments -> + decay * param, the decay
    chosen by `decay_labels(no_decay_keys, norm_paths)` (weight_decay_norm None: norms decay
    like weights) -> x -lr_k, lr_k = `warmup_poly_schedule`; parameters labelled 'backbone'
    by `label_fn` (default: top-level key 'backbone') use lr_k * backbone_multiplier (their
    decay too, as torch's AdamW scales decay by the group's lr).
    """
    def schedule_for(lr: float) -> optax.Schedule:
        return warmup_poly_schedule(lr, total_steps, power, warmup_steps, warmup_ratio)

    norms_differ = weight_decay_norm is not None and weight_decay_norm != weight_decay
    labels = decay_labels(no_decay_keys, norm_paths if norms_differ else ())

    def mask(kind: str) -> Callable[[Any], Any]:
        return lambda params: jax.tree_util.tree_map(lambda label: label == kind, labels(params))

    schedule = schedule_for(learning_rate)
    tx = optax.chain(
        clip_grad_norm(clip_norm) if clip_norm > 0 else optax.identity(),
        optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
        optax.add_decayed_weights(weight_decay, mask("decay")),
        optax.add_decayed_weights(weight_decay_norm or 0.0, mask("norm")),
        optax.multi_transform(
            {
                "head": optax.scale_by_learning_rate(schedule),
                "backbone": optax.scale_by_learning_rate(
                    schedule_for(learning_rate * backbone_multiplier)),
            },
            label_fn or backbone_label_fn(),
        ),
    )
    return tx, schedule
