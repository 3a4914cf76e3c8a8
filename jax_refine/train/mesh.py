"""Device mesh, shardings and global batches (one 'data' axis over every device).

Multi-host: `maybe_initialize_distributed` calls `jax.distributed.initialize()` when the
config asks for it (`config.distributed`) or when the standard variables
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID are set. Every process then
feeds only its local slice of the global batch, and `global_batch` assembles the global
arrays with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed(enabled: bool = False) -> None:
    """Initialise multi-process JAX if `enabled` or the JAX_* environment variables say so."""
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
    elif enabled:
        jax.distributed.initialize()  # cluster auto-detection (SLURM, TPU pods, ...)


def make_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh over all devices of all processes, axis 'data' (automatic sharding mode:
    XLA propagates the batch sharding; BatchNorm reduces over the global batch)."""
    return jax.make_mesh(
        (jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
    )


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis split over 'data'."""
    return NamedSharding(mesh, P(DATA_AXIS))


def local_batch_size(global_batch_size: int) -> int:
    """This process's share of the global batch (checked to divide evenly over devices)."""
    if global_batch_size % jax.device_count():
        raise ValueError(f"batch_size {global_batch_size} is not divisible by the "
                         f"{jax.device_count()} devices")
    return global_batch_size // jax.process_count()


def global_batch(mesh: jax.sharding.Mesh, local: dict[str, np.ndarray]) -> dict[str, Any]:
    """This process's slice {name: [local_batch, ...]} -> global arrays sharded on 'data'."""
    sharding = data_sharded(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local.items()
    }
