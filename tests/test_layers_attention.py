"""Shapes, conventions and transformations of the PNA attention layers."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_refine.layers import (
    ChannelAttention,
    GatedDconvFeedForward,
    Mlp,
    NeighborhoodCrossAttention,
    PNALayer,
    RestormerBlock,
)

KEY = jax.random.PRNGKey(0)


def _maps(shape, n=2, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(n)]


def test_neighborhood_attention_params_and_init():
    layer = NeighborhoodCrossAttention(64, 4, 7)
    x, v = _maps((1, 9, 10, 64))
    params = layer.init(KEY, x, v)["params"]
    shapes = jax.tree_util.tree_map(np.shape, params)
    assert shapes == {
        "qk": {"kernel": (64, 128), "bias": (128,)},
        "embed_v": {"kernel": (64, 64), "bias": (64,)},
        "proj": {"kernel": (64, 64), "bias": (64,)},
        "rpb": (4, 13, 13),
    }
    rpb = np.asarray(params["rpb"])
    assert 0.012 < rpb.std() < 0.025 and np.abs(rpb).max() <= 0.04 + 1e-6
    no_bias = NeighborhoodCrossAttention(64, 4, 7, use_rpb=False, qkv_bias=False)
    params = no_bias.init(KEY, x, v)["params"]
    assert "rpb" not in params and "bias" not in params["qk"] and "bias" in params["proj"]


def test_small_maps_are_padded_and_cropped():
    """A map smaller than L*dilation equals the padded map's result, cropped."""
    layer = NeighborhoodCrossAttention(16, 2, 5, dilation=2)
    x, v = _maps((2, 4, 13, 16))
    params = layer.init(KEY, x, v)
    out = layer.apply(params, x, v)
    assert out.shape == x.shape
    pad = ((0, 0), (0, 6), (0, 0), (0, 0))
    padded = layer.apply(params, jnp.pad(x, pad), jnp.pad(v, pad))
    # Rows of the padded map see the same keys (the padding is part of every window).
    np.testing.assert_allclose(out, padded[:, :4], atol=1e-6)


def test_query_scaled_before_bias():
    """With q = 0 the logits are the bias alone; scaling q must not scale the bias."""
    layer = NeighborhoodCrossAttention(8, 1, 3, qk_scale=1e-9)
    x, v = _maps((1, 5, 5, 8))
    params = layer.init(KEY, x, v)
    big_bias = jax.tree_util.tree_map(lambda a: a, params)
    big_bias["params"]["rpb"] = jnp.zeros((1, 5, 5)).at[0, 2, 2].set(100.0)  # the centre
    out = layer.apply(big_bias, x, v)
    # All attention on the query's own position: out = proj(embed_v(v)).
    p = big_bias["params"]
    centre = (v @ p["embed_v"]["kernel"] + p["embed_v"]["bias"]) @ p["proj"]["kernel"]
    np.testing.assert_allclose(out, centre + p["proj"]["bias"], atol=1e-4)


def test_pna_layer_positional_fields_and_dropout():
    layer = PNALayer(32, 2, 3, 1.0, True, dropout_rate=0.5, attn_dropout_rate=0.5)
    x, v = _maps((2, 6, 7, 32))
    params = jax.jit(layer.init)(KEY, x, v)
    assert set(params["params"]) == {
        "atten1", "norm1", "norm1_2", "attn", "norm2", "mlp", "out_norm",
    }  # fmt: skip
    apply = jax.jit(layer.apply, static_argnames="deterministic")
    a = apply(params, x, v)
    b = apply(params, x, v, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    assert not np.allclose(a, b)
    no_sa = jax.eval_shape(PNALayer(32, 2, 3, use_sa=False).init, KEY, x, v)["params"]
    assert "atten1" not in no_sa


def test_pna_layer_jit_grad_bf16():
    layer = PNALayer(32, 2, 3)
    x, v = _maps((2, 6, 7, 32))
    params = jax.jit(layer.init)(KEY, x, v)
    out = jax.jit(layer.apply)(params, x, v)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, x, v) ** 2)))(params)
    finite = jax.tree_util.tree_map(lambda g: bool(jnp.all(jnp.isfinite(g))), grads)
    assert all(jax.tree_util.tree_leaves(finite))
    assert float(jnp.abs(grads["params"]["attn"]["rpb"]).sum()) > 0

    half = PNALayer(32, 2, 3, dtype=jnp.bfloat16)
    out16 = jax.jit(half.apply)(params, x.astype(jnp.bfloat16), v.astype(jnp.bfloat16))
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out16, np.float32), out, atol=0.15)


@pytest.mark.parametrize(
    "module,names",
    [
        (ChannelAttention(2), {"qkv", "qkv_dwconv", "project_out", "temperature"}),
        (GatedDconvFeedForward(), {"project_in", "dwconv", "project_out"}),
        (RestormerBlock(2), {"norm1", "attn", "norm2", "ffn"}),
        (Mlp(12), {"fc1", "fc2"}),
    ],
)
def test_restormer_parts(module: nn.Module, names):
    (x,) = _maps((2, 5, 6, 8), n=1)
    params = module.init(KEY, x)["params"]
    assert set(params) == names
    assert module.apply({"params": params}, x).shape == x.shape


def test_channel_attention_temperature_and_errors():
    (x,) = _maps((1, 4, 4, 6), n=1)
    params = ChannelAttention(3).init(KEY, x)["params"]
    np.testing.assert_array_equal(params["temperature"], np.ones((3, 1, 1)))
    assert params["qkv_dwconv"]["kernel"].shape == (3, 3, 1, 18)
    with pytest.raises(ValueError, match="divisible"):
        ChannelAttention(4).init(KEY, x)
    with pytest.raises(ValueError, match=r"\[B, H, W, 8\]"):
        NeighborhoodCrossAttention(8, 2, 3).init(KEY, x, x)


def test_neighborhood_attention_implementations_agree():
    """The layer's na2d call: the fused Pallas kernel (interpret mode here) equals "xla" in
    values and parameter gradients (the default on CPU is "xla")."""
    x, v = _maps((1, 9, 10, 32))
    layers = {i: NeighborhoodCrossAttention(32, 2, 3, implementation=i) for i in ("xla", "pallas")}
    params = layers["xla"].init(KEY, x, v)

    @functools.partial(jax.jit, static_argnums=0)
    def out_and_grads(impl, params):
        def loss(params):
            out = layers[impl].apply(params, x, v)
            return jnp.sum(out**2), out

        return jax.grad(loss, has_aux=True)(params)

    ours, ref = out_and_grads("pallas", params), out_and_grads("xla", params)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5), ours, ref
    )
