"""Fused 2D neighborhood attention (qk + rpb -> softmax -> av) as Pallas kernels.

One kernel body per pass runs on GPU (Triton), TPU (Mosaic) and, in interpret mode, on CPU
(tests). Semantics are those of `jax_refine.ops.neighborhood` (NATTEN 0.14.5's clamped windows;
the bias index of a key is its displacement / dilation + L - 1, also at the borders).

Layout inside the kernels: `[B*d*d, heads, Hp, Wp, Dp]`. Dilation d is folded into the batch:
the residue classes (i mod d, j mod d) are independent dilation-1 problems on maps of
n_r = ceil((H - r) / d) rows (the classes of one map differ by at most one row/column; each
program computes its class's n_r, n_c from its batch index). A class map is zero-padded to Hp
rows (ceil(H / d) rounded up to the dq kernel's row block), Wp columns (a multiple of the
query tile and at least the key spans) and D to a power of two >= 16. Padded keys lie in no
window; padded queries are cropped and get a zero output gradient, so they add nothing to dk,
dv or drpb.

Forward (grid: class-batch, head, query row, column tile of Tw queries): all queries of a row
share their window's key rows start(i) .. start(i) + L - 1, and the windows of Tw adjacent
queries lie in a span of Sw >= Tw + L - 1 key columns. For each of the L key rows the kernel
forms the dense [Tw, Sw] logits on-chip (q . k^T on the matrix unit, float32 accumulation),
adds the bias and the window mask (a large negative number outside the window) and updates an
online softmax. It writes the output and the per-query log-sum-exp, nothing else.

Backward (flash-attention style, probabilities recomputed from the log-sum-exp):
  dq kernel (Th query rows per program): dq = scale * sum_a ds_a @ k_a, ds = p * (dp - delta),
  dp = do @ v^T, delta = sum(o * do); it also reduces ds by displacement (e, f) into a
  per-program partial of drpb (summed over programs outside).
  dk/dv kernel (grid: class-batch, head, key row, column tile of Tk keys): loops over exactly
  the query rows whose windows hold the key row, over a span of Sq >= Tk + 2(L-1) query
  columns; dv = sum p^T @ do, dk = sum ds^T @ q_scaled.

Per backend, inside one code path (`jax.lax.platform_dependent`): Triton (GPU, and interpret
mode on CPU) gets power-of-two tiles of 16 queries (dot operands >= 16) and gathers the bias
from rpb in registers; Mosaic (TPU) works on whole padded rows (Tw = Sw = Wp: no dynamic
sublane offsets, no in-register gathers) and reads the bias and mask from precomputed tables
([heads, 2L-1, d, Wp, Wp] float32: sized for maps up to a few hundred columns; wider maps
would need column tiles on TPU too). float32 dots run at full precision when
`jax_default_matmul_precision` asks for it ("highest"), else at the platform default (TF32 on
GPUs).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

_NEG = -1e30  # Bias of keys outside a query's window (exp underflows to exactly 0).


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


class _Geometry(NamedTuple):
    """Static sizes of one call. Columns: query tile Tw, its key span Sw; key tile Tk, its
    query span Sq (the dk/dv kernel)."""

    B: int
    H: int
    W: int
    heads: int
    D: int
    L: int
    d: int
    Hc: int  # rows of a residue-class map (ceil(H / d)).
    Hp: int  # padded rows (a multiple of Th).
    Th: int  # query rows per program of the dq kernel.
    Wc: int  # columns of a residue-class map (ceil(W / d)).
    Wp: int  # padded columns.
    Dp: int  # padded head dim.
    Tw: int
    Sw: int
    Tk: int
    Sq: int
    backend: str  # "gpu" (Triton, also interpret) or "tpu" (Mosaic).

    @property
    def Fp(self) -> int:  # padded 2L-1 (bias displacements).
        return _next_pow2(2 * self.L - 1)


def _geometry(shape: tuple[int, ...], L: int, d: int, backend: str) -> _Geometry:
    B, H, W, heads, D = shape
    Hc, Wc = -(-H // d), -(-W // d)
    Dp = max(16, _next_pow2(D))
    if backend == "tpu":
        Wp = -(-Wc // 8) * 8
        Tw = Sw = Tk = Sq = Wp
    else:
        Tw = Tk = 16
        Sw = _next_pow2(Tw + L - 1)
        Sq = _next_pow2(Tk + 2 * (L - 1))
        Wp = -(-max(Wc, Sw, Sq) // Tw) * Tw
    Th = 8
    Hp = -(-Hc // Th) * Th
    return _Geometry(B, H, W, heads, D, L, d, Hc, Hp, Th, Wc, Wp, Dp, Tw, Sw, Tk, Sq, backend)


# ---------------------------------------------------------------------------------------------
# Layout: [B, H, W, heads, D] <-> [B*d*d, heads, Hp, Wp, Dp].


def _to_kernel(x: jax.Array, g: _Geometry) -> jax.Array:
    B, H, W, h, D = x.shape
    d = g.d
    x = jnp.pad(x, ((0, 0), (0, g.Hc * d - H), (0, g.Wc * d - W), (0, 0), (0, 0)))
    x = x.reshape(B, g.Hc, d, g.Wc, d, h, D).transpose(0, 2, 4, 5, 1, 3, 6)
    x = x.reshape(B * d * d, h, g.Hc, g.Wc, D)
    return jnp.pad(x, ((0, 0), (0, 0), (0, g.Hp - g.Hc), (0, g.Wp - g.Wc), (0, g.Dp - D)))


def _from_kernel(x: jax.Array, g: _Geometry) -> jax.Array:
    d = g.d
    x = x[:, :, : g.Hc, : g.Wc, : g.D].reshape(g.B, d, d, g.heads, g.Hc, g.Wc, g.D)
    x = x.transpose(0, 4, 1, 5, 2, 3, 6).reshape(g.B, g.Hc * d, g.Wc * d, g.heads, g.D)
    return x[:, : g.H, : g.W]


def _class_lengths(length: int, d: int) -> np.ndarray:
    """Members of each residue class r = 0..d-1 of an axis of `length`."""
    return (length - np.arange(d) + d - 1) // d


# ---------------------------------------------------------------------------------------------
# Bias-and-mask tables: [heads, Fp (row displacement e), d * n_tiles, rows, cols] float32.


def _starts(pos: np.ndarray, n: int, L: int) -> np.ndarray:
    """Window start (dilation 1, clamped) of positions `pos` on an axis of n."""
    return np.clip(pos - L // 2, 0, n - L)


def _bias_table(rpb: jax.Array, g: _Geometry, transposed: bool) -> jax.Array:
    """Per residue class s of the columns and per column tile: the bias of (query column,
    key column) pairs, rpb[h, e, kc - qc + L - 1] inside the query's window and _NEG outside.

    Not transposed: tiles of Tw queries x their Sw-key span (forward and dq kernels).
    Transposed: the Sq-query span x a tile of Tk keys, still queries x keys (dk/dv kernel).
    """
    L = g.L
    qcs, kcs = [], []
    for n in _class_lengths(g.W, g.d):
        if not transposed:
            for t in range(g.Wp // g.Tw):
                qc = t * g.Tw + np.arange(g.Tw)
                c0 = min(_starts(np.array(t * g.Tw), n, L), g.Wp - g.Sw)
                qcs.append((qc, n))
                kcs.append(c0 + np.arange(g.Sw))
        else:
            for t in range(g.Wp // g.Tk):
                q0 = int(np.clip(t * g.Tk - (L - 1), 0, g.Wp - g.Sq))
                qcs.append((q0 + np.arange(g.Sq), n))
                kcs.append(t * g.Tk + np.arange(g.Tk))
    f_idx, valid = [], []
    for (qc, n), kc in zip(qcs, kcs, strict=True):
        st = _starts(qc, n, L)[:, None]
        valid.append((kc[None, :] >= st) & (kc[None, :] < st + L))
        f_idx.append(np.clip(kc[None, :] - qc[:, None] + L - 1, 0, 2 * L - 2))
    f_idx, valid = np.stack(f_idx), np.stack(valid)  # [n_var, rows, cols]
    rpb = jnp.pad(rpb.astype(jnp.float32), ((0, 0), (0, g.Fp - (2 * L - 1)), (0, 0)))
    table = rpb[:, :, f_idx]  # [h, Fp, n_var, rows, cols]
    return jnp.where(valid, table, _NEG)


def _bias_input(rpb: jax.Array, g: _Geometry, transposed: bool) -> jax.Array:
    """What the kernels read the bias from: on TPU the tables above; on GPU rpb itself, padded
    to [heads, Fp, Fp] float32 (the kernels gather from it and mask in registers)."""
    if g.backend == "tpu":
        return _bias_table(rpb, g, transposed)
    pad = g.Fp - (2 * g.L - 1)
    return jnp.pad(rpb.astype(jnp.float32), ((0, 0), (0, pad), (0, pad)))


def _bias(bt_ref, e, qc, kc, n_c, g: _Geometry):
    """Bias-and-mask tile [len(qc), len(kc)] of row displacement e for query columns qc [T, 1]
    and key columns kc [1, S]: rpb[e, kc - qc + L - 1] inside each query's window, _NEG outside.
    """
    if g.backend == "tpu":
        return bt_ref[e]
    st = jnp.clip(qc - g.L // 2, 0, n_c - g.L)
    shape = (qc.shape[0], kc.shape[1])
    f = jnp.broadcast_to(jnp.clip(kc - qc + g.L - 1, 0, g.Fp - 1), shape)
    return jnp.where((kc >= st) & (kc < st + g.L), bt_ref[e, f], _NEG)


def _iota(n: int, axis: int, offset=0):
    """[n, 1] (axis 0) or [1, n] (axis 1) int32 positions offset + 0..n-1."""
    shape = (n, 1) if axis == 0 else (1, n)
    return jax.lax.broadcasted_iota(jnp.int32, shape, axis) + offset


# ---------------------------------------------------------------------------------------------
# In-kernel index arithmetic (scalars from program ids; static Python ints otherwise).


def _class_sizes(g: _Geometry):
    """(rows n_r, columns n_c) of the residue class of this program's batch entry."""
    bb = pl.program_id(0)
    d = g.d
    r = jax.lax.rem(jax.lax.div(bb, d), d)
    s = jax.lax.rem(bb, d)
    return jax.lax.div(g.H - r + d - 1, d), jax.lax.div(g.W - s + d - 1, d)


