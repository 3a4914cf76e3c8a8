"""`make demo`: train CRM on synthetic scenes, then refine held-out 2048-px scenes.

Run as `python -m jax_refine.demo [--workdir demo_out/crm_synthetic] [--config.KEY=VALUE]`.
Trains `configs/crm_synthetic.py` on 160-px crops (resuming if the workdir already has
checkpoints), exports the Refiner checkpoint, then evaluates it with the multi-resolution
Refiner on held-out 2048 x 2048 scenes with coarse masks from `perturb_mask` (made at 512 px
and upsampled, see `jax_refine.train.evaluate`) and from `coarse_from_lowres`. It prints
IoU / mBA of the coarse and refined masks, the IoU / mBA after each step of each schedule,
and the paths of side-by-side PNGs (image | coarse | refined | GT). The reference's
four-scale schedule is reported first, then any `config.eval.extra_schedules`
(crm_synthetic: none; e.g. `--config.eval.extra_schedules='((0.5, 1.0),)'`).
"""

from __future__ import annotations

import time
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from jax_refine.train.evaluate import evaluate, markdown_table, steps_table
from jax_refine.train.loop import train_and_evaluate

_DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "crm_synthetic.py"
_CONFIG = config_flags.DEFINE_config_file("config", str(_DEFAULT_CONFIG), "Config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "demo_out/crm_synthetic", "Training directory.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    config, workdir = _CONFIG.value, Path(_WORKDIR.value)
    start = time.perf_counter()
    train_and_evaluate(config, workdir)
    trained = time.perf_counter()
    print(f"training: {trained - start:.0f} s ({config.total_steps} steps of "
          f"{config.batch_size} x {config.crop_size}^2 crops)")
    e = config.eval
    results = {}
    for scales in (tuple(e.scales), *[tuple(s) for s in e.get("extra_schedules", ())]):
        tag = "+".join(f"{s:g}" for s in scales)
        out = workdir / "eval" / f"scales_{tag}"
        r = evaluate(workdir / "refiner", out, folder=e.folder, scales=scales,
                     num_images=e.num_images, num_pngs=e.num_pngs,
                     synthetic_size=e.synthetic_size)
        results.update({f"{name}, scales {tag}": v for name, v in r.items()})
        print(f"metrics: {out / 'metrics.json'}")
    print(f"evaluation: {time.perf_counter() - trained:.0f} s")
    print(markdown_table(results))
    print(steps_table(results))
    for r in results.values():
        for png in r["pngs"]:
            print(f"preview: {png}")
    print(f"total: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    app.run(main)
