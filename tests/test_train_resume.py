"""Checkpoint / resume: a run killed with SIGKILL and restarted ends where an uninterrupted
run ends (same params to 1e-6), because the state, rng and data position are restored."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from train_helpers import ROOT, tiny_flags

from jax_refine.refine import load_checkpoint


def _command(workdir: Path) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--config",
            str(ROOT / "configs" / "crm_synthetic.py"), "--workdir", str(workdir),
            *tiny_flags(total_steps=8, checkpoint_every=2)]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu")


def _run(workdir: Path) -> None:
    proc = subprocess.run(_command(workdir), cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _params(workdir: Path):
    _, variables = load_checkpoint(workdir / "refiner")
    return jax.tree_util.tree_map(np.asarray, variables)


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted(tmp_path):
    _run(tmp_path / "straight")

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_command(killed), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (killed / "checkpoints" / "4").is_dir():  # orbax renames when complete
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "refiner").exists()  # it really stopped before the end

    _run(killed)  # resumes from the latest complete checkpoint
    a, b = _params(tmp_path / "straight"), _params(killed)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)
