"""Benchmark section: training steps on one accelerator, jax_refine against the PyTorch mirrors.

    python benchmarks/accelerator_train.py            # the GPU section (one H200: < 150 s)
    python benchmarks/accelerator_train.py --small    # tiny shapes on CPU, seconds

`run(small)` returns one flat row per case (`benchmarks/accelerator.py` imports it):

* CRM, the paper's step: ResNet-50 CRM, batch 12, 224x224 crops, every pixel centre queried,
  the four CRM losses, Adam with L2 weight decay 1e-4. jax_refine (`train.step.
  crm_train_step`) in float32 at the platform's default precision (TF32 dots and
  convolutions on NVIDIA GPUs) and with bfloat16 compute (float32 parameters); PyTorch: the
  official model (`tests/torch_mirrors/crm.py`) and loss, Adam(weight_decay=1e-4),
  `benchmarks/train_step.py`'s step.
* PNA, configs/pna_voc_r50_fcn.py's step: R-52 (DeepLab stem) at output stride 32, FCN head,
  PNA head (D 96..768, window 9, SAM), 21 classes, batch 8, 512x512, cross-entropy on P0 and
  0.1 x on P1..P4, global-norm clipping 0.01, AdamW. jax_refine (`pna_train_step`) in float32
  and bfloat16; PyTorch: the mirrors (`tests/torch_mirrors/detectron2.py`, `pna.py`, the
  neighbourhood attention with `F.unfold`), the same loss, `clip_grad_norm_`, AdamW with the
  poly schedule.

small=True: the same cases with tiny models (ResNet-18 width 8 / one bottleneck per stage for
PyTorch, narrow heads) and shapes on whatever device is there (CPU in the tests, compiled at
XLA's lowest optimisation level, PyTorch on one thread). The times then only show that every
case runs; the losses (first and last step) let tests compare bfloat16 with float32.

Method. Every case runs in its own subprocess (this file with `--worker`), so that the peak
device memory read at its end is that case's alone (JAX: `memory_stats()
['peak_bytes_in_use']` with XLA_PYTHON_CLIENT_PREALLOCATE=false; PyTorch:
`torch.cuda.max_memory_allocated()`; NaN on a CPU). All workers start together and build their
step at once (JAX compiles ahead of time, on the host's cores in parallel); once all are
ready, this process lets them run one case at a time, so no two cases share the device while
one is timed: `WARMUP` steps, then `STEPS` steps each ended by `jax.block_until_ready` /
`torch.cuda.synchronize()`, reported as the median. The parent must not hold most of the
GPU's memory itself (JAX preallocates 75% in a process that has touched the GPU). A case that
fails, or is still running when `BUDGET_S` is spent, becomes a row with an "error".

Workers import no TensorFlow, TFDS or ml_collections (the GPU machine lacks them): they block
those imports, so a CPU run fails as the GPU run would. The PNA settings below are
configs/pna_voc_r50_fcn.py's, written out for that reason.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pna_forward import torch_model as torch_pna_model  # noqa: E402
from train_step import aot_stepper, jax_crm_step, torch_crm_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 140.0  # the whole section, compiles included (the integrator's limit: 150 s)
SMALL_BUDGET_S = 900.0  # small=True on a shared 2-core CPU: four XLA:CPU compiles
WARMUP, STEPS = 3, 20
SMALL_WARMUP, SMALL_STEPS = 1, 10
ABSENT_ON_GPU_HOST = ("tensorflow", "tensorflow_datasets", "ml_collections")

# (task, implementation, compute dtype) of every case, in the order they are timed.
CASES = [
    ("crm", "jax_refine", "float32"),
    ("crm", "jax_refine", "bfloat16"),
    ("crm", "pytorch", "float32"),
    ("pna", "jax_refine", "float32"),
    ("pna", "jax_refine", "bfloat16"),
    ("pna", "pytorch", "float32"),
]
TASKS = {  # name, batch, side: (full, small)
    "crm": ("crm_paper_step", (12, 224), (2, 32)),
    "pna": ("pna_r50_fcn_step", (8, 512), (2, 64)),
}
PNA_CLASSES = 21
PNA_LOSS = dict(coarse_loss="cross_entropy", stage_loss="cross_entropy", coarse_weight=1.0,
                stage_weight=0.1)
PNA_LR, PNA_STEPS, PNA_POWER, PNA_WD, PNA_CLIP = 1e-4, 20_000, 0.9, 0.01, 0.01
# Row fields: ms_per_step (median), steps_per_s and images_per_s (from it), vs_pytorch (this
# row's time / the PyTorch row's of the task), peak_device_gib, compile_s (JAX: state init and
# the step's ahead-of-time compile; NaN for PyTorch), loss_first / loss_last (the first and
# the last step's loss), param_dtype (of the trained parameters), error ("" when it ran).
KEYS = ("case", "impl", "dtype", "precision", "device", "batch", "image_size", "ms_per_step",
        "steps_per_s", "images_per_s", "vs_pytorch", "peak_device_gib", "compile_s",
        "timed_steps", "loss_first", "loss_last", "param_dtype", "error")


# ------------------------------------------------------------------------------ the steps


def pna_batch(batch: int, side: int, classes: int = PNA_CLASSES) -> dict[str, np.ndarray]:
    """A fixed PNA batch: RGB images in [0, 255] [B, S, S, 3], int32 labels [B, S, S] with
    10% ignored (255)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, (batch, side, side)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.1] = 255
    return {"image": rng.uniform(0, 255, (batch, side, side, 3)).astype(np.float32),
            "label": labels}


