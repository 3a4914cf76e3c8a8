"""End to end: an mmseg-layout PNA checkpoint of a torch mirror (ResNetV1c + mmseg coarse head +
mmseg PNA head + auxiliary FCN) converted by `python -m jax_refine.convert pna` gives the
mirror's logits (P0..P4 and the mmseg output) at an odd image size; float32, `highest`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jax_refine import convert  # noqa: E402
from jax_refine.convert.__main__ import main as convert_main  # noqa: E402
from jax_refine.convert.common import KeyMismatchError  # noqa: E402
from jax_refine.models import pna as pna_lib  # noqa: E402
from tests.torch_mirrors import detectron2 as d2  # noqa: E402
from tests.torch_mirrors import mmseg as mm  # noqa: E402
from tests.torch_mirrors import pna_layers  # noqa: E402
from tests.torch_mirrors import swin as ts  # noqa: E402
from tests.torch_mirrors.mmseg_resnet import ResNetV1c  # noqa: E402
from tests.torch_mirrors.pna import PIXEL_MEAN, PIXEL_STD  # noqa: E402

pytestmark = pytest.mark.usefixtures("highest_precision")
TOL = 1e-4
K = 4
WIDTH = 16  # stem / base channels: features 64, 128, 256, 512 (Bottleneck)
DIMS = (32, 32, 64, 64)
# mmseg's backbone settings per coarse head (the PNA configs): d32 for FCN, d16 otherwise.
D16 = ((1, 2, 2, 1), (1, 1, 1, 2))
BACKBONE = {"fcn": ((1, 2, 2, 2), (1, 1, 1, 1)), "psp": D16, "aspp": D16}


def mirror_model(kind: str) -> mm.CascadeSegmentor:
    if kind == "swin_psp":  # a small Swin: shifted blocks, window 7, 32..256 channels
        backbone = ts.SwinTransformer(32, (2, 2, 2, 2), (1, 2, 4, 8), window_size=7)
        chans = [32 * 2**i for i in range(4)]
    else:
        strides, dilations = BACKBONE[kind]
        backbone = ResNetV1c(50, WIDTH, WIDTH, strides, dilations, blocks=(1, 1, 2, 1))
        chans = [WIDTH * 4 * 2**i for i in range(4)]
    if kind == "fcn":
        coarse = mm.FCNHead(K, cin=chans[3], channels=24)
    elif kind in ("psp", "swin_psp"):
        coarse = mm.PSPHead(K, cin=chans[3], channels=24)
    else:
        coarse = mm.ASPPHead(K, cin=chans[3], channels=24)
    pna = mm.PNAHead(chans, K, DIMS, (3, 5, 3, 3))
    model = mm.CascadeSegmentor(backbone, coarse, pna, mm.aux_fcn_head(K, chans[2], 16))
    pna_layers.randomize_(pna, seed=3)
    d2.randomize(backbone, seed=1)
    d2.randomize(coarse, seed=2)
    d2.randomize(model.auxiliary_head, seed=4)
    calibration = torch.randn(2, 3, 61, 53, generator=torch.Generator().manual_seed(5))
    d2.calibrate_bn(model, calibration)
    return model.eval()


# The VOC models' structures end to end: ResNetV1c d32 + FCN, d16 (contract_dilation) + PSP
# and + ASPP, Swin + PSP; each with the auxiliary head.
@pytest.mark.parametrize("kind", ["fcn", "psp", "aspp", "swin_psp"])
def test_converted_mmseg_checkpoint_gives_the_mirrors_logits(kind, tmp_path):
    mirror = mirror_model(kind)
    checkpoint = tmp_path / "pna_mmseg.pth"
    torch.save({"meta": {"iter": 20000}, "state_dict": mirror.state_dict()}, checkpoint)
    assert convert_main(["pna", str(checkpoint), str(tmp_path / "out")]) == 0
    model, variables, kwargs = pna_lib.load_checkpoint(tmp_path / "out")
    backbone, coarse = ("swin_t", "psp") if kind == "swin_psp" else ("resnet_v1c", kind)
    assert (kwargs["backbone"], kwargs["coarse_head"]) == (backbone, coarse)
    assert kwargs["pna_head"] == "mmseg" and kwargs["auxiliary_head"]
    assert "auxiliary_head" in variables["params"]

    image = np.random.default_rng(7).uniform(0, 255, (1, 61, 53, 3)).astype(np.float32)
    normalised = (image - np.asarray(PIXEL_MEAN)) / np.asarray(PIXEL_STD)
    with torch.no_grad():
        want, want_final = mirror(torch.from_numpy(
            np.ascontiguousarray(normalised.transpose(0, 3, 1, 2), np.float32)))

    def forward(variables, x):
        outs = model.apply(variables, x)
        return outs, pna_lib.final_logits(outs[-1], x.shape[1:3], mode="mmseg")

    x = jnp.asarray(image)
    outs, final = jax.jit(forward)(variables, x)
    for got, ref in zip(outs, want, strict=True):
        ref = ref.numpy().transpose(0, 2, 3, 1)
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(final, want_final.numpy().transpose(0, 2, 3, 1), atol=TOL, rtol=0)


def test_mmseg_key_mismatches_are_listed():
    state = {k: v for k, v in mirror_model("aspp").state_dict().items()
             if k != "decode_head.1.patch_embeds.pna2.bias"}
    state["decode_head.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyMismatchError) as err:
        convert.pna_variables({"meta": {}, "state_dict": state})
    assert err.value.missing == ["decode_head.1.patch_embeds.pna2.bias"]
    assert err.value.unexpected == ["decode_head.0.extra.weight"]
    assert convert.checkpoint_layout(state) == "mmseg"


@pytest.mark.parametrize("recompute", [False, True])
def test_mmseg_cascade_runs_the_coarse_head_again_for_the_pna_head(recompute):
    """CascadeEncoderDecoder in training: P0 for its loss, a second coarse-head run (another
    call, so another dropout draw and statistics update) as the PNA head's input."""
    import flax.linen as nn

    class Features(nn.Module):
        def __call__(self, x, *, train=False):
            return {f"res{k}": x for k in range(2, 6)}

    class CountingHead(nn.Module):  # returns how many times it has run in this apply
        @nn.compact
        def __call__(self, features, *, train=False):
            calls = self.variable("batch_stats", "calls", lambda: jnp.zeros(()))
            if train:
                calls.value += 1
            return jnp.full(features["res5"].shape[:3] + (1,), calls.value)

    class Echo(nn.Module):
        def __call__(self, value, features, *, train=False):
            return [value]

    model = pna_lib.PNASegmentor(Features(), CountingHead(), Echo(), pixel_mean=(0.0,),
                                 pixel_std=(1.0,), recompute_coarse=recompute)
    x = jnp.zeros((1, 2, 2, 1))
    variables = model.init(jax.random.key(0), x)
    (p0, pna_input), state = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert float(p0.max()) == 1 and float(pna_input.max()) == (2 if recompute else 1)
    assert float(state["batch_stats"]["coarse_head"]["calls"]) == (2 if recompute else 1)
    p0, pna_input = model.apply(variables, x, train=False)  # inference: one run
    assert float(pna_input.max()) == float(p0.max()) == 0
    assert pna_lib.build_pna("aspp", 3, pna_head="mmseg").recompute_coarse
    assert not pna_lib.build_pna("deeplabv3", 3).recompute_coarse
