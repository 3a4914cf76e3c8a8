"""`na2d` (fused neighborhood attention), both implementations, against a brute-force float64
reference and NATTEN 0.14.5's own outputs; lowering of the Pallas kernels for GPU and TPU.

The Pallas kernel runs in interpret mode here (slow): the maps are tiny, and every shape is
compiled once for values and gradients together.
"""

from __future__ import annotations

import collections
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_refine.ops.neighborhood import na2d
from tests.test_neighborhood import GOLDEN, _nhwc, brute_indices

pytestmark = pytest.mark.usefixtures("highest_precision")


def reference(q, k, v, rpb, g, L, d, scale):
    """Float64 numpy: out = softmax(scale q.k + rpb) v and the gradients of sum(out * g)."""
    q, k, v, rpb, g = (np.asarray(x, np.float64) for x in (q, k, v, rpb, g))
    _, H, W, _, _ = q.shape
    kr, kc, br, bc = brute_indices(H, W, L, d)
    keys, values = k[:, kr, kc], v[:, kr, kc]  # [B, H, W, L*L, h, D]
    logits = np.einsum("bijhd,bijnhd->bijhn", q * scale, keys)
    logits += np.transpose(rpb[:, br, bc], (1, 2, 0, 3))[None]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bijhn,bijnhd->bijhd", p, values)
    dp = np.einsum("bijhd,bijnhd->bijhn", g, values)
    ds = p * (dp - np.sum(p * dp, -1, keepdims=True))
    dq = scale * np.einsum("bijhn,bijnhd->bijhd", ds, keys)
    dk, dv, drpb = np.zeros_like(k), np.zeros_like(v), np.zeros_like(rpb)
    for n in range(L * L):
        at = (slice(None), kr[..., n], kc[..., n])
        np.add.at(dk, at, ds[..., n, None] * q * scale)
        np.add.at(dv, at, p[..., n, None] * g)
        np.add.at(drpb, (slice(None), br[..., n], bc[..., n]), ds[..., n].sum(0).transpose(2, 0, 1))
    return out, (dq, dk, dv, drpb)


@functools.partial(jax.jit, static_argnames=("L", "d", "implementation"))
def value_and_grads(q, k, v, rpb, g, *, L, d, implementation):
    """One compilation per shape: the output and the gradients of sum(out * g)."""

    def f(q, k, v, rpb):
        out = na2d(q, k, v, L, dilation=d, rpb=rpb, implementation=implementation)
        return out, jnp.sum(out.astype(jnp.float32) * g)

    (out, _), vjp = jax.vjp(f, q, k, v, rpb)
    return out, vjp((jnp.zeros_like(out), jnp.ones((), jnp.float32)))


def random_inputs(seed, shape, L, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k, v, g = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(4))
    rpb = jnp.asarray(rng.standard_normal((shape[3], 2 * L - 1, 2 * L - 1)), jnp.float32)
    return q, k, v, rpb, g.astype(jnp.float32)


CASES = [
    # (shape [B, H, W, heads, D], L, dilation): dilation 2 with residue classes of unequal
    # (odd) size; three column tiles of 16 queries (the last one clamped), two row blocks of
    # the dq kernel, a 7-row window, head dim 8 padded to 16; dilation 3 with a window that
    # fills a class. (B=2: the golden test.)
    ((1, 12, 13, 2, 16), 5, 2),
    ((1, 9, 37, 2, 8), 7, 1),
    ((1, 16, 11, 1, 8), 3, 3),
]


@pytest.mark.parametrize(
    "shape,L,d,implementation",
    [(*case, "pallas") for case in CASES] + [(*CASES[1], "xla")],
)
def test_values_and_gradients_match_float64(shape, L, d, implementation):
    q, k, v, rpb, g = random_inputs(0, shape, L)
    out, grads = value_and_grads(q, k, v, rpb, g, L=L, d=d, implementation=implementation)
    ref_out, ref_grads = reference(q, k, v, rpb, g, L, d, shape[-1] ** -0.5)
    np.testing.assert_allclose(out, ref_out, atol=2e-6, rtol=1e-5)
    for name, ours, ref in zip(("dq", "dk", "dv", "drpb"), grads, ref_grads, strict=True):
        np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-5, err_msg=name)


def test_bf16():
    """bf16 inputs (float32 accumulation): within bf16 rounding of the float64 result on the
    same (rounded) inputs."""
    shape, L, d = (1, 12, 13, 2, 16), 5, 2
    q, k, v, rpb, g = random_inputs(1, shape, L, jnp.bfloat16)
    ref_out, ref_grads = reference(q, k, v, 0 * rpb, g, L, d, 16**-0.5)
    out, grads = value_and_grads(q, k, v, 0 * rpb, g, L=L, d=d, implementation="pallas")
    assert out.dtype == jnp.bfloat16
    assert [x.dtype for x in grads] == [jnp.bfloat16] * 3 + [jnp.float32]
    np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, atol=3e-2, rtol=2e-2)
    for name, ours, ref in zip(("dq", "dk", "dv", "drpb"), grads, ref_grads, strict=True):
        scale = np.abs(ref).max()
        np.testing.assert_allclose(
            np.asarray(ours, np.float32) / scale, ref / scale, atol=2e-2, err_msg=name
        )


