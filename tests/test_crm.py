"""CRM model pieces: banded fusion, grid decoding and bucketing exactness (small models)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_refine.models.backbones import resnet
from jax_refine.models.crm import CRM, grid_tables
from jax_refine.ops import grid

pytestmark = pytest.mark.usefixtures("highest_precision")


def small(level=1):
    return CRM(depth=18, width=8, fusion_channels=(8, 8, 8), latent_channels=16,
               latent_level=level, hidden=(8, 8))


def apply(model, *args, **kwargs):
    """model.apply, jitted (eager Flax is slow); method / band_rows / valid_size static."""
    static = ("method", "band_rows", "valid_size", "rows_per_step")
    fn = jax.jit(model.apply, static_argnames=static)
    return fn(*args, **kwargs)


def init(model, h=37, w=53, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    image = jnp.asarray(rng.normal(size=(batch, h, w, 3)).astype(np.float32))
    mask = jnp.asarray(rng.uniform(-1, 1, size=(batch, h, w, 1)).astype(np.float32))
    q = jnp.zeros((1, 4, 2))
    variables = jax.jit(model.init)(jax.random.PRNGKey(seed), image[:1], mask[:1], q, q)
    # Non-trivial BatchNorm statistics.
    stats = jax.tree_util.tree_map(
        lambda x: x + jnp.asarray(rng.uniform(0.1, 0.5, x.shape), x.dtype),
        variables["batch_stats"],
    )
    return {"params": variables["params"], "batch_stats": stats}, image, mask


# Level 2 covers both a downsampled (x1) and an upsampled (x3) branch; level 3 only the
# former.
@pytest.mark.parametrize("level", [1, 2])
def test_banded_fusion_equals_direct_and_bucketing_is_exact(level):
    model = small(level)
    variables, image, mask = init(model)

    @jax.jit
    def direct(variables, image, mask):
        latent = model.apply(variables, image, mask, method=CRM.encode)
        return model.apply(variables, latent, method=CRM.project)

    want = direct(variables, image, mask)
    assert want.shape[1:3] == tuple(model.latent_size((37, 53)))
    got = apply(model, variables, image, mask, band_rows=3, method=CRM.encode_project)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
    # Bucketed input: filler (non-zero) beyond the valid block changes nothing.
    pad = ((0, 0), (0, 27), (0, 11), (0, 0))
    got = apply(model, variables, jnp.pad(image, pad, constant_values=5.0),
                jnp.pad(mask, pad, constant_values=1.0), valid_size=(37, 53),
                band_rows=32, method=CRM.encode_project)
    h, w = want.shape[1:3]
    np.testing.assert_allclose(np.asarray(got[:, :h, :w]), np.asarray(want), atol=1e-5, rtol=0)


def test_decode_grid_equals_decode():
    model = small()
    variables, image, mask = init(model, batch=1)
    latent = apply(model, variables, image, mask, method=CRM.encode)
    target = (45, 50)
    coord = grid.coordinate_grid(*target).reshape(1, -1, 2)
    cell = jnp.broadcast_to(jnp.asarray([2 / target[0], 2 / target[1]], jnp.float32), coord.shape)
    want = apply(model, variables, latent, coord, cell, method=CRM.decode)
    want = np.asarray(want).reshape(target)
    h, w = latent.shape[1:3]
    proj = apply(model, variables, latent[0], method=CRM.project)
    rows = grid_tables(target[0], h, 0, 48)  # 3 filler rows
    cols = grid_tables(target[1], w)
    rel_cell = np.asarray([np.float32(2 / target[0]) * np.float32(h),
                           np.float32(2 / target[1]) * np.float32(w)], np.float32)
    got = apply(model, variables, proj, rows, cols, rel_cell, method=CRM.decode_grid)
    assert got.shape == (48, 50)
    np.testing.assert_allclose(np.asarray(got)[:45], want, atol=1e-5, rtol=0)
    looped = apply(model, variables, proj, rows, cols, rel_cell, rows_per_step=1,
                   num_rows=np.int32(45), method=CRM.decode_grid)
    np.testing.assert_allclose(np.asarray(looped)[:45], np.asarray(got)[:45], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(looped)[45:], 0)  # rows past num_rows: skipped


def test_crm_defaults_and_errors():
    assert CRM().depth == 50 and CRM().latent_level == 1
    with pytest.raises(ValueError, match="latent_level"):
        CRM(latent_level=4).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)),
                                 jnp.zeros((1, 8, 8, 1)), jnp.zeros((1, 1, 2)),
                                 jnp.zeros((1, 1, 2)))
    with pytest.raises(ValueError, match="input channels"):
        resnet.ResNet18(in_channels=4).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))


def test_parameter_count_of_the_paper_model():
    shapes = jax.eval_shape(CRM().init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                            jnp.zeros((1, 32, 32, 1)), jnp.zeros((1, 4, 2)),
                            jnp.zeros((1, 4, 2)))
    n = sum(x.size for x in jax.tree_util.tree_leaves(shapes["params"]))
    # The reference CRMNet has 24,265,697 parameters, 14,964,736 of them in the unused layer4.
    assert n == 9_300_961


def test_deeplab_stem_and_stage_selection_shapes():
    model = resnet.ResNet50(width=8, in_channels=3, stem="deeplab", num_stages=2)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 37, 53, 3)))
    params = shapes["params"]
    assert params["conv3"]["kernel"].shape == (3, 3, 8, 16)
    assert "layer3_0" not in params
    out = jax.eval_shape(model.apply, shapes, jnp.zeros((1, 37, 53, 3)))
    assert out["stem"].shape == (1, 19, 27, 16)
    assert out["layer2"].shape == (1, 5, 7, 64)


def test_training_mode_updates_batch_stats_and_uses_dropout():
    model = small()
    variables, image, mask = init(model, h=32, w=32, batch=2)
    coord = jnp.broadcast_to(grid.coordinate_grid(8, 8).reshape(1, -1, 2), (2, 64, 2))
    cell = jnp.full_like(coord, 0.25)

    @jax.jit
    def step(variables, rng):
        return model.apply(variables, image, mask, coord, cell, train=True,
                           rngs={"dropout": rng}, mutable=["batch_stats"])

    out1, new = step(variables, jax.random.PRNGKey(1))
    out2, _ = step(variables, jax.random.PRNGKey(2))
    assert out1.shape == (2, 64, 1)
    assert not np.allclose(np.asarray(out1), np.asarray(out2))  # dropout is active
    old_mean = variables["batch_stats"]["aspp_"]["last_conv_1"]["mean"]
    assert not np.allclose(np.asarray(new["batch_stats"]["aspp_"]["last_conv_1"]["mean"]),
                           np.asarray(old_mean))


def test_resnet_stage_ranges_compose():
    model = resnet.ResNet18(width=4, in_channels=4, strides=(1, 2, 1, 2), num_stages=3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 29, 31, 4)).astype(np.float32))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    run = jax.jit(model.apply, static_argnames=("from_stage", "to_stage", "valid_size"))
    full = run(variables, x, valid_size=(25, 30))
    sizes = resnet.feature_valid_sizes((29, 31), (1, 2, 1, 2), 3)
    for name, size in sizes.items():
        assert full[name].shape[1:3] == size, name
    front = run(variables, x, valid_size=(25, 30), to_stage=1)
    assert set(front) == {"stem", "layer1"}
    back = run(variables, front["layer1"], valid_size=(25, 30), from_stage=1)
    assert set(back) == {"layer2", "layer3"}
    np.testing.assert_array_equal(np.asarray(back["layer3"]), np.asarray(full["layer3"]))


def test_scanned_blocks_equal_unrolled_blocks():
    """scan_blocks: same parameter tree at init, same features (eval), ignored in training."""
    model = resnet.ResNet50(width=4, in_channels=4, strides=CRM.strides,
                            dilations=CRM.dilations, num_stages=3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 29, 31, 4)).astype(np.float32))
    init = jax.jit(model.init, static_argnames="scan_blocks")
    variables = init(jax.random.PRNGKey(0), x)
    scanned_init = init(jax.random.PRNGKey(0), x, scan_blocks=True)
    jax.tree_util.tree_map(np.testing.assert_array_equal, scanned_init, variables)
    assert {"layer3_0", "layer3_5"} <= set(variables["params"])
    rng = np.random.default_rng(1)
    variables = jax.tree_util.tree_map(  # distinct statistics per block
        lambda v: v + jnp.asarray(rng.uniform(0.1, 0.5, v.shape), v.dtype), variables)
    run = jax.jit(model.apply, static_argnames=("scan_blocks", "valid_size", "train"))
    jaxpr = str(jax.make_jaxpr(lambda v: model.apply(v, x, scan_blocks=True))(variables))
    assert jaxpr.count("scan[") == 3  # layer1, layer2 and layer3's blocks after the first
    want = run(variables, x, valid_size=(25, 30))
    got = run(variables, x, valid_size=(25, 30), scan_blocks=True)
    for name in want:
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]),
                                   atol=1e-6, rtol=0, err_msg=name)
    train = jax.jit(functools.partial(model.apply, mutable=["batch_stats"], train=True),
                    static_argnames="scan_blocks")
    jax.tree_util.tree_map(np.testing.assert_array_equal, train(variables, x, scan_blocks=True),
                           train(variables, x))


# 5 input channels: XLA's kernel gradient for k x k; PER_TAP_MIN_CHANNELS: the per-tap one
# (CPU, where this runs; tests/test_train_backends.py checks the choice by platform).
@pytest.mark.parametrize("channels", [5, resnet.PER_TAP_MIN_CHANNELS])
@pytest.mark.parametrize("kernel,stride,pad,dilation", [
    (1, 1, 0, 1), (1, 2, 0, 1), (3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 2, 2), (7, 2, 3, 1),
])
def test_conv2d_gradients_equal_xla_convolution_gradients(kernel, stride, pad, dilation,
                                                          channels):
    rng = np.random.default_rng(kernel + stride + dilation)
    x = jnp.asarray(rng.normal(size=(2, 13, 10, channels)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(kernel, kernel, channels, 6)).astype(np.float32))
    args = ((stride, stride), ((pad, pad), (pad, pad)), (dilation, dilation))

    def xla(x, w):
        return jax.lax.conv_general_dilated(x, w, args[0], args[1], rhs_dilation=args[2],
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    out = xla(x, w)
    cotangent = jnp.asarray(rng.normal(size=out.shape).astype(np.float32))
    got_out, vjp = jax.vjp(lambda x, w: resnet.conv2d(x, w, *args), x, w)
    _, want_vjp = jax.vjp(xla, x, w)
    np.testing.assert_array_equal(np.asarray(got_out), np.asarray(out))
    for got, want in zip(vjp(cotangent), want_vjp(cotangent), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
