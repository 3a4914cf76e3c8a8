"""Benchmark: input pipeline throughput, its scaling with host cores, and against the step.

    python benchmarks/pipeline.py [--sections crm_real,crm_synthetic,pna] [--threads 1,2]
    python benchmarks/pipeline.py --config configs/crm_synthetic.py --batches 20 --steps 3

Scaling (the default): examples/s of `pipeline.train_dataset` given n cores, for each n of
--threads: each run is a fresh process pinned to n cores (`os.sched_setaffinity`) running
the pipeline with the library's default loading (n worker processes pinned alike for the
synthetic sources, tf.data's threads for the GIL-free record source) and an n-thread tf.data
pool; it takes 2 warm-up batches, then times --batches batches. Runs alternate (n = 1, 2, 1,
2, ...) so that a change of machine load hits all alike; printed: the median of --repeats
runs and its ratio to the first n's. Sections:

* crm_real: the CRM real-data pipeline of configs/crm_paper.py (batch 12, 224² crops, target
  IoU ~ U[0.8, 1)) over a `refine_folder` TFDS build of a small JPEG folder (48 synthetic
  scenes of 320-640 px as name.jpg + name.png, made in a temporary directory): record read,
  JPEG and PNG decode, crop, flip, jitter, perturbation.
* crm_synthetic: configs/crm_synthetic.py (fresh synthetic scene windows, coarse masks of
  both kinds, half of them blurred).
* pna: configs/pna_synthetic.py (multi-class synthetic scenes, scale, crop, flip, jitter).

With --config: the pipeline of that config (machine defaults) against its train step alone
on a fixed batch (after compilation); the pipeline keeps up when its rate exceeds the step's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
JPEG_SCENES = 48


def jpeg_folder(directory: Path, count: int = JPEG_SCENES) -> Path:
    """`count` synthetic scenes of 320-640 px as name.jpg (quality 90) + name.png masks."""
    import cv2
    import numpy as np

    from jax_refine.data.synthetic import make_scene

    folder = directory / "jpegs"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        h, w = (int(v) for v in rng.integers(320, 641, size=2))
        image, label = make_scene(i, h, w)
        cv2.imwrite(str(folder / f"s{i:03d}.jpg"), image[..., ::-1],
                    [cv2.IMWRITE_JPEG_QUALITY, 90])
        cv2.imwrite(str(folder / f"s{i:03d}.png"), label * 255)
    return folder


def section(name: str, workdir: Path) -> tuple[Any, Any, int]:
    """(loader, augment, global batch size) of a section (see the module docstring)."""
    from jax_refine.train import loop

    if name == "crm_real":
        config = loop.load_config_file(ROOT / "configs" / "crm_paper.py")
        config.dataset.data_dir = str(workdir / "tfds")
        config.dataset.builder_kwargs.folders = str(jpeg_folder(workdir))
    elif name in ("crm_synthetic", "pna"):
        file = "crm_synthetic.py" if name == "crm_synthetic" else "pna_synthetic.py"
        config = loop.load_config_file(ROOT / "configs" / file)
    else:
        raise ValueError(f"unknown section {name!r}")
    return loop.build_loader(config), loop.build_augment(config), config.batch_size


def rate(name: str, workdir: Path, n: int, batches: int) -> float:
    """Examples/s of section `name` on n cores, in this process (see the module docstring)."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:n])
    from jax_refine.data import pipeline

    loader, augment, batch = section(name, workdir)
    ds = pipeline.train_dataset(loader, augment, global_batch_size=batch, threads=n)
    it = pipeline.as_numpy(ds)
    for _ in range(2):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - start)


def scaling(args: argparse.Namespace) -> None:
    threads = [int(n) for n in args.threads.split(",")]
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, cpus: {os.cpu_count()}, "
          f"load average at start: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sections.split(","):
            section(name, Path(tmp))  # builds the crm_real data once
            runs: dict[int, list[float]] = {n: [] for n in threads}
            for _ in range(args.repeats):
                for n in threads:
                    run = subprocess.run(
                        [sys.executable, __file__, "--run", name, "--threads", str(n),
                         "--batches", str(args.batches), "--workdir", tmp],
                        capture_output=True, text=True)
                    if run.returncode:
                        raise RuntimeError(f"{name} on {n} core(s) failed:\n{run.stderr[-3000:]}")
                    runs[n].append(float(run.stdout.split()[-1]))
            base = statistics.median(runs[threads[0]])
            for n in threads:
                median = statistics.median(runs[n])
                each = " ".join(f"{r:.1f}" for r in runs[n])
                print(f"{name}: {n} thread(s): {median:.1f} examples/s (runs: {each}), "
                      f"{median / base:.2f}x {threads[0]} thread(s)")
            print(f"  load average now: {os.getloadavg()}")


def step_comparison(args: argparse.Namespace) -> None:
    import jax

    from jax_refine.data import pipeline
    from jax_refine.train import loop
    from jax_refine.train import mesh as mesh_lib
    from jax_refine.train import step as step_lib

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="crm_real,crm_synthetic,pna")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--config", default="", help="compare this config's pipeline and step")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--run", default="", help=argparse.SUPPRESS)  # one scaling run
    parser.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(rate(args.run, Path(args.workdir), int(args.threads), args.batches))
    elif args.config:
        step_comparison(args)
    else:
        scaling(args)


if __name__ == "__main__":
    main()
