"""mmsegmentation's ResNetV1c: parity of `models.pna.resnet_v1c` with a PyTorch mirror, the
mmseg converter, and open-mmlab ImageNet weights as PNA's `init_from`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jax_refine import convert  # noqa: E402
from jax_refine.convert.mmseg import resnet_v1c_tree  # noqa: E402
from jax_refine.models import pna as pna_lib  # noqa: E402
from jax_refine.train.checkpoint import load_pna_init_variables  # noqa: E402
from tests.torch_mirrors import detectron2 as d2  # noqa: E402
from tests.torch_mirrors import mmseg_resnet as mm  # noqa: E402
from tests.torch_mirrors.arrays import max_err, nchw, nhwc, rand  # noqa: E402

pytestmark = pytest.mark.usefixtures("highest_precision")
TOL = 1e-5
SIZE = (67, 61)
MMSEG_STRIDES = {  # mmseg's d32 / d16 / d8 configs: (strides, dilations)
    32: ((1, 2, 2, 2), (1, 1, 1, 1)),
    16: ((1, 2, 2, 1), (1, 1, 1, 2)),
    8: ((1, 2, 1, 1), (1, 1, 2, 4)),
}


def _mirror(depth, output_stride, blocks, width=16, seed=0):
    strides, dilations = MMSEG_STRIDES[output_stride]
    mirror = mm.ResNetV1c(depth, width, width, strides, dilations, contract_dilation=True,
                          blocks=blocks)
    d2.randomize(mirror, seed=seed)
    return d2.calibrate_bn(mirror, nchw(rand((2, *SIZE, 3), seed=seed + 10)))


@pytest.mark.parametrize(
    "depth, output_stride, blocks",
    # BasicBlock at d8: dilated conv1 only, contracted first blocks (layer3 1, layer4 2).
    # Bottleneck at d16 (PSP / ASPP): layer4's first block contracted to dilation 1.
    [(18, 8, (2, 1, 2, 2)), (50, 16, (1, 1, 1, 2))],
)
def test_resnet_v1c_matches_mmseg_mirror(depth, output_stride, blocks):
    mirror = _mirror(depth, output_stride, blocks)
    image = rand((1, *SIZE, 3), seed=1)
    with torch.no_grad():
        want = mirror(nchw(image))
    # As inside a segmentor checkpoint (mmheads' converter reads the backbone this way).
    reader = convert.StateDictReader({f"backbone.{k}": v for k, v in mirror.state_dict().items()})
    params, stats = resnet_v1c_tree(reader, "backbone.")
    reader.finish()
    variables = {"params": params, "batch_stats": stats}
    model = pna_lib.resnet_v1c(depth, width=16, output_stride=output_stride,
                               stage_sizes=blocks)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *SIZE, 3)))
    convert.check_shapes(variables, shapes, "resnet_v1c")
    got = pna_lib.res_features(jax.jit(model.apply)(variables, jnp.asarray(image)))
    for i, name in enumerate(("res2", "res3", "res4", "res5")):
        assert got[name].shape == nhwc(want[i]).shape, name
        assert max_err(got[name], nhwc(want[i])) <= TOL, name


def _pna_model():
    backbone = pna_lib.resnet_v1c(50, width=16, output_stride=32, stage_sizes=(1, 1, 1, 1))
    model = pna_lib.build_pna("fcn", 3, embed_dims=(32, 32, 32, 32), window_sizes=(3,) * 4,
                              head_kwargs={"channels": 16, "num_convs": 1})
    model = model.clone(backbone=backbone)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)
    return variables["params"], variables["batch_stats"]


def test_open_mmlab_imagenet_weights_initialise_the_backbone(tmp_path):
    mirror = d2.randomize(mm.ResNetV1c(50, 16, 16, blocks=(1, 1, 1, 1)), seed=5)
    sd = dict(mirror.state_dict())
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(10, 512), torch.zeros(10)  # the classifier
    path = tmp_path / "resnet50_v1c.pth"
    torch.save({"state_dict": sd, "meta": {}}, path)
    params, stats = _pna_model()
    new_params, new_stats = load_pna_init_variables(path, params, stats)
    want = convert.resnet_from_mmseg(sd)
    for got, ref in ((new_params["backbone"], want["params"]),
                     (new_stats["backbone"], want["batch_stats"])):
        assert jax.tree.structure(got) == jax.tree.structure(ref)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(new_params["backbone"]["conv1"]["kernel"],
                                  sd["stem.0.weight"].numpy().transpose(2, 3, 1, 0))
    for a, b in zip(jax.tree.leaves(new_params["pna_head"]), jax.tree.leaves(params["pna_head"]),
                    strict=True):
        np.testing.assert_array_equal(a, b)

    del sd["layer3.0.downsample.1.running_var"]
    sd["layer4.0.conv4.weight"] = torch.zeros(1)
    torch.save({"state_dict": sd}, path)
    with pytest.raises(ValueError) as err:
        load_pna_init_variables(path, params, stats)
    message = str(err.value)
    for text in ("resnet50_v1c.pth", "missing (1): layer3.0.downsample.1.running_var",
                 "unexpected (1): layer4.0.conv4.weight"):
        assert text in message
