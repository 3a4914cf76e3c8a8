"""Two local processes (jax.distributed on localhost, 2 CPU devices each) train 3 steps of a
global batch assembled with make_array_from_process_local_data, and agree."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
from train_helpers import ROOT

_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    from train_helpers import tiny_config
    from jax_refine.train.loop import train_and_evaluate

    config = tiny_config(total_steps=3, checkpoint_every=3, batch_size=4)
    state = train_and_evaluate(config, {workdir!r})
    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    leaves = jax.tree_util.tree_leaves(jax.device_get(state.params))
    print("STEP", int(state.step), "SUM", repr(float(sum(np.abs(x).sum() for x in leaves))))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_agree(tmp_path):
    code = _SCRIPT.format(tests=str(ROOT / "tests"), workdir=str(tmp_path / "run"))
    port = _free_port()
    procs = []
    for i in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2",
                   JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
        outs.append([line for line in out.splitlines() if line.startswith("STEP")][-1])
    assert outs[0] == outs[1], outs
    assert outs[0].startswith("STEP 3 ")
    assert (tmp_path / "run" / "refiner" / "config.json").is_file()
    assert (tmp_path / "run" / "checkpoints" / "3").is_dir()
