"""PNA head and whole PNA models vs the PyTorch mirror of the official detectron2 code."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jax_refine import convert  # noqa: E402
from jax_refine.convert.common import KeyMismatchError  # noqa: E402
from jax_refine.models import heads  # noqa: E402
from jax_refine.models.backbones.resnet import Bottleneck, ResNet  # noqa: E402
from jax_refine.models.pna import (  # noqa: E402
    PNAHead,
    PNASegmentor,
    build_pna,
    deeplab_resnet,
    final_logits,
    pad_to_divisibility,
)
from tests.torch_mirrors import detectron2 as d2  # noqa: E402
from tests.torch_mirrors import pna as tp  # noqa: E402
from tests.torch_mirrors.arrays import max_err, nchw, nhwc, rand  # noqa: E402

pytestmark = pytest.mark.usefixtures("highest_precision")
TOL = 1e-4


def tree_shapes(tree):
    return jax.tree.map(lambda a: tuple(a.shape), tree)


@pytest.mark.parametrize(
    "upsample_mode, embed_dims, windows",
    [("nearest", (32, 64, 64, 96), (5, 5, 3, 3)), ("bilinear", (32, 32, 64, 64), (7, 5, 5, 3))],
)
def test_pna_head_parity_odd_sizes(upsample_mode, embed_dims, windows):
    # Output-stride-16 sizes of a 67 x 57 image: res4 and res5 share a size, none divides 32.
    channels, k = (24, 32, 40, 48), 5
    sizes = [(17, 15), (9, 8), (5, 4), (5, 4)]
    feats = {f"res{i}": rand((2, *s, c), seed=i) for i, s, c in zip(range(2, 6), sizes, channels,
                                                                      strict=True)}
    coarse = rand((2, 5, 4, k), seed=9, scale=2.0)
    mirror = d2.randomize(
        tp.PNAHead(channels, k, embed_dims, windows, upsample_mode=upsample_mode), seed=3
    )
    with torch.no_grad():
        want = mirror.layers(nchw(coarse), {n: nchw(v) for n, v in feats.items()})
    sd = {f"sem_seg_head.pna_head.{n}": v for n, v in mirror.state_dict().items()}
    params = convert.pna_head_params(sd, prefix="sem_seg_head.pna_head.")
    head = PNAHead(k, embed_dims, windows, upsample_mode=upsample_mode)
    jfeats = {n: jnp.asarray(v) for n, v in feats.items()}
    init = jax.eval_shape(head.init, jax.random.PRNGKey(0), jnp.asarray(coarse), jfeats)
    assert tree_shapes(params) == tree_shapes(init["params"])
    got = jax.jit(head.apply)({"params": params}, jnp.asarray(coarse), jfeats)
    assert len(got) == 4
    for stage, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == nhwc(w).shape
        assert max_err(g, nhwc(w)) <= TOL, f"P{stage + 1}"


SMALL = (1, 1, 2, 3)  # blocks per stage of the reduced-depth backbone (res5 keeps 3 for
# the multi-grid)


def _pna_mirror(kind: str, num_classes: int, windows, upsample_mode: str, image, blocks=None):
    res5_dilation = 2 if kind == "deeplabv3" else 1
    backbone = d2.DeepLabResNet(50, "deeplab", res5_dilation=res5_dilation, blocks=blocks)
    pna = tp.PNAHead((256, 512, 1024, 2048), num_classes, window_sizes=windows,
                     upsample_mode=upsample_mode)
    if kind == "deeplabv3":
        model = tp.PNASegmentor(backbone, d2.DeepLabV3Head(num_classes), pna, 0)
    else:
        model = tp.PNASegmentor(d2.FPN(backbone), d2.SemSegFPNHead(num_classes), pna, 32)
    d2.randomize(model, seed=5)
    return d2.calibrate_bn(model, nchw(image))


@pytest.mark.parametrize(
    "kind, size, windows, upsample_mode, blocks",
    [
        ("deeplabv3", (61, 75), (9, 9, 9, 9), "nearest", None),  # R-52, output stride 16
        ("semantic_fpn", (50, 70), (7,) * 4, "bilinear", SMALL),  # padded to 64 x 96
    ],
)
def test_pna_segmentor_parity_full_checkpoint(kind, size, windows, upsample_mode, blocks):
    k = 5
    images = np.random.default_rng(0).uniform(0, 255, (1, *size, 3)).astype(np.float32)
    calib = np.random.default_rng(1).uniform(0, 255, (2, *size, 3)).astype(np.float32)
    mirror = _pna_mirror(kind, k, windows, upsample_mode, calib, blocks)
    with torch.no_grad():
        want, want_final = mirror(nchw(images))
    state_dict = {"model": mirror.state_dict(), "__author__": "test"}

    config = convert.pna_config(state_dict)
    assert config == {
        "coarse_head": kind, "depth": 50 if blocks is None else blocks[2], "stem": "deeplab",
        "num_classes": k,
        "embed_dims": (96, 192, 384, 768), "window_sizes": windows, "use_sa": True,
    }
    variables = convert.pna_variables(state_dict)
    model = build_pna(kind, k, upsample_mode=upsample_mode)
    assert model.pna_head.window_sizes == windows
    if blocks is not None:
        model = model.clone(
            backbone=deeplab_resnet(50, output_stride=32, stage_sizes=blocks)
        )
    init = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.asarray(images))
    assert tree_shapes(variables) == tree_shapes(dict(init))
    got = jax.jit(model.apply)(variables, jnp.asarray(images))
    assert len(got) == 5
    for stage, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == nhwc(w).shape, f"P{stage}"
        assert max_err(g, nhwc(w)) <= TOL, f"P{stage}: {max_err(g, nhwc(w))}"
    final = final_logits(got[-1], size)
    assert final.shape == (1, *size, k)
    assert max_err(final, nhwc(want_final)) <= TOL


def test_pna_variables_lists_missing_and_unknown_keys():
    mirror = tp.PNASegmentor(
        d2.DeepLabResNet(50), d2.DeepLabV3Head(3), tp.PNAHead((256, 512, 1024, 2048), 3)
    )
    sd = mirror.state_dict()
    sd.pop("sem_seg_head.pna_head.stages.res3.blocks.0.attn.rpb")
    sd.pop("backbone.res4.2.conv1.norm.bias")
    sd["sem_seg_head.pna_head.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyMismatchError) as err:
        convert.pna_variables(sd)
    message = str(err.value)
    for key in ("stages.res3.blocks.0.attn.rpb", "backbone.res4.2.conv1.norm.bias",
                "sem_seg_head.pna_head.extra.weight"):
        assert key in message


def test_pna_segmentor_train_step_shapes_and_frozen_bn():
    k = 3
    backbone = ResNet(Bottleneck, (1, 1, 1, 1), width=16, stem="deeplab")
    model = PNASegmentor(
        backbone,
        heads.FCNHead(k, channels=64),
        PNAHead(k, embed_dims=(32, 32, 64, 64), window_sizes=(3, 3, 3, 3), use_sa=False),
        freeze_backbone_bn=True,
    )
    images = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (2, 45, 39, 3)), jnp.float32)
    # Random variables of the right shapes (one compilation fewer than a jitted init).
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    rng = np.random.default_rng(1)
    variables = jax.tree.map(
        lambda s: jnp.asarray(0.5 + 0.1 * rng.standard_normal(s.shape), s.dtype), shapes
    )
    outs, updates = jax.jit(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"],
                                 rngs={"dropout": jax.random.PRNGKey(1)})
    )(variables, images)
    strides = [(2, 2), (2, 2), (3, 3), (6, 5), (12, 10)]  # 45 x 39 at strides 32, 32, 16, 8, 4
    assert [o.shape[1:3] for o in outs] == strides
    assert all(o.shape[-1] == k for o in outs)
    # FrozenBN backbone: its statistics do not move; the head's BatchNorm does.
    np.testing.assert_array_equal(
        updates["batch_stats"]["backbone"]["bn1"]["mean"],
        variables["batch_stats"]["backbone"]["bn1"]["mean"],
    )
    assert not np.allclose(
        updates["batch_stats"]["coarse_head"]["convs_0"]["norm"]["mean"],
        variables["batch_stats"]["coarse_head"]["convs_0"]["norm"]["mean"],
    )


def test_pad_to_divisibility_labels_with_ignore_value():
    labels = jnp.asarray(np.random.default_rng(0).integers(0, 5, (2, 50, 70)), jnp.int32)
    padded = pad_to_divisibility(labels, 32, 255)
    assert padded.shape == (2, 64, 96)
    np.testing.assert_array_equal(padded[:, :50, :70], labels)
    assert bool(jnp.all(padded[:, 50:] == 255)) and bool(jnp.all(padded[:, :, 70:] == 255))
    assert pad_to_divisibility(labels, 0, 255) is labels
    images = jnp.ones((1, 33, 32, 3))
    assert pad_to_divisibility(images, 32).shape == (1, 64, 32, 3)
