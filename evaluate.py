"""Evaluate a trained model: `python evaluate.py --config configs/NAME.py --workdir DIR`.

CRM (config.task 'crm', the default): uses DIR/refiner (or `--checkpoint` of the Refiner
format); data from config.eval (a BIG folder, or held-out synthetic scenes); IoU and mBA of
the coarse and refined masks, and of the mask after each scale of the schedule. PNA
(config.task 'pna'): uses DIR/pna (or `--checkpoint`); per-stage mIoU P0..P4 and the last
stage's fwIoU / mACC / pACC on config.eval's semantic_folder split or held-out synthetic
scenes, with the reference's test protocol of the config (`config.eval.resize`,
`iou_classes`, `mean_classes`: see jax_refine.train.evaluate_pna).
The same code runs inside training with `config.eval_every`.
Writes metrics.json and side-by-side PNGs to DIR/eval (or --out), and prints markdown tables.
Multi-host: run it on every host as train.py (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID, or `--config.distributed=True`); each process evaluates its share of the
images, process 0 writes and prints the whole set's metrics.
"""

from pathlib import Path

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jax_refine.train import cli_flags, evaluate_pna
from jax_refine.train import evaluate as crm_eval
from jax_refine.train import mesh as mesh_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                                "Training workdir (uses WORKDIR/refiner or WORKDIR/pna).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "A Refiner (CRM) or PNA checkpoint directory.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default WORKDIR/eval).")
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not (_WORKDIR.value or _CHECKPOINT.value):
        raise app.UsageError("give --workdir or --checkpoint")
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    mesh_lib.maybe_initialize_distributed(config.get("distributed", False))
    pna = config.get("task", "crm") == "pna"
    checkpoint = _CHECKPOINT.value or Path(_WORKDIR.value) / ("pna" if pna else "refiner")
    out = _OUT.value or (Path(_WORKDIR.value) / "eval" if _WORKDIR.value else "eval_out")
    if pna:
        results = evaluate_pna.evaluate(config, checkpoint, out)
        tables = [evaluate_pna.markdown_table(results)]
    else:
        results = crm_eval.evaluate(checkpoint, out, **crm_eval.eval_kwargs(config.eval))
        tables = [crm_eval.markdown_table(results), crm_eval.steps_table(results)]
    if jax.process_index() != 0:
        return
    print("\n".join(tables))
    for r in results.values():
        for png in r["pngs"]:
            print(png)
    print(f"metrics: {Path(out) / 'metrics.json'}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli_flags.parse_flags)
