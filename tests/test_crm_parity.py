"""Numerical parity of CRM and the converters with the PyTorch reference (mirror)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jax_refine.convert import KeyMismatchError, crm_variables, resnet_from_torchvision  # noqa: E402
from jax_refine.models.backbones.resnet import ResNet50  # noqa: E402
from jax_refine.models.crm import CRM  # noqa: E402
from tests.torch_mirrors import crm as mirror  # noqa: E402
from tests.torch_mirrors.arrays import nhwc  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("highest_precision")]


@pytest.fixture(scope="module")
def torch_crm():
    torch.manual_seed(0)
    return mirror.randomise(mirror.CRMNet(), seed=0)


def test_crm_forward_matches_reference(torch_crm):
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.normal(size=(2, 3, 64, 48)).astype(np.float32))
    seg = torch.from_numpy(rng.uniform(-1, 1, size=(2, 1, 64, 48)).astype(np.float32))
    coord = mirror.make_coord((64, 48))[None].repeat(2, 1, 1)
    cell = torch.ones_like(coord)
    cell[..., 0] *= 2 / 64
    cell[..., 1] *= 2 / 48
    with torch.no_grad():
        want = torch_crm(image, seg, coord, cell).numpy()

    state = {"module." + k: v for k, v in torch_crm.state_dict().items()}  # DataParallel
    variables = crm_variables(state)
    got = CRM().apply(variables, nhwc(image), nhwc(seg), jnp.asarray(coord), jnp.asarray(cell))
    assert got.shape == want.shape == (2, 64 * 48, 1)
    assert np.abs(want).max() > 0.1  # the comparison is not vacuous
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_crm_variables_report_key_mismatches(torch_crm):
    state = dict(torch_crm.state_dict())
    del state["aspp_.last_conv.1.running_var"]
    state["imnet.extra.weight"] = state["imnet.layers.0.weight"]
    with pytest.raises(KeyMismatchError) as err:
        crm_variables(state)
    assert err.value.missing == ["aspp_.last_conv.1.running_var"]
    assert err.value.unexpected == ["imnet.extra.weight"]
    assert "aspp_.last_conv.1.running_var" in str(err.value)


def test_crm_variables_tree_matches_model(torch_crm):
    variables = crm_variables(torch_crm.state_dict())
    shapes = jax.eval_shape(
        CRM().init,
        jax.random.PRNGKey(0),
        jnp.zeros((1, 32, 32, 3)),
        jnp.zeros((1, 32, 32, 1)),
        jnp.zeros((1, 4, 2)),
        jnp.zeros((1, 4, 2)),
    )
    want = jax.tree_util.tree_map(lambda x: x.shape, shapes)
    got = jax.tree_util.tree_map(lambda x: x.shape, variables)
    assert got == want


def test_resnet_from_torchvision_matches_reference():
    torch.manual_seed(1)
    tv = mirror.randomise(mirror.ResNet(in_channels=3, crm=False), seed=1)
    image = torch.from_numpy(np.random.default_rng(1).normal(size=(1, 3, 64, 64)).astype("f4"))
    with torch.no_grad():
        want = tv(image)
    variables = resnet_from_torchvision(tv.state_dict(), in_channels=4)
    assert variables["params"]["conv1"]["kernel"].shape == (7, 7, 4, 64)
    np.testing.assert_array_equal(variables["params"]["conv1"]["kernel"][:, :, 3], 0)
    extra = jnp.asarray(np.random.default_rng(2).normal(size=(1, 64, 64, 1)).astype("f4"))
    x = jnp.concatenate([nhwc(image), extra], axis=-1)  # the zero-filled channel is ignored
    got = ResNet50(in_channels=4).apply(variables, x)
    for name in ("stem", "layer1", "layer2", "layer3", "layer4"):
        ref = want[name].permute(0, 2, 3, 1).numpy()
        scale = max(1.0, np.abs(ref).max())
        np.testing.assert_allclose(np.asarray(got[name]), ref, atol=1e-4 * scale, rtol=0)

    crm_backbone = resnet_from_torchvision(tv.state_dict(), in_channels=4, num_stages=3)
    assert "layer4_0" not in crm_backbone["params"]
    with pytest.raises(KeyMismatchError, match="unexpected"):
        resnet_from_torchvision({**tv.state_dict(), "layer9.0.conv1.weight": 0}, in_channels=4)


def test_two_scale_refine_matches_reference_loop(torch_crm):
    from jax_refine.refine import Refiner

    rng = np.random.default_rng(3)
    h, w = 45, 38
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    mask = ((((yy - 20) ** 2 + (xx - 18) ** 2) < 150) * 255).astype(np.uint8)
    state = {k: v.clone() for k, v in torch_crm.state_dict().items()}
    # Spread and centre the random model's logits so that the binary comparison means something.
    state["imnet.layers.8.weight"] *= 40
    im_t, seg_t = mirror.normalise(image, mask)
    probe = mirror.CRMNet().eval()
    probe.load_state_dict(state)
    with torch.no_grad():
        coord = mirror.make_coord((h, w))[None]
        logits = probe(im_t, seg_t, coord, torch.full_like(coord, 2 / h))
    state["imnet.layers.8.bias"] -= logits.median()
    probe.load_state_dict(state)

    want = mirror.refine_multiscale(probe, im_t, seg_t, scales=(0.5, 1.0)).numpy()
    refiner = Refiner(CRM(), crm_variables(state), precision="highest")
    got = refiner.refine(image, mask, scales=(0.5, 1.0))
    assert got.shape == want.shape == (h, w) and got.dtype == np.float32
    assert 0.1 < (want > 0.5).mean() < 0.9
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
    assert ((got > 0.5) == (want > 0.5)).mean() >= 0.999
