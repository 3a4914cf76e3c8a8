"""Command-line parsing of train.py and evaluate.py: bad flags give one line, not a traceback.

`ml_collections.config_flags` reports an unknown `--config.KEY` as a long traceback;
`parse_flags` (an absl `flags_parser`) checks every `--config.KEY` override against the
config file first and names the key and the closest valid one, then exits with status 2.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags


def config_keys(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[str]:
    """Every dotted field path of `config` ('model', 'model.depth', ...)."""
    for key, value in config.items():
        path = f"{prefix}{key}"
        yield path
        if isinstance(value, ml_collections.ConfigDict):
            yield from config_keys(value, path + ".")


def _config_path(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _overrides(argv: list[str], name: str) -> Iterator[str]:
    for arg in argv:
        for head in (f"--{name}.", f"--no{name}."):
            if arg.startswith(head):
                yield arg[len(head):].split("=", 1)[0]


def unknown_override(argv: list[str], name: str = "config") -> str | None:
    """One line naming the first `--NAME.KEY` override that the config file lacks, with the
    closest valid key; None if all are known (or the file cannot be loaded: then the flag
    parser reports that)."""
    path = _config_path(argv, name)
    keys = list(_overrides(argv, name))
    if path is None or not keys:
        return None
    try:
        from jax_refine.train.loop import load_config_file

        config = load_config_file(path)
    except Exception:  # noqa: BLE001 — the flag parser gives the file's own error
        return None
    valid = list(config_keys(config))
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
            hint = f" (closest valid key: '{close[0]}')" if close else ""
            return f"unknown config key '{key}' in --{name}.{key} for {path}{hint}"
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl `flags_parser`: parse `argv`, or print one line and exit 2 on a bad flag."""
    prog = Path(argv[0]).name
    problem = unknown_override(argv)
    if problem is None:
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            problem = str(e).splitlines()[0]
    sys.stderr.write(f"{prog}: {problem}\n")
    sys.exit(2)


def quiet_library_logs(logging: Any) -> None:
    """absl INFO for the loop's progress and metrics, WARNING for orbax's per-save chatter."""
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(
        lambda record: record.levelno >= logging.converter.STANDARD_WARNING
        or "/orbax/" not in record.pathname)
