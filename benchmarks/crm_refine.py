"""Benchmark: CRM refinement of large synthetic scenes, JAX Refiner vs the official PyTorch way.

    python benchmarks/crm_refine.py                      # 2048x2048 and 3840x2160
    python benchmarks/crm_refine.py --sizes 1024x1024 --side jax
    python benchmarks/crm_refine.py --huge               # adds 6000x4000 (JAX only)

Both sides use the same random weights (the PyTorch mirror's, converted with
`jax_refine.convert.crm_variables`) and the four-scale schedule on a
`jax_refine.data.synthetic.make_scene` image with a `coarse_from_lowres` mask. PyTorch runs
the official way (tests/torch_mirrors/crm.py: layer4 computed, per-query 262-d MLP, chunks
of 50176*16 queries) with torch.set_num_threads(2). Each measurement runs once, in its own
subprocess, so the peak memory is that process's max RSS; the JAX time includes compilation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from procmem import max_rss_mb  # noqa: E402
from workers import run_worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCALES = (0.125, 0.25, 0.5, 1.0)


def scene(height: int, width: int, seed: int = 0):
    import numpy as np

    from jax_refine.data.perturb import coarse_from_lowres
    from jax_refine.data.synthetic import make_scene

    image, label = make_scene(seed, height, width)
    coarse = coarse_from_lowres(label > 0, 16.0, np.random.default_rng(seed))
    return image, (coarse > 0).astype(np.uint8) * 255



def worker_jax(args) -> dict:
    from jax_refine.refine import Refiner

    image, mask = scene(*args.size)
    refiner = Refiner.from_checkpoint(args.weights)
    start = time.perf_counter()
    prob = refiner.refine(image, mask, SCALES)
    seconds = time.perf_counter() - start
    foreground = float((prob > 0.5).mean())
    return {"seconds": seconds, "max_rss_mb": max_rss_mb(), "foreground": foreground}


def worker_torch(args) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from tests.torch_mirrors import crm as mirror

    torch.set_num_threads(args.threads)
    image, mask = scene(*args.size)
    model = mirror.CRMNet().eval()
    state = torch.load(args.weights, map_location="cpu", weights_only=True)
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    start = time.perf_counter()
    prob = mirror.refine_multiscale(model, *mirror.normalise(image, mask), scales=SCALES)
    seconds = time.perf_counter() - start
    foreground = float((prob > 0.5).float().mean())
    return {"seconds": seconds, "max_rss_mb": max_rss_mb(), "foreground": foreground}


def make_weights(directory: Path) -> tuple[Path, Path]:
    """Random mirror weights as a .pth (PyTorch side) and a converted checkpoint (JAX side)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from jax_refine.convert.__main__ import convert_crm
    from tests.torch_mirrors import crm as mirror

    torch.manual_seed(0)
    model = mirror.randomise(mirror.CRMNet(), seed=0)
    pth = directory / "crm_random.pth"
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, pth)
    out = directory / "crm_random"
    convert_crm(str(pth), str(out))
    return pth, out


def parse_size(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' -> (height, width)."""
    width, height = (int(v) for v in text.lower().split("x"))
    return height, width


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["2048x2048", "3840x2160"],
                        help="WIDTHxHEIGHT entries")
    parser.add_argument("--huge", action="store_true", help="also refine 6000x4000 (JAX only)")
    parser.add_argument("--side", choices=["both", "jax", "torch"], default="both",
                        help="which implementation(s) to run")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch threads")
    parser.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        args.size = parse_size(args.sizes[0])
        result = worker_jax(args) if args.worker == "jax" else worker_torch(args)
        print(json.dumps(result))
        return

    sizes = [parse_size(s) for s in args.sizes]
    with tempfile.TemporaryDirectory() as tmp:
        pth, ckpt = make_weights(Path(tmp))
        print(f"load average at start: {os.getloadavg()}, cpus: {os.cpu_count()}")
        print(f"{'size':>10} {'side':>6} {'time s':>8} {'peak MB':>8} {'fg':>6}")
        for size in sizes + ([(4000, 6000)] if args.huge else []):
            label = f"{size[1]}x{size[0]}"
            results = {}
            for kind, weights in (("jax", ckpt), ("torch", pth)):
                if args.side not in ("both", kind) or (kind == "torch" and size == (4000, 6000)):
                    continue
                flags = ["--weights", str(weights), "--threads", str(args.threads),
                         "--sizes", f"{size[1]}x{size[0]}"]
                r = results[kind] = run_worker(__file__, kind, flags, args.threads)
                print(f"{label:>10} {kind:>6} {r['seconds']:8.1f} {r['max_rss_mb']:8.0f} "
                      f"{r['foreground']:6.3f}", flush=True)
            if len(results) < 2:
                continue
            jax_r, torch_r = results["jax"], results["torch"]
            print(f"{label:>10} ratio jax/torch: time {jax_r['seconds'] / torch_r['seconds']:.3f}, "
                  f"peak memory {jax_r['max_rss_mb'] / torch_r['max_rss_mb']:.3f}", flush=True)
        print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
