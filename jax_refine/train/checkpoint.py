"""Training checkpoints (orbax CheckpointManager) and weight initialisation.

A checkpoint step directory holds 'state' (the whole TrainState: params, batch_stats,
opt_state, step, rng) and 'data' (JSON: the data position — the step and the seed, which
determine every later example, see `jax_refine.data.pipeline`). Orbax writes to a temporary
directory and renames it when complete, so a run killed mid-save leaves the previous
checkpoint intact; the last `keep` checkpoints are kept.

Nothing poisoned is saved or resumed: `Checkpointer.save` refuses a state with a NaN or inf
anywhere (`NonFiniteError`, naming the step and the last finite checkpoint), and
`Checkpointer.restore_latest` skips a checkpoint that cannot be read (a truncated or missing
file) or that holds non-finite values, says so, moves it to `<directory>_rejected/<step>` and
falls back to the previous one.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jax_refine.train.state import TrainState


class NonFiniteError(FloatingPointError):
    """Training produced a NaN or inf (in the loss or the state); the run stops."""


@jax.jit
def _finite_parts(state: TrainState) -> dict[str, jax.Array]:
    """{field: bool scalar} — whether every floating leaf of each state field is finite."""
    out = {}
    for name in ("params", "batch_stats", "opt_state"):
        leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(getattr(state, name))
                  if jnp.issubdtype(x.dtype, jnp.inexact)]
        out[name] = jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)
    return out


def non_finite_parts(state: TrainState) -> list[str]:
    """Names of the state fields ('params', 'batch_stats', 'opt_state') holding NaN or inf
    (one small reduction on the devices, one scalar per field fetched)."""
    return [name for name, ok in jax.device_get(_finite_parts(state)).items() if not ok]


class Checkpointer:
    """Save / restore TrainState and data position under `directory`.

    `report` receives one line per skipped checkpoint on restore (default: print).
    """

    def __init__(self, directory: str | Path, keep: int = 3,
                 report: Callable[[str], None] = print):
        self.directory = Path(directory).absolute()
        self.rejected = self.directory.with_name(self.directory.name + "_rejected")
        self.report = report
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "data"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def last_finite(self) -> str:
        """'step N in DIR' of the newest checkpoint (all saved ones are finite), or 'none'."""
        step = self.latest_step()
        return "none" if step is None else f"step {step} in {self.directory}"

    def save(self, step: int, state: TrainState, data: dict[str, Any]) -> None:
        """Save asynchronously; raises `NonFiniteError` (saving nothing) if `state` holds a
        NaN or inf."""
        bad = non_finite_parts(state)
        if bad:
            self.wait()
            raise NonFiniteError(
                f"non-finite loss or state at step {step}: {', '.join(bad)} hold NaN or inf; "
                f"stopping without saving it. The last finite checkpoint is "
                f"{self.last_finite()}.")
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)
            ),
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[TrainState, dict[str, Any]]:
        """Restore step `step`; `abstract_state` gives shapes, dtypes and shardings."""
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return out["state"], dict(out["data"])

    def restore_latest(
        self, abstract_state: Any
    ) -> tuple[int, TrainState, dict[str, Any]] | None:
        """(step, state, data) of the newest checkpoint that reads and is finite, or None.

        Newer checkpoints that fail (unreadable, or holding NaN / inf) are reported through
        `report` and moved to `self.rejected` (by process 0), so that training can save those
        steps again.
        """
        restored, rejected = None, []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, data = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 — any read failure means "unusable"
                first = (str(e).strip().splitlines() or [""])[0][:200]
                self.report(f"checkpoint {self.directory / str(step)} is unreadable "
                            f"({type(e).__name__}: {first}); trying the previous one")
                rejected.append(step)
                continue
            bad = non_finite_parts(state)
            if bad:
                self.report(f"checkpoint {self.directory / str(step)} holds non-finite "
                            f"{', '.join(bad)}; trying the previous one")
                rejected.append(step)
                continue
            restored = (step, state, data)
            break
        if rejected:
            if jax.process_index() == 0:
                for step in rejected:
                    self.rejected.mkdir(parents=True, exist_ok=True)
                    target = self.rejected / str(step)
                    shutil.rmtree(target, ignore_errors=True)
                    shutil.move(self.directory / str(step), target)
                self.report(f"moved rejected checkpoint(s) {rejected} to {self.rejected}")
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("jax_refine_rejected_checkpoints")
            self.manager.reload()
        return restored

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _replace_subtree(tree: dict[str, Any], new: dict[str, Any], where: str) -> dict[str, Any]:
    """Copy of `tree` with `new`'s leaves, checking that structures and shapes agree."""
    old_shapes = jax.tree_util.tree_map(np.shape, tree)
    new_shapes = jax.tree_util.tree_map(np.shape, new)
    if old_shapes != new_shapes:
        raise ValueError(f"init_from: {where} does not match the model "
                         f"(structure or shapes differ)")
    return jax.tree_util.tree_map(lambda o, n: np.asarray(n, dtype=o.dtype), tree, new)


