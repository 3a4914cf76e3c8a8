"""Optimisers, the sharded train step (8 forced CPU devices vs 1), BatchNorm over the global
batch, and the decoder query grid."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_helpers import default_xla_env

from jax_refine.train import optim, step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_crm_optimizer_matches_torch_adam_weight_decay():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(5, 3)).astype(np.float32)
    grads = [rng.normal(size=(5, 3)).astype(np.float32) for _ in range(6)]
    # 6 steps, boundaries at 2 and 4 (fractions 1/3, 2/3).
    tx, schedule = optim.crm_optimizer(0.1, 6, (1 / 3, 2 / 3), 0.1, weight_decay=0.05)
    params = {"w": jnp.asarray(w0)}
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
    tw = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = torch.optim.Adam([tw], lr=0.1, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [2, 4], 0.1)
    for g in grads:
        tw.grad = torch.from_numpy(g.copy())
        opt.step()
        sched.step()
    np.testing.assert_allclose(np.asarray(params["w"]), tw.detach().numpy(), atol=1e-5)
    assert [float(schedule(s)) for s in (0, 1, 2, 3, 4, 5)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_paper_boundaries():
    assert optim.piecewise_boundaries(45_000, (0.5, 37_500 / 45_000)) == [22_500, 37_500]


def test_pna_optimizer_labels_clipping_and_schedule():
    params = {"backbone": {"w": jnp.ones(3)}, "head": {"w": jnp.ones(3)}}
    tx, schedule = optim.pna_optimizer(1e-2, 10, weight_decay=0.0, clip_norm=0.01,
                                       backbone_multiplier=0.1)
    state = tx.init(params)
    grads = {"backbone": {"w": jnp.full(3, 100.0)}, "head": {"w": jnp.full(3, 100.0)}}
    updates, _ = tx.update(grads, state, params)
    # Adam's first step moves by ~lr regardless of the gradient scale; the backbone 10x less.
    np.testing.assert_allclose(np.asarray(updates["head"]["w"]), -1e-2, rtol=1e-3)
    np.testing.assert_allclose(np.asarray(updates["backbone"]["w"]), -1e-3, rtol=1e-3)
    clipped, _ = optax.clip_by_global_norm(0.01).update(grads, optax.EmptyState())
    assert float(optax.tree.norm(clipped)) == pytest.approx(0.01, rel=1e-5)
    assert float(schedule(0)) == pytest.approx(1e-2)
    assert float(schedule(5)) == pytest.approx(1e-2 * 0.5 ** 0.9, rel=1e-5)
    assert float(schedule(10)) == 0.0
    labels = optim.backbone_label_fn()(params)
    assert labels == {"backbone": {"w": "backbone"}, "head": {"w": "head"}}


def test_query_grid_matches_pixel_centres():
    coord, cell = step.crm_queries(4, 6)
    assert coord.shape == (24, 2) and cell.shape == (24, 2)
    np.testing.assert_allclose(coord[0], [-0.75, -1 + 1 / 6], atol=1e-7)
    np.testing.assert_allclose(coord[7], [-0.25, -1 + 3 / 6], atol=1e-7)  # row 1, col 1
    np.testing.assert_allclose(cell[0], [0.5, 1 / 3])


_EIGHT_DEVICES = textwrap.dedent(
    """
    import functools, sys
    import jax, numpy as np, optax
    sys.path.insert(0, {tests!r})
    from train_helpers import tiny_config
    from jax_refine.train import loop, mesh as mesh_lib, optim, step as step_lib
    from jax_refine.train.state import create_state
    from jax_refine.data import pipeline

    assert jax.device_count() == 8, jax.devices()
    config = tiny_config()
    model = loop.build_model(config)
    ds = pipeline.train_dataset(loop.build_loader(config), loop.build_augment(config),
                              global_batch_size=8)
    local = next(pipeline.as_numpy(ds))
    optimizers = {{"sgd": (optax.sgd(1e-2), optax.constant_schedule(1e-2)),
                  "adam": optim.crm_optimizer(1e-3, 10)}}
    out = {{}}
    for name, (tx, schedule) in optimizers.items():
        init = jax.jit(functools.partial(create_state, model, tx,
                                         example=step_lib.example_inputs(1, config.crop_size)))
        fn = functools.partial(step_lib.crm_train_step, model=model, tx=tx, schedule=schedule)
        for n in (1, 8):
            mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ("data",),
                                     axis_types=(jax.sharding.AxisType.Auto,))
            state = jax.device_put(init(jax.random.key(0)), mesh_lib.replicated(mesh))
            batch = mesh_lib.global_batch(mesh, local)
            assert len(batch["image"].sharding.device_set) == n
            train_step = step_lib.jit_train_step(fn, mesh)
            state, metrics = train_step(state, batch)
            state, metrics = train_step(state, batch)
            out[name, n] = jax.device_get(
                (state.params, state.batch_stats, metrics, state.opt_state))

    def close(a, b, **tol):
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
            np.testing.assert_allclose(x, y, **tol)

    # SGD moves the parameters linearly in the gradient: everything agrees to 1e-5.
    close(out["sgd", 1], out["sgd", 8], atol=1e-5, rtol=1e-5)
    # The CRM recipe's Adam steps by lr * m / (sqrt(v) + 1e-8): a gradient entry near 1e-8
    # turns float summation-order noise into up to lr-sized parameter differences. What the
    # devices compute (loss, BatchNorm statistics, gradient moments) agrees to 1e-5; the
    # parameters to lr / 10.
    (p1, s1, m1, o1), (p8, s8, m8, o8) = out["adam", 1], out["adam", 8]
    close((s1, m1, o1), (s8, m8, o8), atol=1e-5, rtol=1e-5)
    close(p1, p8, atol=1e-4, rtol=0)
    # BatchNorm statistics are those of the global batch: the 8-device run (1 example per
    # device) equals the 1-device run; check one running mean moved from its init.
    stem_mean = s8["feats"]["bn1"]["mean"]
    assert np.abs(stem_mean).max() > 0
    print("OK", float(m1["loss"]), float(m8["loss"]))
    """
)


def run_forced_devices(code: str, devices: int, timeout: int = 600) -> str:
    # The default optimisation level: the tolerances below are its summation-order noise.
    env = dict(default_xla_env(f"--xla_force_host_platform_device_count={devices}"),
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.parametrize("windows, on_boundary", [(1, 0), (3, 2)])
def test_query_window_loss_is_the_full_grid_loss_on_those_windows(windows, on_boundary):
    """query_size q: the step's loss is the CRM loss of the full-grid logits cut to each
    example's q x q windows (origins from query_window_origins(fold_in(fold_in(rng, step), 1)))."""
    import jax
    from train_helpers import tiny_config

    from jax_refine import losses
    from jax_refine.train import loop
    from jax_refine.train.state import create_state

    model = loop.build_model(tiny_config()).clone(dropout_rate=0.0)
    tx, schedule = optim.crm_optimizer(1e-3, 10)
    c, q, b = 32, 12, 2
    state = create_state(model, tx, jax.random.key(0), example=step.example_inputs(1, c))
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(b, c, c, 3)), jnp.float32),
             "mask": jnp.asarray(np.sign(rng.normal(size=(b, c, c, 1))), jnp.float32),
             "gt": jnp.asarray(rng.integers(0, 2, (b, c, c, 1)), jnp.float32)}
    _, metrics = step.crm_train_step(state, batch, model=model, tx=tx, schedule=schedule,
                                     query_size=q, query_windows=windows,
                                     boundary_windows=on_boundary)
    coord, cell = (jnp.broadcast_to(jnp.asarray(a), (b, *a.shape)) for a in step.crm_queries(c, c))
    logits, _ = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                            batch["image"], batch["mask"], coord, cell, train=True,
                            mutable=["batch_stats"])
    logits = logits.reshape(b, c, c, 1)
    key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)
    origins = np.asarray(step.query_window_origins(key, batch["gt"], (q, q), windows,
                                                   on_boundary))
    assert origins.shape == (b, windows, 2)
    cut = [(i, slice(y, y + q), slice(x, x + q)) for i in range(b) for y, x in origins[i]]
    want, _ = losses.crm_loss(jnp.stack([logits[w] for w in cut]),
                              jnp.stack([batch["gt"][w] for w in cut]))
    assert float(metrics["loss"]) == pytest.approx(float(want), rel=1e-5)


