"""Shared machinery for PyTorch state_dict -> Flax conversion.

Conversion is a pure mapping: every converter reads keys through a `StateDictReader`,
which transposes PyTorch layouts to Flax layouts and, when `finish()` is called, raises one
`KeyMismatchError` that lists every missing and every unexpected key. torch is never
imported here; tensors are turned into numpy via their `.numpy()` method.
"""

from __future__ import annotations

import contextlib
import contextvars
import pickle
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

# While `recording_sources()` is active: (array, state_dict key) of every array a reader returns.
_SOURCES: contextvars.ContextVar[list[tuple[np.ndarray, str]] | None] = contextvars.ContextVar(
    "jax_refine_convert_sources", default=None)


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


class ShapeMismatchError(ValueError):
    """Converted tensors do not have the shapes the model expects."""


@contextlib.contextmanager
def recording_sources() -> Iterator[dict[int, str]]:
    """Within the block, map id(array) -> state_dict key for every array a reader returns.

    Used by `check_shapes` to name the checkpoint key of a wrong-shaped tensor; the arrays
    are held until the block ends, so the ids stay unique.
    """
    record: list[tuple[np.ndarray, str]] = []
    token = _SOURCES.set(record)
    sources: dict[int, str] = {}
    try:
        yield sources
        sources.update({id(array): key for array, key in record})
    finally:
        _SOURCES.reset(token)


def check_shapes(found: Mapping[str, Any], expected: Mapping[str, Any], where: str,
                 sources: Mapping[int, str] | None = None) -> None:
    """Raise `ShapeMismatchError` listing every leaf of `found` whose shape differs from
    `expected` (a tree of arrays or `jax.ShapeDtypeStruct`, e.g. from `jax.eval_shape` of the
    model's init), and every leaf present in only one of them.

    Each line names the checkpoint key (when `sources` from `recording_sources` knows it),
    the Flax path, and the expected and found shapes (Flax layout).
    """
    import jax

    def flat(tree: Mapping[str, Any]) -> dict[str, Any]:
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in leaves}

    have, want = flat(found), flat(expected)
    lines = []
    for path in sorted(have.keys() | want.keys()):
        leaf = have.get(path)
        key = (sources or {}).get(id(leaf)) if leaf is not None else None
        name = f"{key} -> {path}" if key else path
        if path not in want:
            lines.append(f"{name}: not a variable of the model")
        elif path not in have:
            lines.append(f"{path}: missing (expected shape {tuple(want[path].shape)})")
        elif tuple(np.shape(leaf)) != tuple(want[path].shape):
            lines.append(f"{name}: expected shape {tuple(want[path].shape)}, "
                         f"found {tuple(np.shape(leaf))}")
    if lines:
        raise ShapeMismatchError(f"{where}: {len(lines)} tensor(s) do not fit the model:\n  "
                                 + "\n  ".join(lines))


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
        return self._noted(to_numpy(self._tensors[key]), key)

    def conv(self, key: str) -> np.ndarray:
        """Conv weight under `key`, as a Flax kernel."""
        weight = self.get(key)
        return self._noted(conv_kernel(weight), key) if weight.ndim == 4 else weight

    def dense(self, key: str) -> np.ndarray:
        """Linear (or 1x1 conv) weight under `key`, as a Flax Dense kernel."""
        weight = self.get(key)
        return self._noted(dense_kernel(weight), key) if weight.ndim >= 2 else weight

    def _noted(self, array: np.ndarray, key: str) -> np.ndarray:
        record = _SOURCES.get()
        if record is not None:
            record.append((array, self.prefix + key))
        return array

    def finish(self) -> None:
        """Raise `KeyMismatchError` listing missing and unused (non-ignored) keys."""
        unexpected = [
            self.prefix + key
            for key in self._tensors
            if key not in self._used and not any(p.search(key) for p in self._ignore)
        ]
        if self._missing or unexpected:
            raise KeyMismatchError(self.where, self._missing, unexpected)


