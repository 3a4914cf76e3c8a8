"""Evaluation split over the processes of a multi-process run.

Item i of an evaluation set (an image, in the set's order) belongs to process i % P of P:
each process loads, predicts and scores only its items, on its own devices, with no
collective until the end. Then the per-item scores are gathered back in item order
(`in_item_order`) or per-process sums added up (`all_processes`), so that every process
holds the whole set's metrics, equal bit for bit to what one process computes alone (the
reductions run over the same values in the same order). One process: no communication.

Evaluation sets are `LazySequence`s, so a process never loads another's images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

import jax
import numpy as np

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class LazySequence(Sequence[T], Generic[T]):
    """`length` items, item i made by `load(i)` when it is accessed (read and decode an
    image, render a scene), never cached."""

    length: int
    load: Callable[[int], T]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> T:  # type: ignore[override]  (no slices)
        if not 0 <= i < self.length:
            raise IndexError(f"item {i} of {self.length}")
        return self.load(i)


def process_items(items: Sequence[T]) -> Iterator[T]:
    """This process's items: i = process_index, + process_count, ... (all with one process)."""
    return (items[i] for i in range(jax.process_index(), len(items), jax.process_count()))


def global_index(local: int) -> int:
    """The item number of this process's `local`-th item (`process_items`)."""
    return jax.process_index() + local * jax.process_count()


def all_processes(array: np.ndarray) -> np.ndarray:
    """[P, ...]: every process's `array` (same shape and dtype everywhere), on every process.

    Travels as bytes, so int64 and float64 values arrive exact whatever jax_enable_x64.
    """
    array = np.ascontiguousarray(array)
    if jax.process_count() == 1:
        return array[None]
    from jax.experimental import multihost_utils

    raw = array.reshape(-1).view(np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(raw))
    return gathered.view(array.dtype).reshape(jax.process_count(), *array.shape)


def in_item_order(rows: np.ndarray) -> np.ndarray:
    """Rows [n_p, ...] of this process's items (in `process_items` order) -> the rows of every
    process's items in item order [n, ...], on every process."""
    if jax.process_count() == 1:
        return rows
    counts = all_processes(np.asarray([len(rows)], np.int64))[:, 0]
    padded = np.zeros((int(counts.max()), *rows.shape[1:]), rows.dtype)
    padded[:len(rows)] = rows
    gathered = all_processes(padded)  # [P, max n_p, ...]; item p + k P is [p, k]
    interleaved = np.swapaxes(gathered, 0, 1).reshape(-1, *rows.shape[1:])
    return interleaved[:int(counts.sum())]
