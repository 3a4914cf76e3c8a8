"""Parity of the mmsegmentation heads (ASPP, FCN, PSP, auxiliary FCN, PNA head) with PyTorch
mirrors carrying mmseg's parameter names, through the converters; float32, `highest`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jax_refine import convert  # noqa: E402
from jax_refine.models import heads  # noqa: E402
from jax_refine.models.pna import PNAHead, auxiliary_fcn_head  # noqa: E402
from tests.torch_mirrors import detectron2 as d2  # noqa: E402
from tests.torch_mirrors import mmseg as mm  # noqa: E402
from tests.torch_mirrors import pna_layers  # noqa: E402
from tests.torch_mirrors.arrays import max_err, nchw, nhwc, rand  # noqa: E402

pytestmark = pytest.mark.usefixtures("highest_precision")
TOL = 1e-5
K = 5  # classes


def _head_parity(mirror, model, kind, feature, x, prefix="decode_head.0."):
    """Convert the mirror's weights (mmseg keys under `prefix`) and compare eval logits."""
    d2.calibrate_bn(mirror, nchw(rand(x.shape, seed=5)))
    state = {f"{prefix}{k}": v for k, v in mirror.state_dict().items()}
    variables = convert.coarse_head_variables(state, kind, prefix=prefix)
    with torch.no_grad():
        want = nhwc(mirror(nchw(x)))
    got = jax.jit(model.apply)(variables, {feature: jnp.asarray(x)})
    assert got.shape == want.shape
    assert max_err(got, want) <= TOL
    return variables


def test_aspp_head_parity_and_names():
    x = rand((2, 13, 11, 48), seed=1)
    mirror = d2.randomize(mm.ASPPHead(K, cin=48, channels=32), seed=2)
    model = heads.ASPPHead(K, channels=32)  # official dilations (1, 12, 24, 36)
    variables = _head_parity(mirror, model, "aspp", "res5", x)
    assert sorted(variables["params"]) == [
        "aspp_modules_0", "aspp_modules_1", "aspp_modules_2", "aspp_modules_3",
        "bottleneck", "conv_seg", "image_pool"]
    # A 1x1 branch for dilation 1, 3x3 otherwise; image pooling has BN (mmseg's ConvModule).
    assert variables["params"]["aspp_modules_0"]["conv"]["kernel"].shape == (1, 1, 48, 32)
    assert variables["params"]["aspp_modules_3"]["conv"]["kernel"].shape == (3, 3, 48, 32)
    assert "norm" in variables["batch_stats"]["image_pool"]


@pytest.mark.parametrize("aux", [False, True], ids=["fcn", "aux_fcn"])
def test_fcn_head_parity(aux):
    x = rand((2, 9, 7, 40), seed=3)
    if aux:  # mmseg's auxiliary head: one conv, no concat, on res4
        mirror = d2.randomize(mm.aux_fcn_head(K, cin=40, channels=24), seed=4)
        model, feature = auxiliary_fcn_head(K, channels=24), "res4"
    else:
        mirror = d2.randomize(mm.FCNHead(K, cin=40, channels=24), seed=4)
        model, feature = heads.FCNHead(K, channels=24), "res5"
    variables = _head_parity(mirror, model, "fcn", feature, x,
                             "auxiliary_head." if aux else "decode_head.0.")
    assert ("conv_cat" in variables["params"]) != aux


def test_psp_head_parity():
    x = rand((2, 13, 10, 40), seed=6)
    mirror = d2.randomize(mm.PSPHead(K, cin=40, channels=24), seed=7)
    _head_parity(mirror, heads.PSPHead(K, channels=24), "psp", "res5", x)


