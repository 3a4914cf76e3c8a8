"""Issue 18 item 5 and issue 19 items 4 and 8: reproducible training, nothing poisoned saved
or resumed, prompt exit on a first-step error, one-line errors for unknown config keys.

Two CPU runs of a tiny config are bitwise equal, one of them interrupted and resumed (with
a different save schedule); a resume skips a NaN checkpoint and a truncated one and falls
back to the previous checkpoint, again ending bitwise where the straight run ends.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from train_helpers import ROOT, compilation_cache, tiny_config, tiny_flags  # noqa: F401

from jax_refine.train import cli_flags, loop
from jax_refine.train.checkpoint import Checkpointer

STEPS = 6


def _leaves(state):
    host = jax.device_get((state.params, state.batch_stats, state.opt_state, state.step))
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(host)]


def _assert_bitwise_equal(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run: checkpoints at 2, 4 and 6."""
    workdir = tmp_path_factory.mktemp("straight") / "run"
    return workdir, loop.train_and_evaluate(tiny_config(total_steps=STEPS, checkpoint_every=2),
                                            workdir)


def test_two_runs_bitwise_equal_across_a_save_and_a_resume(straight, tmp_path):
    _, state = straight
    workdir = tmp_path / "run"
    config = tiny_config(total_steps=STEPS, checkpoint_every=4)  # saves at 4 and 6
    loop.train_and_evaluate(config, workdir)
    shutil.rmtree(workdir / "checkpoints" / str(STEPS))  # as if killed after step 4
    resumed = loop.train_and_evaluate(config, workdir)
    _assert_bitwise_equal(resumed, state)


def _poison_with_nan(directory, step):
    manager = ocp.CheckpointManager(directory, item_names=("state", "data"))
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
    tree = out["state"]
    tree["params"] = jax.tree_util.tree_map(lambda x: np.full_like(x, np.nan), tree["params"])
    shutil.rmtree(directory / str(step))
    manager.reload()
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                               data=ocp.args.JsonSave(dict(out["data"]))))
    manager.wait_until_finished()
    manager.close()


def _truncate_largest_file(path):
    largest = max((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])


def test_resume_skips_non_finite_and_unreadable_checkpoints(straight, tmp_path, capsys):
    source, state = straight
    workdir = tmp_path / "run"
    shutil.copytree(source / "checkpoints", workdir / "checkpoints")
    _poison_with_nan(workdir / "checkpoints", 6)
    _truncate_largest_file(workdir / "checkpoints" / "4" / "state")

    resumed = loop.train_and_evaluate(tiny_config(total_steps=STEPS, checkpoint_every=2),
                                      workdir)
    out = capsys.readouterr().out
    assert "checkpoints/6 holds non-finite params" in out
    assert "checkpoints/4 is unreadable" in out
    assert "resumed from" in out and "(step 2)" in out
    assert sorted(p.name for p in (workdir / "checkpoints_rejected").iterdir()) == ["4", "6"]
    _assert_bitwise_equal(resumed, state)  # fell back to step 2 and trained on exactly
    assert Checkpointer(workdir / "checkpoints").latest_step() == STEPS


def _train_command(workdir, *flags):
    return [sys.executable, str(ROOT / "train.py"), "--config",
            str(ROOT / "configs" / "crm_synthetic.py"), "--workdir", str(workdir),
            *tiny_flags(total_steps=2), *flags]


def test_error_in_the_first_step_exits_promptly(tmp_path):
    # Raised while tracing step 1 (more boundary windows than windows); train.py used to
    # print the error and then hang forever on the live tf.data iterator.
    proc = subprocess.run(
        _train_command(tmp_path / "run", "--config.query_windows=2",
                       "--config.boundary_windows=3", "--config.query_size=8"),
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=240)
    assert proc.returncode == 1
    assert "need 0 <= boundary_windows <= query_windows" in proc.stderr


def test_unknown_config_key_is_one_line(capsys):
    argv = ["train.py", "--config", str(ROOT / "configs" / "crm_synthetic.py"),
            "--workdir", "/tmp/x", "--config.batch_sise=4"]
    assert cli_flags.unknown_override(argv) == (
        f"unknown config key 'batch_sise' in --config.batch_sise for {argv[2]} "
        f"(closest valid key: 'batch_size')")
    argv[-1] = "--config.model.dpeth=18"
    assert cli_flags.unknown_override(argv).endswith("(closest valid key: 'model.depth')")
    argv[-1] = "--config.model.depth=18"
    assert cli_flags.unknown_override(argv) is None
    argv[-1] = "--config.bogus=1"
    with pytest.raises(SystemExit) as exit_info:
        cli_flags.parse_flags(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train.py: unknown config key 'bogus'")
