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

A checkpoint that cannot be read or holds NaN / inf is reported, moved aside and the previous
one is used (`checkpoint.Checkpointer.restore_latest`).

The loop is asynchronous: steps are dispatched without waiting for them, batches are placed on
the devices two steps ahead (sharded over 'data'), and the host reads device values only every
`log_every` steps (the metrics, averaged over the interval, one step late so that the device
is never idle) and at checkpoints. The non-finite check rides on those reads: the interval's
first step with a NaN / inf loss is recorded on the device, and before every save the whole
state is checked (`Checkpointer.save`), so a NaN state is never saved; the run stops with
`checkpoint.NonFiniteError` naming the step and the last finite checkpoint.

Outputs in `workdir`: checkpoints/ (orbax, last `keep_checkpoints`), tensorboard/ (from
process 0 through `clu.metric_writers`, also logged: loss terms, lr, grad norm, steps/s,
examples/s; with `config.eval_every`, the task's evaluation scalars and an image panel;
`config.profile_every`: jax.profiler traces), the inference export (CRM: refiner/ in the
`jax_refine.refine` format; PNA: pna/ in the `models.pna` format) written at the end and, if
`config.export_every_checkpoint`, at every checkpoint; eval/step_N/ (metrics.json and PNGs of
the in-loop evaluations); config.json.

Reproducibility: on CPU two runs of the same config give bitwise-equal states, across
checkpoint saves and resumes (tests/test_train_robust.py), given the same number of cores
(see `mesh.configure_determinism`). On GPU, XLA's scatter-adds and some reductions are not
deterministic; `config.deterministic` sets `--xla_gpu_deterministic_ops=true` (slower) for
runs that must repeat or resume exactly.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions

from jax_refine import refine
from jax_refine.data import pipeline
from jax_refine.models import pna as pna_lib
from jax_refine.models.crm import CRM
from jax_refine.train import checkpoint as ckpt_lib
from jax_refine.train import evaluate as crm_eval
from jax_refine.train import evaluate_pna, optim
from jax_refine.train import mesh as mesh_lib
from jax_refine.train import step as step_lib
from jax_refine.train.state import TrainState

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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
                                   c.soft_prob, tuple(c.soft_sigma), c.iou_against),
    )


def _crm_optimizer(config: ml_collections.ConfigDict, model: Any):
    del model
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


def _crm_evaluator(config, model):
    """IoU / mBA of coarse and refined masks on config.eval's set (`evaluate.evaluate_refiner`,
    as evaluate.py, batched through `Refiner.refine_batch`: the final scale only; each
    process scores its share of the set) with one float32 Refiner whose weights are swapped
    at each call (its compilations are reused)."""
    refiner = None

    def run(variables, out_dir):
        nonlocal refiner
        variables = jax.device_get({k: variables[k] for k in ("params", "batch_stats")})
        if refiner is None:
            refiner = refine.Refiner(model.clone(dtype=jnp.float32), variables)
        refiner.variables = variables
        return crm_eval.evaluate_refiner(refiner, out_dir, per_step=False,
                                         **crm_eval.eval_kwargs(config.eval))

    return run


# ----------------------------------------------------------------------------- PNA pieces


def _pna_model(config: ml_collections.ConfigDict) -> Any:
    return pna_lib.build_pna(**pna_build_kwargs(config), dtype=DTYPES[config.dtype])


def _pna_augment(config: ml_collections.ConfigDict) -> pipeline.PnaAugment:
    """`pipeline.PnaAugment` of config.augment; fields it lacks keep PnaAugment's defaults."""
    fields = {f.name for f in dataclasses.fields(pipeline.PnaAugment)} - {"seed", "crop"}
    kwargs = {k: tuple(v) if isinstance(v, list | tuple) else v
              for k, v in config.augment.items() if k in fields}
    unknown = set(config.augment.keys()) - fields
    if unknown:
        raise ValueError(f"config.augment: unknown PnaAugment fields {sorted(unknown)} "
                         f"(known: {sorted(fields)})")
    return pipeline.PnaAugment(seed=config.seed, crop=pipeline.crop_hw(config.crop_size),
                               **kwargs)


def _pna_optimizer(config: ml_collections.ConfigDict, model: Any):
    """`optim.pna_optimizer` of the config. Optional keys (absent = off): warmup_steps,
    warmup_ratio, weight_decay_norm (None = weight_decay), no_decay_keys."""
    weight_decay_norm = config.get("weight_decay_norm")
    return optim.pna_optimizer(
        config.learning_rate, config.total_steps, weight_decay=config.weight_decay,
        power=config.lr_power, clip_norm=config.clip_norm,
        backbone_multiplier=config.backbone_multiplier,
        warmup_steps=config.get("warmup_steps", 0),
        warmup_ratio=config.get("warmup_ratio", 1e-3),
        weight_decay_norm=weight_decay_norm,
        no_decay_keys=tuple(config.get("no_decay_keys", ())),
        # found when the optimiser is initialised (an abstract trace of the model)
        norm_paths=functools.partial(optim.norm_layer_paths, model, example_inputs(config)),
    )