def test_query_window_options_are_checked():
    """Several windows without a window size, or more boundary windows than windows, fail
    with the option's name before anything is traced."""
    import jax
    from train_helpers import tiny_config

    from jax_refine.train import loop
    from jax_refine.train.state import create_state

    model = loop.build_model(tiny_config())
    tx, schedule = optim.crm_optimizer(1e-3, 10)
    state = create_state(model, tx, jax.random.key(0), example=step.example_inputs(1, 16))
    batch = {"image": jnp.zeros((1, 16, 16, 3)), "mask": jnp.zeros((1, 16, 16, 1)),
             "gt": jnp.zeros((1, 16, 16, 1))}
    kwargs = dict(model=model, tx=tx, schedule=schedule)
    with pytest.raises(ValueError, match="query_windows=4 needs a query_size"):
        step.crm_train_step(state, batch, query_windows=4, **kwargs)
    with pytest.raises(ValueError, match="boundary_windows <= query_windows"):
        step.crm_train_step(state, batch, query_size=8, query_windows=2, boundary_windows=3,
                            **kwargs)


def test_boundary_windows_are_centred_on_boundary_pixels():
    """Boundary windows hold a boundary pixel at their centre (away from the crop's edges);
    an example without any boundary falls back to uniform windows inside the crop."""
    import jax

    b, c, q = 3, 64, 16
    gt = np.zeros((b, c, c, 1), np.float32)
    gt[0, 20:40, 24:50] = 1  # a rectangle
    gt[1, :, 33] = 1  # a 1-px wire
    # example 2: no object at all
    origins = np.asarray(step.query_window_origins(jax.random.key(3), jnp.asarray(gt), (q, q),
                                                   64, 64))
    boundary = np.asarray(step.boundary_map(jnp.asarray(gt)))
    np.testing.assert_array_equal(np.argwhere(boundary[1])[:, 1].min(), 32)
    np.testing.assert_array_equal(np.argwhere(boundary[1])[:, 1].max(), 34)
    assert not boundary[2].any()
    assert (origins >= 0).all() and (origins <= c - q).all()
    for i in (0, 1):
        for y, x in origins[i]:
            cy, cx = y + q // 2, x + q // 2
            interior = 0 < y < c - q and 0 < x < c - q
            assert boundary[i, cy, cx] or not interior
    assert len({tuple(o) for o in origins[2]}) > 32  # spread over the crop, not one place


def test_eight_devices_match_one_device():
    out = run_forced_devices(_EIGHT_DEVICES.format(tests=os.path.join(ROOT, "tests")), 8)
    assert "OK" in out
