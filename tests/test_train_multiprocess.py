"""Two local processes (jax.distributed on localhost, 2 CPU devices each) train 3 steps of a
global batch assembled with make_array_from_process_local_data, and agree; their in-loop
evaluation, split between them, gives one process's metrics bit for bit (CRM: the exported
Refiner evaluated here; PNA's confusion-matrix sums: a fixed stand-in predictor)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest
from train_helpers import ROOT

from jax_refine import refine
from jax_refine.train import evaluate as crm_eval

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    from test_train_multiprocess import pna_stand_in_metrics
    from train_helpers import tiny_config
    from jax_refine.train.loop import train_and_evaluate

    config = tiny_config(total_steps=3, checkpoint_every=3, batch_size=4, eval_every=3,
                         **{{"eval." + k: v for k, v in {eval_config!r}.items()}})
    state = train_and_evaluate(config, {workdir!r})
    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    leaves = jax.tree_util.tree_leaves(jax.device_get(state.params))
    print("STEP", int(state.step), "SUM", repr(float(sum(np.abs(x).sum() for x in leaves))))
    print("PNA", pna_stand_in_metrics())
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# Three held-out scenes: process 0 scores scenes 0 and 2, process 1 scene 1.
_EVAL = {"synthetic_size": 48, "num_images": 3, "scales": (1.0,), "num_pngs": 2}


def pna_stand_in_metrics() -> str:
    """PNA `evaluate_samples` of 5 held-out scenes (this process's share) with a predictor
    that maps colours to classes, as JSON."""
    from jax_refine.train import distributed_eval, evaluate_pna

    def predict(images):
        return [np.stack([(image[..., c] // 64).astype(np.uint8) for c in range(3)])
                for image in images]

    samples = evaluate_pna.synthetic_samples(5, 40, 3)
    result = evaluate_pna.evaluate_samples(predict, distributed_eval.process_items(samples), 4,
                                           chunk=2)
    return json.dumps({k: result[k] for k in ("num_images", "stages")}, sort_keys=True)


@pytest.mark.slow
def test_two_processes_agree(tmp_path):
    code = _SCRIPT.format(tests=str(ROOT / "tests"), workdir=str(tmp_path / "run"),
                          eval_config=_EVAL)
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
    outs, pna = [], []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
        outs.append([line for line in out.splitlines() if line.startswith("STEP")][-1])
        pna.append([line for line in out.splitlines() if line.startswith("PNA ")][-1][4:])
    assert outs[0] == outs[1], outs
    assert outs[0].startswith("STEP 3 ")
    assert (tmp_path / "run" / "refiner" / "config.json").is_file()
    assert (tmp_path / "run" / "checkpoints" / "3").is_dir()

    # PNA: the confusion matrices summed over the two shares are this process's alone.
    assert pna[0] == pna[1] == pna_stand_in_metrics()
    assert json.loads(pna[0])["num_images"] == 5
    # CRM: the in-loop evaluation (process 0's metrics.json) is the exported Refiner's here.
    split = json.loads((tmp_path / "run" / "eval" / "step_3" / "metrics.json").read_text())
    config = ml_collections.ConfigDict(_EVAL)
    config.folder = ""
    alone = crm_eval.evaluate_refiner(
        refine.Refiner.from_checkpoint(tmp_path / "run" / "refiner"), tmp_path / "alone",
        per_step=False, **crm_eval.eval_kwargs(config))
    for name, result in alone.items():
        assert split[name]["num_images"] == 3
        for key in ("coarse", "refined", "steps"):
            assert split[name][key] == result[key], (name, key)