def _row_start(row, n_r, L: int):
    return jnp.clip(row - L // 2, 0, n_r - L)


def _precision(dtype) -> jax.lax.Precision:
    """float32 dots at full precision when the user asked for it (parity), else the default."""
    want = jax.config.jax_default_matmul_precision
    if jnp.dtype(dtype) == jnp.float32 and want in ("highest", "float32"):
        return jax.lax.Precision.HIGHEST
    return jax.lax.Precision.DEFAULT


def _dot(a, b, prec, trans_a: bool = False, trans_b: bool = False):
    dims = (((0,) if trans_a else (1,)), ((1,) if trans_b else (0,)))
    return jax.lax.dot_general(
        a, b, (dims, ((), ())), precision=prec, preferred_element_type=jnp.float32
    )


def _scaled(x, scale: float):
    return (x.astype(jnp.float32) * scale).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Kernels.


def _fwd_kernel(q_ref, k_ref, v_ref, bt_ref, o_ref, lse_ref, *, g: _Geometry, scale: float):
    """One row of Tw queries: online softmax over the L key rows of its window."""
    n_r, n_c = _class_sizes(g)
    row, ct = pl.program_id(2), pl.program_id(3)
    st = _row_start(row, n_r, g.L)
    pb = st - row + g.L - 1
    c0 = _span_start(ct, n_c, g)
    qc, kc = _iota(g.Tw, 0, ct * g.Tw), _iota(g.Sw, 1, c0)
    prec = _precision(q_ref.dtype)
    q = _scaled(q_ref[...], scale)

    def body(a, carry):
        m, total, acc = carry
        k = k_ref[st + a, pl.ds(c0, g.Sw), :]
        v = v_ref[st + a, pl.ds(c0, g.Sw), :]
        s = _dot(q, k, prec, trans_b=True) + _bias(bt_ref, pb + a, qc, kc, n_c, g)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        corr = jnp.exp(m - m_new)
        total = corr * total + jnp.sum(p, axis=1, keepdims=True)
        acc = corr * acc + _dot(p.astype(v.dtype), v, prec)
        return m_new, total, acc

    init = (
        jnp.full((g.Tw, 1), -jnp.inf, jnp.float32),
        jnp.zeros((g.Tw, 1), jnp.float32),
        jnp.zeros((g.Tw, g.Dp), jnp.float32),
    )
    m, total, acc = jax.lax.fori_loop(0, g.L, body, init)
    o_ref[...] = (acc / total).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(total)


def _span_start(ct, n_c, g: _Geometry):
    """First key column of the Sw-span holding the windows of query tile ct."""
    if g.Sw == g.Wp:
        return 0
    return jnp.minimum(jnp.clip(ct * g.Tw - g.L // 2, 0, n_c - g.L), g.Wp - g.Sw)


def _dq_kernel(
    q_ref, k_ref, v_ref, bt_ref, do_ref, lse_ref, delta_ref, dq_ref, drpb_ref,
    *, g: _Geometry, scale: float,
):  # fmt: skip
    """dq of Th rows of Tw queries, and their partial drpb [Fp (e), Fp (f)].

    drpb needs ds summed by displacement (e, f): f varies along the diagonals of a [Tw, Sw]
    tile, a reduction of 2L-1 masked sums. Rows whose window is not clamped (and padding
    rows, whose ds is 0) share e = a + L//2 for key row a, so their ds tiles are summed first
    and reduced once per program; the few clamped rows are reduced row by row.
    """
    L, half = g.L, g.L // 2
    n_r, n_c = _class_sizes(g)
    rb, ct = pl.program_id(2), pl.program_id(3)
    c0 = _span_start(ct, n_c, g)
    prec = _precision(q_ref.dtype)
    qc, kc = _iota(g.Tw, 0, ct * g.Tw), _iota(g.Sw, 1, c0)
    f_idx = kc - qc + L - 1  # [Tw, Sw] column displacement index of each entry
    f_lane = jax.lax.broadcasted_iota(jnp.int32, (1, g.Fp), 1)
    drpb_ref[...] = jnp.zeros(drpb_ref.shape, drpb_ref.dtype)

    def reduce_into(ds, e):
        """drpb row e += the sums of ds over each column displacement f."""

        def add_f(f, by_f):
            part = jnp.sum(jnp.where(f_idx == f, ds, 0.0), axis=(0, 1), keepdims=True)
            return jnp.where(f_lane == f, part, by_f)

        by_f = jax.lax.fori_loop(0, 2 * L - 1, add_f, jnp.zeros((1, g.Fp), jnp.float32))
        drpb_ref[pl.ds(e, 1), :] += by_f

    def row_body(i, acc):
        row = rb * g.Th + i
        st = _row_start(row, n_r, L)
        pb = st - row + L - 1
        shared = (pb == half) | (row >= n_r)
        q = _scaled(q_ref[i], scale)
        do, lse, delta = do_ref[i], lse_ref[i], delta_ref[i]
        dq = jnp.zeros((g.Tw, g.Dp), jnp.float32)
        new_acc = []
        for a in range(L):
            k = k_ref[st + a, pl.ds(c0, g.Sw), :]
            v = v_ref[st + a, pl.ds(c0, g.Sw), :]
            s = _dot(q, k, prec, trans_b=True) + _bias(bt_ref, pb + a, qc, kc, n_c, g)
            p = jnp.exp(s - lse)
            ds = p * (_dot(do, v, prec, trans_b=True) - delta)
            dq = dq + _dot(ds.astype(k.dtype), k, prec)
            new_acc.append(acc[a] + jnp.where(shared, ds, 0.0))
            pl.when(jnp.logical_not(shared))(functools.partial(reduce_into, ds, pb + a))
        dq_ref[i] = (dq * scale).astype(dq_ref.dtype)
        return tuple(new_acc)

    zeros = tuple(jnp.zeros((g.Tw, g.Sw), jnp.float32) for _ in range(L))
    acc = jax.lax.fori_loop(0, g.Th, row_body, zeros)
    for a in range(L):
        reduce_into(acc[a], a + half)


def _dkdv_kernel(
    q_ref, k_ref, v_ref, bt_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
    *, g: _Geometry, scale: float,
):  # fmt: skip
    """dk, dv of one row of Tk keys: loop over the query rows whose windows hold it."""
    n_r, n_c = _class_sizes(g)
    kr, kt = pl.program_id(2), pl.program_id(3)
    L, half = g.L, g.L // 2
    q0 = 0 if g.Sq == g.Wp else jnp.clip(kt * g.Tk - (L - 1), 0, g.Wp - g.Sq)
    qc, kc = _iota(g.Sq, 0, q0), _iota(g.Tk, 1, kt * g.Tk)
    prec = _precision(q_ref.dtype)
    k, v = k_ref[...], v_ref[...]
    # Query rows i with start(i) <= kr <= start(i) + L - 1 form the interval [lo, hi].
    lo = jnp.where(kr <= L - 1, 0, kr - half)
    hi = jnp.where(kr >= n_r - L, n_r - 1, kr + half)

    def body(i, carry):
        dk, dv = carry
        q = _scaled(q_ref[i, pl.ds(q0, g.Sq), :], scale)
        do = do_ref[i, pl.ds(q0, g.Sq), :]
        lse = lse_ref[i, pl.ds(q0, g.Sq), :]
        delta = delta_ref[i, pl.ds(q0, g.Sq), :]
        s = _dot(q, k, prec, trans_b=True) + _bias(bt_ref, kr - i + L - 1, qc, kc, n_c, g)
        p = jnp.exp(s - lse)
        dv = dv + _dot(p.astype(do.dtype), do, prec, trans_a=True)
        ds = p * (_dot(do, v, prec, trans_b=True) - delta)
        dk = dk + _dot(ds.astype(q.dtype), q, prec, trans_a=True)
        return dk, dv

    zeros = jnp.zeros((g.Tk, g.Dp), jnp.float32)
    dk, dv = jax.lax.fori_loop(lo, hi + 1, body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ---------------------------------------------------------------------------------------------
# pallas_call wrappers.


def _compiler_params(g: _Geometry):
    if g.backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary")
        )
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=4, num_stages=2)


def _specs(g: _Geometry, rows: int = 1):
    """BlockSpecs: a tile of `rows` rows (of Tw queries or keys), a whole map, a per-query
    column of the same tile, a whole map's column, the bias input (a function of its tile)."""
    tile = pl.BlockSpec((None, None, rows, g.Tw, g.Dp), lambda b, h, r, t: (b, h, r, t, 0))
    full = pl.BlockSpec((None, None, g.Hp, g.Wp, g.Dp), lambda b, h, r, t: (b, h, 0, 0, 0))
    per_query = pl.BlockSpec((None, None, rows, g.Tw, 1), lambda b, h, r, t: (b, h, r, t, 0))
    full_col = pl.BlockSpec((None, None, g.Hp, g.Wp, 1), lambda b, h, r, t: (b, h, 0, 0, 0))
    if rows == 1:  # one row: squeeze it
        tile, per_query = (
            pl.BlockSpec((None, None, None) + spec.block_shape[3:], spec.index_map)
            for spec in (tile, per_query)
        )
    n_t = g.Wp // g.Tw

    def table(rows: int, cols: int):
        if g.backend != "tpu":
            return pl.BlockSpec((None, g.Fp, g.Fp), lambda b, h, r, t: (h, 0, 0))
        return pl.BlockSpec(
            (None, g.Fp, None, rows, cols),
            lambda b, h, r, t: (h, 0, jax.lax.rem(b, g.d) * n_t + t, 0, 0),
        )

    return tile, full, per_query, full_col, table


def _call(
    kernel, g: _Geometry, interpret: bool, in_specs, out_specs, out_shape, name: str, rows: int
):
    """pallas_call over (class-batch, head, `rows`, column tile)."""
    return pl.pallas_call(
        kernel,
        grid=(g.B * g.d * g.d, g.heads, rows, g.Wp // g.Tw),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=None if interpret else _compiler_params(g),
        interpret=interpret,
        name=name,
    )


def _forward(q, k, v, rpb, g: _Geometry, scale: float, interpret: bool):
    """Kernel-layout forward: (o, lse [BB, h, Hp, Wp, 1] float32)."""
    tile, full, per_query, _, table = _specs(g)
    shape = q.shape
    return _call(
        functools.partial(_fwd_kernel, g=g, scale=scale),
        g,
        interpret,
        [tile, full, full, table(g.Tw, g.Sw)],
        [tile, per_query],
        [
            jax.ShapeDtypeStruct(shape, q.dtype),
            jax.ShapeDtypeStruct(shape[:4] + (1,), jnp.float32),
        ],
        "na2d_fwd",
        g.Hc,
    )(q, k, v, _bias_input(rpb, g, transposed=False))


def _backward(q, k, v, rpb, o, lse, do, g: _Geometry, scale: float, interpret: bool):
    """Kernel-layout gradients (dq, dk, dv) and drpb [h, 2L-1, 2L-1] float32."""
    tile, full, per_query, full_col, table = _specs(g)
    rows, _, rows_col, _, _ = _specs(g, g.Th)
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
    n_rb, n_t = g.Hp // g.Th, g.Wp // g.Tw
    drpb_spec = pl.BlockSpec(
        (None, None, None, None, g.Fp, g.Fp), lambda b, h, r, t: (b, h, r, t, 0, 0)
    )
    dq, drpb_part = _call(
        functools.partial(_dq_kernel, g=g, scale=scale),
        g,
        interpret,
        [rows, full, full, table(g.Tw, g.Sw), rows, rows_col, rows_col],
        [rows, drpb_spec],
        [
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct(q.shape[:2] + (n_rb, n_t, g.Fp, g.Fp), jnp.float32),
        ],
        "na2d_bwd_dq",
        n_rb,
    )(q, k, v, _bias_input(rpb, g, transposed=False), do, lse, delta)
    dk, dv = _call(
        functools.partial(_dkdv_kernel, g=g, scale=scale),
        g,
        interpret,
        [full, tile, tile, table(g.Sq, g.Tk), full, full_col, full_col],
        [tile, tile],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        "na2d_bwd_dkdv",
        g.Hc,
    )(q, k, v, _bias_input(rpb, g, transposed=True), do, lse, delta)
    return dq, dk, dv, _drpb(drpb_part, g)


def _drpb(part: jax.Array, g: _Geometry) -> jax.Array:
    """[BB, h, row blocks, column tiles, Fp (e), Fp (f)] partials -> drpb [h, 2L-1, 2L-1]."""
    n = 2 * g.L - 1
    return part.sum(axis=(0, 2, 3))[:, :n, :n]


# ---------------------------------------------------------------------------------------------
# Public entry: custom VJP over [B, H, W, heads, D] inputs, tiles chosen per backend.


def forward_impl(backend: str, interpret: bool, q, k, v, rpb, *, L: int, d: int, scale: float):
    """(out, lse [B, H, W, heads, 1] float32) with the tiling of `backend` ("gpu" | "tpu")."""
    g = _geometry(q.shape, L, d, backend)
    o, lse = _forward(*(_to_kernel(x, g) for x in (q, k, v)), rpb, g, scale, interpret)
    return _from_kernel(o, g), _from_kernel(lse, g._replace(D=1, Dp=1))


def backward_impl(
    backend: str, interpret: bool, q, k, v, rpb, out, lse, g_out, *, L: int, d: int, scale: float
):
    """(dq, dk, dv, drpb float32) from the forward's out and lse, tiling of `backend`."""
    g = _geometry(q.shape, L, d, backend)
    to = functools.partial(_to_kernel, g=g)
    lse = _to_kernel(lse, g._replace(D=1, Dp=1))
    dq, dk, dv, drpb = _backward(
        to(q), to(k), to(v), rpb, to(out), lse, to(g_out.astype(out.dtype)), g, scale, interpret
    )
    return _from_kernel(dq, g), _from_kernel(dk, g), _from_kernel(dv, g), drpb


def _platform_call(fn, backend: str | None, *args, **static):
    """fn(backend, interpret, *args, **static): with `backend` "gpu" or "tpu", that kernel;
    with None, the one of the platform the call is lowered for: Triton on GPUs, Mosaic on
    TPUs, the GPU tiling in interpret mode elsewhere (CPU)."""
    if backend is not None:
        return fn(backend, False, *args, **static)
    gpu = functools.partial(fn, "gpu", False, **static)  # one branch for cuda and rocm
    return jax.lax.platform_dependent(
        *args, tpu=functools.partial(fn, "tpu", False, **static), cuda=gpu, rocm=gpu,
        default=functools.partial(fn, "gpu", True, **static))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def na2d_pallas(q, k, v, rpb, L: int, d: int, scale: float, backend: str | None = None):
    """Fused neighborhood attention; q, k, v `[B, H, W, heads, D]`, rpb `[heads, 2L-1, 2L-1]`.

    Inputs are checked by the caller (`neighborhood.na2d`). Output in the dtype of q.
    `backend`: "gpu" (Triton) or "tpu" (Mosaic) for that kernel only (inside a
    `platform_dependent` branch of that platform), None for the kernel of the platform lowered
    for (interpret mode on CPU).
    Residuals for the backward: q, k, v, rpb, the output and the log-sum-exp.
    """
    return _platform_call(forward_impl, backend, q, k, v, rpb, L=L, d=d, scale=scale)[0]


def _na2d_fwd(q, k, v, rpb, L, d, scale, backend):
    out, lse = _platform_call(forward_impl, backend, q, k, v, rpb, L=L, d=d, scale=scale)
    return out, (q, k, v, rpb, out, lse)


def _na2d_bwd(L, d, scale, backend, res, g_out):
    dq, dk, dv, drpb = _platform_call(backward_impl, backend, *res, g_out, L=L, d=d,
                                      scale=scale)
    return dq, dk, dv, drpb.astype(res[3].dtype)


na2d_pallas.defvjp(_na2d_fwd, _na2d_bwd)
