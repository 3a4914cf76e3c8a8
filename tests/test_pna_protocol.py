"""PNA's detectron2 training protocol (issue 21): each item against a small reference
computation written here (torch's AdamW and clip_grad_norm_, detectron2's and mmcv's warmup
formulas, detectron2's ResizeShortestEdge / RandomCrop_CategoryAreaConstraint /
ColorAugSSDTransform rules with PIL and cv2)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_refine.layers.restormer import RestormerBlock
from jax_refine.train import optim


class _Tiny(nn.Module):
    """Conv + BN, Dense + LN, GroupNorm, a Restormer block (its LNs decay, as the reference's
    custom LayerNorm) and a parameter named like a relative position bias."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        x = nn.GroupNorm(num_groups=2, name="gn")(x)
        x = RestormerBlock(num_heads=1, name="sa")(x)
        x = nn.LayerNorm(name="ln")(nn.Dense(4, name="fc")(x))
        rpb = self.param("rpb", nn.initializers.zeros, (3,))
        return nn.Dense(2, name="head")(x) + rpb[0]


@pytest.fixture(scope="module")
def tiny():
    model = _Tiny()
    example = {"x": jax.ShapeDtypeStruct((1, 4, 4, 3), jnp.float32)}
    # Random values of the parameters' shapes (no compilation).
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4, 4, 3)))["params"]
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(size=s.shape).astype(np.float32)), shapes)
    return model, example, params


def _labels(params, no_decay_keys, norm_paths):
    flat = jax.tree_util.tree_flatten_with_path(
        optim.decay_labels(no_decay_keys, norm_paths)(params))[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): v for p, v in flat}


def test_norm_layers_found_by_class(tiny):
    model, example, params = tiny
    paths = optim.norm_layer_paths(model, example)
    assert paths == {"bn", "gn", "ln"}  # not sa/norm1, sa/norm2 (plain weights upstream)
    labels = _labels(params, ("rpb",), paths)
    assert labels["bn/scale"] == labels["bn/bias"] == labels["gn/scale"] == "norm"
    assert labels["ln/scale"] == labels["ln/bias"] == "norm"
    assert labels["sa/norm1/scale"] == labels["sa/norm2/bias"] == "decay"
    assert labels["conv/kernel"] == labels["fc/bias"] == labels["sa/attn/temperature"] == "decay"
    assert labels["rpb"] == "none"


def _torch_lr(k, base, total, power, warmup, ratio):
    """detectron2 WarmupPolyLR.get_lr (linear warmup, constant_ending 0)."""
    factor = 1.0 if k >= warmup else ratio * (1 - k / warmup) + k / warmup
    return base * factor * (1.0 - k / total) ** power


def test_pna_optimizer_is_torch_adamw_with_detectron2_param_groups():
    """Three steps against torch: clip_grad_norm_ on all parameters, then AdamW with one
    group per parameter (decay 0.05, norm decay 0.0, 0 for 'rpb'), lr from WarmupPolyLR."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    shapes = {"conv": {"kernel": (3, 3, 2, 4), "bias": (4,)}, "bn": {"scale": (4,), "bias": (4,)},
              "attn": {"rpb": (1, 3, 3)}}
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32),
                                    shapes, is_leaf=lambda s: isinstance(s, tuple))
    base, total, power, warmup, ratio, wd, clip = 0.1, 10, 0.9, 2, 0.25, 0.05, 0.5
    norms = {"bn"}
    tx, schedule = optim.pna_optimizer(
        base, total, weight_decay=wd, power=power, clip_norm=clip, backbone_multiplier=1.0,
        warmup_steps=warmup, warmup_ratio=ratio, weight_decay_norm=0.0,
        no_decay_keys=("rpb",), norm_paths=norms)
    labels = _labels(params, ("rpb",), norms)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in flat]
    tparams = [torch.tensor(np.asarray(v), requires_grad=True) for _, v in flat]
    decay = {"decay": wd, "norm": 0.0, "none": 0.0}
    opt = torch.optim.AdamW([{"params": [t], "weight_decay": decay[labels[n]]}
                             for t, n in zip(tparams, names, strict=True)], lr=base)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: _torch_lr(k, 1.0, total, power, warmup, ratio))
    grads = [np.stack([rng.normal(size=np.shape(v)).astype(np.float32) * 0.3
                       for _ in range(3)]) for _, v in flat]

    @jax.jit
    def three_steps(params, grads):  # one compilation: init, 3 updates, the 3 rates
        def step(carry, g):
            params, state = carry
            updates, state = tx.update(g, state, params)
            return (jax.tree_util.tree_map(jnp.add, params, updates), state), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), grads)
        return params, jax.vmap(schedule)(jnp.arange(3))

    params, rates = three_steps(params, jax.tree_util.tree_unflatten(treedef, grads))
    for step in range(3):
        for t, g in zip(tparams, grads, strict=True):
            t.grad = torch.tensor(g[step])
        torch.nn.utils.clip_grad_norm_(tparams, clip)
        opt.step()
        sched.step()
        assert float(rates[step]) == pytest.approx(
            _torch_lr(step, base, total, power, warmup, ratio), rel=1e-6)
    for (_, v), t, n in zip(jax.tree_util.tree_flatten_with_path(params)[0], tparams, names,
                            strict=True):
        np.testing.assert_allclose(np.asarray(v), t.detach().numpy(), atol=3e-6, err_msg=n)


def test_warmup_poly_schedule_is_detectron2_and_mmcv():
    base, total, power, warmup, ratio = 1e-4, 100, 0.9, 10, 1e-6
    schedule = optim.warmup_poly_schedule(base, total, power, warmup, ratio)
    for k in (0, 3, warmup - 1, warmup, warmup + 1, 57, total):
        regular = base * (1 - k / total) ** power  # mmcv PolyLrUpdaterHook, min_lr 0
        mmcv = regular if k >= warmup else regular * (1 - (1 - k / warmup) * (1 - ratio))
        assert float(schedule(k)) == pytest.approx(mmcv, rel=1e-5, abs=1e-12), k
        assert float(schedule(k)) == pytest.approx(
            _torch_lr(k, base, total, power, warmup, ratio), rel=1e-5, abs=1e-12), k
    assert float(schedule(0)) == pytest.approx(base * ratio)
    none = optim.warmup_poly_schedule(base, total, power, 0)
    assert float(none(0)) == pytest.approx(base) and float(none(50)) == pytest.approx(
        base * 0.5 ** power)


def test_clip_grad_norm_is_torch():
    grads = {"a": jnp.full(3, 0.004), "b": jnp.full(2, -0.003)}
    norm = float(np.sqrt(3 * 0.004**2 + 2 * 0.003**2))
    out, _ = optim.clip_grad_norm(0.005).update(grads, optim.clip_grad_norm(0.005).init(grads))
    np.testing.assert_allclose(out["a"], 0.004 * 0.005 / (norm + 1e-6), rtol=1e-6)
    same, _ = optim.clip_grad_norm(1.0).update(grads, None)
    np.testing.assert_array_equal(same["b"], grads["b"])
