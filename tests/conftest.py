"""Shared test fixtures."""

import jax
import pytest


@pytest.fixture(scope="module")
def highest_precision():
    """Full float32 matmuls for a parity-test module (GPUs otherwise use TF32 passes).

    Module-scoped, so it is in force before the module's own module-scoped fixtures.
    """
    old = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "highest")
    yield
    jax.config.update("jax_default_matmul_precision", old)
