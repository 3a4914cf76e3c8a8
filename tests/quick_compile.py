"""Compile a test's program with XLA's cheap backend settings (no LLVM optimisation passes).

On the 2-core CI machine a whole-model train step compiles about twice as fast this way (a
shrunk PNA step measured 43 s instead of 100 s under load) and runs a little slower, which a
single-step test does not notice. Numerics are the same float32 program (only fusion and
instruction selection differ), so parity tolerances hold.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

FAST_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def quick_jit(fn: Callable[..., Any], *args: Any) -> Callable[..., Any]:
    """`jax.jit(fn)` lowered for `args` and compiled with `FAST_OPTIONS` (call it with
    arguments of the same shapes)."""
    return jax.jit(fn).lower(*args).compile(FAST_OPTIONS)
