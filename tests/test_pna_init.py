"""PNA weight initialisation (`init_from`) and the `python -m jax_refine.convert pna` command."""

from __future__ import annotations

import pickle

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jax_refine import convert  # noqa: E402
from jax_refine.convert.__main__ import main as convert_main  # noqa: E402
from jax_refine.models import pna as pna_lib  # noqa: E402
from jax_refine.train.checkpoint import load_pna_init_variables  # noqa: E402
from tests.torch_mirrors import crm as crm_mirror  # noqa: E402
from tests.torch_mirrors import detectron2 as d2  # noqa: E402
from tests.torch_mirrors import pna as tp  # noqa: E402

BLOCKS = (1, 1, 1, 1)


def _variables(model, size=64):
    variables = model.init(jax.random.PRNGKey(0), np.zeros((1, size, size, 3), np.float32))
    return jax.device_get(variables["params"]), jax.device_get(variables["batch_stats"])


def _model(stem: str):
    model = pna_lib.build_pna("fcn", 3, embed_dims=(32, 32, 32, 32), window_sizes=(3,) * 4,
                              head_kwargs={"channels": 16, "num_convs": 1}, stem=stem)
    backbone = pna_lib.deeplab_resnet(50, stem=stem, output_stride=32, multi_grid=None,
                                      stage_sizes=BLOCKS)
    return model.clone(backbone=backbone)


def _assert_tree_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_detectron2_imagenet_weights_initialise_the_backbone_only(tmp_path, suffix):
    mirror = d2.randomize(d2.DeepLabResNet(50, "deeplab", res5_dilation=1,
                                           multi_grid=(1, 1, 1), blocks=list(BLOCKS)), seed=2)
    path = tmp_path / f"R-52{suffix}"
    if suffix == ".pkl":  # detectron2's model-zoo format: numpy arrays under 'model'
        arrays = {k: v.numpy() for k, v in mirror.state_dict().items()}
        path.write_bytes(pickle.dumps({"model": arrays, "__author__": "test"}))
    else:
        torch.save(mirror.state_dict(), path)
    params, stats = _variables(_model("deeplab"))
    new_params, new_stats = load_pna_init_variables(path, params, stats)
    want = convert.resnet_from_detectron2(mirror.state_dict())
    _assert_tree_equal(new_params["backbone"], want["params"])
    _assert_tree_equal(new_stats["backbone"], want["batch_stats"])
    _assert_tree_equal(new_params["pna_head"], params["pna_head"])
    _assert_tree_equal(new_params["coarse_head"], params["coarse_head"])


def test_torchvision_weights_initialise_a_torchvision_stem_backbone(tmp_path):
    mirror = d2.randomize(crm_mirror.ResNet(BLOCKS, in_channels=3, crm=False), seed=3)
    path = tmp_path / "resnet50.pth"
    torch.save(mirror.state_dict(), path)
    params, stats = _variables(_model("torchvision"))
    new_params, _ = load_pna_init_variables(path, params, stats)
    want = convert.resnet_from_torchvision(mirror.state_dict(), in_channels=3)
    _assert_tree_equal(new_params["backbone"], want["params"])
    # The same weights do not fit the DeepLab stem: a clear error, not a silent mix.
    with pytest.raises(ValueError, match="does not match the model"):
        load_pna_init_variables(path, *_variables(_model("deeplab")))


def test_pna_checkpoint_directory_and_unknown_files(tmp_path):
    model = _model("deeplab")
    params, stats = _variables(model)
    other = jax.tree_util.tree_map(lambda x: x + 1, params)
    kwargs = {"coarse_head": "fcn", "num_classes": 3}
    pna_lib.save_checkpoint(tmp_path / "ckpt", kwargs, {"params": other, "batch_stats": stats})
    new_params, _ = load_pna_init_variables(tmp_path / "ckpt", params, stats)
    _assert_tree_equal(new_params, other)

    torch.save({"head.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="neither a PNA checkpoint"):
        load_pna_init_variables(tmp_path / "other.pth", params, stats)
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pth"):
        load_pna_init_variables(tmp_path / "broken.pth", params, stats)


def test_convert_pna_command_writes_a_loadable_checkpoint(tmp_path, capsys):
    mirror = tp.PNASegmentor(d2.DeepLabResNet(50), d2.DeepLabV3Head(3),
                             tp.PNAHead((256, 512, 1024, 2048), 3), 0)
    d2.randomize(mirror, seed=4)
    pth = tmp_path / "pna_official.pth"
    torch.save({"model": mirror.state_dict(), "iteration": 10}, pth)
    out = tmp_path / "converted"
    assert convert_main(["pna", str(pth), str(out), "--pool-kernel-size", "32", "64"]) == 0
    assert str(out) in capsys.readouterr().out
    model, variables, kwargs = pna_lib.load_checkpoint(out)
    assert kwargs["coarse_head"] == "deeplabv3" and kwargs["num_classes"] == 3
    assert kwargs["pool_kernel_size"] == (32, 64) and kwargs["depth"] == 50
    assert model.coarse_head.pool_kernel_size == (32, 64)
    _assert_tree_equal(variables, convert.pna_variables({"model": mirror.state_dict()}))

    sd = mirror.state_dict()
    del sd["sem_seg_head.pna_head.conv_seg_layers.res2.bias"]
    torch.save(sd, pth)
    assert convert_main(["pna", str(pth), str(tmp_path / "bad")]) == 1
    assert "conv_seg_layers.res2.bias" in capsys.readouterr().err