def _pna_train_step(config, model, tx, schedule):
    return functools.partial(step_lib.pna_train_step, model=model, tx=tx, schedule=schedule,
                             loss_kwargs=_plain(config.loss))


def _pna_export(config, directory, model, variables) -> None:
    pna_lib.save_checkpoint(directory, pna_build_kwargs(config), variables)


def _pna_evaluator(config, model):
    """Per-stage mIoU on config.eval's set (`evaluate_pna.evaluate_model`, as evaluate.py),
    batched and sharded over this process's devices (each process scores its share of the
    set, `distributed_eval`), one compilation per shape bucket for the run."""
    predictor = evaluate_pna.predictor_for(config, pna_lib.build_pna(**pna_build_kwargs(config)))
    return functools.partial(evaluate_pna.evaluate_model, config, predictor)


@dataclasses.dataclass(frozen=True)
class Task:
    """What differs between the tasks; every builder takes the config first."""

    model: Callable[..., Any]  # (config) -> Flax module computing in config.dtype
    synthetic_source: Callable[..., pipeline.Loader]  # (config) -> fresh synthetic scenes
    record_kwargs: Callable[..., dict[str, Any]]  # (config) -> RecordSource options
    augment: Callable[..., Any]  # (config) -> the training transform
    # (config, model) -> (optimizer, schedule)
    optimizer: Callable[..., tuple[optax.GradientTransformation, optax.Schedule]]
    train_step: Callable[..., Callable[..., Any]]  # (config, model, tx, schedule) -> step
    example_inputs: Callable[..., dict[str, jax.ShapeDtypeStruct]]  # (config) -> init shapes
    init_variables: Callable[..., tuple[Any, Any]]  # (path, params, batch_stats)
    export_name: str  # the inference checkpoint's directory in the workdir
    export: Callable[..., None]  # (config, directory, model, variables)
    # (config, model) -> evaluate(variables, out_dir) -> results by set (metrics.json)
    evaluator: Callable[..., Callable[..., dict[str, Any]]]


