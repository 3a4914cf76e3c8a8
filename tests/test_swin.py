"""Swin backbone vs the PyTorch mirror of mmsegmentation's, and the Swin converters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jax_refine import convert  # noqa: E402
from jax_refine.convert.common import KeyMismatchError, recording_sources  # noqa: E402
from jax_refine.convert.swin import unfold_order  # noqa: E402
from jax_refine.models.backbones import swin  # noqa: E402
from tests.torch_mirrors import swin as ts  # noqa: E402
from tests.torch_mirrors.arrays import max_err, nchw, nhwc, rand  # noqa: E402

pytestmark = pytest.mark.usefixtures("highest_precision")
TOL = 1e-5
# Tiny but complete: 4 stages, shifted blocks in each, heads > 1, window 7. A 61 x 75 image
# pads in the patch embedding (to 64 x 76), in every stage's windows (16 x 19 -> 21 x 21, ...)
# and in two PatchMergings (odd 19 and 5 columns); the last stage (2 x 3) is one padded window.
TINY = dict(embed_dims=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7)
SIZE = (61, 75)
# XLA:CPU spends most of these tests compiling; without LLVM optimisation it compiles in half
# the time (same float32 operations).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def compiled(f, *args):
    """f jitted and compiled for args with FAST_COMPILE."""
    return jax.jit(f).lower(*args).compile(compiler_options=FAST_COMPILE)


def tree_shapes(tree):
    return jax.tree.map(lambda a: tuple(np.shape(a)), tree)


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights scaled by 1 / sqrt(fan_in) (the residual stream stays O(1) through the
    blocks), non-trivial LayerNorms and position biases; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2 and "relative_position_bias_table" not in name:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif name.endswith("weight"):  # LayerNorm scale
                p.copy_(1.0 + 0.2 * noise)
            else:  # biases and bias tables
                p.copy_(0.5 * noise if "table" in name else 0.1 * noise)
    return module.eval()


@pytest.fixture(scope="module")
def case(highest_precision):
    """Mirror, its state_dict, the converted params, and both sides' outputs and per-block
    intermediates on one 61 x 75 batch."""
    mirror = randomize(ts.SwinTransformer(**TINY), seed=1)
    image = rand((2, *SIZE, 3), seed=2)
    blocks = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: blocks.__setitem__(n, o))
             for n, m in mirror.named_modules() if isinstance(m, ts.SwinBlock)]
    with torch.no_grad():
        want = [nhwc(o) for o in mirror(nchw(image))]
    for h in hooks:
        h.remove()
    state_dict = mirror.state_dict()
    params = convert.swin_variables(state_dict)["params"]
    model = swin.SwinTransformer(**TINY)
    x = jnp.asarray(image)
    got, inter = compiled(lambda p, x: model.apply(
        {"params": p}, x, capture_intermediates=lambda m, _: isinstance(m, swin.SwinBlock),
        mutable=["intermediates"]), params, x)(params, x)
    return dict(mirror=mirror, state_dict=state_dict, params=params, model=model, image=image,
                want=want, got=got, blocks=blocks, inter=inter["intermediates"])


def test_param_tree_matches_init(case):
    init = jax.eval_shape(case["model"].init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    assert tree_shapes(case["params"]) == tree_shapes(init["params"])
    n_torch = sum(p.numel() for p in case["mirror"].parameters())
    assert sum(np.size(a) for a in jax.tree.leaves(case["params"])) == n_torch


@pytest.mark.parametrize("factory, count", [(swin.swin_tiny, 27_520_698),
                                            (swin.swin_base, 86_745_016)])
def test_official_sizes(factory, count):
    # mmseg's Swin-T / Swin-B backbones (ImageNet model minus the classifier head).
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    shapes = jax.eval_shape(factory().init, jax.random.PRNGKey(0), x)["params"]
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes)) == count


def test_no_decay_keys_select_the_same_tensors(case):
    # mmseg's custom_keys match substrings of torch names; ours match the Flax paths.
    with recording_sources() as sources:
        params = convert.swin_variables(case["state_dict"])["params"]
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    assert len(leaves) == 125
    for path, leaf in leaves:
        flax_name = "/".join(k.key for k in path)
        for key in ("norm", "relative_position_bias_table"):
            assert (key in sources[id(leaf)]) == (key in flax_name), (flax_name, key)


def test_every_block_matches_mirror(case):
    b, (h, w) = case["image"].shape[0], SIZE
    sizes = [(-(-h // 4), -(-w // 4))]
    for _ in range(3):
        sizes.append(tuple(-(-n // 2) for n in sizes[-1]))
    assert len(case["blocks"]) == sum(TINY["depths"])
    for name, want in case["blocks"].items():  # 'stages.i.blocks.j' -> [B, H*W, C]
        i, j = int(name.split(".")[1]), int(name.split(".")[3])
        got = case["inter"][f"stages_{i}"][f"blocks_{j}"]["__call__"][0]
        assert got.shape == (b, *sizes[i], want.shape[-1]), name
        assert max_err(got.reshape(want.shape), want.numpy()) <= TOL, name


def test_stage_outputs_match_mirror(case):
    assert list(case["got"]) == ["res2", "res3", "res4", "res5"]
    for k, (name, want) in enumerate(zip(case["got"], case["want"], strict=True)):
        got = case["got"][name]
        assert got.shape == want.shape == (2, *got.shape[1:3], 32 * 2**k)
        assert max_err(got, want) <= TOL, name
    assert case["got"]["res2"].shape[1:3] == (16, 19)
    assert case["got"]["res5"].shape[1:3] == (2, 3)


def test_relative_index_and_shift_mask_conventions():
    # The JAX index (coordinate differences) equals mmseg's double-step/flip construction.
    mirror_index = ts.WindowMSA(8, 1, 7).relative_position_index.numpy()
    np.testing.assert_array_equal(swin.relative_position_index(7), mirror_index)
    # The mask equals mmseg's construction: label the 3 x 3 regions of the padded map, split
    # into windows, -100 where labels differ.
    h, w, ws, shift = 21, 28, 7, 3
    labels = np.zeros((h, w))
    cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    for i, rows in enumerate(cuts):
        for j, cols in enumerate(cuts):
            labels[rows, cols] = 3 * i + j
    windows = labels.reshape(h // ws, ws, w // ws, ws).transpose(0, 2, 1, 3).reshape(-1, ws * ws)
    want = np.where(windows[:, :, None] != windows[:, None, :], -100.0, 0.0)
    np.testing.assert_array_equal(swin.shift_attention_mask(h, w, ws, shift), want)
    assert (want[0] == 0).all() and (want[-1] != 0).any()


def _microsoft_state_dict(state_dict) -> dict:
    """The original Swin layout of an mmseg-layout state_dict (the inverse of swin2mmseg),
    with the keys an official ImageNet file also holds (attn_mask, final norm, head)."""
    out = {}
    for key, value in state_dict.items():
        value = value.numpy()
        if key.startswith("stages."):
            key = key.replace("stages.", "layers.", 1).replace(".attn.w_msa.", ".attn.")
            key = key.replace(".ffn.layers.0.0.", ".mlp.fc1.")
            key = key.replace(".ffn.layers.1.", ".mlp.fc2.")
            if ".downsample." in key:  # mmseg c * 4 + k  ->  original k * C + c
                four_c = value.shape[-1]
                value = value.reshape(*value.shape[:-1], four_c // 4, 4)[..., [0, 2, 1, 3]]
                value = np.swapaxes(value, -1, -2).reshape(*value.shape[:-2], four_c)
        elif key.startswith("patch_embed.projection."):
            key = key.replace("projection", "proj")
        elif key.startswith("norm"):
            continue  # ImageNet checkpoints have no output norms
        out[key] = value
    out["layers.0.blocks.1.attn_mask"] = np.zeros((9, 49, 49), np.float32)
    out["norm.weight"] = out["norm.bias"] = np.zeros(256, np.float32)
    out["head.weight"], out["head.bias"] = np.zeros((10, 256), np.float32), np.zeros(10)
    return {"model": out}


def test_converter_layouts(case):
    params, sd = case["params"], case["state_dict"]
    segmentor = {"state_dict": {**{f"backbone.{k}": v for k, v in sd.items()},
                                "decode_head.conv_seg.weight": torch.zeros(3, 8, 1, 1)},
                 "meta": {}}
    assert convert.swin_layout(segmentor) == "mmseg"
    jax.tree.map(np.testing.assert_array_equal,
                 convert.swin_variables(segmentor)["params"], params)

    microsoft = _microsoft_state_dict(sd)
    assert convert.swin_layout(microsoft) == "microsoft"
    got = convert.swin_variables(microsoft)["params"]
    for i in range(4):  # ImageNet files: identity output norms, as mmseg's loading leaves them
        np.testing.assert_array_equal(got[f"norm{i}"]["scale"], np.ones(32 * 2**i))
        np.testing.assert_array_equal(got[f"norm{i}"]["bias"], np.zeros(32 * 2**i))
        got[f"norm{i}"] = params[f"norm{i}"]
    jax.tree.map(np.testing.assert_array_equal, got, params)
    assert convert.swin_config(microsoft) == dict(TINY, patch_size=4, in_channels=3)
    # openmmlab's pretrain files: swin2mmseg's output (mmseg keys, no output norms, `norm.*`).
    pretrain = convert.swin_from_microsoft(microsoft["model"])
    assert "stages.0.downsample.reduction.weight" in pretrain and "norm.weight" in pretrain
    assert convert.swin_layout(pretrain) == "mmseg"
    jax.tree.map(np.testing.assert_array_equal, convert.swin_variables(pretrain)["params"],
                 convert.swin_variables(microsoft)["params"])


def test_microsoft_patch_merging_order():
    # The original PatchMerging (concat of x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2],
    # x[1::2, 1::2], LayerNorm, Linear) with weights in the original layout computes what
    # mmseg's Unfold version computes with its own: checks the reordering, not just a cycle.
    merge = randomize(ts.PatchMerging(8, 16), seed=5)
    original = _microsoft_state_dict(
        {f"stages.0.downsample.{k}": v for k, v in merge.state_dict().items()})["model"]
    x = torch.from_numpy(rand((2, 6 * 5, 8), seed=6))
    with torch.no_grad():
        want = merge(x, (6, 5))[0]
        x = torch.nn.functional.pad(x.view(2, 6, 5, 8), (0, 0, 0, 1))
        cat = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2],
                         x[:, 1::2, 1::2]], -1).view(2, -1, 32)
        norm = {k: torch.from_numpy(original[f"layers.0.downsample.norm.{k}"])
                for k in ("weight", "bias")}
        got = torch.nn.functional.linear(
            torch.nn.functional.layer_norm(cat, (32,), norm["weight"], norm["bias"]),
            torch.from_numpy(original["layers.0.downsample.reduction.weight"]))
    assert max_err(got.numpy(), want.numpy()) <= TOL


def test_unfold_order_is_swin2mmseg():
    # mmseg: x.reshape(O, 4, C)[:, [0, 2, 1, 3], :].transpose(1, 2).reshape(O, 4C).
    w = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 20)
    want = w.reshape(3, 4, 5)[:, [0, 2, 1, 3], :].transpose(0, 2, 1).reshape(3, 20)
    np.testing.assert_array_equal(unfold_order(w), want)
    np.testing.assert_array_equal(unfold_order(w[0]), want[0])


def test_converter_reports_key_mismatch(case):
    sd = dict(case["state_dict"])
    del sd["stages.1.blocks.0.attn.w_msa.qkv.bias"]
    sd["stages.1.blocks.0.attn.w_msa.extra"] = torch.zeros(1)
    with pytest.raises(KeyMismatchError) as err:
        convert.swin_variables(sd)
    assert "stages.1.blocks.0.attn.w_msa.qkv.bias" in str(err.value)
    assert "stages.1.blocks.0.attn.w_msa.extra" in str(err.value)
    with pytest.raises(ValueError, match="not a Swin"):
        convert.swin_variables({"conv1.weight": torch.zeros(1)})


def test_drop_path_train_mode(case):
    # Both residual branches of a block are dropped per sample (rate 0.5, scale 2): on a batch
    # of identical samples at most 4 distinct outputs, one of them the input itself.
    block = swin.SwinBlock(1, 7, shift=True, drop_path_rate=0.5)
    variables = {"params": case["params"]["stages_0"]["blocks_1"]}
    x = jnp.broadcast_to(jnp.asarray(rand((1, 9, 8, 32), seed=4)), (16, 9, 8, 32))
    run = compiled(lambda rng: block.apply(variables, x, train=True, rngs={"dropout": rng}),
                   jax.random.PRNGKey(0))
    out = np.asarray(run(jax.random.PRNGKey(1)))
    distinct = np.unique(out.reshape(16, -1).round(5), axis=0)
    assert 2 <= len(distinct) <= 4
    assert any(np.array_equal(o, x[0]) for o in out)
    np.testing.assert_array_equal(out, run(jax.random.PRNGKey(1)))
    kept = jax.jit(swin.drop_path, static_argnums=1)(jnp.ones((4000, 1, 1, 1)), 0.25,
                                                      jax.random.PRNGKey(3))
    assert set(np.unique(kept).tolist()) <= {0.0, np.float32(1 / 0.75)}
    assert abs(float((kept > 0).mean()) - 0.75) < 0.03


def test_training_gradient_lowers_for_accelerators():
    # Train mode (drop path, shifted windows, PatchMerging) forward + backward exports for GPU
    # and TPU from this CPU machine (two stages keep the trace short).
    model = swin.SwinTransformer(32, (2, 2), (1, 2), drop_path_rate=0.2)
    x = jax.ShapeDtypeStruct((2, *SIZE, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]

    def loss(p, x, rng):
        out = model.apply({"params": p}, x, train=True, rngs={"dropout": rng})
        return sum(jnp.mean(f**2) for f in out.values())

    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    exported = jax.export.export(jax.jit(jax.grad(loss)), platforms=["cuda", "tpu"])(
        params, x, rng)
    assert exported.platforms == ("cuda", "tpu")
    assert "stablehlo.dot_general" in exported.mlir_module()
