"""Local TFDS builders (nothing downloads) and a random-access loader for training.

* `synthetic_scenes` — `make_scene` scenes; configs 'binary' and 'multiclass', or any
  `SyntheticScenesConfig(size=..., num_train=..., num_test=..., num_classes=...)`.
* `refine_folder` — refinement data from local folders: 'pairs' (name.jpg + name.png, also
  FSS-1000's class/name.jpg + class/name.png, searched recursively) or 'big' (BIG / relabelled
  PASCAL: name_im.jpg, name_gt.png and optional name_seg.png coarse masks).
* `semantic_folder` — an image folder, a label-map folder (PNG class ids, 255 = ignore) and
  class names (stored in the dataset info metadata).

Builds are written under the `data_dir` the caller passes; datasets are stored as
ArrayRecord so that `data_source` gives random access (the training pipeline's example k is
a pure function of (seed, k)). Unreadable files, size mismatches and unpaired files are
reported with their paths (logged and listed in the builder's `problems`) and skipped; a
dataset without any usable example is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jax_refine.data.tfds.builders import (
    RefineFolder,
    SemanticFolder,
    SyntheticScenes,
    SyntheticScenesConfig,
)

__all__ = ["BUILDERS", "RefineFolder", "SemanticFolder", "SyntheticScenes",
           "SyntheticScenesConfig", "builder", "data_source"]

BUILDERS = {
    "synthetic_scenes": SyntheticScenes,
    "refine_folder": RefineFolder,
    "semantic_folder": SemanticFolder,
}


def builder(name: str, *, data_dir: str, builder_config: Any = None,
            builder_kwargs: dict[str, Any] | None = None) -> Any:
    """An instance of builder `name` with its build directory under `data_dir`."""
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(BUILDERS)}")
    if not data_dir:
        raise ValueError(f"dataset {name!r} needs a data_dir for its TFDS build")
    kwargs = dict(builder_kwargs or {})
    if builder_config:
        kwargs["config"] = builder_config
    return BUILDERS[name](data_dir=data_dir, file_format="array_record", **kwargs)


def data_source(name: str, *, data_dir: str, split: str = "train", builder_config: Any = None,
                builder_kwargs: dict[str, Any] | None = None) -> Sequence[dict[str, Any]]:
    """Build (if needed) and open a random-access split of builder `name`."""
    b = builder(name, data_dir=data_dir, builder_config=builder_config,
                builder_kwargs=builder_kwargs)
    b.download_and_prepare()
    return b.as_data_source(split)