def test_mmseg_heads_dropout_is_channelwise():
    """mmseg's Dropout2d: in training a dropped channel is zero at every pixel."""
    model = heads.FCNHead(3, channels=8, num_convs=0, concat_input=False, dropout=0.5)
    x = {"res5": jnp.ones((1, 6, 5, 8))}
    variables = model.init(jax.random.PRNGKey(0), x)
    params = jax.tree.map(jnp.ones_like, variables["params"])
    # With an all-ones 1x1 classifier, the logits sum the kept (scaled) channels: constant
    # over the pixels iff whole channels are dropped.
    out = model.apply({**variables, "params": params}, x, train=True,
                      rngs={"dropout": jax.random.PRNGKey(3)})
    assert np.ptp(np.asarray(out[..., 0])) == 0.0
    with pytest.raises(ValueError, match="num_convs=0 needs res5 with channels=16"):
        heads.FCNHead(3, channels=16, num_convs=0).init(jax.random.PRNGKey(0), x)


def test_mmseg_pna_head_parity():
    """mmseg's PNAHead (embeddings with bias, stages pna0..pna3) at odd feature sizes."""
    dims, chans = (32, 32, 64, 64), (8, 16, 24, 32)
    sizes = [(17, 15), (9, 8), (5, 4), (3, 2)]
    feats = [rand((1, *s, c), seed=10 + i)
             for i, (s, c) in enumerate(zip(sizes, chans, strict=True))]
    coarse = rand((1, 3, 2, K), seed=20)
    mirror = pna_layers.randomize_(mm.PNAHead(chans, K, dims, (3, 5, 3, 3)), seed=8).eval()
    with torch.no_grad():
        want = mirror([nchw(f) for f in feats], nchw(coarse))
    state = {f"decode_head.1.{k}": v for k, v in mirror.state_dict().items()}
    params = convert.pna_head_params(state, prefix="decode_head.1.")
    assert params["patch_embeds_res2"]["bias"].shape == (32,)
    model = PNAHead(K, embed_dims=dims, window_sizes=(3, 5, 3, 3), embed_bias=True)
    features = {f"res{i + 2}": jnp.asarray(f) for i, f in enumerate(feats)}
    args = ({"params": params}, jnp.asarray(coarse), features)
    got = jax.jit(model.apply)(*args)
    for g, w in zip(got, want, strict=True):
        assert g.shape == nhwc(w).shape
        assert max_err(g, nhwc(w)) <= TOL


def test_pna_loss_is_mmsegs_with_the_auxiliary_term():
    """mmseg: each head's logits resized to the label size (bilinear, align_corners=False),
    CrossEntropyLoss(ignore_index=255, avg_non_ignore=False) = mean over ALL pixels, weights
    1.0 (P0), 0.1 (P1..), 0.4 (auxiliary)."""
    from jax_refine import losses

    labels = np.random.default_rng(0).integers(0, K, (2, 17, 13))
    labels[0, :5] = 255
    logits = [rand((2, 3, 2, K), seed=1), rand((2, 5, 4, K), seed=2), rand((2, 17, 13, K), seed=3)]
    aux = rand((2, 3, 2, K), seed=4)

    def mmseg_ce(x):
        up = torch.nn.functional.interpolate(nchw(x), size=(17, 13), mode="bilinear",
                                             align_corners=False)
        loss = torch.nn.functional.cross_entropy(up, torch.from_numpy(labels), reduction="none",
                                                 ignore_index=255)
        return float(loss.mean())

    want = mmseg_ce(logits[0]) + 0.1 * sum(mmseg_ce(x) for x in logits[1:]) + 0.4 * mmseg_ce(aux)
    total, terms = losses.pna_loss(
        [jnp.asarray(x) for x in logits], jnp.asarray(labels), coarse_loss="cross_entropy_all",
        stage_loss="cross_entropy_all", aux_logits=jnp.asarray(aux), aux_weight=0.4)
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    assert set(terms) == {"p0", "p1", "p2", "aux"}
    with pytest.raises(ValueError, match="aux_weight is set but no aux_logits"):
        losses.pna_loss([jnp.asarray(logits[0])], jnp.asarray(labels), aux_weight=0.4)
