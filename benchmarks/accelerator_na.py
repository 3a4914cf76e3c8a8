"""Accelerator section: `na2d` "xla" against "pallas" (the fused kernel), and the PNA model.

    from accelerator_na import run      # benchmarks/ on sys.path, as benchmarks/accelerator.py
    rows = run(small=False)             # on a GPU/TPU: the issue-17 cases, <= 150 s
    rows = run(small=True)              # on CPU in interpret mode: tiny shapes (a test runs it)

One row per case (flat dict, the same keys in every row):
  case               e.g. "na2d B=8 128^2 12x32 L=9 d=1 bf16" or "pna fwd+bwd B=8 512^2 f32"
  xla_fwd_ms, pallas_fwd_ms, xla_fwdbwd_ms, pallas_fwdbwd_ms
                     median of >= 10 runs after a warm-up run (compiled ahead of time),
                     jax.block_until_ready; the PNA model has forward+backward only (NaN);
                     forward+backward = gradients of sum(out * g) w.r.t. q, k, v and rpb (for
                     the PNA model: of a loss on all stage logits w.r.t. the parameters)
  xla_fwdbwd_temp_mb, pallas_fwdbwd_temp_mb
                     XLA's memory analysis of the compiled forward+backward (temporaries)
  max_rel_err        max |pallas - xla| / max |xla| of the output (over all its leaves)
  max_rel_err_grad   the same for the gradients
  error              "" or why the case failed / was skipped (the numbers are then NaN)
Inputs are random normal (rpb 0.02 * normal), at the platform's default matmul precision
(float32 dots may use TF32 on GPUs: say so next to the figures). Cases run in order of
importance; once the section has used its time budget the rest become rows with error
"skipped: time budget". Imports no TensorFlow, TFDS or ml_collections.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_refine.ops.neighborhood import na2d

IMPLEMENTATIONS = ("xla", "pallas")
KEYS = (
    "case",
    "xla_fwd_ms",
    "pallas_fwd_ms",
    "xla_fwdbwd_ms",
    "pallas_fwdbwd_ms",
    "xla_fwdbwd_temp_mb",
    "pallas_fwdbwd_temp_mb",
    "max_rel_err",
    "max_rel_err_grad",
    "error",
)


def _row(case: str, **values: Any) -> dict:
    row = {key: math.nan for key in KEYS}
    row.update(case=case, error="", **values)
    return row


def _time_ms(fn: Callable, args: tuple, repeats: int) -> tuple[float, Any]:
    """Median milliseconds of `repeats` calls after a warm-up call; the warm-up's result."""
    out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times)), out


def _rel_err(a, b) -> float:
    """max |a - b| / max |b| over all leaves of two pytrees (leaves with ~0 values, e.g. the
    gradient of a LayerNorm scale feeding nothing, would make a per-leaf ratio meaningless)."""
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    diff, size = 0.0, 0.0
    for x, y in pairs:
        x, y = x.astype(jnp.float32), y.astype(jnp.float32)
        diff = max(diff, float(jnp.max(jnp.abs(x - y))))
        size = max(size, float(jnp.max(jnp.abs(y))))
    return diff / max(size, 1e-30)


def _temp_mb(compiled) -> float:
    analysis = compiled.memory_analysis()
    return math.nan if analysis is None else analysis.temp_size_in_bytes / 2**20


def _compare(case: str, make: Callable[[str], tuple[Callable | None, Callable]], args, repeats):
    """Time forward and forward+backward of both implementations (compiled ahead of time);
    compare their results. make(impl) -> (forward or None, forward+backward); without a
    forward, forward+backward returns (value, gradients) and only it is timed."""
    values: dict[str, Any] = {}
    results = {}
    for impl in IMPLEMENTATIONS:
        fwd, fwdbwd = make(impl)
        if fwd is not None:
            fwd = jax.jit(fwd).lower(*args).compile()
            values[f"{impl}_fwd_ms"], out = _time_ms(fwd, args, repeats)
        fwdbwd = jax.jit(fwdbwd).lower(*args).compile()
        values[f"{impl}_fwdbwd_ms"], grads = _time_ms(fwdbwd, args, repeats)
        values[f"{impl}_fwdbwd_temp_mb"] = _temp_mb(fwdbwd)
        results[impl] = (out, grads) if fwd is not None else grads
    (out_p, grads_p), (out_x, grads_x) = results["pallas"], results["xla"]
    values["max_rel_err"] = _rel_err(out_p, out_x)
    values["max_rel_err_grad"] = _rel_err(grads_p, grads_x)
    return _row(case, **values)


