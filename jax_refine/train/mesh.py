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


GPU_DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def configure_determinism(gpu_deterministic_ops: bool) -> None:
    """Ask XLA for deterministic GPU reductions (`config.deterministic`).

    On GPU, XLA's scatter-adds (the gradients of gathers: the CRM decoder's feature lookups)
    and some reductions use atomics, so two runs, or a run and its resume, drift apart at
    float precision and then visibly. `--xla_gpu_deterministic_ops=true` makes them
    deterministic at some speed cost. XLA reads XLA_FLAGS once, when the backend starts:
    `train_and_evaluate` calls this before any JAX computation; a process whose backend has
    already started keeps its flags (a warning says so). CPU needs nothing on one machine:
    two runs with the same number of cores are bitwise equal, across saves and resumes
    (tests/test_train_robust.py). Different core counts give different bits: a tiny 8-step
    run pinned to 1 core (`taskset -c 0`) ends with other parameters than on 2 cores, also
    with `--xla_cpu_multi_thread_eigen=false` (measured 2026-12-04, jax 0.10.2), so XLA:CPU
    splits some reductions by thread count; the data pipeline's batches are identical.
    """
    if not gpu_deterministic_ops:
        return
    current = os.environ.get("XLA_FLAGS", "")
    if GPU_DETERMINISTIC_FLAG in current:
        return
    os.environ["XLA_FLAGS"] = f"{current} {GPU_DETERMINISTIC_FLAG}".strip()
    from jax._src import xla_bridge  # the only way to ask whether backends have started

    if xla_bridge.backends_are_initialized():
        import warnings

        warnings.warn(f"config.deterministic: JAX's backend has already started, so "
                      f"{GPU_DETERMINISTIC_FLAG} applies only to new processes; set it in "
                      f"XLA_FLAGS before starting Python", stacklevel=2)


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


def make_local_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh over this process's devices, axis 'data' (work that each process does on
    its own: evaluation of its share of a set, `distributed_eval`)."""
    return jax.sharding.Mesh(np.asarray(jax.local_devices()), (DATA_AXIS,))


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
