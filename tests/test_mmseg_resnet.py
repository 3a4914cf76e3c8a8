"""mmsegmentation's ResNetV1c: parity of `models.pna.resnet_v1c` with a PyTorch mirror and the
mmseg converter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

torch = pytest.importorskip("torch")

from jax_refine import convert  # noqa: E402
from jax_refine.models import pna as pna_lib  # noqa: E402
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
    variables = convert.resnet_from_mmseg(
        {f"backbone.{k}": v for k, v in mirror.state_dict().items()}, prefix="backbone."
    )
    model = pna_lib.resnet_v1c(depth, width=16, output_stride=output_stride,
                               stage_sizes=blocks)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *SIZE, 3)))
    convert.check_shapes(variables, shapes, "resnet_v1c")
    got = pna_lib.res_features(model.apply(variables, jnp.asarray(image)))
    for i, name in enumerate(("res2", "res3", "res4", "res5")):
        assert got[name].shape == nhwc(want[i]).shape, name
        assert max_err(got[name], nhwc(want[i])) <= TOL, name