def load_init_variables(
    path: str | Path, params: dict[str, Any], batch_stats: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """New (params, batch_stats) initialised from `path`.

    `path` is either a Refiner checkpoint directory (`jax_refine.refine.save_checkpoint`,
    e.g. a converted official CRM or an exported run: all weights) or a torchvision ResNet
    state_dict file (.pth/.pt: backbone 'feats' only, mask channel zero-filled, as the paper's
    ImageNet initialisation).
    """
    path = Path(path)
    params = jax.tree_util.tree_map(np.asarray, params)
    batch_stats = jax.tree_util.tree_map(np.asarray, batch_stats)
    if (path / "config.json").is_file():
        from jax_refine.refine import load_checkpoint

        _, variables = load_checkpoint(path)
        return _replace_variables(params, batch_stats, variables, path)
    if path.is_file():
        from jax_refine.convert.common import read_checkpoint_file
        from jax_refine.convert.resnet import resnet_from_torchvision

        tree = resnet_from_torchvision(read_checkpoint_file(path), in_channels=4, num_stages=3)
        return _replace_variables(params, batch_stats, tree, path, backbone="feats")
    raise FileNotFoundError(f"init_from: {path} is neither a Refiner checkpoint directory "
                            f"(with config.json) nor a torchvision state_dict file")


def _replace_variables(
    params: dict[str, Any], batch_stats: dict[str, Any], new: dict[str, Any], path: Path,
    backbone: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(params, batch_stats) with `new`'s ({'params', 'batch_stats'}) in place of the whole
    trees, or only of their subtree `backbone`."""
    out = []
    for tree, key in ((params, "params"), (batch_stats, "batch_stats")):
        if backbone is None:
            out.append(_replace_subtree(tree, new[key], f"{path} {key}"))
        else:
            out.append(dict(tree, **{backbone: _replace_subtree(
                tree[backbone], new[key], f"{path} backbone {key}")}))
    return out[0], out[1]


def load_pna_init_variables(
    path: str | Path, params: dict[str, Any], batch_stats: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """New (params, batch_stats) of a `PNASegmentor` initialised from `path`, one of:

    * a PNA checkpoint directory (`models.pna.save_checkpoint`, e.g. WORKDIR/pna of a run or
      `python -m jax_refine.convert pna`): all weights;
    * an official PNA checkpoint file (detectron2 keys, `convert.pna_variables`): all weights;
    * ImageNet backbone weights, the rest staying as initialised: a detectron2 ResNet file
      (.pkl or .pth, e.g. DeepLab's R-52.pkl / R-103.pkl for the 'deeplab' stem;
      `convert.resnet_from_detectron2`), open-mmlab's ResNetV1c weights (.pth with
      'stem.0.weight', e.g. resnet50_v1c / resnet101_v1c for `models.pna.resnet_v1c`;
      `convert.resnet_from_mmseg`) or a torchvision ResNet state_dict (.pth, for
      stem='torchvision'; `convert.resnet_from_torchvision`).
    Keys and shapes must match the model (ValueError otherwise, naming the file and listing
    the missing and unexpected keys).
    """
    path = Path(path)
    params = jax.tree_util.tree_map(np.asarray, params)
    batch_stats = jax.tree_util.tree_map(np.asarray, batch_stats)
    if path.is_dir():
        from jax_refine.models.pna import load_checkpoint

        _, variables, _ = load_checkpoint(path)
        return _replace_variables(params, batch_stats, variables, path)
    if not path.is_file():
        raise FileNotFoundError(f"init_from: {path} does not exist")
    from jax_refine import convert
    from jax_refine.convert.common import read_checkpoint_file

    state_dict = convert.unwrap_checkpoint(read_checkpoint_file(path))
    if any(k.startswith("sem_seg_head.pna_head.") for k in state_dict):
        variables = convert.pna_variables(state_dict)
        return _replace_variables(params, batch_stats, variables, path)
    converters = {
        "stem.conv1.weight": convert.resnet_from_detectron2,
        "stem.0.weight": convert.resnet_from_mmseg,
        "conv1.weight": lambda sd: convert.resnet_from_torchvision(sd, in_channels=3),
    }
    layout = next((key for key in converters if key in state_dict), None)
    if layout is None:
        raise ValueError(f"init_from: {path} is neither a PNA checkpoint nor detectron2 / "
                         f"mmseg / torchvision ResNet weights "
                         f"(first keys: {sorted(state_dict)[:5]})")
    try:
        tree = converters[layout](state_dict)
    except convert.KeyMismatchError as err:
        raise ValueError(f"init_from: {path}: {err}") from err
    return _replace_variables(params, batch_stats, tree, path, backbone="backbone")
