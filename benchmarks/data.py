"""Scene generation and mBA at 4K, on one core, against their budgets and the reference.

    python benchmarks/data.py [--size 4096] [--repeats 3]

* scene: `make_scene(seed, size, size)`; budget 2 s per 4096x4096 scene.
* mBA: `metrics.boundary_accuracy` vs CascadePSP's `compute_boundary_acc` as published
  (written out below: the same OpenCV morphology plus its uint8 arithmetic); budget 2 s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import cv2
import numpy as np

from jax_refine import metrics
from jax_refine.data.perturb import coarse_from_lowres
from jax_refine.data.synthetic import make_scene

BUDGET_SECONDS = 2.0


def cascadepsp_mba(gt: np.ndarray, seg: np.ndarray) -> float:
    """The reference's per-image mBA, op for op (uint8 masks in {0, 1})."""
    h, w = gt.shape
    max_radius = (w + h) / 300
    accs = []
    for i in range(5):
        radius = 1 + int((max_radius - 1) / 5 * i)
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (radius * 2 + 1, radius * 2 + 1))
        region = cv2.morphologyEx(gt, cv2.MORPH_GRADIENT, kernel) > 0
        gt_in, seg_in = gt[region], seg[region]
        correct = (gt_in * seg_in + (1 - gt_in) * (1 - seg_in)).sum()
        accs.append(correct / region.sum())
    return sum(accs) / 5


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    size = args.size

    scene_times = []
    for seed in range(args.repeats):
        seconds, (_, gt) = timed(lambda s=seed: make_scene(s, size, size), 1)
        scene_times.append(seconds)
    scene = statistics.median(scene_times)
    print(
        f"make_scene {size}x{size}: {scene:.3f} s (median of {args.repeats} seeds), "
        f"{scene / BUDGET_SECONDS:.2f}x the {BUDGET_SECONDS:.0f} s budget"
    )

    pred = coarse_from_lowres(gt, 16, np.random.default_rng(0))
    ours_times, ref_times = [], []
    for _ in range(args.repeats):  # interleaved, so load changes hit both alike
        seconds, value = timed(lambda: metrics.boundary_accuracy(pred, gt), 1)
        ours_times.append(seconds)
        seconds, ref_value = timed(lambda: cascadepsp_mba(gt, pred), 1)
        ref_times.append(seconds)
    assert abs(value - ref_value) < 1e-12, (value, ref_value)
    ours, ref = statistics.median(ours_times), statistics.median(ref_times)
    print(
        f"boundary_accuracy {size}x{size}: {ours:.3f} s, {ours / BUDGET_SECONDS:.2f}x the "
        f"budget, {ours / ref:.2f}x CascadePSP's ({ref:.3f} s); same value {value:.6f}"
    )


if __name__ == "__main__":
    main()
