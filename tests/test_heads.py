"""Parity of PNA's backbones and coarse heads with PyTorch mirrors of detectron2 / mmseg."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jax_refine import convert  # noqa: E402
from jax_refine.convert.common import KeyMismatchError  # noqa: E402
from jax_refine.models import heads  # noqa: E402
from jax_refine.models.pna import deeplab_resnet, res_features  # noqa: E402
from jax_refine.ops.pooling import adaptive_avg_pool, avg_pool_valid  # noqa: E402
from tests.torch_mirrors import detectron2 as d2  # noqa: E402
from tests.torch_mirrors.arrays import max_err, nchw, nhwc, rand  # noqa: E402

pytestmark = pytest.mark.usefixtures("highest_precision")
TOL = 1e-4


def assert_same_tree(variables, module, *args) -> None:
    """The converted tree has exactly the structure and shapes of the module's own init."""
    init = jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)
    want = jax.tree.map(lambda a: a.shape, dict(init))
    got = jax.tree.map(lambda a: a.shape, {k: v for k, v in variables.items() if v})
    assert got == want


@pytest.mark.parametrize("size", [(7, 9), (13, 5), (6, 6), (1, 4)])
def test_adaptive_avg_pool_matches_torch(size):
    x = rand((2, *size, 3))
    for scale in (1, 2, 3, 6):
        want = nhwc(torch.nn.functional.adaptive_avg_pool2d(nchw(x), scale))
        np.testing.assert_allclose(adaptive_avg_pool(jnp.asarray(x), scale), want, atol=1e-6)
    want = nhwc(torch.nn.functional.avg_pool2d(nchw(x), (1, 2), stride=1))
    np.testing.assert_allclose(avg_pool_valid(jnp.asarray(x), (1, 2)), want, atol=1e-6)


@pytest.mark.parametrize(
    "stem, output_stride, size",
    [("deeplab", 16, (67, 53)), ("torchvision", 32, (64, 64))],
)
def test_detectron2_resnet_parity(stem, output_stride, size):
    res5_dilation = {16: 2, 32: 1}[output_stride]
    mirror = d2.randomize(d2.DeepLabResNet(50, stem, res5_dilation=res5_dilation), seed=1)
    d2.calibrate_bn(mirror, nchw(rand((2, *size, 3), seed=11)))
    image = rand((1, *size, 3), seed=2)
    with torch.no_grad():
        want = mirror(nchw(image))
    variables = convert.resnet_from_detectron2(
        {f"backbone.{k}": v for k, v in mirror.state_dict().items()}, prefix="backbone."
    )
    model = deeplab_resnet(50, stem=stem, output_stride=output_stride)
    assert_same_tree(variables, model, jnp.zeros((1, 64, 64, 3)))
    got = res_features(model.apply(variables, jnp.asarray(image)))
    for name in ("res2", "res3", "res4", "res5"):
        assert got[name].shape == nhwc(want[name]).shape, name
        assert max_err(got[name], nhwc(want[name])) <= TOL, name


def test_resnet_converter_lists_bad_keys():
    sd = d2.DeepLabResNet(50, "deeplab").state_dict()
    sd.pop("res3.1.conv2.norm.running_var")
    sd["res5.0.conv4.weight"] = torch.zeros(1)
    with pytest.raises(KeyMismatchError) as err:
        convert.resnet_from_detectron2(sd)
    assert "res3.1.conv2.norm.running_var" in str(err.value)
    assert "res5.0.conv4.weight" in str(err.value)


@pytest.mark.parametrize("pool_kernel_size, size", [(None, (9, 11)), ((4, 6), (8, 12))])
def test_deeplabv3_head_parity(pool_kernel_size, size):
    mirror = d2.randomize(
        d2.DeepLabV3Head(5, cin=64, channels=32, pool_kernel_size=pool_kernel_size), seed=3
    )
    x = rand((2, *size, 64), seed=4)
    with torch.no_grad():
        want = nhwc(mirror.layers({"res5": nchw(x)}))
    sd = {f"sem_seg_head.coarse_sem_seg_head.{k}": v for k, v in mirror.state_dict().items()}
    variables = convert.coarse_head_variables(
        sd, "deeplabv3", prefix="sem_seg_head.coarse_sem_seg_head."
    )
    head = heads.DeepLabV3Head(5, aspp_channels=32, pool_kernel_size=pool_kernel_size)
    assert_same_tree(variables, head, {"res5": jnp.asarray(x)})
    got = head.apply(variables, {"res5": jnp.asarray(x)})
    assert max_err(got, want) <= TOL


