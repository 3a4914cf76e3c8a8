"""The inference checkpoint directory shared by CRM (`jax_refine.refine`) and PNA
(`jax_refine.models.pna`): `config.json` = {"format", "model": constructor keyword arguments,
...} and the orbax item `variables/` = {'params', 'batch_stats'}.

Writing order (`save`): an old config.json is removed first, the weights are written (orbax
writes to a temporary directory and renames it), and config.json is written last, to a
temporary file renamed into place. A directory with a config.json therefore always holds
complete weights; a crash at any point leaves no half-written checkpoint that looks whole.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_refine.io import atomic_write_text

# format -> (module, callable) whose keyword arguments config.json's "model" holds.
_CONSTRUCTORS = {
    "jax_refine.crm": ("jax_refine.models.crm", "CRM"),
    "jax_refine.pna": ("jax_refine.models.pna", "build_pna"),
}


def save(directory: str | Path, fmt: str, model_kwargs: Mapping[str, Any],
         variables: Mapping[str, Any], **extra: Any) -> Path:
    """Write variables/ then config.json ({'format': fmt, **extra, 'model': model_kwargs})."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    config = {"format": fmt, **extra, "model": dict(model_kwargs)}
    text = json.dumps(config, indent=2) + "\n"  # fails before anything is touched
    (directory / "config.json").unlink(missing_ok=True)
    arrays = {k: jax.tree_util.tree_map(np.asarray, variables[k])
              for k in ("params", "batch_stats")}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "variables", arrays, force=True)
    checkpointer.wait_until_finished()
    atomic_write_text(directory / "config.json", text)
    return directory


def valid_model_keys(fmt: str) -> list[str]:
    """The keyword arguments the model constructor of format `fmt` accepts."""
    module, name = _CONSTRUCTORS[fmt]
    constructor = getattr(importlib.import_module(module), name)
    return [p for p in inspect.signature(constructor).parameters if p not in ("parent", "name")]


def read_config(directory: str | Path, fmt: str) -> dict[str, Any]:
    """config.json of a `save` directory, checked: a JSON object of format `fmt` whose
    "model" is an object of the constructor's keyword arguments (lists become tuples).

    FileNotFoundError without config.json; ValueError naming the file and the key otherwise.
    """
    path = Path(directory).absolute() / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent} is not a {fmt} checkpoint (no config.json)")
    try:
        config = json.loads(path.read_text())
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a text file ({err})") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: "
                         f"{err.msg}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, found a {type(config).__name__}")
    if config.get("format") != fmt:
        raise ValueError(f"{path}: format {config.get('format')!r}, expected {fmt!r}")
    model = config.get("model")
    if not isinstance(model, dict):
        found = "no key" if model is None else f"a {type(model).__name__}"
        raise ValueError(f"{path}: key 'model' must be an object of model arguments, "
                         f"found {found}")
    valid = valid_model_keys(fmt) if fmt in _CONSTRUCTORS else list(model)
    for key in model:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{path}: unknown key 'model.{key}'{hint}; valid keys: "
                             f"{', '.join(valid)}")
    config["model"] = {k: tuple(v) if isinstance(v, list) else v for k, v in model.items()}
    return config


def load(directory: str | Path, fmt: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a `save` directory of format `fmt` -> (model kwargs, lists as tuples; variables).

    FileNotFoundError without config.json or variables/; ValueError naming the file and the
    key for a bad config.json (`read_config`) or unreadable weights.
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    kwargs = read_config(directory, fmt)["model"]
    if not (directory / "variables").is_dir():
        raise FileNotFoundError(f"{directory}: config.json present but no variables/ "
                                f"(an incomplete checkpoint)")
    try:
        variables = ocp.StandardCheckpointer().restore(directory / "variables")
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()
        raise ValueError(f"{directory / 'variables'}: cannot read the weights "
                         f"({type(err).__name__}: {first[0] if first else ''})") from err
    return kwargs, jax.tree_util.tree_map(jnp.asarray, dict(variables))
