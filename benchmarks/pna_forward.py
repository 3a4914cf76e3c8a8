"""Benchmark: PNA forward (ResNet-50 + FCN-OS-32 + PNA head), JAX vs a PyTorch mirror.

    .venv/bin/python benchmarks/pna_forward.py                  # 1 x 512 x 512, 21 classes
    .venv/bin/python benchmarks/pna_forward.py --size 256 --repeats 2

The paper's Table 1 setting: ResNet-50 at output stride 32 (DeepLab stem), the FCN head on
res5, the PNA head with D = (96, 192, 384, 768), window 9, SAM on, nearest upsampling.
Both sides use the same random weights (PyTorch mirror, BatchNorm statistics calibrated on
a random image so that activations stay O(1), converted with `jax_refine.convert`).

PyTorch side: `tests/torch_mirrors` (detectron2 / mmseg / PNA names and op order) with the
neighbourhood attention written with `F.unfold` (every window start unfolded once, then the
start of each query picked by indexing; NATTEN's clamped windows and bias indices), eval
mode, `torch.no_grad()`, `torch.set_num_threads(--threads)`. JAX side: `PNASegmentor` under
`jax.jit` (compiled ahead of time; the compile time is printed separately).

Each side runs in its own subprocess. Time = median of `--repeats` forwards after one
warm-up forward. Memory: the process's peak resident set (ru_maxrss, everything incl.
imports and weights), and the peak *during the first forward* above the resident set just
before it (VmHWM reset through /proc/self/clear_refs). The two sides' final logits are
compared (max abs difference) as a check that they compute the same function.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from procmem import max_rss_mb, reset_peak, rss_kb  # noqa: E402
from workers import run_worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 21


def _measure(run, repeats: int) -> dict:
    before = rss_kb("VmRSS")
    reset_peak()
    out = run()  # warm-up; its peak is the forward's working memory
    forward_peak = (rss_kb("VmHWM") - before) / 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {
        "seconds": sorted(times)[len(times) // 2],
        "forward_peak_mb": forward_peak,
        "max_rss_mb": max_rss_mb(),
        "out": out,
    }


def image(size: int) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (1, size, size, 3)).astype(np.float32)


def torch_model(tiny: bool = False, num_classes: int = NUM_CLASSES):
    """The mirror: R-52 at output stride 32, mmseg FCNHead, PNA head (unfold attention).

    tiny (CPU tests of the training benchmark): one block per stage, FCN head of 16 channels
    and one convolution, PNA widths 32 and windows 3.
    """
    sys.path.insert(0, str(ROOT))
    from tests.torch_mirrors import detectron2 as d2
    from tests.torch_mirrors import pna as tp
    from tests.torch_mirrors import pna_layers

    attention = pna_layers.NeighborhoodCrossAttention
    attention.neighbourhood_ops = (pna_layers.unfold_qkrpb, pna_layers.unfold_av)
    backbone = d2.DeepLabResNet(50, "deeplab", res5_dilation=1, multi_grid=(1, 1, 1),
                                blocks=[1, 1, 1, 1] if tiny else None)
    if tiny:
        head = d2.FCNHead(num_classes, channels=16, num_convs=1)
        pna = tp.PNAHead((256, 512, 1024, 2048), num_classes, embed_dims=(32,) * 4,
                         window_sizes=(3,) * 4)
    else:
        head = d2.FCNHead(num_classes)
        pna = tp.PNAHead((256, 512, 1024, 2048), num_classes)
    return tp.PNASegmentor(backbone, FCNCoarse(head), pna, 0)


def FCNCoarse(head):  # noqa: N802 - a factory returning an nn.Module
    """mmseg FCNHead with detectron2's `layers(features)` interface (reads res5)."""
    import torch

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head

        def layers(self, features):
            return self.head(features["res5"])

    return Wrapped()


