"""`train_and_evaluate(config, workdir)`: the one training loop of CRM and PNA.

`config.task` ('crm', the default, or 'pna') selects the task's pieces in `TASKS`: model
builder, init example, optimiser recipe, train step, data augmentation and the exported
inference checkpoint. Everything else (mesh, resume, data indexing, logging, checkpoints,
the non-finite-loss stop) is shared.

Resume order (first that applies):
  1. the latest checkpoint in `workdir/checkpoints` — exact resume: state, rng, and the data
     position (example k is a pure function of (seed, k), so the pipeline restarts at the
     restored step);
  2. `config.init_from` — weights only, starting at step 0. CRM: a Refiner checkpoint
     directory, or a torchvision ResNet state_dict for the backbone; PNA: a PNA checkpoint
     directory or official checkpoint, or detectron2 / torchvision ImageNet ResNet weights
     for the backbone (`checkpoint.load_pna_init_variables`);
  3. random initialisation.

Outputs in `workdir`: checkpoints/ (orbax, last `keep_checkpoints`), tensorboard/ (event
files from process 0: loss terms, lr, grad norm, throughput), the inference export (CRM:
refiner/ in the `jax_refine.refine` format; PNA: pna/ in the `models.pna` format) written at
the end and, if `config.export_every_checkpoint`, at every checkpoint; config.json.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jax_refine import refine
from jax_refine.data import pipeline
from jax_refine.models import pna as pna_lib
from jax_refine.models.crm import CRM
from jax_refine.train import checkpoint as ckpt_lib
from jax_refine.train import mesh as mesh_lib
from jax_refine.train import optim
from jax_refine.train import step as step_lib
from jax_refine.train.state import TrainState

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class MetricWriter:
    """TensorBoard scalars through `tf.summary` (process 0 only; else a no-op)."""

    def __init__(self, logdir: Path, enabled: bool):
        self.writer = None
        if enabled:
            import tensorflow as tf

            tf.config.set_visible_devices([], "GPU")
            self._tf = tf
            self.writer = tf.summary.create_file_writer(str(logdir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        with self.writer.as_default():
            for tag, value in values.items():
                self._tf.summary.scalar(tag, float(value), step=step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _plain(value: Any) -> Any:
    """ConfigDict / list values -> dict / tuple (constructor arguments, JSON-able)."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return tuple(_plain(v) for v in value)
    return value


def pna_build_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`build_pna` keyword arguments of config.model (also stored in the PNA export)."""
    return _plain(config.model)


# ----------------------------------------------------------------------------- CRM pieces


def _crm_model(config: ml_collections.ConfigDict) -> CRM:
    return CRM(**_plain(config.model), dtype=DTYPES[config.dtype])


def _crm_augment(config: ml_collections.ConfigDict) -> pipeline.CrmAugment:
    c = config.dataset.coarse
    return pipeline.CrmAugment(
        seed=config.seed,
        crop=config.crop_size,
        coarse=pipeline.CoarseSpec(tuple(c.iou_range), c.lowres_prob, tuple(c.lowres_factors),
                                   c.soft_prob, tuple(c.soft_sigma)),
    )


def _crm_optimizer(config: ml_collections.ConfigDict):
    return optim.crm_optimizer(
        config.learning_rate, config.total_steps, tuple(config.lr_boundaries),
        config.lr_decay_factor, config.weight_decay,
    )


def _crm_train_step(config, model, tx, schedule):
    # Optional (crm_synthetic): the decoder's query windows per example, see step.py.
    return functools.partial(step_lib.crm_train_step, model=model, tx=tx, schedule=schedule,
                             query_size=config.get("query_size"),
                             query_windows=config.get("query_windows", 1),
                             boundary_windows=config.get("boundary_windows", 0))


def _crm_export(config, directory, model, variables) -> None:
    refine.save_checkpoint(directory, model.clone(dtype=jnp.float32), variables)


# ----------------------------------------------------------------------------- PNA pieces


def _pna_model(config: ml_collections.ConfigDict) -> Any:
    return pna_lib.build_pna(**pna_build_kwargs(config), dtype=DTYPES[config.dtype])


def _pna_augment(config: ml_collections.ConfigDict) -> pipeline.PnaAugment:
    a = config.augment
    return pipeline.PnaAugment(
        seed=config.seed, crop=pipeline.crop_hw(config.crop_size),
        scale_range=tuple(a.scale_range),
        brightness=a.brightness, contrast=a.contrast, saturation=a.saturation,
    )


def _pna_optimizer(config: ml_collections.ConfigDict):
    return optim.pna_optimizer(
        config.learning_rate, config.total_steps, weight_decay=config.weight_decay,
        power=config.lr_power, clip_norm=config.clip_norm,
        backbone_multiplier=config.backbone_multiplier,
    )


def _pna_train_step(config, model, tx, schedule):
    return functools.partial(step_lib.pna_train_step, model=model, tx=tx, schedule=schedule,
                             loss_kwargs=_plain(config.loss))


def _pna_export(config, directory, model, variables) -> None:
    pna_lib.save_checkpoint(directory, pna_build_kwargs(config), variables)


@dataclasses.dataclass(frozen=True)
class Task:
    """What differs between the tasks; every builder takes the config first."""

    model: Callable[..., Any]  # (config) -> Flax module computing in config.dtype
    synthetic_source: Callable[..., pipeline.Loader]  # (config) -> fresh synthetic scenes
    record_kwargs: Callable[..., dict[str, Any]]  # (config) -> RecordSource options
    augment: Callable[..., Any]  # (config) -> the training transform
    optimizer: Callable[..., tuple[optax.GradientTransformation, optax.Schedule]]
    train_step: Callable[..., Callable[..., Any]]  # (config, model, tx, schedule) -> step
    example_inputs: Callable[..., dict[str, jax.ShapeDtypeStruct]]  # (config) -> init shapes
    init_variables: Callable[..., tuple[Any, Any]]  # (path, params, batch_stats)
    export_name: str  # the inference checkpoint's directory in the workdir
    export: Callable[..., None]  # (config, directory, model, variables)


TASKS = {
    "crm": Task(
        model=_crm_model,
        synthetic_source=lambda c: pipeline.SyntheticSource(
            c.seed, c.dataset.min_size, c.dataset.max_size, window=c.crop_size,
            subset_prob=c.dataset.subset_prob),
        record_kwargs=lambda c: {},
        augment=_crm_augment,
        optimizer=_crm_optimizer,
        train_step=_crm_train_step,
        example_inputs=lambda c: step_lib.example_inputs(1, c.crop_size),
        init_variables=ckpt_lib.load_init_variables,
        export_name="refiner",
        export=_crm_export,
    ),
    "pna": Task(
        model=_pna_model,
        synthetic_source=lambda c: pipeline.SyntheticSemanticSource(
            c.seed, c.dataset.min_size, c.dataset.max_size, c.dataset.num_classes),
        # semantic label maps: class ids, 255 = ignore
        record_kwargs=lambda c: {"mask_key": c.dataset.label_key, "binarize": False},
        augment=_pna_augment,
        optimizer=_pna_optimizer,
        train_step=_pna_train_step,
        example_inputs=lambda c: step_lib.pna_example_inputs(1, pipeline.crop_hw(c.crop_size)),
        init_variables=ckpt_lib.load_pna_init_variables,
        export_name="pna",
        export=_pna_export,
    ),
}


def task_name(config: ml_collections.ConfigDict) -> str:
    """config.task ('crm' when absent), checked against `TASKS`."""
    task = config.get("task", "crm")
    if task not in TASKS:
        raise ValueError(f"config.task must be one of {sorted(TASKS)}, got {task!r}")
    return task


def _task(config: ml_collections.ConfigDict) -> Task:
    return TASKS[task_name(config)]


def build_model(config: ml_collections.ConfigDict) -> Any:
    """The model of config.model (CRM arguments, or `build_pna` arguments for task 'pna'),
    computing in config.dtype (parameters stay float32)."""
    return _task(config).model(config)


def build_loader(config: ml_collections.ConfigDict) -> pipeline.Loader:
    """The example loader of config.dataset ('synthetic' or a TFDS builder name)."""
    ds = config.dataset
    if ds.name == "synthetic":
        return _task(config).synthetic_source(config)
    from jax_refine.data import tfds as tfds_lib

    records = tfds_lib.data_source(ds.name, data_dir=ds.data_dir, builder_config=ds.config,
                                   split=ds.split, builder_kwargs=ds.builder_kwargs.to_dict())
    return pipeline.RecordSource(records, config.seed, **_task(config).record_kwargs(config))


def build_augment(config: ml_collections.ConfigDict) -> pipeline.CrmAugment | pipeline.PnaAugment:
    """The training transform of the task (crop, flips, jitter; CRM coarse masks)."""
    return _task(config).augment(config)


def build_optimizer(
    config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The task's optimiser recipe with the config's hyperparameters."""
    return _task(config).optimizer(config)


