"""2D neighborhood attention with relative position bias (NATTEN 0.14.5 semantics).

Layout: queries, keys and values are `[B, H, W, heads, D]`; attention logits and weights are
`[B, H, W, heads, L*L]` with the neighbours of a query in row-major window order `ki*L + kj`.

Window rule (NATTEN): every query sees exactly L*L real keys. Along one axis of length n, with
dilation d, position i belongs to the residue class r = i mod d (m = i // d is its index inside
the class, which has n_r = ceil((n - r) / d) members). The window is the 1D clamped window of
that class: start(i) = r + d * clip(m - L//2, 0, n_r - L), keys start(i) + a*d for a < L.
The bias of neighbour a sits at rpb index pb(i) + a, with
pb(i) = L//2 + max(L//2 - m, 0) - max(m + L//2 - n_r + 1, 0).

(Neighbour a of query i is the key at displacement (pb(i) + a - (L - 1)) * d.)

Memory: nothing of size `[B, H, W, L*L, D]` is formed; the extra memory beyond the logits is
O(B*H*W*heads*D). The q.k product is a tiled matmul (the windows of a tile of 8 x 8 queries
lie in a span of (8 + (L-1)*d)^2 keys), one row of tiles at a time, written in place into the
output (see `_pairwise`); the weighted sum of values is a fused sum of gathered planes per row
offset; the transposed ("scatter") products of the backward pass are written as gathers too
(see `_scatter_sum`). Gradients are exact and defined with `jax.custom_vjp`; only the inputs
are saved as residuals.

Speed notes (XLA:CPU, measured): the matmuls are cheap even at 3.2x the needed multiply-adds;
what costs is moving data through gathers and transposes. Hence keys are the matmul's left
operand (both operands keep D minor), the logits are picked straight into the final layout,
and the bias comes from a small per-row-class table instead of a per-element gather of rpb.
Tilings with fewer wasted multiply-adds (1 x 8 query strips per window row offset, 4 x 4 or
2 x 8 tiles) were measured slower: XLA:CPU runs many tiny matmuls poorly.

The fused op `na2d` (qk + rpb -> softmax -> av) has two implementations: "xla" composes the
tiled kernels above (the CPU default), "pallas" is the fused kernel of
`jax_refine.ops.neighborhood_pallas` (the GPU/TPU default; Pallas interpret mode on CPU).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["na2d", "na2d_qk", "na2d_av", "window_start", "bias_start"]

_TILE = 8  # q.k works on tiles of (up to) _TILE x _TILE queries.


def window_start(length: int, kernel_size: int, dilation: int = 1) -> np.ndarray:
    """First key index of each query's window along one axis (NATTEN `get_window_start`)."""
    _check_axis(length, kernel_size, dilation, "length")
    half = kernel_size // 2
    i = np.arange(length)
    r, m = i % dilation, i // dilation
    n_r = (length - r + dilation - 1) // dilation
    return r + dilation * np.clip(m - half, 0, n_r - kernel_size)


def bias_start(length: int, kernel_size: int, dilation: int = 1) -> np.ndarray:
    """First rpb index of each query's window along one axis (NATTEN `get_pb_start`)."""
    _check_axis(length, kernel_size, dilation, "length")
    half = kernel_size // 2
    i = np.arange(length)
    r, m = i % dilation, i // dilation
    n_r = (length - r + dilation - 1) // dilation
    return half + np.maximum(half - m, 0) - np.maximum(m + half - n_r + 1, 0)


def _check_axis(length: int, kernel_size: int, dilation: int, name: str) -> None:
    if kernel_size < 1 or kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be an odd positive integer, got {kernel_size}.")
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}.")
    if length < kernel_size * dilation:
        raise ValueError(
            f"neighborhood attention needs {name} >= kernel_size * dilation = "
            f"{kernel_size} * {dilation} = {kernel_size * dilation}, got {length}; "
            "zero-pad the map first (the layers do this)."
        )