def test_pallas_matches_natten_golden(case="k9_d2_19x23"):
    if not GOLDEN.exists():
        pytest.skip(f"NATTEN golden file not found at {GOLDEN}")
    data = np.load(GOLDEN)
    spec, size = case.rsplit("_", 1)
    L, d = (int(s[1:]) for s in spec.split("_"))
    q, k, v, gout = (_nhwc(data[f"{n}_{size}"]) for n in ("q", "k", "v", "gout"))
    rpb = jnp.asarray(data[f"rpb_k{L}"])
    # NATTEN's q is not scaled: scale=1 reproduces its logits.
    f = functools.partial(na2d, kernel_size=L, dilation=d, scale=1.0, implementation="pallas")
    out, vjp = jax.vjp(lambda q, k, v, rpb: f(q, k, v, rpb=rpb), q, k, v, rpb)
    np.testing.assert_allclose(out, _nhwc(data[f"out64_{case}"]), atol=1e-5)
    np.testing.assert_allclose(out, _nhwc(data[f"out_{case}"]), atol=1.5e-5)
    grads = vjp(gout)
    for name, ours in zip(("dq", "dk", "dv"), grads[:3], strict=True):
        np.testing.assert_allclose(
            ours, _nhwc(data[f"{name}_{case}"]), atol=6e-5, rtol=1e-5, err_msg=name
        )
    np.testing.assert_allclose(grads[3], data[f"drpb_{case}"], atol=6e-5, rtol=1e-5)


KERNELS = ("na2d_fwd", "na2d_bwd_dq", "na2d_bwd_dkdv")


@pytest.mark.parametrize(
    "platform,custom_call",
    [("cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu_custom_call")],
)
def test_pallas_lowers_for_gpu_and_tpu(platform, custom_call):
    """Forward and gradient export for the platform; the lowering holds the three kernels."""
    L, d = 5, 2
    x = jax.ShapeDtypeStruct((1, 12, 13, 2, 16), jnp.bfloat16)
    rpb = jax.ShapeDtypeStruct((2, 2 * L - 1, 2 * L - 1), jnp.float32)

    def loss(q, k, v, rpb):
        out = na2d(q, k, v, L, dilation=d, rpb=rpb, implementation="pallas")
        return jnp.sum(out.astype(jnp.float32))

    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    texts = [
        jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(
            x, x, x, rpb
        ).mlir_module()
        for fn in (loss, jax.grad(loss, argnums=(0, 1, 2, 3)))
    ]
    forward, backward = (re.findall(rf"custom_call @{re.escape(custom_call)}", t) for t in texts)
    assert len(forward) == 1 and len(backward) == 3
    assert "na2d_fwd" in texts[0]
    assert all(name in texts[1] for name in KERNELS)


def test_default_implementation_and_errors():
    q, k, v, rpb, _ = random_inputs(2, (1, 9, 9, 2, 8), 3)
    # The default is chosen by the platform lowered for: on CPU the "xla" kernels' program
    # (the other branch pruned; only the platform switch remains), on GPU/TPU the Pallas
    # kernel (tests/test_train_backends.py).
    def ops(implementation):
        fn = functools.partial(na2d, kernel_size=3, rpb=rpb, implementation=implementation)
        text = jax.jit(fn).lower(q, k, v).as_text()
        found = collections.Counter(re.findall(r"stablehlo\.\w+", text))
        return {op: n for op, n in found.items()
                if op not in ("stablehlo.case", "stablehlo.constant", "stablehlo.return")}

    if jax.default_backend() == "cpu":
        assert ops(None) == ops("xla") != ops("pallas")
    for bias in (rpb, None):  # rpb=None: a zero bias
        fused = functools.partial(na2d, kernel_size=3, rpb=bias, implementation="pallas")
        assert "pallas_call" in str(jax.make_jaxpr(lambda q, f=fused: f(q, k, v))(q))
    with pytest.raises(ValueError, match="implementation must be"):
        na2d(q, k, v, 3, implementation="cuda")
    with pytest.raises(ValueError, match="value dtype"):
        na2d(q, k, v.astype(jnp.bfloat16), 3)
    with pytest.raises(ValueError, match="key shape"):
        na2d(q, k[:, :8], v, 3)
    with pytest.raises(ValueError, match="rpb must be"):
        na2d(q, k, v, 3, rpb=rpb[:, :4])
    with pytest.raises(ValueError, match="height H >= kernel_size"):
        na2d(q, k, v, 5, dilation=2)


def test_tpu_tiling_in_interpret_mode():
    """The TPU tiling (whole rows, bias-and-mask tables) computes the same numbers; it runs
    here in interpret mode, so not only its lowering is checked."""
    from jax_refine.ops import neighborhood_pallas as nap

    shape, L, d = (1, 12, 13, 2, 8), 5, 2
    q, k, v, rpb, g = random_inputs(3, shape, L)
    static = dict(L=L, d=d, scale=8**-0.5)
    out, lse = jax.jit(functools.partial(nap.forward_impl, "tpu", True, **static))(q, k, v, rpb)
    grads = jax.jit(functools.partial(nap.backward_impl, "tpu", True, **static))(
        q, k, v, rpb, out, lse, g
    )
    ref_out, ref_grads = reference(q, k, v, rpb, g, L, d, 8**-0.5)
    np.testing.assert_allclose(out, ref_out, atol=2e-6, rtol=1e-5)
    for name, ours, ref in zip(("dq", "dk", "dv", "drpb"), grads, ref_grads, strict=True):
        np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-5, err_msg=name)
