"""Neighborhood attention (qk + softmax + av): time and peak memory, ours vs two baselines.

    .venv/bin/python benchmarks/neighborhood.py            # B=1, 64^2 and 128^2, heads 3/6/12/24,
                                                           # L=7 and 9, head_dim 32
    .venv/bin/python benchmarks/neighborhood.py --quick    # a small subset

Implementations (same semantics: NATTEN's clamped windows and bias indices):
  ours    `jax_refine.ops.neighborhood` (na2d_qk / na2d_av, custom VJP).
  na2d    `jax_refine.ops.neighborhood.na2d`, the fused op, default implementation ("xla" on
          CPU: the same kernels as `ours` in one call).
  pallas  `na2d(implementation="pallas")`, the fused Pallas kernel (`--pallas`; on CPU it runs
          in Pallas interpret mode, far slower: for accelerators, see accelerator_na.py).
  gather  JAX, gathers the whole neighbourhood `[B, H, W, L*L, heads, D]` of k and v, einsum,
          autodiff for the backward.
  torch   PyTorch (CPU): `F.unfold` of k and v over all window starts, then the start of each
          query picked by indexing, autograd for the backward.
Forward = logits + bias, softmax, weighted sum; forward+backward = gradients of
sum(out * g) w.r.t. q, k, v and the bias.

Method: every (implementation, configuration) runs in a fresh subprocess. JAX functions are
compiled first (ahead of time). Peak memory = the process's peak resident set (VmHWM, reset
through /proc/self/clear_refs) during the first run, minus the resident set just before it
(inputs allocated, executable compiled), so it counts everything the run allocates (outputs,
residuals, temporaries), the same way for JAX and PyTorch. For JAX the compiled executable's
own figure (XLA memory_analysis: temporaries + outputs) is printed too. Times are the median
of `--repeats` further runs. Baselines whose gathered tensors (k and v neighbourhoods and
their gradients) would exceed `--max-gather-gb` (`--max-torch-gb` for the slow torch one) are
skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from procmem import reset_peak, rss_kb  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]




def _measure(run, repeats: int) -> tuple[float, float]:
    """(median seconds, peak MiB above the current resident set) of `run()`.

    The memory is taken on the first run: XLA keeps an executable's temporary buffers for
    later runs, so only the first run's peak shows them.
    """
    before = rss_kb("VmRSS")
    reset_peak()
    run()
    peak_mib = (rss_kb("VmHWM") - before) / 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], peak_mib


def worker(impl: str, size: int, heads: int, kernel: int, repeats: int) -> dict:
    import numpy as np

    B, D, L = 1, 32, kernel
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((B, size, size, heads, D)).astype(np.float32) for _ in range(4)]
    rpb_np = (0.02 * rng.standard_normal((heads, 2 * L - 1, 2 * L - 1))).astype(np.float32)
    result: dict = {}
    if impl == "torch":
        import torch
        import torch.nn.functional as F

        from jax_refine.ops.neighborhood import bias_start, window_start

        torch.set_num_threads(os.cpu_count() or 1)
        q, k, v, g = (torch.from_numpy(a).permute(0, 3, 1, 2, 4).contiguous() for a in arrays)
        rpb = torch.from_numpy(rpb_np)
        starts = torch.from_numpy(window_start(size, L))
        bias = torch.from_numpy(bias_start(size, L))
        bias_idx = (bias[:, None] + torch.arange(L)[None]).reshape(-1)  # [size*L]
        n_start = size - L + 1

        def neighbourhood(x):  # [B, h, H, W, D] -> [B, h, H, W, L*L, D]
            x = x.permute(0, 1, 4, 2, 3).reshape(B, heads * D, size, size)
            cols = F.unfold(x, L).reshape(B, heads, D, L * L, n_start, n_start)
            cols = cols[:, :, :, :, starts][:, :, :, :, :, starts]
            return cols.permute(0, 1, 4, 5, 3, 2)

        def forward(q, k, v, rpb):
            bias_table = rpb[:, bias_idx][:, :, bias_idx].reshape(heads, size, L, size, L)
            bias_table = bias_table.permute(0, 1, 3, 2, 4).reshape(heads, size, size, L * L)
            logits = torch.einsum("bhijd,bhijnd->bhijn", q, neighbourhood(k)) + bias_table
            return torch.einsum("bhijn,bhijnd->bhijd", logits.softmax(-1), neighbourhood(v))

        def run_fwd():
            with torch.no_grad():
                forward(q, k, v, rpb)

        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, rpb)]

        def run_bwd():
            for t in leaves:
                t.grad = None
            (forward(*leaves) * g).sum().backward()

        result["fwd_s"], result["fwd_mib"] = _measure(run_fwd, repeats)
        result["bwd_s"], result["bwd_mib"] = _measure(run_bwd, repeats)
        with torch.no_grad():
            result["checksum"] = float((forward(q, k, v, rpb).double() * g).sum())
        return result

    import jax
    import jax.numpy as jnp

    from jax_refine.ops.neighborhood import bias_start, na2d, na2d_av, na2d_qk, window_start

    q, k, v, g = (jnp.asarray(a) for a in arrays)
    rpb = jnp.asarray(rpb_np)
    if impl == "ours":

        def forward(q, k, v, rpb):
            logits = na2d_qk(q, k, rpb, L)
            return na2d_av(jax.nn.softmax(logits, axis=-1), v, L)

    elif impl in ("na2d", "pallas"):
        implementation = None if impl == "na2d" else "pallas"

        def forward(q, k, v, rpb):
            return na2d(q, k, v, L, rpb=rpb, scale=1.0, implementation=implementation)

    else:
        rows = window_start(size, L)[:, None] + np.arange(L)[None]  # [size, L]
        bias = bias_start(size, L)[:, None] + np.arange(L)[None]
        kr = np.broadcast_to(rows[:, None, :, None], (size, size, L, L)).reshape(size, size, -1)
        kc = np.broadcast_to(rows[None, :, None, :], (size, size, L, L)).reshape(size, size, -1)
        br = np.broadcast_to(bias[:, None, :, None], (size, size, L, L)).reshape(size, size, -1)
        bc = np.broadcast_to(bias[None, :, None, :], (size, size, L, L)).reshape(size, size, -1)

        def forward(q, k, v, rpb):
            logits = jnp.einsum("bijhd,bijnhd->bijhn", q, k[:, kr, kc])
            logits = logits + jnp.transpose(rpb[:, br, bc], (1, 2, 0, 3))[None]
            attn = jax.nn.softmax(logits, axis=-1)
            return jnp.einsum("bijhn,bijnhd->bijhd", attn, v[:, kr, kc])

    fwd = jax.jit(forward).lower(q, k, v, rpb).compile()
    grad = jax.grad(lambda q, k, v, rpb: jnp.sum(forward(q, k, v, rpb) * g), argnums=(0, 1, 2, 3))
    bwd = jax.jit(grad).lower(q, k, v, rpb).compile()
    for name, compiled in (("fwd", fwd), ("bwd", bwd)):
        analysis = compiled.memory_analysis()
        result[f"{name}_xla_mib"] = (
            analysis.temp_size_in_bytes + analysis.output_size_in_bytes
        ) / 2**20

        def run(compiled=compiled):
            jax.block_until_ready(compiled(q, k, v, rpb))

        result[f"{name}_s"], result[f"{name}_mib"] = _measure(run, repeats)
    result["checksum"] = float(jnp.sum(fwd(q, k, v, rpb).astype(jnp.float32) * g))
    return result


def run_config(impl: str, size: int, heads: int, kernel: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, str(size), str(heads), str(kernel)]
    cmd += ["--repeats", str(repeats)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="64^2 and 128^2 at 12 heads, L=9")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-gather-gb", type=float, default=10.0)
    parser.add_argument(
        "--max-torch-gb", type=float, default=2.5, help="the same limit for the (slow) torch run"
    )
    parser.add_argument("--sizes", type=int, nargs="*", help="only these map sizes")
    parser.add_argument("--pallas", action="store_true", help="also run the Pallas kernel")
    parser.add_argument("--worker", nargs=4, metavar=("IMPL", "SIZE", "HEADS", "L"))
    args = parser.parse_args()
    if args.worker:
        impl, size, heads, kernel = args.worker
        print(json.dumps(worker(impl, int(size), int(heads), int(kernel), args.repeats)))
        return

    if args.quick:
        configs = [(64, 12, 9), (128, 12, 9)]
    else:
        configs = [(s, h, L) for s in (64, 128) for L in (7, 9) for h in (3, 6, 12, 24)]
    if args.sizes:
        configs = [c for c in configs if c[0] in args.sizes]
    print(
        f"B=1, head_dim 32, float32, {os.cpu_count()} CPU threads. Times: median of "
        f"{args.repeats} runs (s). Memory: peak RSS above the inputs (MiB); xla: the compiled "
        "executable's temporaries + outputs (MiB). Ratios: baseline / ours."
    )
    print(
        f"{'HxW':>7} {'heads':>5} {'L':>2} {'impl':>6} | {'fwd s':>7} {'f+b s':>7} | "
        f"{'fwd MiB':>7} {'f+b MiB':>7} | {'xla fwd':>7} {'xla f+b':>7} | "
        f"{'fwd x':>6} {'f+b x':>6} {'mem x':>6}"
    )
    for size, heads, kernel in configs:
        gathered_gb = 2 * size * size * kernel**2 * heads * 32 * 4 / 1e9  # k and v neighbourhoods
        ours = run_config("ours", size, heads, kernel, args.repeats)
        impls = ("ours", "na2d") + (("pallas",) if args.pallas else ()) + ("gather", "torch")
        for impl in impls:
            label = f"{size:>4}^2 {heads:>5} {kernel:>2} {impl:>6} |"
            if impl == "ours":
                r = ours
            elif gathered_gb * 2 > (args.max_torch_gb if impl == "torch" else args.max_gather_gb):
                print(f"{label} skipped (gathered tensors ~{gathered_gb * 2:.0f} GB)")
                continue
            else:
                r = run_config(impl, size, heads, kernel, args.repeats)
            if "error" in r:
                print(f"{label} failed: {r['error']}")
                continue
            line = (
                f"{label} {r['fwd_s']:7.3f} {r['bwd_s']:7.3f} | {r['fwd_mib']:7.0f} "
                f"{r['bwd_mib']:7.0f} |"
            )
            if "fwd_xla_mib" in r:
                line += f" {r['fwd_xla_mib']:7.0f} {r['bwd_xla_mib']:7.0f} |"
            else:
                line += f" {'-':>7} {'-':>7} |"
            if impl != "ours" and abs(r["checksum"] - ours["checksum"]) > 1e-3 * (
                1 + abs(ours["checksum"])
            ):
                line += f" RESULTS DIFFER: {r['checksum']} vs {ours['checksum']}"
            if impl != "ours" and "error" not in ours:
                peak = max(r["fwd_mib"], r["bwd_mib"]) / max(ours["fwd_mib"], ours["bwd_mib"], 1)
                line += (
                    f" {r['fwd_s'] / ours['fwd_s']:6.1f} {r['bwd_s'] / ours['bwd_s']:6.1f} "
                    f"{peak:6.1f}"
                )
            print(line, flush=True)


if __name__ == "__main__":
    main()