def key_indices(keys: Iterable[str], pattern: str) -> list[int]:
    """Sorted distinct integers captured by group 1 of `pattern` (matched at the start of
    each key): the block / branch / stage numbers a checkpoint holds."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := regex.match(k))})


def strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the `module.` prefix that nn.DataParallel adds to every key (if all keys have it)."""
    if state_dict and all(key.startswith("module.") for key in state_dict):
        return {key[len("module."):]: value for key, value in state_dict.items()}
    return dict(state_dict)


# Globals a numpy-array pickle may name (detectron2 model-zoo files): the array and dtype
# reconstructors, numpy scalars, the bytes codec of protocol <= 2, and OrderedDict.
_PICKLE_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
    ("collections", "OrderedDict"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers, numbers, strings and numpy arrays/dtypes/scalars.

    Any other global (a class or function a malicious `__reduce__` would call) raises
    `pickle.UnpicklingError` before anything is constructed.
    """

    def find_class(self, module: str, name: str) -> Any:
        # Pickles written with numpy 1.x name `numpy.core`; numpy 2 moved it to `numpy._core`.
        module = "numpy._core" + module[len("numpy.core"):] if module.startswith(
            "numpy.core.") else module
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only numpy arrays and plain containers "
                f"are allowed in a weights file")
        return super().find_class(module, name)


def load_array_pickle(path: str | Path) -> Any:
    """Unpickle `path` allowing only numpy arrays, dtypes, scalars and plain containers.

    Python 2 pickles (detectron2's model zoo) are read with the latin-1 encoding.
    Raises `pickle.UnpicklingError` for any other object: no code in the file can run.
    """
    with Path(path).open("rb") as f:
        return _ArrayUnpickler(f, encoding="latin1").load()


def _not_a_checkpoint(path: Path) -> str | None:
    """Why `path` is plainly not a weights file (empty, HTML, text, unknown format), or None."""
    with path.open("rb") as f:
        head = f.read(256)
    if not head:
        return "is empty, not a checkpoint"
    if head.lstrip().startswith(b"<"):
        return "is an HTML/XML page (a failed download?), not a checkpoint"
    if path.suffix == ".pkl" or head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return None  # a pickle (protocol 0 is text), a torch zip archive or a binary pickle
    text = head.decode("utf-8", errors="replace")
    if all(c.isprintable() or c.isspace() for c in text):
        return f"is a text file (starts {text[:40]!r}), not a checkpoint"
    return f"is not a PyTorch checkpoint (neither a zip archive nor a pickle: {head[:8]!r})"


def read_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """A PyTorch or detectron2 checkpoint file -> its state_dict (tensors or numpy arrays).

    `.pkl`: a pickle of numpy arrays (detectron2's model-zoo format, e.g. DeepLab's R-52.pkl),
    read with a restricted unpickler (`load_array_pickle`) that constructs nothing but numpy
    arrays and containers. Anything else: `torch.load(weights_only=True)` (torch is imported
    only then). No code path unpickles arbitrary objects. A state_dict nested under
    'state_dict' or 'model' is unwrapped. Raises ValueError naming the file if it is missing,
    empty, HTML or text, holds other objects, or holds no state_dict.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint file {path} does not exist")
    reason = _not_a_checkpoint(path)
    if reason:
        raise ValueError(f"{path} {reason}")
    if path.suffix != ".pkl":
        try:
            import torch
        except ImportError as err:  # torch is not a dependency of the library
            raise ValueError(f"reading {path} needs PyTorch (pip install torch)") from err
    try:
        if path.suffix == ".pkl":
            obj = load_array_pickle(path)
        else:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:
                # torch's message advises weights_only=False, i.e. running the file's code.
                lines = [line.strip() for line in str(err).splitlines() if line.strip()]
                detail = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line),
                              lines[-1] if lines else "")
                raise pickle.UnpicklingError(
                    f"the file holds objects other than tensors (refused): {detail}") from None
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError,
            AttributeError, ImportError, IndexError, TypeError) as err:
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not contain a state_dict (got {type(obj).__name__})")
    return obj