class _Axis(NamedTuple):
    """Static index tables for one spatial axis (numpy, int32)."""

    keys: np.ndarray  # [L, n]: key index of neighbour a of query i.
    bias: np.ndarray  # [L, n]: rpb index of neighbour a of query i.
    # Tiled products (q.k): tiles of `tile` consecutive queries; the last tile is shifted back
    # to end at n (it overlaps its neighbour) so that no padding is needed.
    tile: int
    tile_first: np.ndarray  # [n_tiles] first query of each tile.
    span_first: np.ndarray  # [n_tiles] first key of the key span that holds the tile's windows.
    span: int  # keys per span (the same for every tile).
    tile_of: np.ndarray  # [n] the tile that produces query i's output.
    pick: np.ndarray  # [n, L] position of key a of query i inside its tile's span.


@functools.lru_cache(maxsize=256)
def _axis_plan(length: int, kernel_size: int, dilation: int) -> _Axis:
    L, d = kernel_size, dilation
    start = window_start(length, L, d)
    pb = bias_start(length, L, d)
    offsets = np.arange(L)
    keys = (start[None, :] + d * offsets[:, None]).astype(np.int32)
    bias = (pb[None, :] + offsets[:, None]).astype(np.int32)
    # Neighbour a of query i is the key at displacement (pb + a - (L - 1)) * d.
    i = np.arange(length)
    assert np.array_equal(keys, i[None, :] + (bias - (L - 1)) * d), "window rule mismatch"

    tile = min(_TILE, length)
    n_tiles = -(-length // tile)
    tile_first = np.minimum(np.arange(n_tiles) * tile, length - tile)
    queries = tile_first[:, None] + np.arange(tile)[None, :]  # [n_tiles, tile]
    lo = start[queries].min(axis=1)
    span = int((start[queries].max(axis=1) + (L - 1) * d - lo + 1).max())
    span_first = np.minimum(lo, length - span)
    tile_of = np.minimum(i // tile, n_tiles - 1)
    pick = keys.T - span_first[tile_of][:, None]
    assert pick.min() >= 0 and pick.max() < span
    return _Axis(
        keys,
        bias,
        tile,
        tile_first.astype(np.int32),
        span_first.astype(np.int32),
        span,
        tile_of.astype(np.int32),
        pick.astype(np.int32),
    )


def _check_inputs(name: str, x: jax.Array, kernel_size: int, dilation: int) -> None:
    if x.ndim != 5:
        raise ValueError(f"{name} must be [B, H, W, heads, D], got shape {x.shape}.")
    _check_axis(x.shape[1], kernel_size, dilation, "height H")
    _check_axis(x.shape[2], kernel_size, dilation, "width W")


def _acc_dtype(*xs: jax.Array) -> jnp.dtype:
    return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


# ---------------------------------------------------------------------------------------------
# The three products. `x`, `y`: [B, H, W, h, D]; `w`: [B, H, W, h, L*L].


def _pairwise(
    x: jax.Array, y: jax.Array, L: int, d: int, rpb: jax.Array | None = None
) -> jax.Array:
    """out[..., a*L+b] = x[i, j] . y[key_a(i), key_b(j)] (+ rpb[h, pb_a(i), pb_b(j)])
    ->  [B, H, W, h, L*L] (float32+).

    Tiled: the L x L windows of a tile of 8 x 8 queries lie inside a span of Sr x Sc keys
    (S = 8 + (L-1)*d). One loop step per row of tiles: a batched matmul of every tile's key
    span with its queries ([Sr*Sc, D] x [D, 64] per tile and head; keys as the left operand so
    that both operands keep D minor and need no transpose), then each query's L*L logits are
    picked out of its column of the product, the bias added from a per-row-class table, and
    the rows written in place into the output.
    """
    B, H, W, h, D = x.shape
    rows, cols = _axis_plan(H, L, d), _axis_plan(W, L, d)
    acc = _acc_dtype(x, y)
    Tr, Tc, Sr, Sc = rows.tile, cols.tile, rows.span, cols.span
    ntc = len(cols.tile_first)
    x_cols = (cols.tile_first[:, None] + np.arange(Tc)[None, :]).reshape(-1)  # [ntc * Tc]
    col_keys = cols.span_first[:, None] + np.arange(Sc)[None, :]  # [ntc, Sc]
    # Pick indices for the output rows of one tile row: [Tr, W, L, L] (the row part is traced).
    c = np.arange(W)
    col_tile = cols.tile_of[:, None, None]  # [W, 1, 1]
    col_query = (c - cols.tile_first[cols.tile_of])[:, None, None]  # [W, 1, 1]
    col_pick = cols.pick[:, None, :]  # [W, 1, L]
    query_idx = np.arange(Tr)[:, None, None, None] * Tc + col_query[None]  # [Tr, W, 1, 1]
    tile_rows = rows.tile_first[:, None] + np.arange(Tr)[None, :]  # [n_row_tiles, Tr]
    row_pick = jnp.asarray(rows.keys.T[tile_rows] - rows.span_first[:, None, None])  # [.., Tr, L]
    if rpb is not None:
        # Rows with the same bias start share one bias plane: [n_classes, W, h, L*L].
        class_start, row_class = np.unique(rows.bias[0], return_inverse=True)
        r_idx = (class_start[:, None] + np.arange(L))[:, None, :, None]  # [n_cls, 1, L, 1]
        table = rpb.astype(acc)[:, r_idx, cols.bias.T[None, :, None, :]]  # [h, n_cls, W, L, L]
        table = jnp.transpose(table, (1, 2, 0, 3, 4)).reshape(-1, W, h, L * L)
        row_class = jnp.asarray(row_class[tile_rows].astype(np.int32))  # [n_row_tiles, Tr]

    def tile_row(t, out):
        r0 = jnp.asarray(rows.tile_first)[t]
        x_t = jnp.take(jax.lax.dynamic_slice_in_dim(x, r0, Tr, axis=1), x_cols, axis=2)
        x_t = x_t.reshape(B, Tr, ntc, Tc, h, D)
        y_t = jax.lax.dynamic_slice_in_dim(y, jnp.asarray(rows.span_first)[t], Sr, axis=1)
        y_t = jnp.take(y_t, col_keys, axis=2)  # [B, Sr, ntc, Sc, h, D]
        dense = jnp.einsum("brtshd,bxtyhd->bthrsxy", y_t, x_t, preferred_element_type=acc)
        dense = dense.reshape(B, ntc, h, Sr * Sc, Tr * Tc)
        key_idx = row_pick[t][:, None, :, None] * Sc + col_pick[None, :, :, :]
        picked = dense[:, col_tile[None], :, key_idx, query_idx]  # [Tr, W, L, L, B, h]
        picked = jnp.transpose(picked, (4, 0, 1, 5, 2, 3)).reshape(B, Tr, W, h, L * L)
        if rpb is not None:
            picked = picked + jnp.take(table, row_class[t], axis=0)
        return jax.lax.dynamic_update_slice_in_dim(out, picked, r0, axis=1)

    n_row_tiles = len(rows.tile_first)
    return jax.lax.fori_loop(0, n_row_tiles, tile_row, jnp.zeros((B, H, W, h, L * L), acc))


def _weighted_sum(w: jax.Array, y: jax.Array, L: int, d: int) -> jax.Array:
    """out[i, j] = sum_ab w[i, j, ab] * y[key_a(i), key_b(j)]  ->  [B, H, W, h, D].

    A loop over the row offsets a; the L column offsets of one step are a fused sum of
    gathered planes.
    """
    B, H, W, h, D = y.shape
    rows, cols = _axis_plan(H, L, d), _axis_plan(W, L, d)
    acc = _acc_dtype(w, y)
    row_keys = jnp.asarray(rows.keys)

    def step(a, out):
        y_rows = jnp.take(y, row_keys[a], axis=1).astype(acc)
        w_a = jax.lax.dynamic_slice_in_dim(w, a * L, L, axis=-1).astype(acc)
        for b in range(L):
            term = w_a[..., b, None] * jnp.take(y_rows, cols.keys[b], axis=2)
            out = term if out is None else out + term
        return out

    return jax.lax.fori_loop(1, L, step, step(0, None))


def _add_at(y: jax.Array, update: jax.Array, start, axis: int) -> jax.Array:
    """y with `update` added to the slice of y starting at `start` along `axis` (in place)."""
    current = jax.lax.dynamic_slice_in_dim(y, start, update.shape[axis], axis=axis)
    return jax.lax.dynamic_update_slice_in_dim(y, current + update, start, axis=axis)


def _scatter_sum(w: jax.Array, x: jax.Array, L: int, d: int) -> jax.Array:
    """Transpose of `_weighted_sum` in y: out[m] = sum over (i, j, ab) with key_ab(i, j) = m of
    w[i, j, ab] * x[i, j]  ->  [B, H, W, h, D].

    Separable: along one axis, the transpose of "take key start(i) + a*d" is "sum the queries
    that share a window start" followed by a shift by a*d. Start s (of n - (L-1)*d) is used by
    query s + (L//2)*d, and on the borders also by the clamped queries: the first (L//2)*d
    queries (start = their residue, one of the first d starts) and the last (L//2)*d (start =
    the last of their residue, one of the last d starts). So each shifted transpose is a
    gather of the representative queries plus two small border blocks. A loop runs over the
    row offsets a; the column offsets of one step are a fused sum of gathered planes.
    """
    B, H, W, h, D = x.shape
    acc = _acc_dtype(w, x)
    x = x.astype(acc)
    half, band, pad = L // 2, (L // 2) * d, (L - 1) * d
    H_s, W_s = H - (L - 1) * d, W - (L - 1) * d
    # Column c gets, through offset b, the representative query c + (half - b)*d if valid.
    c = np.arange(W)
    col_src = [np.clip(c + (half - b) * d, 0, W - 1) for b in range(L)]
    col_ok = [((c - b * d >= 0) & (c - b * d < W_s)).astype(np.float32) for b in range(L)]

    def strip_sum(y: jax.Array, axis: int) -> jax.Array:
        """[.., half*d, ..] -> [.., d, ..]: sum over the `half` clamped members of a residue.

        Written as adds of slices: XLA:CPU runs this short reduction far faster as one
        elementwise fusion than as a reduce.
        """
        parts = [jax.lax.slice_in_dim(y, k * d, (k + 1) * d, axis=axis) for k in range(half)]
        return functools.reduce(jnp.add, parts)

    def columns(w_a: jax.Array) -> jax.Array:
        """sum_b (transposed column take b)(w_a[..., b] * x)  ->  [B, H, W, h, D]."""
        plane = None
        for b in range(L):
            # Gather the product (not x alone, which XLA would hoist out of the loop).
            term = jnp.take(w_a[..., b, None] * x, col_src[b], axis=2)
            term = term * col_ok[b][:, None, None]
            plane = term if plane is None else plane + term
        if half:
            for lo, first in ((0, 0), (W - band, W - L * d)):
                edge = w_a[:, :, lo : lo + band, :, None, :] * x[:, :, lo : lo + band, :, :, None]
                edge = strip_sum(edge, 2)  # [B, H, d, h, D, L(b)]
                edge = jnp.moveaxis(edge, -1, 2).reshape(B, H, L * d, h, D)
                plane = _add_at(plane, edge, first, axis=2)
        return plane

    def step(a, out):
        w_a = jax.lax.dynamic_slice_in_dim(w, a * L, L, axis=-1).astype(acc)
        plane = columns(w_a)
        # Interior rows: key row m gets query row m - a*d + band. Read as a shifted window of
        # the zero-padded plane so that the add is one in-place pass over `out`.
        mid = jnp.pad(plane[:, band : H - band], ((0, 0), (pad, pad), (0, 0), (0, 0), (0, 0)))
        out = out + jax.lax.dynamic_slice_in_dim(mid, pad - a * d, H, axis=1)
        if half:
            out = _add_at(out, strip_sum(plane[:, :band], 1), a * d, axis=1)
            out = _add_at(out, strip_sum(plane[:, H - band :], 1), H_s - d + a * d, axis=1)
        return out

    return jax.lax.fori_loop(0, L, step, jnp.zeros((B, H, W, h, D), acc))


def _bias_grad(g: jax.Array, L: int, d: int) -> jax.Array:
    """Gradient of the bias term (summed over the batch): [B, H, W, h, L*L] -> [h, 2L-1, 2L-1]."""
    B, H, W, h, _ = g.shape
    rows, cols = _axis_plan(H, L, d), _axis_plan(W, L, d)
    n = 2 * L - 1
    one_hot_r = np.zeros((H, L, n), np.float32)
    one_hot_r[np.arange(H)[:, None], np.arange(L)[None, :], rows.bias.T] = 1.0
    one_hot_c = np.zeros((W, L, n), np.float32)
    one_hot_c[np.arange(W)[:, None], np.arange(L)[None, :], cols.bias.T] = 1.0
    g = g.reshape(B, H, W, h, L, L)
    acc = _acc_dtype(g)
    t = jnp.einsum("nijhab,iae->jhbe", g, one_hot_r.astype(acc), preferred_element_type=acc)
    return jnp.einsum("jhbe,jbf->hef", t, one_hot_c.astype(acc), preferred_element_type=acc)


# ---------------------------------------------------------------------------------------------
# custom_vjp wrappers.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _qk_rpb(query, key, rpb, L, d):
    logits = _pairwise(query, key, L, d, rpb)
    return logits.astype(jnp.result_type(query, key, rpb))


def _qk_rpb_fwd(query, key, rpb, L, d):
    return _qk_rpb(query, key, rpb, L, d), (query, key, rpb)


def _qk_rpb_bwd(L, d, res, g):
    query, key, rpb = res
    d_query = _weighted_sum(g, key, L, d).astype(query.dtype)
    d_key = _scatter_sum(g, query, L, d).astype(key.dtype)
    d_rpb = _bias_grad(g, L, d).astype(rpb.dtype)
    return d_query, d_key, d_rpb


_qk_rpb.defvjp(_qk_rpb_fwd, _qk_rpb_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _qk(query, key, L, d):
    return _pairwise(query, key, L, d).astype(jnp.result_type(query, key))


def _qk_fwd(query, key, L, d):
    return _qk(query, key, L, d), (query, key)


def _qk_bwd(L, d, res, g):
    query, key = res
    d_query = _weighted_sum(g, key, L, d).astype(query.dtype)
    d_key = _scatter_sum(g, query, L, d).astype(key.dtype)
    return d_query, d_key


_qk.defvjp(_qk_fwd, _qk_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _av(attn, value, L, d):
    return _weighted_sum(attn, value, L, d).astype(jnp.result_type(attn, value))


def _av_fwd(attn, value, L, d):
    return _av(attn, value, L, d), (attn, value)


def _av_bwd(L, d, res, g):
    attn, value = res
    d_attn = _pairwise(g, value, L, d).astype(attn.dtype)
    d_value = _scatter_sum(attn, g, L, d).astype(value.dtype)
    return d_attn, d_value


_av.defvjp(_av_fwd, _av_bwd)


# ---------------------------------------------------------------------------------------------
# Public API.


@functools.partial(jax.jit, static_argnames=("kernel_size", "dilation"))
def na2d_qk(
    query: jax.Array,
    key: jax.Array,
    rpb: jax.Array | None,
    kernel_size: int,
    dilation: int = 1,
) -> jax.Array:
    """Neighborhood attention logits (NATTEN `natten2dqkrpb`).

    Args:
      query: `[B, H, W, heads, D]`, not scaled here (scale it before, as NATTEN's callers do).
      key: `[B, H, W, heads, D]`.
      rpb: relative position bias `[heads, 2L-1, 2L-1]`, or None for no bias.
      kernel_size: odd window size L.
      dilation: window dilation d; needs H, W >= L * d.

    Returns:
      `[B, H, W, heads, L*L]` logits, neighbour `ki*L + kj`; dtype of the inputs (float32
      accumulation).
    """
    _check_inputs("query", query, kernel_size, dilation)
    if key.shape != query.shape:
        raise ValueError(f"key shape {key.shape} != query shape {query.shape}.")
    if rpb is None:
        return _qk(query, key, kernel_size, dilation)
    n = 2 * kernel_size - 1
    if rpb.shape != (query.shape[3], n, n):
        raise ValueError(
            f"rpb must be [heads, 2L-1, 2L-1] = {(query.shape[3], n, n)}, got {rpb.shape}."
        )
    return _qk_rpb(query, key, rpb, kernel_size, dilation)


@functools.partial(jax.jit, static_argnames=("kernel_size", "dilation"))
def na2d_av(attn: jax.Array, value: jax.Array, kernel_size: int, dilation: int = 1) -> jax.Array:
    """Neighborhood attention output (NATTEN `natten2dav`).

    Args:
      attn: attention weights `[B, H, W, heads, L*L]` (usually a softmax of `na2d_qk`).
      value: `[B, H, W, heads, D]`.
      kernel_size: odd window size L.
      dilation: window dilation d; needs H, W >= L * d.

    Returns:
      `[B, H, W, heads, D]`, sum over the window of weight * value (float32 accumulation).
    """
    _check_inputs("value", value, kernel_size, dilation)
    expected = value.shape[:4] + (kernel_size * kernel_size,)
    if attn.shape != expected:
        raise ValueError(f"attn must have shape {expected}, got {attn.shape}.")
    return _av(attn, value, kernel_size, dilation)


def _na2d_xla(query, key, value, rpb, L: int, d: int, scale: float) -> jax.Array:
    """`na2d` composed of the tiled kernels: logits (float32) -> softmax -> weighted sum."""
    q = (query.astype(jnp.float32) * scale).astype(query.dtype)
    logits = na2d_qk(q, key, rpb, L, d)
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(value.dtype)
    return na2d_av(attn, value, L, d)


_IMPLEMENTATIONS = ("xla", "pallas")


@functools.partial(
    jax.jit, static_argnames=("kernel_size", "dilation", "scale", "implementation")
)
def na2d(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    kernel_size: int,
    *,
    dilation: int = 1,
    rpb: jax.Array | None = None,
    scale: float | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Neighborhood attention in one op: softmax(scale * q . k + rpb) . v over each window.

    Exactly `na2d_av(softmax(na2d_qk(scale * query, key, rpb)), value)` (NATTEN 0.14.5
    semantics: clamped windows, bias index at the borders, dilation within residue classes).

    Args:
      query, key, value: `[B, H, W, heads, D]`, one dtype (float32, bfloat16 or float16).
      kernel_size: odd window size L; H, W >= L * dilation.
      dilation: window dilation d.
      rpb: relative position bias `[heads, 2L-1, 2L-1]`, or None.
      scale: query scale; None means D ** -0.5.
      implementation: None (the best for the platform the call is lowered for, chosen by
        `jax.lax.platform_dependent`: "pallas" on GPU/TPU, "xla" elsewhere, so a program
        exported for CUDA or TPU from a CPU host holds the fused kernel), "xla" (the tiled
        kernels, logits materialised in float32) or "pallas" (the fused kernel: logits stay
        on-chip, only a per-query log-sum-exp is saved for the backward; runs in Pallas
        interpret mode on CPU, slowly). A `jax.export` for CPU and an accelerator at once
        needs "xla": JAX lowers every branch for every platform of such an export, and the
        Pallas kernels do not lower for CPU.

    Returns:
      `[B, H, W, heads, D]` in the dtype of the inputs (float32 accumulation). Differentiable
      in query, key, value and rpb.
    """
    _check_inputs("query", query, kernel_size, dilation)
    for name, x in (("key", key), ("value", value)):
        if x.shape != query.shape:
            raise ValueError(f"{name} shape {x.shape} != query shape {query.shape}.")
        if x.dtype != query.dtype:
            raise ValueError(f"{name} dtype {x.dtype} != query dtype {query.dtype}.")
    heads, n = query.shape[3], 2 * kernel_size - 1
    if rpb is not None and rpb.shape != (heads, n, n):
        raise ValueError(f"rpb must be [heads, 2L-1, 2L-1] = {(heads, n, n)}, got {rpb.shape}.")
    if implementation is not None and implementation not in _IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be None or one of {_IMPLEMENTATIONS}, got {implementation!r}."
        )
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)

    def tiled(q, k, v):
        return _na2d_xla(q, k, v, rpb, kernel_size, dilation, scale)

    def fused(q, k, v, backend=None):
        from jax_refine.ops.neighborhood_pallas import na2d_pallas

        bias = jnp.zeros((heads, n, n), jnp.float32) if rpb is None else rpb
        return na2d_pallas(q, k, v, bias, kernel_size, dilation, scale, backend)

    if implementation is None:  # each kernel traced once; no interpret-mode kernel
        gpu = functools.partial(fused, backend="gpu")
        return jax.lax.platform_dependent(query, key, value, cuda=gpu, rocm=gpu,
                                          tpu=functools.partial(fused, backend="tpu"),
                                          default=tiled)
    return (tiled if implementation == "xla" else fused)(query, key, value)
