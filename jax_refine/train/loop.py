"""`train_and_evaluate(config, workdir)`: the CRM training loop.

Resume order (first that applies):
  1. the latest checkpoint in `workdir/checkpoints` — exact resume: state, rng, and the data
     position (example k is a pure function of (seed, k), so the pipeline restarts at the
     restored step);
  2. `config.init_from` — weights only (a Refiner checkpoint directory, or a torchvision
     ResNet state_dict for the backbone), starting at step 0;
  3. random initialisation.

Outputs in `workdir`: checkpoints/ (orbax, last `keep_checkpoints`), tensorboard/ (event
files from process 0: loss terms, lr, grad norm, throughput), refiner/ (the trained model in
the `jax_refine.refine` checkpoint format, written at the end and, if
`config.export_every_checkpoint`, at every checkpoint), config.json.
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jax_refine import refine
from jax_refine.data import pipeline
from jax_refine.models.crm import CRM
from jax_refine.train import checkpoint as ckpt_lib
from jax_refine.train import mesh as mesh_lib
from jax_refine.train import optim
from jax_refine.train import step as step_lib
from jax_refine.train.state import TrainState, create_state

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class MetricWriter:
    """TensorBoard scalars through TensorFlow's summary writer (process 0 only; else no-op)."""

    def __init__(self, logdir: Path, enabled: bool):
        self.writer = None
        if enabled:
            import tensorflow as tf
            from tensorflow.core.framework import summary_pb2

            tf.config.set_visible_devices([], "GPU")
            self._tf = tf
            self._meta = summary_pb2.SummaryMetadata(
                plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
            )
            self.writer = tf.summary.create_file_writer(str(logdir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        with self.writer.as_default():
            for tag, value in values.items():
                # tf.summary.write is TF's core summary op (tf.summary.scalar needs the
                # tensorboard package); the 'scalars' plugin metadata makes TensorBoard show
                # them as scalars.
                self._tf.summary.write(tag, float(value), step=step, metadata=self._meta)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def build_model(config: ml_collections.ConfigDict) -> CRM:
    """The CRM of config.model, computing in config.dtype (parameters stay float32)."""
    kwargs = {k: tuple(v) if isinstance(v, list | tuple) else v
              for k, v in config.model.to_dict().items()}
    return CRM(**kwargs, dtype=DTYPES[config.dtype])


def build_loader(config: ml_collections.ConfigDict) -> pipeline.Loader:
    """The example loader of config.dataset ('synthetic' or a TFDS builder name)."""
    ds = config.dataset
    if ds.name == "synthetic":
        return pipeline.SyntheticSource(config.seed, ds.min_size, ds.max_size)
    from jax_refine.data import tfds as tfds_lib

    records = tfds_lib.data_source(ds.name, data_dir=ds.data_dir, builder_config=ds.config,
                                   split=ds.split, builder_kwargs=ds.builder_kwargs.to_dict())
    return pipeline.RecordSource(records, config.seed)


def build_augment(config: ml_collections.ConfigDict) -> pipeline.CrmAugment:
    c = config.dataset.coarse
    return pipeline.CrmAugment(
        seed=config.seed,
        crop=config.crop_size,
        coarse=pipeline.CoarseSpec(tuple(c.iou_range), c.lowres_prob, tuple(c.lowres_factors)),
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> TrainState:
    """Train CRM as configured; write checkpoints, summaries and the Refiner export."""
    mesh_lib.maybe_initialize_distributed(config.get("distributed", False))
    workdir = Path(workdir).absolute()
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

    mesh = mesh_lib.make_mesh()
    rep = mesh_lib.replicated(mesh)
    model = build_model(config)
    tx, schedule = optim.crm_optimizer(
        config.learning_rate, config.total_steps, tuple(config.lr_boundaries),
        config.lr_decay_factor, config.weight_decay,
    )
    example = step_lib.example_inputs(1, config.crop_size)
    init = jax.jit(functools.partial(create_state, model, tx, example=example),
                   out_shardings=rep)
    rng = jax.random.key(config.seed)
    abstract = jax.eval_shape(init, rng)
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), abstract
    )

    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", config.keep_checkpoints)
    latest = checkpointer.latest_step()
    if latest is not None:  # 1. resume
        state, data = checkpointer.restore(latest, abstract)
        if data.get("seed") != config.seed:
            raise ValueError(f"checkpoint {latest} was made with seed {data.get('seed')}, "
                             f"config has {config.seed}")
        start = int(data["step"])
        print(f"resumed from {checkpointer.directory}/{latest} (step {start})")
    else:
        state = init(rng)  # 3. scratch
        if config.init_from:  # 2. init_from
            params, stats = ckpt_lib.load_init_variables(
                config.init_from, state.params, state.batch_stats
            )
            state = jax.device_put(state.replace(params=params, batch_stats=stats), rep)
            print(f"initialised weights from {config.init_from}")
        start = 0

    train_step = step_lib.jit_train_step(
        functools.partial(step_lib.crm_train_step, model=model, tx=tx, schedule=schedule),
        mesh,
    )
    ds = pipeline.crm_dataset(
        build_loader(config), build_augment(config),
        global_batch_size=config.batch_size, start_step=start,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )
    mesh_lib.local_batch_size(config.batch_size)  # checks divisibility
    batches = pipeline.as_numpy(ds)
    writer = MetricWriter(workdir / "tensorboard", is_main)

    def export() -> None:
        refine.save_checkpoint(workdir / "refiner", _export_model(model), state.variables)

    from tqdm import tqdm

    bar = tqdm(total=config.total_steps, initial=start, disable=not is_main,
               dynamic_ncols=True, desc="train")
    last_time, last_step = time.perf_counter(), start
    for step in range(start, config.total_steps):
        batch = mesh_lib.global_batch(mesh, next(batches))
        state, metrics = train_step(state, batch)
        done = step + 1
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            good = checkpointer.latest_step()
            checkpointer.wait()
            raise FloatingPointError(
                f"non-finite loss {loss} at step {done}; stopping. The last good checkpoint "
                f"is step {good} in {checkpointer.directory} (nothing was saved after it)."
            )
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if done % config.log_every == 0 or done == config.total_steps:
            now = time.perf_counter()
            rate = (done - last_step) / (now - last_time)
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            values.update(steps_per_sec=rate, examples_per_sec=rate * config.batch_size)
            writer.scalars(done, values)
            last_time, last_step = now, done
        if done % config.checkpoint_every == 0 or done == config.total_steps:
            checkpointer.save(done, state, {"step": done, "seed": config.seed})
            if config.export_every_checkpoint:
                export()
    bar.close()
    checkpointer.wait()
    export()
    writer.close()
    checkpointer.close()
    return state


def _export_model(model: CRM) -> CRM:
    """The inference model (float32 compute) with the trained architecture."""
    return model.clone(dtype=jnp.float32)


def load_config_json(workdir: str | Path) -> dict[str, Any]:
    return json.loads((Path(workdir) / "config.json").read_text())