def build_train_step(
    config: ml_collections.ConfigDict, model: Any, tx: optax.GradientTransformation,
    schedule: optax.Schedule,
) -> Callable[..., Any]:
    """The task's (unjitted) step `fn(state, batch)` with its config-driven options bound."""
    return _task(config).train_step(config, model, tx, schedule)


def example_inputs(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of one example of the task's model inputs (for init)."""
    return _task(config).example_inputs(config)


def export_dir(config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
    """Where training writes the inference checkpoint (CRM: refiner/, PNA: pna/)."""
    return Path(workdir) / _task(config).export_name


def export(config: ml_collections.ConfigDict, workdir: Path, model: Any,
           variables: dict[str, Any]) -> None:
    """Write the inference checkpoint of the trained model to `export_dir`."""
    _task(config).export(config, export_dir(config, workdir), model, variables)


def init_variables(
    config: ml_collections.ConfigDict, params: Any, batch_stats: Any
) -> tuple[Any, Any]:
    """(params, batch_stats) from config.init_from (see the module docstring, item 2)."""
    return _task(config).init_variables(config.init_from, params, batch_stats)


def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
    """`get_config()` of a config file (how a config derives from another one)."""
    import importlib.util

    path = Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> TrainState:
    """Train the config's task; write checkpoints, summaries and the inference export."""
    mesh_lib.maybe_initialize_distributed(config.get("distributed", False))
    workdir = Path(workdir).absolute()
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

    mesh = mesh_lib.make_mesh()
    rep = mesh_lib.replicated(mesh)
    model = build_model(config)
    tx, schedule = build_optimizer(config)
    init = step_lib.jit_init_state(model, tx, example_inputs(config), mesh)
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
            params, stats = init_variables(config, state.params, state.batch_stats)
            state = jax.device_put(state.replace(params=params, batch_stats=stats), rep)
            print(f"initialised weights from {config.init_from}")
        start = 0

    train_step = step_lib.jit_train_step(build_train_step(config, model, tx, schedule), mesh)
    ds = pipeline.train_dataset(
        build_loader(config), build_augment(config),
        global_batch_size=config.batch_size, start_step=start,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )
    mesh_lib.local_batch_size(config.batch_size)  # checks divisibility
    batches = pipeline.as_numpy(ds)
    writer = MetricWriter(workdir / "tensorboard", is_main)

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
                export(config, workdir, model, state.variables)
    bar.close()
    checkpointer.wait()
    export(config, workdir, model, state.variables)
    writer.close()
    checkpointer.close()
    return state
