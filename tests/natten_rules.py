"""NATTEN 0.14.5's integer window rules written out literally (for test references only).

`natten_window_start(i, n, k, d)`: first key index of query i's window along an axis of n;
`natten_pb_start(i, n, k, d)`: first relative-position-bias index. Kept independent of
`jax_refine.ops.neighborhood` so that tests check the library against them.
"""

from __future__ import annotations


def natten_window_start(i: int, n: int, k: int, d: int) -> int:
    half = k // 2
    if d <= 1:
        return max(i - half, 0) + (i + half >= n) * (n - i - half - 1)
    if i - half * d < 0:
        return i % d
    if i + half * d >= n:
        imodd = i % d
        a = (n // d) * d
        b = n - a
        if imodd < b:
            return n - b + imodd - 2 * half * d
        return a + imodd - k * d
    return i - half * d


def natten_pb_start(i: int, n: int, k: int, d: int) -> int:
    half = k // 2
    if d <= 1:
        return half + (i < half) * (half - i) + (i + half >= n) * (n - i - 1 - half)
    if i - half * d < 0:
        return k - 1 - i // d
    if i + half * d >= n:
        return (n - i - 1) // d
    return half
