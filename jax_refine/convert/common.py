"""Shared machinery for PyTorch state_dict -> Flax conversion.

Conversion is a pure mapping: every converter reads keys through a `StateDictReader`,
which transposes PyTorch layouts to Flax layouts and, when `finish()` is called, raises one
`KeyMismatchError` that lists every missing and every unexpected key. torch is never
imported here; tensors are turned into numpy via their `.numpy()` method.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np


class KeyMismatchError(KeyError):
    """A state_dict does not have exactly the keys a converter expects."""

    def __init__(self, where: str, missing: Iterable[str], unexpected: Iterable[str]):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        lines = [f"{where}: state_dict keys do not match the model."]
        if self.missing:
            lines.append(f"missing ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"unexpected ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        super().__init__("\n".join(lines))

    def __str__(self) -> str:  # KeyError would repr() the message.
        return str(self.args[0])


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (any device, with or without grad) or array-like -> float32/int numpy."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
    if hasattr(value, "numpy"):
        value = value.numpy()
    array = np.asarray(value)
    if np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    return array


def conv_kernel(weight: np.ndarray) -> np.ndarray:
    """PyTorch conv weight (O, I, kh, kw) -> Flax kernel (kh, kw, I, O)."""
    return np.transpose(weight, (2, 3, 1, 0))


def dense_kernel(weight: np.ndarray) -> np.ndarray:
    """PyTorch Linear weight (O, I) (or a 1x1 conv (O, I, 1, 1)) -> Flax Dense kernel (I, O)."""
    if weight.ndim == 4:
        weight = weight[:, :, 0, 0]
    return np.transpose(weight)


class StateDictReader:
    """Reads a state_dict below `prefix`, remembering which keys were used.

    Attributes:
      where: a name for error messages (the converter's name).
      prefix: only keys starting with it are considered; it is stripped from them.
      ignore: regular expressions (matched against the stripped key) of keys to skip.
    """

    def __init__(
        self,
        state_dict: Mapping[str, Any],
        prefix: str = "",
        *,
        where: str = "convert",
        ignore: Iterable[str] = (r"(^|\.)num_batches_tracked$",),
    ):
        self.where = where
        self.prefix = prefix
        self._ignore = [re.compile(p) for p in ignore]
        self._tensors = {
            key[len(prefix):]: value
            for key, value in state_dict.items()
            if key.startswith(prefix)
        }
        self._used: set[str] = set()
        self._missing: list[str] = []

    def has(self, key: str) -> bool:
        return key in self._tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def get(self, key: str) -> np.ndarray:
        """The array under `key` (numpy, PyTorch layout); a missing key is recorded."""
        if key not in self._tensors:
            self._missing.append(self.prefix + key)
            return np.zeros((0,), np.float32)
        self._used.add(key)
        return to_numpy(self._tensors[key])

    def conv(self, key: str) -> np.ndarray:
        """Conv weight under `key`, as a Flax kernel."""
        weight = self.get(key)
        return conv_kernel(weight) if weight.ndim == 4 else weight

    def dense(self, key: str) -> np.ndarray:
        """Linear (or 1x1 conv) weight under `key`, as a Flax Dense kernel."""
        weight = self.get(key)
        return dense_kernel(weight) if weight.ndim >= 2 else weight

    def finish(self) -> None:
        """Raise `KeyMismatchError` listing missing and unused (non-ignored) keys."""
        unexpected = [
            self.prefix + key
            for key in self._tensors
            if key not in self._used and not any(p.search(key) for p in self._ignore)
        ]
        if self._missing or unexpected:
            raise KeyMismatchError(self.where, self._missing, unexpected)


def strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the `module.` prefix that nn.DataParallel adds to every key (if all keys have it)."""
    if state_dict and all(key.startswith("module.") for key in state_dict):
        return {key[len("module."):]: value for key, value in state_dict.items()}
    return dict(state_dict)


def read_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """A PyTorch checkpoint file -> its state_dict (tensors or numpy arrays).

    `.pkl`: a pickle of numpy arrays (detectron2's model-zoo format, e.g. DeepLab's R-52.pkl),
    read with the latin-1 encoding those Python 2 files need. Anything else: `torch.load`
    with `weights_only=True` (torch is imported only then). A state_dict nested under
    'state_dict' or 'model' is unwrapped. Raises ValueError naming the file if it cannot be
    read or holds no state_dict.
    """
    path = Path(path)
    try:
        if path.suffix == ".pkl":
            with path.open("rb") as f:
                obj = pickle.load(f, encoding="latin1")
        else:
            try:
                import torch
            except ImportError as err:  # torch is not a dependency of the library
                raise ValueError(f"reading {path} needs PyTorch (pip install torch)") from err
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as err:
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not contain a state_dict (got {type(obj).__name__})")
    return obj