def make_weights(path: Path) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from tests.torch_mirrors import detectron2 as d2

    torch.manual_seed(0)
    model = d2.randomize(torch_model(), seed=0)
    calib = np.random.default_rng(1).uniform(0, 255, (2, 128, 128, 3)).astype(np.float32)
    d2.calibrate_bn(model, torch.from_numpy(calib.transpose(0, 3, 1, 2).copy()))
    np.savez(path, **{k: v.numpy() for k, v in model.state_dict().items()})


def worker_torch(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model = torch_model().eval()
    state = np.load(args.weights)
    model.load_state_dict({k: torch.from_numpy(state[k]) for k in state.files})
    x = torch.from_numpy(image(args.size).transpose(0, 3, 1, 2).copy())

    def run():
        with torch.no_grad():
            return model(x)[1].numpy().transpose(0, 2, 3, 1)

    return _measure(run, args.repeats)


def worker_jax(args) -> dict:
    import jax
    import jax.numpy as jnp

    from jax_refine import convert
    from jax_refine.models.heads import FCNHead
    from jax_refine.models.pna import PNAHead, PNASegmentor, deeplab_resnet, final_logits

    state = dict(np.load(args.weights))
    backbone = convert.resnet_from_detectron2(state, prefix="backbone.")
    coarse_prefix = "sem_seg_head.coarse_sem_seg_head.head."
    head = convert.coarse_head_variables(state, "fcn", prefix=coarse_prefix)
    pna = convert.pna_head_params(state, prefix="sem_seg_head.pna_head.")
    variables = {
        "params": {"backbone": backbone["params"], "coarse_head": head["params"], "pna_head": pna},
        "batch_stats": {"backbone": backbone["batch_stats"], "coarse_head": head["batch_stats"]},
    }
    variables = jax.device_put(variables)
    model = PNASegmentor(
        deeplab_resnet(50, output_stride=32, multi_grid=None),
        FCNHead(NUM_CLASSES),
        PNAHead(NUM_CLASSES),
    )
    size = args.size

    def forward(variables, x):
        return final_logits(model.apply(variables, x)[-1], (size, size))

    x = jnp.asarray(image(size))
    start = time.perf_counter()
    compiled = jax.jit(forward).lower(variables, x).compile()
    compile_s = time.perf_counter() - start
    result = _measure(lambda: np.asarray(compiled(variables, x)), args.repeats)
    result["compile_s"] = compile_s
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image side")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="PyTorch threads")
    parser.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = (worker_jax if args.worker == "jax" else worker_torch)(args)
        np.save(args.out, result.pop("out"))
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "pna_random.npz"
        make_weights(weights)
        print(f"load average at start: {os.getloadavg()}, cpus: {os.cpu_count()}")
        print(f"PNA forward, 1 x {args.size} x {args.size}, R-52 OS32 + FCN + PNA head "
              f"(D 96..768, window 9, SAM), {NUM_CLASSES} classes")
        results = {}
        for kind in ("jax", "torch"):
            out = Path(tmp) / f"{kind}.npy"
            results[kind] = run_worker(
                __file__, kind, ["--weights", str(weights), "--size", str(args.size),
                                 "--repeats", str(args.repeats), "--threads", str(args.threads),
                                 "--out", str(out)], args.threads)
            results[kind]["logits"] = np.load(out)
            r = results[kind]
            extra = f", compile {r['compile_s']:.1f} s" if "compile_s" in r else ""
            print(f"{kind:>6}: forward {r['seconds']:.3f} s (median of {args.repeats}){extra}; "
                  f"forward peak {r['forward_peak_mb']:.0f} MB, process peak "
                  f"{r['max_rss_mb']:.0f} MB", flush=True)
        j, t = results["jax"], results["torch"]
        diff = float(np.max(np.abs(j["logits"] - t["logits"])))
        print(f"ratio jax/torch: time {j['seconds'] / t['seconds']:.3f}, forward peak "
              f"{j['forward_peak_mb'] / t['forward_peak_mb']:.3f}, process peak "
              f"{j['max_rss_mb'] / t['max_rss_mb']:.3f}; max |logits diff| {diff:.2e} "
              f"(max |logit| {float(np.max(np.abs(t['logits']))):.1f})")
        print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
