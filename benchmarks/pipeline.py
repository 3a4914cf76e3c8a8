"""Benchmark: CRM input pipeline throughput vs what the train step consumes.

    python benchmarks/pipeline.py --config configs/crm_synthetic.py --batches 20

Measures batches/s of the tf.data pipeline alone (after 2 warm-up batches) and, unless
--skip-step, the train step alone on a fixed batch (after compilation), both with the
config's model, batch size and crop. The pipeline keeps up when its rate exceeds the step's.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "crm_synthetic.py"))
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--skip-step", action="store_true")
    args = parser.parse_args()

    from jax_refine.data import pipeline
    from jax_refine.train import loop

    config = loop.load_config_file(args.config)
    print(f"load average at start: {os.getloadavg()}, cpus: {os.cpu_count()}")
    ds = pipeline.train_dataset(loop.build_loader(config), loop.build_augment(config),
                              global_batch_size=config.batch_size)
    it = pipeline.as_numpy(ds)
    for _ in range(2):
        batch = next(it)
    start = time.perf_counter()
    for _ in range(args.batches):
        next(it)
    data_rate = args.batches / (time.perf_counter() - start)
    print(f"pipeline: {data_rate:.2f} batches/s ({data_rate * config.batch_size:.1f} "
          f"examples/s), batch {config.batch_size} x {config.crop_size}^2")
    del it
    if args.skip_step:
        return

    import jax

    from jax_refine.train import mesh as mesh_lib
    from jax_refine.train import step as step_lib

    model = loop.build_model(config)
    tx, schedule = loop.build_optimizer(config)
    mesh = mesh_lib.make_mesh()
    state = step_lib.jit_init_state(model, tx, loop.example_inputs(config), mesh)(
        jax.random.key(0))
    train_step = step_lib.jit_train_step(loop.build_train_step(config, model, tx, schedule),
                                         mesh)
    gbatch = mesh_lib.global_batch(mesh, batch)
    state, metrics = train_step(state, gbatch)
    float(metrics["loss"])
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = train_step(state, gbatch)
        float(metrics["loss"])
    step_rate = args.steps / (time.perf_counter() - start)
    print(f"train step: {step_rate:.3f} steps/s; pipeline / step = {data_rate / step_rate:.1f}x")


if __name__ == "__main__":
    main()