def jax_pna_step(batch: int, side: int, dtype: str, small: bool):
    """jax_refine's PNA training step `step() -> metrics` on one fixed batch (compiled)."""
    import functools

    import jax
    import jax.numpy as jnp

    from jax_refine.models import pna as pna_lib
    from jax_refine.train import mesh as mesh_lib
    from jax_refine.train import optim
    from jax_refine.train import step as step_lib

    tiny = dict(depth=18, width=8, embed_dims=(32,) * 4, window_sizes=(3,) * 4,
                head_kwargs=dict(channels=16, num_convs=1))
    model = pna_lib.build_pna("fcn", PNA_CLASSES, dtype=jnp.dtype(dtype), **(tiny if small else {}))
    tx, schedule = optim.pna_optimizer(PNA_LR, PNA_STEPS, weight_decay=PNA_WD, power=PNA_POWER,
                                       clip_norm=PNA_CLIP, backbone_multiplier=1.0)
    mesh = mesh_lib.make_mesh()
    state = step_lib.jit_init_state(model, tx, step_lib.pna_example_inputs(1, (side, side)),
                                    mesh)(jax.random.key(0))
    train_step = step_lib.jit_train_step(functools.partial(
        step_lib.pna_train_step, model=model, tx=tx, schedule=schedule, loss_kwargs=PNA_LOSS),
        mesh)
    return aot_stepper(train_step, state, mesh_lib.global_batch(mesh, pna_batch(batch, side)))


