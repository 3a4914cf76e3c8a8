"""Train steps (CRM, PNA): one `jax.jit` over a mesh, params replicated, batch sharded on 'data'.

Under jit the computation is written for the *global* batch, so BatchNorm's batch mean and
variance are over the global batch (synchronised BN) without any axis_name; XLA inserts the
cross-device reductions. The training state is donated.

Queries: the decoder is trained on every pixel centre of the crop. Their coordinates and
cells are the same for every example, so they are computed once here (a constant folded
into the program) instead of being shipped with each example. (The regular-grid decoder
`CRM.decode_grid` is mathematically the same but its gradient measured 1.5x slower on CPU.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_refine import losses
from jax_refine.models.pna import pad_to_divisibility
from jax_refine.ops import grid
from jax_refine.train import mesh as mesh_lib
from jax_refine.train.state import TrainState, create_state

Batch = dict[str, Any]


def crm_queries(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates [H*W, 2] and cells [H*W, 2] of a height x width crop."""
    ys, xs = grid.pixel_centers(height), grid.pixel_centers(width)
    coord = np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(-1, 2)
    cell = np.broadcast_to(np.asarray([2 / height, 2 / width], np.float32), coord.shape)
    return coord, np.ascontiguousarray(cell)


def example_inputs(batch_size: int, crop: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of the model's inputs for a batch of crop x crop examples (for init)."""
    f32 = jnp.float32
    return {
        "image": jax.ShapeDtypeStruct((batch_size, crop, crop, 3), f32),
        "mask": jax.ShapeDtypeStruct((batch_size, crop, crop, 1), f32),
        "coord": jax.ShapeDtypeStruct((batch_size, crop * crop, 2), f32),
        "cell": jax.ShapeDtypeStruct((batch_size, crop * crop, 2), f32),
    }


def update(
    state: TrainState,
    loss_fn: Callable[[Any], tuple[jax.Array, tuple[dict[str, jax.Array], Any]]],
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser update of `state` with the gradient of `loss_fn`.

    `loss_fn(params) -> (total, (terms, new_batch_stats))`. Returns the new state and the
    metrics every task logs: loss, loss_<term> (unweighted terms), lr, grad_norm.
    """
    (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics = {
        "loss": loss,
        **{f"loss_{k}": v for k, v in terms.items()},
        "lr": schedule(state.step),
        "grad_norm": optax.tree.norm(grads),
    }
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, metrics


def boundary_map(gt: jax.Array) -> jax.Array:
    """bool [B, H, W]: pixels of `gt` [B, H, W, 1] whose 3x3 neighbourhood holds both labels
    (gt > 0.5 and not): both sides of every object boundary, and all of a 1-px wire. (A 3x3
    square morphological gradient, in jnp for the jitted step; mBA's host-side regions are
    `metrics._morphological_gradient` with OpenCV's elliptical disks.)"""
    hard = (gt[..., 0] > 0.5).astype(jnp.float32)
    pool = functools.partial(jax.lax.reduce_window, window_dimensions=(1, 3, 3),
                             window_strides=(1, 1, 1), padding="SAME")
    return pool(hard, -jnp.inf, jax.lax.max) != pool(hard, jnp.inf, jax.lax.min)


def query_window_origins(
    key: jax.Array, gt: jax.Array, size: tuple[int, int], windows: int, on_boundary: int
) -> jax.Array:
    """Top-left corners int32 [B, windows, 2] of `windows` query windows of `size` per example.

    The first `windows - on_boundary` are uniform over the crop. The last `on_boundary` are
    centred (then clipped into the crop) on a pixel drawn uniformly from `boundary_map(gt)`,
    or from the whole crop if the example has no boundary.
    """
    b, h, w, _ = gt.shape
    qh, qw = size
    uniform_key, boundary_key = jax.random.split(key)
    limit = jnp.asarray([h - qh, w - qw])
    uniform = jax.random.randint(uniform_key, (b, windows - on_boundary, 2), 0, limit + 1)
    if on_boundary == 0:  # no boundary map to build
        return uniform.astype(jnp.int32)
    # exp(-30) * H * W is negligible: boundary pixels only, unless there are none.
    logits = jnp.where(boundary_map(gt), 0.0, -30.0).reshape(b, h * w)
    flat = jax.random.categorical(boundary_key, logits, shape=(on_boundary, b)).T
    centres = jnp.stack([flat // w, flat % w], axis=-1)
    centred = jnp.clip(centres - jnp.asarray([qh // 2, qw // 2]), 0, limit)
    return jnp.concatenate([uniform, centred], axis=1).astype(jnp.int32)


def crm_train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    query_size: int | None = None,
    query_windows: int = 1,
    boundary_windows: int = 0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update on batch {'image' [B,H,W,3], 'mask' [B,H,W,1] in [-1,1], 'gt' [B,H,W,1]
    soft in [0, 1]} (float32, `pipeline.CrmAugment`).

    `query_size`: None (or 0) queries every pixel centre of the crop (the paper). q supervises
    each example on `query_windows` q x q windows of those pixel centres only, placed by
    `query_window_origins` (`boundary_windows` of them centred on ground-truth boundary
    pixels) from the state's rng and step: the encoder still sees the whole crop, the queries
    keep the full crop's coordinates and cells, and each window is contiguous so the
    Sobel-gradient loss is the reference's within it (the loss is the mean over all windows)
    — as LIIF trains its implicit decoder on a random subset of the query pixels. The decoder
    dominates the full-crop step's cost (~70% with crm_synthetic's model at 224 px, where a
    112² window halves the step: 1.74 -> 0.83 s), so this buys more steps.
    Returns the new state and scalar metrics (loss, its terms, lr, grad_norm).
    """
    image, mask, gt = batch["image"], batch["mask"], batch["gt"]
    b, h, w, _ = image.shape
    coord_np, cell_np = crm_queries(h, w)
    dropout_rng = jax.random.fold_in(state.rng, state.step)
    qh, qw = (h, w) if not query_size else (min(query_size, h), min(query_size, w))
    if not 0 <= boundary_windows <= query_windows:
        raise ValueError(f"need 0 <= boundary_windows <= query_windows, got {boundary_windows} "
                         f"and {query_windows}")
    full_crop = (qh, qw) == (h, w)
    if full_crop and query_windows != 1:
        raise ValueError(f"query_windows={query_windows} needs a query_size smaller than the "
                         f"{h}x{w} crop, got {query_size}")
    if full_crop:
        k = 1
        coord = jnp.broadcast_to(jnp.asarray(coord_np), (b, *coord_np.shape))
        gt = gt[:, None]
    else:  # k windows per example: coordinates [B, k*qh*qw, 2], gt [B, k, qh, qw, 1]
        k = query_windows
        origins = query_window_origins(jax.random.fold_in(dropout_rng, 1), gt, (qh, qw), k,
                                       boundary_windows)

        def window(x, origin):
            return jax.lax.dynamic_slice(x, (origin[0], origin[1], 0), (qh, qw, x.shape[-1]))

        windows = jax.vmap(window, in_axes=(None, 0))  # one array, k origins
        grid_hw = jnp.asarray(coord_np).reshape(h, w, 2)
        coord = jax.vmap(windows, in_axes=(None, 0))(grid_hw, origins).reshape(b, -1, 2)
        gt = jax.vmap(windows)(gt, origins)
    cell = jnp.broadcast_to(jnp.asarray(cell_np[:1]), (b, k * qh * qw, 2))
    dtype = model.dtype

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            image.astype(dtype), mask.astype(dtype), coord, cell,
            train=True, rngs={"dropout": dropout_rng}, mutable=["batch_stats"],
        )
        total, terms = losses.crm_loss(logits.reshape(b * k, qh, qw, 1),
                                       gt.reshape(b * k, qh, qw, 1))
        return total, (terms, updates["batch_stats"])

    return update(state, loss_fn, tx, schedule)


def pna_example_inputs(batch_size: int, crop: tuple[int, int]) -> dict[str, Any]:
    """Shapes of the PNA model's inputs (RGB images in [0, 255], crop (H, W)) for init."""
    return {"image": jax.ShapeDtypeStruct((batch_size, *crop, 3), jnp.float32)}


def pna_train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    loss_kwargs: dict[str, Any] | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update on batch {'image' [B,H,W,3] RGB in [0, 255], 'label' int32 [B,H,W]}.

    `loss_kwargs` go to `losses.pna_loss` (loss types, weights, `aux_weight`). Labels are
    padded with the ignore label to the model's size divisibility, as the reference pads its
    targets. With `aux_weight` > 0 the auxiliary head's logits, which the model sows into
    'intermediates' in training, get their loss term.
    Returns the new state and scalar metrics (loss, loss_p0..p4[, loss_aux] unweighted, lr,
    grad_norm).
    """
    image = batch["image"]  # the model's modules cast to their computation dtype
    labels = pad_to_divisibility(batch["label"], model.size_divisibility, losses.IGNORE_LABEL)
    dropout_rng = jax.random.fold_in(state.rng, state.step)
    loss_kwargs = dict(loss_kwargs or {})
    if loss_kwargs.get("aux_weight") and model.auxiliary_head is None:
        raise ValueError("loss.aux_weight is set but the model has no auxiliary head "
                         "(set model.auxiliary_head=True)")

    def loss_fn(params):
        stage_logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, image,
            train=True, rngs={"dropout": dropout_rng}, mutable=["batch_stats", "intermediates"],
        )
        aux = updates.get("intermediates", {}).get("aux_logits")
        total, terms = losses.pna_loss(stage_logits, labels,
                                       aux_logits=None if aux is None else aux[0], **loss_kwargs)
        return total, (terms, updates["batch_stats"])

    return update(state, loss_fn, tx, schedule)


def jit_init_state(
    model: Any, tx: optax.GradientTransformation, example: dict[str, Any],
    mesh: jax.sharding.Mesh,
) -> Callable[[jax.Array], TrainState]:
    """jit of `rng -> create_state(model, tx, rng, example)`, the state replicated on `mesh`
    as `jit_train_step` takes and returns it (a state placed otherwise would make the step
    compile again on its second call)."""
    return jax.jit(functools.partial(create_state, model, tx, example=example),
                   out_shardings=mesh_lib.replicated(mesh))


def jit_train_step(
    step_fn: Callable[..., tuple[TrainState, dict[str, jax.Array]]],
    mesh: jax.sharding.Mesh,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """jit `step_fn(state, batch)`: state replicated and donated, batch sharded on 'data'."""
    rep = mesh_lib.replicated(mesh)
    return jax.jit(
        step_fn,
        in_shardings=(rep, mesh_lib.data_sharded(mesh)),
        out_shardings=(rep, rep),
        donate_argnums=(0,),
    )