def _na_case(B: int, size: int, heads: int, D: int, L: int, d: int, dtype, repeats: int) -> dict:
    case = _na_name(B, size, heads, D, L, d, dtype)
    rng = np.random.default_rng(0)
    shape = (B, size, size, heads, D)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(3))
    g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    rpb = jnp.asarray(0.02 * rng.standard_normal((heads, 2 * L - 1, 2 * L - 1)), jnp.float32)

    def make(impl):
        def forward(q, k, v, rpb):
            return na2d(q, k, v, L, dilation=d, rpb=rpb, implementation=impl)

        def loss(q, k, v, rpb):
            return jnp.sum(forward(q, k, v, rpb).astype(jnp.float32) * g)

        return forward, jax.grad(loss, argnums=(0, 1, 2, 3))

    return _compare(case, make, (q, k, v, rpb), repeats)


def _pna_case(B: int, size: int, dtype, small: bool, repeats: int) -> dict:
    """The PNA segmentor (R-52 + FCN head + PNA head, 21 classes): forward+backward only (the
    mean square of all stage logits and its parameter gradients; max_rel_err compares the
    loss). small=True: a PNA head alone (one
    stage of width 32, window 3, no self-aggregation module) on random res2 features of a
    `size`^2 image, for CPU tests.

    The model does not take an attention implementation, so the layers' default (None: the
    backend's best) is overridden per run by intercepting `NeighborhoodCrossAttention`.
    """
    import flax.linen as nn

    from jax_refine.layers import NeighborhoodCrossAttention
    from jax_refine.models.pna import PNAHead, build_pna

    name = "bf16" if dtype == jnp.bfloat16 else "f32"
    rng = np.random.default_rng(0)
    if small:
        case = f"pna head fwd+bwd B={B} {size}^2 {name}"
        model = PNAHead(3, embed_dims=(32,), window_sizes=(3,), in_features=("res2",),
                        use_sa=False, dtype=dtype)  # fmt: skip
        features = {"res2": jnp.asarray(rng.standard_normal((B, size // 4, size // 4, 16)), dtype)}
        coarse = jnp.asarray(rng.standard_normal((B, size >> 5, size >> 5, 3)), dtype)
        inputs = (coarse, features)
    else:
        case = f"pna fwd+bwd B={B} {size}^2 {name}"
        model = build_pna("fcn", 21, dtype=dtype)
        inputs = (jnp.asarray(rng.uniform(0, 255, (B, size, size, 3)), dtype),)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), *inputs)

    def with_impl(impl: str, fn: Callable) -> Callable:
        def interceptor(next_fun, args, kwargs, context):
            if isinstance(context.module, NeighborhoodCrossAttention):
                # Flax modules are frozen dataclasses: set the field on this bound instance.
                object.__setattr__(context.module, "implementation", impl)
            return next_fun(*args, **kwargs)

        def wrapped(*args):
            with nn.intercept_methods(interceptor):
                return fn(*args)

        return wrapped

    def make(impl):
        def loss(params, *inputs):
            logits = model.apply(params, *inputs)
            return sum(jnp.mean(jnp.square(p.astype(jnp.float32))) for p in logits)

        return None, with_impl(impl, jax.value_and_grad(loss))

    return _compare(case, make, (params, *inputs), repeats)


def _na_name(B, size, heads, D, L, d, dtype) -> str:
    return f"na2d B={B} {size}^2 {heads}x{D} L={L} d={d} " + (
        "bf16" if dtype == jnp.bfloat16 else "f32"
    )


def run(small: bool) -> list[dict]:
    """The section's rows (see the module docstring). small=True: tiny shapes, CPU-friendly.

    Order: the issue's target case (B=8, L=9, d=1, bf16 then f32), the PNA model, then the
    other NA cases while the section has used less than its budget (GPU compiles take
    seconds per function: 4 per NA case, 2 large ones for the model).
    """
    if small:
        na_cases = [(1, 12, 2, 16, 5, 2, jnp.float32)]
        pna = (1, 32, jnp.float32)
        repeats, budget_s = 2, math.inf
    else:
        na_cases = [
            (B, 128, 12, 32, L, d, dt)
            for B in (8, 1)
            for L in (9, 7)
            for d in (1, 2)
            for dt in (jnp.bfloat16, jnp.float32)
        ]
        pna = (8, 512, jnp.float32)
        repeats, budget_s = 10, 100.0
    rows, start = [], time.perf_counter()
    cases = [("na", c) for c in na_cases[:2]] + [("pna", pna)] + [("na", c) for c in na_cases[2:]]
    for kind, spec in cases:
        if kind == "pna":
            B, size, dtype = spec
            name = f"pna fwd+bwd B={B} {size}^2"
        else:
            name = _na_name(*spec)
        if time.perf_counter() - start > budget_s:
            rows.append(_row(name, error="skipped: time budget"))
            continue
        try:
            if kind == "pna":
                rows.append(_pna_case(B, size, dtype, small, repeats))
            else:
                rows.append(_na_case(*spec, repeats))
        except Exception as e:  # noqa: BLE001 - one failing case becomes a row
            rows.append(_row(name, error=f"{type(e).__name__}: {e}"[:500]))
    return rows


if __name__ == "__main__":
    import sys

    for row in run(small="--small" in sys.argv):
        print(row, flush=True)