def torch_pna_step(batch: int, side: int, device: str, small: bool):
    """The PyTorch PNA training step `step() -> loss` on one fixed batch: the mirror in
    training mode, the same loss as `losses.pna_loss`, backward, global-norm clipping, AdamW
    with the poly schedule."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = torch_pna_model(tiny=small, num_classes=PNA_CLASSES).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=PNA_LR, weight_decay=PNA_WD)
    schedule = torch.optim.lr_scheduler.PolynomialLR(opt, PNA_STEPS, PNA_POWER)
    data = pna_batch(batch, side)
    images = torch.from_numpy(data["image"]).permute(0, 3, 1, 2).contiguous().to(device)
    labels = torch.from_numpy(data["label"]).long().to(device)
    weights = [PNA_LOSS["coarse_weight"]] + [PNA_LOSS["stage_weight"]] * 4

    def step():
        opt.zero_grad()
        outs, _ = model(images)
        loss = sum(w * F.cross_entropy(F.interpolate(o, size=(side, side), mode="bilinear",
                                                     align_corners=False),
                                       labels, ignore_index=255)
                   for w, o in zip(weights, outs, strict=True))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), PNA_CLIP)
        opt.step()
        schedule.step()
        return loss.detach()

    return step


# ------------------------------------------------------------------------------ one case


def _block_imports(names) -> None:
    """Make `import name` fail as on a machine without it."""
    for name in names:
        sys.modules[name] = None


def _jax_case(task: str, dtype: str, batch: int, side: int, small: bool):
    import jax
    import jax.numpy as jnp

    start = time.perf_counter()
    if task == "crm":
        from jax_refine.models.crm import CRM

        tiny = dict(depth=18, width=8, fusion_channels=(8, 8, 8), latent_channels=16,
                    hidden=(8, 8, 8, 8))
        step = jax_crm_step(batch, side, CRM(dtype=jnp.dtype(dtype), **(tiny if small else {})))
    else:
        step = jax_pna_step(batch, side, dtype, small)
    compile_s = time.perf_counter() - start

    def timed():
        metrics = jax.block_until_ready(step())
        return metrics["loss"]

    device = jax.devices()[0]
    precision = (f"{dtype} compute; matmul precision "
                 f"{jax.config.jax_default_matmul_precision or 'platform default'}")

    def peak_gib() -> float:
        stats = device.memory_stats() or {}
        return stats.get("peak_bytes_in_use", math.nan) / 2**30

    def param_dtype() -> str:
        params = step.state().params
        return ",".join(sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(params)}))

    return timed, {"device": device.device_kind, "precision": precision, "compile_s": compile_s,
                   "peak_device_gib": peak_gib, "param_dtype": param_dtype}


def _torch_case(task: str, batch: int, side: int, small: bool):
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if small:  # the six workers share a small CPU: more threads only spin
        torch.set_num_threads(1)
    if task == "crm":
        step = torch_crm_step(batch, side, device, tiny=small)
    else:
        step = torch_pna_step(batch, side, device, small)

    def timed():
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        return loss

    def peak_gib() -> float:
        return torch.cuda.max_memory_allocated() / 2**30 if cuda else math.nan

    precision = ("torch defaults: cudnn.allow_tf32="
                 f"{torch.backends.cudnn.allow_tf32}, matmul.allow_tf32="
                 f"{torch.backends.cuda.matmul.allow_tf32}")
    name = torch.cuda.get_device_name() if cuda else "cpu"
    return timed, {"device": name, "precision": precision, "compile_s": math.nan,
                   "peak_device_gib": peak_gib, "param_dtype": "float32"}


def worker(task: str, impl: str, dtype: str, small: bool) -> None:
    """Build the case, print READY, wait for a line on stdin, time it, print RESULT {json}."""
    _block_imports(ABSENT_ON_GPU_HOST)
    _, full, tiny = TASKS[task]
    batch, side = tiny if small else full
    if impl == "jax_refine":
        timed, info = _jax_case(task, dtype, batch, side, small)
    else:
        timed, info = _torch_case(task, batch, side, small)
    print("READY", flush=True)
    sys.stdin.readline()
    warmup, steps = (SMALL_WARMUP, SMALL_STEPS) if small else (WARMUP, STEPS)
    losses, times = [], []
    for k in range(warmup + steps):
        start = time.perf_counter()
        losses.append(timed())
        if k >= warmup:
            times.append(time.perf_counter() - start)
    print("RESULT " + json.dumps({
        **{k: v() if callable(v) else v for k, v in info.items()},
        "ms_per_step": 1e3 * statistics.median(times), "timed_steps": float(steps),
        "loss_first": float(losses[0]), "loss_last": float(losses[-1]),
    }), flush=True)


# ------------------------------------------------------------------------------ the section


class _Worker:
    """One case's subprocess: stdout lines (READY, RESULT {json}) are read by a thread into a
    queue; stderr goes to a log file (quoted in the error of a failed case)."""

    def __init__(self, case: tuple[str, str, str], small: bool, logdir: Path):
        self.case = case
        self.log = logdir / ("_".join(case) + ".log")
        env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_PYTHON_CLIENT_PREALLOCATE="false")
        if small:  # most of XLA:CPU's compile time is LLVM optimisation (4x); speed is moot
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0"
        cmd = [sys.executable, __file__, "--worker", *case] + (["--small"] if small else [])
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")  # end of output

    def expect(self, word: str, deadline: float) -> str:
        """The rest of the next stdout line starting with `word` (before `deadline`)."""
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                raise TimeoutError(f"no {word} within the section's time budget") from None
            if not line:
                tail = self.log.read_text()[-2000:]
                raise RuntimeError(f"worker exited with {self.proc.wait()}: {tail}")
            if line.startswith(word):
                return line[len(word):].strip()

    def result(self, deadline: float) -> dict:
        """Let the (ready) worker run its timed steps; its measurements."""
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return json.loads(self.expect("RESULT", deadline))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _row(case: tuple[str, str, str], small: bool, measured: dict | None, error: str) -> dict:
    task, impl, dtype = case
    name, full, tiny = TASKS[task]
    batch, side = tiny if small else full
    row = dict.fromkeys(KEYS, math.nan)
    row.update(case=name + ("_small" if small else ""), impl=impl, dtype=dtype,
               precision="", device="", batch=float(batch), image_size=f"{side}x{side}",
               param_dtype="", error=error)
    if measured:
        row.update({k: v for k, v in measured.items() if k in KEYS})
        row["steps_per_s"] = 1e3 / row["ms_per_step"]
        row["images_per_s"] = batch * row["steps_per_s"]
    return row


def run(small: bool) -> list[dict]:
    """The section's rows (flat dicts of str / float, keys `KEYS`); see the module docstring.

    vs_pytorch = ms_per_step / the PyTorch mirror's ms_per_step for the same task.
    """
    deadline = time.monotonic() + (SMALL_BUDGET_S if small else BUDGET_S)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        workers = [_Worker(case, small, Path(tmp)) for case in CASES]
        try:
            # Every worker builds and compiles first (XLA's GPU autotuning runs kernels on the
            # device), then they are timed one at a time.
            for w in workers:
                try:
                    w.expect("READY", deadline)
                except Exception as e:  # noqa: BLE001 - every failure becomes a row
                    rows[w.case] = _row(w.case, small, None, f"{type(e).__name__}: {e}")
                    w.close()
            for w in workers:
                if w.case in rows:
                    continue
                try:
                    rows[w.case] = _row(w.case, small, w.result(deadline), "")
                except Exception as e:  # noqa: BLE001
                    rows[w.case] = _row(w.case, small, None, f"{type(e).__name__}: {e}")
                finally:
                    w.close()
        finally:
            for w in workers:
                w.close()
    rows = [rows[case] for case in CASES]
    for row in rows:
        ref = [r for r in rows if r["case"] == row["case"] and r["impl"] == "pytorch"]
        if ref and not row["error"] and not ref[0]["error"]:
            row["vs_pytorch"] = row["ms_per_step"] / ref[0]["ms_per_step"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU, seconds)")
    parser.add_argument("--worker", nargs=3, metavar=("TASK", "IMPL", "DTYPE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, small=args.small)
        return
    start = time.perf_counter()
    rows = run(args.small)
    for row in rows:
        print(json.dumps(row))
    print(f"section: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