TASKS = {
    "crm": Task(
        model=_crm_model,
        synthetic_source=lambda c: pipeline.SyntheticSource(
            c.seed, c.dataset.min_size, c.dataset.max_size, window=c.crop_size,
            subset_prob=c.dataset.subset_prob),
        # 8-bit soft GT; epochs of whole batches, as the reference's DataLoader(drop_last)
        record_kwargs=lambda c: {"epoch_batch": c.batch_size},
        augment=_crm_augment,
        optimizer=_crm_optimizer,
        train_step=_crm_train_step,
        example_inputs=lambda c: step_lib.example_inputs(1, c.crop_size),
        init_variables=ckpt_lib.load_init_variables,
        export_name="refiner",
        export=_crm_export,
        evaluator=_crm_evaluator,
    ),
    "pna": Task(
        model=_pna_model,
        synthetic_source=lambda c: pipeline.SyntheticSemanticSource(
            c.seed, c.dataset.min_size, c.dataset.max_size, c.dataset.num_classes),
        # semantic label maps: class ids, 255 = ignore
        record_kwargs=lambda c: {"mask_key": c.dataset.label_key, "labels": True,
                                 "reduce_zero_label": c.dataset.get("reduce_zero_label", False)},
        augment=_pna_augment,
        optimizer=_pna_optimizer,
        train_step=_pna_train_step,
        example_inputs=lambda c: step_lib.pna_example_inputs(1, pipeline.crop_hw(c.crop_size)),
        init_variables=ckpt_lib.load_pna_init_variables,
        export_name="pna",
        export=_pna_export,
        evaluator=_pna_evaluator,
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
    config: ml_collections.ConfigDict, model: Any = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The task's optimiser recipe with the config's hyperparameters (`model`: the config's
    model, built here if not given; PNA finds its normalisation layers in it)."""
    return _task(config).optimizer(config, build_model(config) if model is None else model)


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


def eval_scalars(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Flat TensorBoard scalars of an evaluation's results by set: CRM
    'eval/SET/{coarse,refined}_{iou,mba}', PNA 'eval/SET/P<i>_{miou,fwiou,macc,pacc}'."""
    out = {}
    for name, r in results.items():
        for kind in ("coarse", "refined"):
            for metric in ("iou", "mba"):
                if kind in r:
                    out[f"eval/{name}/{kind}_{metric}"] = r[kind][metric]
        for stage, m in r.get("stages", {}).items():
            for metric in ("miou", "fwiou", "macc", "pacc"):
                out[f"eval/{name}/{stage}_{metric}"] = m[metric]
    return out


def _eval_images(results: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
    """The first side-by-side panel of each set as uint8 [1, H, W, 3] (cheap: one PNG read)."""
    import cv2

    out = {}
    for name, r in results.items():
        if r["pngs"]:
            out[f"eval/{name}"] = cv2.cvtColor(cv2.imread(r["pngs"][0]), cv2.COLOR_BGR2RGB)[None]
    return out


@jax.jit
def _accumulate(acc: dict[str, Any], metrics: dict[str, jax.Array], step: jax.Array):
    """Running sums of the metrics since the last write, their count, and the first step
    (with its loss) whose loss was not finite (-1 if none) — all on the device."""
    bad = ~jnp.isfinite(metrics["loss"]) & (acc["first_bad"] < 0)
    return {
        "sums": jax.tree_util.tree_map(lambda a, m: a + m.astype(jnp.float32), acc["sums"],
                                       metrics),
        "count": acc["count"] + 1,
        "first_bad": jnp.where(bad, step, acc["first_bad"]),
        "bad_loss": jnp.where(bad, metrics["loss"].astype(jnp.float32), acc["bad_loss"]),
    }


def _empty_accumulator(metrics: dict[str, jax.Array]) -> dict[str, Any]:
    return {"sums": {k: jnp.zeros((), jnp.float32) for k in metrics},
            "count": jnp.zeros((), jnp.int32), "first_bad": jnp.full((), -1, jnp.int32),
            "bad_loss": jnp.zeros((), jnp.float32)}


def _device_batches(batches: Iterator[dict[str, np.ndarray]], mesh: jax.sharding.Mesh,
                    ahead: int = 2) -> Iterator[dict[str, jax.Array]]:
    """Global batches sharded on 'data', their host-to-device copies started `ahead` steps
    before the step that uses them (`make_array_from_process_local_data` is asynchronous)."""
    queue: collections.deque = collections.deque()
    for local in batches:
        queue.append(mesh_lib.global_batch(mesh, local))
        if len(queue) > ahead:
            yield queue.popleft()


class _MetricsLog:
    """The interval's metrics: accumulated on the device every step, read by the host one
    step after each write point (so the read never leaves the device idle)."""

    def __init__(self, writer: metric_writers.MetricWriter, checkpointer: ckpt_lib.Checkpointer,
                 batch_size: int):
        self.writer, self.checkpointer, self.batch_size = writer, checkpointer, batch_size
        self.acc: dict[str, Any] | None = None
        self.pending: tuple[int, dict[str, Any], float] | None = None
        self.last: tuple[int, float] | None = None  # (step, time) of the last write

    def add(self, metrics: dict[str, jax.Array], step: jax.Array) -> None:
        if self.acc is None:
            self.acc = _empty_accumulator(metrics)
        self.acc = _accumulate(self.acc, metrics, step)

    def mark(self, step: int, now: float) -> None:
        """Close the interval ending at `step`; it is written at the next `flush`."""
        self.flush()
        self.pending, self.acc = (step, self.acc, now), None

    def flush(self) -> None:
        """Write the pending interval; raise `NonFiniteError` if one of its losses was not."""
        if self.pending is None:
            return
        step, acc, now = self.pending
        self.pending = None
        host = jax.device_get(acc)
        check_finite_losses(host, self.checkpointer)
        values = {k: float(v) / int(host["count"]) for k, v in host["sums"].items()}
        if self.last is not None and now > self.last[1]:
            rate = (step - self.last[0]) / (now - self.last[1])
            values.update(steps_per_sec=rate, examples_per_sec=rate * self.batch_size)
        self.last = (step, now)
        self.writer.write_scalars(step, values)

    def check_current(self) -> None:
        """Raise `NonFiniteError` if a loss of the open interval was not finite."""
        if self.acc is not None:
            check_finite_losses(jax.device_get({k: self.acc[k] for k in ("first_bad",
                                                                          "bad_loss")}),
                                self.checkpointer)


def check_finite_losses(acc: dict[str, Any], checkpointer: ckpt_lib.Checkpointer) -> None:
    if int(acc["first_bad"]) >= 0:
        checkpointer.wait()
        raise ckpt_lib.NonFiniteError(
            f"non-finite loss {float(acc['bad_loss'])} at step {int(acc['first_bad'])}; "
            f"stopping. The last finite checkpoint is {checkpointer.last_finite()} (nothing "
            f"non-finite is ever saved).")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> TrainState:
    """Train the config's task; write checkpoints, summaries, evaluations and the export.

    See the module docstring for the resume order, the outputs and the non-finite stop.
    """
    mesh_lib.configure_determinism(config.get("deterministic", False))
    mesh_lib.maybe_initialize_distributed(config.get("distributed", False))
    workdir = Path(workdir).absolute()
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        _write_atomic(workdir / "config.json", config.to_json_best_effort(indent=2) + "\n")

    mesh = mesh_lib.make_mesh()
    rep = mesh_lib.replicated(mesh)
    model = build_model(config)
    tx, schedule = build_optimizer(config, model)
    init = step_lib.jit_init_state(model, tx, example_inputs(config), mesh)
    rng = jax.random.key(config.seed)
    abstract = jax.eval_shape(init, rng)
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), abstract
    )

    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", config.keep_checkpoints,
                                         report=_report)
    writer = None
    try:
        restored = checkpointer.restore_latest(abstract)
        if restored is not None:  # 1. resume
            latest, state, data = restored
            if data.get("seed") != config.seed:
                raise ValueError(f"checkpoint {latest} was made with seed {data.get('seed')}, "
                                 f"config has {config.seed}")
            start = int(data["step"])
            _report(f"resumed from {checkpointer.directory}/{latest} (step {start})")
        else:
            state = init(rng)  # 3. scratch
            if config.init_from:  # 2. init_from
                params, stats = init_variables(config, state.params, state.batch_stats)
                state = jax.device_put(state.replace(params=params, batch_stats=stats), rep)
                _report(f"initialised weights from {config.init_from}")
            start = 0

        train_step = step_lib.jit_train_step(build_train_step(config, model, tx, schedule),
                                             mesh)
        mesh_lib.local_batch_size(config.batch_size)  # checks divisibility
        ds = pipeline.train_dataset(
            build_loader(config), build_augment(config),
            global_batch_size=config.batch_size, start_step=start,
            process_index=jax.process_index(), process_count=jax.process_count(),
        )
        # (after the pipeline, which keeps TensorFlow off the accelerators)
        writer = metric_writers.create_default_writer(
            workdir / "tensorboard", just_logging=not is_main, asynchronous=True)
        state = _train(config, workdir, model, state, start, train_step, ds, mesh,
                       checkpointer, writer, is_main)
        checkpointer.wait()
        export(config, workdir, model, state.variables)
        return state
    finally:
        if writer is not None:
            writer.close()
        checkpointer.close()


