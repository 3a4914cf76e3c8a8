"""The `python -m jax_refine.convert crm` command and the checkpoint directory format."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_refine.models.crm import CRM
from jax_refine.refine import Refiner, load_checkpoint, save_checkpoint

torch = pytest.importorskip("torch")

from jax_refine.convert import crm_variables  # noqa: E402
from jax_refine.convert.__main__ import main as convert_main  # noqa: E402
from tests.torch_mirrors import crm as mirror  # noqa: E402


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_convert_command_writes_a_loadable_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    model = mirror.randomise(mirror.CRMNet(), seed=4)
    state = {"module." + k: v for k, v in model.state_dict().items()}
    pth = tmp_path / "crm.pth"
    torch.save(state, pth)
    out = tmp_path / "converted"
    assert convert_main(["crm", str(pth), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (out / "config.json").is_file()

    refiner = Refiner.from_checkpoint(out)
    assert refiner.model == CRM()
    _assert_trees_equal(refiner.variables, crm_variables(state))


def test_convert_command_reports_bad_keys(tmp_path, capsys):
    pth = tmp_path / "bad.pth"
    torch.save({"imnet.layers.0.weight": torch.zeros(32, 262)}, pth)
    assert convert_main(["crm", str(pth), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "missing" in err and "feats.conv1.weight" in err


def test_checkpoint_round_trips_a_different_configuration(tmp_path):
    model = CRM(depth=18, width=8, fusion_channels=(8, 8, 8), latent_channels=16,
                latent_level=2, hidden=(8, 8))
    x = jnp.zeros((1, 32, 32, 3))
    m = jnp.zeros((1, 32, 32, 1))
    q = jnp.zeros((1, 5, 2))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x, m, q, q)
    save_checkpoint(tmp_path / "small", model, variables)
    loaded_model, loaded = load_checkpoint(tmp_path / "small")
    assert loaded_model == model
    _assert_trees_equal(loaded, {k: variables[k] for k in ("params", "batch_stats")})


def test_load_checkpoint_rejects_other_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path)