def test_aspp_pool_kernel_must_divide():
    head = heads.DeepLabV3Head(3, aspp_channels=32, pool_kernel_size=(4, 4))
    with pytest.raises(ValueError, match="pool_kernel_size"):
        head.init(jax.random.PRNGKey(0), {"res5": jnp.zeros((1, 6, 8, 16))})


class _Given(torch.nn.Module):
    def forward(self, x):
        return x


def test_semantic_fpn_head_parity():
    channels = (16, 32, 48, 64)
    sizes = [(32, 24), (16, 12), (8, 6), (4, 3)]
    feats = {f"res{k}": rand((1, *s, c), seed=k) for k, s, c in zip(range(2, 6), sizes, channels,
                                                                       strict=True)}
    fpn = d2.randomize(d2.FPN(_Given(), channels, out_channels=64), seed=5)
    sem = d2.randomize(d2.SemSegFPNHead(7, channels=64, conv_dims=32), seed=6)
    with torch.no_grad():
        p = fpn({k: nchw(v) for k, v in feats.items()})
        want = nhwc(sem.layers(p))
    sd = {f"backbone.{k}": v for k, v in fpn.state_dict().items()}
    sd.update({f"sem_seg_head.coarse_sem_seg_head.{k}": v for k, v in sem.state_dict().items()})
    variables = convert.coarse_head_variables(
        sd, "semantic_fpn", prefix="sem_seg_head.coarse_sem_seg_head.", fpn_prefix="backbone."
    )
    head = heads.SemanticFPNHead(7, fpn_channels=64, conv_dims=32)
    jfeats = {k: jnp.asarray(v) for k, v in feats.items()}
    assert_same_tree(variables, head, jfeats)
    got = head.apply(variables, jfeats)
    assert got.shape == want.shape == (1, 32, 24, 7)
    assert max_err(got, want) <= TOL
    # The FPN levels themselves (p2..p6).
    pj = heads.FPN(64).apply({"params": variables["params"]["fpn"]}, jfeats)
    for k in range(2, 7):
        assert max_err(pj[f"p{k}"], nhwc(p[f"p{k}"])) <= TOL


def test_fpn_rejects_sizes_not_divisible_by_32():
    feats = {f"res{k}": jnp.zeros((1, s, s, 8)) for k, s in zip(range(2, 6), (9, 5, 3, 2),
                                                                strict=True)}
    with pytest.raises(ValueError, match="size_divisibility"):
        heads.FPN(32).init(jax.random.PRNGKey(0), feats)


@pytest.mark.parametrize(
    "kind, mirror_cls, head_cls, size",
    [("fcn", d2.FCNHead, heads.FCNHead, (5, 7)), ("psp", d2.PSPHead, heads.PSPHead, (7, 11))],
)
def test_mmseg_head_parity_odd_size(kind, mirror_cls, head_cls, size):
    mirror = d2.randomize(mirror_cls(4, cin=48, channels=32), seed=7)
    x = rand((2, *size, 48), seed=8)
    with torch.no_grad():
        want = nhwc(mirror(nchw(x)))
    variables = convert.coarse_head_variables(mirror.state_dict(), kind)
    head = head_cls(4, channels=32)
    assert_same_tree(variables, head, {"res5": jnp.asarray(x)})
    assert max_err(head.apply(variables, {"res5": jnp.asarray(x)}), want) <= TOL


def test_heads_train_mode_updates_batch_stats_and_uses_dropout():
    head = heads.DeepLabV3Head(3, aspp_channels=32)
    x = {"res5": jnp.asarray(rand((2, 6, 6, 16)))}
    variables = head.init(jax.random.PRNGKey(0), x)
    out, updates = head.apply(
        variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(1)}
    )
    assert out.shape == (2, 6, 6, 3)
    old = variables["batch_stats"]["aspp"]["project"]["norm"]["mean"]
    assert not np.allclose(updates["batch_stats"]["aspp"]["project"]["norm"]["mean"], old)
    frozen = heads.DeepLabV3Head(3, aspp_channels=32, norm="FrozenBN", aspp_dropout=0.0)
    _, updates = frozen.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(updates["batch_stats"]["aspp"]["project"]["norm"]["mean"], old)


def test_torchvision_imagenet_weights_fit_the_torchvision_stem_backbone():
    from tests.torch_mirrors import crm as crm_mirror

    sd = crm_mirror.ResNet(in_channels=3, crm=False).state_dict()
    variables = convert.resnet_from_torchvision(sd, in_channels=3)
    model = deeplab_resnet(50, stem="torchvision", output_stride=16)
    assert_same_tree(variables, model, jnp.zeros((1, 64, 64, 3)))

