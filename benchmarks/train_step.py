"""Benchmark: the paper's CRM training step, JAX vs the PyTorch mirror, in one run.

    python benchmarks/train_step.py                 # ResNet-50, batch 12, 224x224, 2 steps
    python benchmarks/train_step.py --batch 4 --steps 3 --side jax

Each side runs in its own subprocess (peak memory = that process's max RSS): build the
model, then `--steps` timed training steps (forward at all 224x224 pixel centres, the four
CRM losses, backward, Adam with weight decay 1e-4) after one untimed warm-up step (JAX's
printed warm-up also holds its state init and ahead-of-time compile). PyTorch uses the
official model (tests/torch_mirrors/crm.py: layer4 computed, per-query 262-d MLP) with
torch.set_num_threads(--threads). The step builders (`jax_crm_step`, `torch_crm_step`) are
shared with benchmarks/accelerator_train.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from procmem import max_rss_mb  # noqa: E402
from workers import run_worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def crm_batch(batch: int, crop: int) -> dict:
    """A fixed CRM batch (numpy NHWC): normal image, a box ground truth, its mask with 5% of
    the pixels flipped (in [-1, 1])."""
    import numpy as np

    rng = np.random.default_rng(0)
    gt = np.zeros((batch, crop, crop, 1), np.float32)
    gt[:, crop // 4: 3 * crop // 4, crop // 5: 2 * crop // 3] = 1
    return {
        "image": rng.normal(size=(batch, crop, crop, 3)).astype(np.float32),
        "mask": np.where(rng.random(gt.shape) < 0.05, 1 - gt, gt) * 2 - 1,
        "gt": gt,
    }


def jax_crm_step(batch: int, crop: int, model=None):
    """The JAX side: `step() -> metrics` of the paper's CRM training step (every query, Adam
    with L2 weight decay) on one fixed batch, compiled here; `model` defaults to the paper's
    `CRM()`."""
    import functools

    import jax

    from jax_refine.models.crm import CRM
    from jax_refine.train import mesh as mesh_lib
    from jax_refine.train import optim
    from jax_refine.train import step as step_lib

    model = CRM() if model is None else model
    tx, schedule = optim.crm_optimizer(2.25e-4, 45_000)
    mesh = mesh_lib.make_mesh()
    state = step_lib.jit_init_state(model, tx, step_lib.example_inputs(1, crop),
                                    mesh)(jax.random.key(0))
    train_step = step_lib.jit_train_step(
        functools.partial(step_lib.crm_train_step, model=model, tx=tx, schedule=schedule), mesh)
    data = mesh_lib.global_batch(mesh, crm_batch(batch, crop))
    return aot_stepper(train_step, state, data)


def aot_stepper(train_step, state, batch):
    """Compile the jitted (state-donating) `train_step` for (state, batch) ahead of time;
    return `step() -> metrics`, which applies it to the current state (`step.state()`) and
    the fixed batch."""
    compiled = train_step.lower(state, batch).compile()
    box = [state]

    def step():
        box[0], metrics = compiled(box[0], batch)
        return metrics

    step.state = lambda: box[0]  # the current TrainState
    return step


def worker_jax(args) -> dict:
    start = time.perf_counter()
    step = jax_crm_step(args.batch, args.crop)
    float(step()["loss"])
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = float(step()["loss"])
    seconds = (time.perf_counter() - start) / args.steps
    return {"seconds": seconds, "warmup": warmup, "max_rss_mb": max_rss_mb(), "loss": loss}


def torch_crm_step(batch: int, crop: int, device: str = "cpu", tiny: bool = False):
    """The PyTorch side: `step() -> loss tensor` of the reference's training step (the
    official model `tests/torch_mirrors/crm.py`, layer4 computed, per-query 262-d MLP; the
    four CRM losses; backward; Adam with weight_decay 1e-4) on one fixed batch on `device`.
    tiny: one bottleneck block per stage (CPU tests)."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from jax_refine.ops.sobel import GX, GY
    from tests.torch_mirrors import crm as mirror

    torch.manual_seed(0)
    model = mirror.CRMNet()
    if tiny:
        model.feats = mirror.ResNet(layers=(1, 1, 1, 1))
    model = model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=2.25e-4, weight_decay=1e-4)
    data = {k: torch.from_numpy(v).permute(0, 3, 1, 2).contiguous().to(device)
            for k, v in crm_batch(batch, crop).items()}
    coord = mirror.make_coord((crop, crop)).unsqueeze(0).expand(batch, -1, -1).to(device)
    cell = torch.ones_like(coord) * torch.tensor([2 / crop, 2 / crop], device=device)
    kx = torch.tensor(GX, device=device)[None, None]
    ky = torch.tensor(GY, device=device)[None, None]

    def sobel(x):
        x = F.avg_pool2d(x, 3, stride=1, padding=1)
        return torch.sqrt(F.conv2d(x, kx, padding=1) ** 2 + F.conv2d(x, ky, padding=1) ** 2
                          + 1e-4)

    def step():
        opt.zero_grad()
        logits = model(data["image"], data["mask"], coord, cell)
        logits = logits.view(batch, 1, crop, crop)
        p = torch.sigmoid(logits)
        gt = data["gt"]
        loss = (F.binary_cross_entropy_with_logits(logits, (gt > 0.5).float())
                + 0.5 * F.l1_loss(p, gt) + 0.5 * F.mse_loss(p, gt)
                + 2.0 * F.l1_loss(sobel(gt), sobel(p)))
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def worker_torch(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    step = torch_crm_step(args.batch, args.crop)
    start = time.perf_counter()
    step()
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = float(step())
    seconds = (time.perf_counter() - start) / args.steps
    return {"seconds": seconds, "warmup": warmup, "max_rss_mb": max_rss_mb(), "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per side")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch threads")
    parser.add_argument("--side", choices=["both", "jax", "torch"], default="both",
                        help="which implementation(s) to run")
    parser.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker_jax(args) if args.worker == "jax" else worker_torch(args)
        print(json.dumps(result))
        return
    print(f"load average at start: {os.getloadavg()}, cpus: {os.cpu_count()}")
    print(f"CRM ResNet-50 train step, batch {args.batch}, {args.crop}x{args.crop}")
    flags = ["--batch", str(args.batch), "--crop", str(args.crop), "--steps", str(args.steps),
             "--threads", str(args.threads)]
    results = {kind: run_worker(__file__, kind, flags, args.threads) for kind in ("jax", "torch")
               if args.side in ("both", kind)}
    for kind, r in results.items():
        print(f"{kind:>6}: {r['seconds']:7.2f} s/step (warm-up {r['warmup']:.1f} s), "
              f"peak {r['max_rss_mb']:.0f} MB, loss {r['loss']:.4f}")
    if "torch" in results:
        j, t = results["jax"], results["torch"]
        print(f"ratio jax/torch: time {j['seconds'] / t['seconds']:.2f}x, "
              f"peak memory {j['max_rss_mb'] / t['max_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
