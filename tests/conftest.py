"""Shared test fixtures, and the test processes' XLA settings.

Tests compile hundreds of small programs on XLA:CPU and run each a few times, so LLVM's
optimisation passes dominate their cost: `--xla_backend_optimization_level=0` (set here,
before JAX starts its backend, and inherited by the subprocesses tests launch) roughly halves
a compile-bound test's time. It changes code generation only, not the HLO the tests check
(operations, dtypes, precision); users and benchmarks run the default level.
"""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def highest_precision():
    """Full float32 matmuls for a parity-test module (GPUs otherwise use TF32 passes).

    Module-scoped, so it is in force before the module's own module-scoped fixtures.
    """
    old = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "highest")
    yield
    jax.config.update("jax_default_matmul_precision", old)
