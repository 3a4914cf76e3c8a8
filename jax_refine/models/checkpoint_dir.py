"""The inference checkpoint directory shared by CRM (`jax_refine.refine`) and PNA
(`jax_refine.models.pna`): `config.json` = {"format", "model": constructor keyword arguments,
...} and the orbax item `variables/` = {'params', 'batch_stats'}."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def save(directory: str | Path, fmt: str, model_kwargs: Mapping[str, Any],
         variables: Mapping[str, Any], **extra: Any) -> Path:
    """Write config.json ({'format': fmt, **extra, 'model': model_kwargs}) and variables/."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    config = {"format": fmt, **extra, "model": dict(model_kwargs)}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    arrays = {k: jax.tree_util.tree_map(np.asarray, variables[k])
              for k in ("params", "batch_stats")}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "variables", arrays, force=True)
    checkpointer.wait_until_finished()
    return directory


def load(directory: str | Path, fmt: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a `save` directory of format `fmt` -> (model kwargs, lists as tuples; variables).

    FileNotFoundError without config.json; ValueError for another format.
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a {fmt} checkpoint (no config.json)")
    config = json.loads(path.read_text())
    if config.get("format") != fmt:
        raise ValueError(f"{path}: format {config.get('format')!r}, expected {fmt!r}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config["model"].items()}
    variables = ocp.StandardCheckpointer().restore(directory / "variables")
    return kwargs, jax.tree_util.tree_map(jnp.asarray, dict(variables))
