"""jax_refine.ops.neighborhood against a brute-force reference and NATTEN 0.14.5 outputs."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_refine.ops.neighborhood import bias_start, na2d_av, na2d_qk, window_start
from tests.natten_rules import natten_pb_start, natten_window_start

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "reference" / "natten_0_14_5_cpu.npz"


# --- Brute-force reference: NATTEN's integer rules written out literally, one query at a time.


def brute_indices(H: int, W: int, k: int, d: int):
    """Gather indices [H, W, k*k] of key rows/cols and rpb rows/cols, from the literal rules."""
    kr = np.zeros((H, W, k * k), np.int32)
    kc, br, bc = np.zeros_like(kr), np.zeros_like(kr), np.zeros_like(kr)
    for i in range(H):
        ni, pi = natten_window_start(i, H, k, d), natten_pb_start(i, H, k, d)
        for j in range(W):
            nj, pj = natten_window_start(j, W, k, d), natten_pb_start(j, W, k, d)
            for a in range(k):
                for b in range(k):
                    kr[i, j, a * k + b] = ni + a * d
                    kc[i, j, a * k + b] = nj + b * d
                    br[i, j, a * k + b] = pi + a
                    bc[i, j, a * k + b] = pj + b
    return kr, kc, br, bc


def brute_qk(q, k, rpb, ks, d):
    """Gathers the whole neighbourhood (fine for small maps); jnp so that jax.grad works."""
    _, H, W, _, _ = q.shape
    kr, kc, br, bc = brute_indices(H, W, ks, d)
    keys = k[:, kr, kc]  # [B, H, W, L*L, h, D]
    logits = jnp.einsum("bijhd,bijnhd->bijhn", q, keys, precision="highest")
    if rpb is not None:
        logits = logits + jnp.transpose(rpb[:, br, bc], (1, 2, 0, 3))[None]
    return logits


def brute_av(attn, v, ks, d):
    _, H, W, _, _ = v.shape
    kr, kc, _, _ = brute_indices(H, W, ks, d)
    return jnp.einsum("bijhn,bijnhd->bijhd", attn, v[:, kr, kc], precision="highest")


def random_inputs(seed, shape, ks, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k, v, g = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(4))
    rpb = jnp.asarray(rng.standard_normal((shape[3], 2 * ks - 1, 2 * ks - 1)), dtype)
    return q, k, v, rpb, g


def test_window_rules_match_natten_literal():
    for n in range(3, 40):
        for k in (3, 5, 7, 9, 11, 13):
            for d in (1, 2, 3, 4):
                if n < k * d:
                    continue
                ref_n = [natten_window_start(i, n, k, d) for i in range(n)]
                ref_p = [natten_pb_start(i, n, k, d) for i in range(n)]
                np.testing.assert_array_equal(window_start(n, k, d), ref_n)
                np.testing.assert_array_equal(bias_start(n, k, d), ref_p)


CASES = [
    # (H, W, kernel, dilation)
    (3, 3, 3, 1),
    (7, 11, 3, 1),
    (13, 6, 3, 2),
    (5, 5, 5, 1),
    (11, 17, 5, 2),
    (7, 9, 7, 1),
    (15, 14, 7, 2),
    (21, 23, 7, 3),
    (9, 9, 9, 1),
    (19, 29, 9, 2),
    (27, 28, 9, 3),
    (11, 13, 11, 1),
    (23, 22, 11, 2),
    (13, 13, 13, 1),
    (17, 14, 13, 1),
    (31, 26, 13, 2),
    # q.k tiles of 8 queries: exact multiples, overlapping last tiles, interior tiles, one
    # tile covering the whole axis.
    (16, 24, 5, 1),
    (25, 17, 7, 1),
    (8, 8, 3, 2),
    (41, 9, 9, 1),
]


@pytest.mark.parametrize("H,W,ks,d", CASES)
def test_forward_matches_brute_force(H, W, ks, d):
    q, k, v, rpb, _ = random_inputs(0, (2, H, W, 2, 8), ks)
    for bias in (rpb, None):
        logits = na2d_qk(q, k, bias, ks, d)
        np.testing.assert_allclose(logits, brute_qk(q, k, bias, ks, d), atol=2e-5, rtol=1e-5)
    attn = jax.nn.softmax(logits, axis=-1)
    np.testing.assert_allclose(
        na2d_av(attn, v, ks, d), brute_av(attn, v, ks, d), atol=2e-6, rtol=1e-5
    )


GRAD_CASES = [
    (3, 3, 3, 1),
    (7, 11, 3, 2),
    (11, 9, 5, 1),
    (16, 15, 7, 2),
    (9, 10, 9, 1),
    (13, 14, 13, 1),
    (16, 17, 5, 3),
    (16, 24, 5, 1),
    (25, 17, 7, 1),
]


@pytest.mark.parametrize("H,W,ks,d", GRAD_CASES)
def test_gradients_match_brute_force(H, W, ks, d):
    q, k, v, rpb, g = random_inputs(1, (2, H, W, 2, 8), ks)

    def loss(op_qk, op_av, q, k, v, rpb):
        attn = jax.nn.softmax(op_qk(q * 0.3, k, rpb, ks, d), axis=-1)
        return jnp.sum(op_av(attn, v, ks, d) * g)

    ours = jax.jit(jax.grad(lambda *a: loss(na2d_qk, na2d_av, *a), argnums=(0, 1, 2, 3)))(
        q, k, v, rpb
    )
    ref = jax.jit(jax.grad(lambda *a: loss(brute_qk, brute_av, *a), argnums=(0, 1, 2, 3)))(
        q, k, v, rpb
    )
    for name, a, b in zip(("dq", "dk", "dv", "drpb"), ours, ref, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=name)
    # Without bias (a separate custom_vjp).
    w = jnp.asarray(np.random.default_rng(2).standard_normal((2, H, W, 2, ks * ks)), jnp.float32)
    dq, dk = jax.jit(jax.grad(lambda q, k: jnp.sum(na2d_qk(q, k, None, ks, d) * w), (0, 1)))(q, k)
    dq_ref, dk_ref = jax.jit(
        jax.grad(lambda q, k: jnp.sum(brute_qk(q, k, None, ks, d) * w), (0, 1))
    )(q, k)
    np.testing.assert_allclose(dq, dq_ref, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(dk, dk_ref, atol=2e-5, rtol=1e-4)


# --- NATTEN 0.14.5 golden outputs.


@pytest.fixture(scope="module")
def golden():
    if not GOLDEN.exists():
        pytest.skip(f"NATTEN golden file not found at {GOLDEN}")
    data = np.load(GOLDEN)
    return data, json.loads(str(data["meta_json"]))


def _nhwc(x):
    """NATTEN layout [B, heads, H, W, ...] -> ours [B, H, W, heads, ...]."""
    return jnp.asarray(np.moveaxis(x, 1, 3))


GOLDEN_CASES = [
    "k3_d1_13x17",
    "k3_d2_13x17",
    "k7_d1_13x17",
    "k9_d1_13x17",
    "k7_d2_19x23",
    "k9_d2_19x23",
]


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_matches_natten_golden(golden, case):
    data, meta = golden
    assert case in [c["name"] for c in meta["configs"]]
    spec, size = case.rsplit("_", 1)
    ks, d = (int(s[1:]) for s in spec.split("_"))
    q, k, v, gout = (_nhwc(data[f"{n}_{size}"]) for n in ("q", "k", "v", "gout"))
    rpb = jnp.asarray(data[f"rpb_k{ks}"])

    def forward(q, k, v, rpb):
        logits = na2d_qk(q, k, rpb, ks, d)
        return logits, na2d_av(jax.nn.softmax(logits, axis=-1), v, ks, d)

    logits, out = forward(q, k, v, rpb)
    np.testing.assert_allclose(logits, _nhwc(data[f"attn_{case}"]), atol=2e-5)
    # Logits reach |35| here, so float32 rounding alone gives ~5e-6 on the outputs (NATTEN's own
    # float32 outputs are 3e-6 away from its float64 ones).
    np.testing.assert_allclose(out, _nhwc(data[f"out64_{case}"]), atol=1e-5)
    np.testing.assert_allclose(out, _nhwc(data[f"out_{case}"]), atol=1.5e-5)
    with jax.enable_x64(True):
        out64 = forward(*(jnp.asarray(x, jnp.float64) for x in (q, k, v, rpb)))[1]
        assert out64.dtype == jnp.float64
        np.testing.assert_allclose(out64, _nhwc(data[f"out64_{case}"]), rtol=0, atol=1e-12)

    grads = jax.grad(lambda *a: jnp.sum(forward(*a)[1] * gout), argnums=(0, 1, 2, 3))(q, k, v, rpb)
    # Gradients are ~20 in size; ours and NATTEN's are both ~1e-5 from the float64 gradient.
    for name, ours in zip(("dq", "dk", "dv"), grads[:3], strict=True):
        np.testing.assert_allclose(ours, _nhwc(data[f"{name}_{case}"]), atol=6e-5, err_msg=name)
    np.testing.assert_allclose(grads[3], data[f"drpb_{case}"], atol=6e-5, err_msg="drpb")


def test_golden_too_small_cases_raise(golden):
    data, meta = golden
    for failed in meta["failed"]:
        ks, d = failed["kernel"], failed["dilation"]
        q = jnp.zeros((1, failed["H"], failed["W"], 1, 4))
        with pytest.raises(ValueError, match="kernel_size \\* dilation"):
            na2d_qk(q, q, None, ks, d)


# --- Errors and transformations.


def test_errors():
    q = jnp.zeros((1, 8, 9, 2, 4))
    with pytest.raises(ValueError, match="height H >= kernel_size"):
        na2d_qk(q, q, None, 9)
    with pytest.raises(ValueError, match="width W >= kernel_size"):
        na2d_qk(jnp.zeros((1, 9, 8, 2, 4)), jnp.zeros((1, 9, 8, 2, 4)), None, 3, 3)
    with pytest.raises(ValueError, match=r"\[B, H, W, heads, D\]"):
        na2d_qk(q[0], q[0], None, 3)
    with pytest.raises(ValueError, match="odd"):
        na2d_qk(q, q, None, 4)
    with pytest.raises(ValueError, match="rpb"):
        na2d_qk(q, q, jnp.zeros((2, 4, 4)), 3)
    with pytest.raises(ValueError, match="attn must have shape"):
        na2d_av(jnp.zeros((1, 8, 9, 2, 8)), q, 3)
    with pytest.raises(ValueError, match=r"\[B, H, W, heads, D\]"):
        na2d_av(jnp.zeros((8, 9, 2, 9)), q[0], 3)


def test_jit_vmap_and_bf16():
    ks, d = 5, 2
    q, k, v, rpb, _ = random_inputs(2, (2, 12, 13, 2, 8), ks)

    def f(q, k, v):
        return na2d_av(jax.nn.softmax(na2d_qk(q, k, rpb, ks, d), -1), v, ks, d)

    eager = f(q, k, v)
    np.testing.assert_allclose(jax.jit(f)(q, k, v), eager, atol=1e-6)
    batched = jax.vmap(f)(q[:, None], k[:, None], v[:, None])
    np.testing.assert_allclose(batched[:, 0], eager, atol=1e-6)
    grad_vmapped = jax.vmap(jax.grad(lambda q: jnp.sum(f(q[None], k[:1], v[:1]))))(q[:1])
    grad_direct = jax.grad(lambda q: jnp.sum(f(q, k[:1], v[:1])))(q[:1])
    np.testing.assert_allclose(grad_vmapped, grad_direct, atol=1e-6)

    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    logits = na2d_qk(bf[0], bf[1], rpb.astype(jnp.bfloat16), ks, d)
    assert logits.dtype == jnp.bfloat16
    out = na2d_av(jax.nn.softmax(logits.astype(jnp.float32), -1).astype(jnp.bfloat16), bf[2], ks, d)
    assert out.dtype == jnp.bfloat16
    ref = f(*(x.astype(jnp.float32) for x in bf))
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.1)
    grads = jax.grad(lambda q: jnp.sum(na2d_qk(q, bf[1], None, ks, d).astype(jnp.float32)))(bf[0])
    assert grads.dtype == jnp.bfloat16
