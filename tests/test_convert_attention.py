"""Parity of the PNA attention layers and their converters with PyTorch mirrors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jax_refine.convert import (  # noqa: E402
    KeyMismatchError,
    pna_layer_params,
    restormer_block_params,
)
from jax_refine.layers import PNALayer, RestormerBlock  # noqa: E402
from tests.torch_mirrors import pna_layers as mirror  # noqa: E402
from tests.torch_mirrors.arrays import nchw, nhwc  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("highest_precision")]


def test_restormer_block_parity():
    dim, heads = 24, 3
    ref = mirror.randomize_(mirror.TransformerBlock(dim, heads), seed=1).eval()
    state = {f"sam.{k}": v for k, v in ref.state_dict().items()}
    params = restormer_block_params(state, prefix="sam.")
    x = np.random.default_rng(0).standard_normal((2, 9, 11, dim)).astype(np.float32)
    ours = RestormerBlock(heads).apply({"params": params}, jnp.asarray(x))
    with torch.no_grad():
        expected = nhwc(ref(nchw(x)))
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "H,W,kernel,dilation,use_sa",
    [
        (12, 13, 5, 1, True),  # larger than the window
        (11, 14, 3, 2, False),  # dilated, sizes not divisible by the dilation
        (4, 9, 7, 1, True),  # smaller than the window: both maps padded, then cropped
    ],
)
def test_pna_layer_parity(H, W, kernel, dilation, use_sa):
    dim, heads = 32, 2
    ref = mirror.PNALayer(dim, heads, kernel, mlp_ratio=1.0, use_sa=use_sa, dilation=dilation)
    ref = mirror.randomize_(ref, seed=2).eval()
    params = pna_layer_params(ref.state_dict())
    rng = np.random.default_rng(3)
    x, v = (rng.standard_normal((2, H, W, dim)).astype(np.float32) for _ in range(2))
    layer = PNALayer(dim, heads, kernel, 1.0, use_sa, dilation=dilation)
    ours = layer.apply({"params": params}, jnp.asarray(x), jnp.asarray(v))
    with torch.no_grad():
        expected = nhwc(ref(nchw(x), nchw(v)))
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
    # The converted tree has exactly the structure the layer initialises.
    init = layer.init(jax.random.PRNGKey(0), jnp.asarray(x), jnp.asarray(v))["params"]
    shapes = jax.tree_util.tree_map(np.shape, params)
    assert shapes == jax.tree_util.tree_map(np.shape, init)


def test_converter_lists_missing_and_unexpected_keys():
    ref = mirror.PNALayer(32, 2, 3)
    state = {f"stages.res2.blocks.0.{k}": v for k, v in ref.state_dict().items()}
    prefix = "stages.res2.blocks.0."
    params = pna_layer_params(state, prefix)
    assert set(params) == {"atten1", "norm1", "norm1_2", "attn", "norm2", "mlp", "out_norm"}

    broken = dict(state)
    del broken[prefix + "attn.rpb"]
    broken[prefix + "attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyMismatchError) as info:
        pna_layer_params(broken, prefix)
    message = str(info.value)
    assert "missing (1): stages.res2.blocks.0.attn.rpb" in message
    assert "unexpected (1): stages.res2.blocks.0.attn.extra.weight" in message
    assert info.value.missing == [prefix + "attn.rpb"]

    sam = {k[len(prefix) + len("atten1.") :]: v for k, v in state.items() if ".atten1." in k}
    del sam["ffn.dwconv.weight"]
    with pytest.raises(KeyMismatchError, match="missing \\(1\\): ffn.dwconv.weight"):
        restormer_block_params(sam)
    with pytest.raises(KeyError, match="no state_dict key"):
        pna_layer_params(state, "stages.res3.")


@pytest.mark.parametrize("H, W, kernel, dilation", [(9, 13, 3, 1), (11, 7, 3, 2), (7, 7, 7, 1)])
def test_unfold_neighbourhood_ops_match_the_loop(H, W, kernel, dilation):
    """The benchmarks' F.unfold ops compute what the mirror's brute-force loop does."""
    rng = np.random.default_rng(3)
    q, k, v = (torch.from_numpy(rng.standard_normal((2, 3, H, W, 4)).astype(np.float32))
               for _ in range(3))
    rpb = torch.from_numpy(rng.standard_normal((3, 2 * kernel - 1, 2 * kernel - 1))
                           .astype(np.float32))
    for bias in (rpb, None):
        logits = mirror.natten_qkrpb(q, k, bias, kernel, dilation)
        torch.testing.assert_close(mirror.unfold_qkrpb(q, k, bias, kernel, dilation), logits,
                                   atol=1e-5, rtol=0)
    attn = logits.softmax(-1)
    torch.testing.assert_close(mirror.unfold_av(attn, v, kernel, dilation),
                               mirror.natten_av(attn, v, kernel, dilation), atol=1e-5, rtol=0)
