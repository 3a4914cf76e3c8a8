"""Shared helpers of the training tests: a tiny CRM config (fast on CPU) and a persistent
compilation cache for modules whose runs compile the same programs again."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "model.depth": 18,
    "model.width": 8,
    "model.fusion_channels": (8, 8, 8),
    "model.latent_channels": 16,
    "model.hidden": (8, 8, 8, 8),
    "dataset.min_size": 48,
    "dataset.max_size": 80,
    "crop_size": 32,
    "batch_size": 8,
    "total_steps": 6,
    "checkpoint_every": 2,
    "log_every": 1,
}


def default_xla_env(extra_flags: str = "") -> dict[str, str]:
    """os.environ for a subprocess at XLA:CPU's default optimisation level (conftest lowers
    it for speed) plus `extra_flags`: for tests of compile caching and of float32
    summation-order agreement, whose figures are the users' level's."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").replace("--xla_backend_optimization_level=0", "")
    env["XLA_FLAGS"] = f"{flags} {extra_flags}".strip()
    if not env["XLA_FLAGS"]:
        del env["XLA_FLAGS"]  # (XLA reads a blank value as the name of a flag file)
    return env


def load_config(name: str = "crm_synthetic"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def with_overrides(config, overrides: dict):
    """`config` with dotted-key overrides ('model.depth': 18) applied in place."""
    for key, value in overrides.items():
        node = config
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    return config


def tiny_config(**overrides):
    return with_overrides(load_config(), {**TINY, **overrides})


def tiny_flags(**overrides) -> list[str]:
    """The TINY overrides as train.py command-line flags."""
    out = []
    for key, value in {**TINY, **overrides}.items():
        if isinstance(value, tuple):
            value = "(" + ",".join(str(v) for v in value) + ",)"
        out.append(f"--config.{key}={value}")
    return out


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """JAX's persistent compilation cache for the module (autouse where imported): a second
    training run (resume, init_from, a repeat) loads the first run's programs."""
    from jax_refine.refine import enable_compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {name: getattr(jax.config, name) for name in names}
    enable_compilation_cache(tmp_path_factory.mktemp("jax_cache"))
    yield
    for name, value in old.items():
        jax.config.update(name, value)