def _report(message: str) -> None:
    """A line for the user (process 0 prints it; every process logs it)."""
    logging.info(message)
    if jax.process_index() == 0:
        print(message, flush=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _train(config, workdir, model, state, start, train_step, ds, mesh, checkpointer, writer,
           is_main) -> TrainState:
    """The step loop of `train_and_evaluate` (state already restored or initialised)."""
    total = config.total_steps
    hooks = []
    if is_main:
        hooks.append(periodic_actions.ReportProgress(
            num_train_steps=total, every_steps=config.log_every, every_secs=None))
        if config.get("profile_every", 0):
            hooks.append(periodic_actions.Profile(
                logdir=str(workdir / "tensorboard"), num_profile_steps=5,
                first_profile=start + min(10, config.profile_every),
                every_steps=config.profile_every, every_secs=None))
    eval_every = config.get("eval_every", 0)
    evaluate = _task(config).evaluator(config, model) if eval_every else None
    log = _MetricsLog(writer, checkpointer, config.batch_size)
    log.last = (start, time.perf_counter())
    numpy_batches = pipeline.as_numpy(ds)
    batches = _device_batches(numpy_batches, mesh)
    try:
        for step in range(start, total):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = train_step(state, next(batches))
            log.add(metrics, state.step)
            log.flush()  # the previous write point's metrics: read while this step runs
            done = step + 1
            for hook in hooks:
                hook(done)
            last = done == total
            if done % config.log_every == 0 or last:
                log.mark(done, time.perf_counter())
            if done % config.checkpoint_every == 0 or last:
                log.flush()
                log.check_current()
                checkpointer.save(done, state, {"step": done, "seed": config.seed})
                if config.export_every_checkpoint:
                    export(config, workdir, model, state.variables)
            if evaluate is not None and (done % eval_every == 0 or last):
                with hooks[0].timed("eval") if hooks else contextlib.nullcontext():
                    _evaluate(evaluate, state, workdir / "eval" / f"step_{done}", done, writer,
                              is_main)
        log.flush()
    finally:
        # Stop tf.data's workers now: a live iterator at interpreter exit (held by an
        # exception's traceback) would keep the process from ever exiting.
        batches.close()
        del batches, numpy_batches
    return state


def _evaluate(evaluate, state, out_dir: Path, step: int, writer, is_main: bool) -> None:
    """Run the task's evaluation of `state`, write its scalars and first image panels."""
    results = evaluate(state.variables, out_dir)
    writer.write_scalars(step, eval_scalars(results))
    if is_main:
        writer.write_images(step, _eval_images(results))
    for key, value in eval_scalars(results).items():
        logging.info("[%d] %s = %.4f", step, key, value)
