"""TrainState: everything a resumed run needs (params, BN statistics, optimiser, step, rng)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
    """Attributes:
      step: int32 scalar, number of updates applied.
      params, batch_stats: the model's variable collections.
      opt_state: optax state.
      rng: base PRNG key; step k's dropout key is fold_in(rng, k).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array

    @property
    def variables(self) -> dict[str, Any]:
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_state(
    model: Any, tx: optax.GradientTransformation, rng: jax.Array, example: dict[str, Any]
) -> TrainState:
    """Initialise a TrainState for `model` from example inputs (shapes only matter).

    `example`: the model's positional inputs in call order, e.g. CRM {'image': [B, H, W, 3],
    'mask': [B, H, W, 1], 'coord'/'cell': [B, Q, 2]}, PNA {'image': [B, H, W, 3]}.
    """
    init_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
    example = {k: jnp.zeros(v.shape, v.dtype) for k, v in example.items()}
    variables = model.init(
        {"params": init_rng, "dropout": dropout_rng},
        *example.values(), train=False,
    )
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=state_rng,
    )
