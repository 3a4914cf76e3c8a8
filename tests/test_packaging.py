"""Packaging: inference imports no TensorFlow, and pyproject / requirements.txt agree."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter in which the training-only packages cannot be imported.
BLOCKED_IMPORTS = """
import importlib, sys
BLOCKED = ("tensorflow", "tensorflow_datasets", "tensorboard", "ml_collections", "clu",
           "array_record")
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: inference must not import it")
sys.meta_path.insert(0, Blocker())
for module in ("jax_refine.refine", "jax_refine.models", "jax_refine.models.crm",
               "jax_refine.models.pna", "jax_refine.models.checkpoint_dir", "jax_refine.ops",
               "jax_refine.ops.neighborhood", "jax_refine.layers", "jax_refine.convert",
               "jax_refine.convert.__main__", "jax_refine.cli", "jax_refine.io",
               "jax_refine.metrics"):
    importlib.import_module(module)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, loaded
print("ok")
"""


def test_inference_imports_without_tensorflow():
    result = subprocess.run([sys.executable, "-c", BLOCKED_IMPORTS], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"


def _requirement_lines(text: str) -> dict[str, str]:
    """{normalised name: specifier} of requirement lines."""
    out = {}
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            name, spec = re.match(r"([A-Za-z0-9_.\-\[\]]+)\s*(.*)", line).groups()
            out[re.sub(r"[-_.]+", "-", name).lower()] = spec.replace(" ", "")
    return out


def test_requirements_txt_is_the_core_plus_the_train_extra():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _requirement_lines("\n".join(
        project["dependencies"] + project["optional-dependencies"]["train"]))
    assert _requirement_lines((ROOT / "requirements.txt").read_text()) == declared
    core = _requirement_lines("\n".join(project["dependencies"]))
    assert not {"tensorflow-cpu", "tensorflow-datasets", "tensorboard", "ml-collections"} & set(
        core)
    assert project["scripts"]["jax-refine"] == "jax_refine.cli:console_main"
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
