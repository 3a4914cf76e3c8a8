"""The accelerator benchmark: one script, one table, run on one GPU (or, --small, on CPU).

    python benchmarks/accelerator.py --out DIR              # on a GPU host, ~8 minutes
    python benchmarks/accelerator.py --small --out DIR      # CPU, tiny sizes (a test runs it)
    python benchmarks/accelerator.py --sections crm na      # a subset of the sections

Sections (each a list of rows; all rows go to DIR/accelerator.json and one markdown table,
DIR/accelerator.md, which is also printed last):

* crm: CRM 4-scale refinement at 2048^2, 3840x2160 and 6000x4000, the Refiner in float32
  (platform default precision: TF32 convolutions and dots on NVIDIA GPUs), float32 "highest"
  and bfloat16, against the PyTorch mirror of the reference (tests/torch_mirrors/crm.py) run
  the reference's way (`test.py`: PyTorch defaults, i.e. TF32 convolutions and float32
  matmuls, `torch.no_grad`) on the same device with the same random weights: time after
  warm-up (median; both sides from uint8 arrays on the host to probabilities on the host),
  first call of a new size (compilation), peak device memory, binary agreement (p > 0.5)
  with the reference; the first call of a size in a fresh process from the persistent
  compilation cache; and a folder of 20 mixed-size 2K-4K images through `refine_batch`
  against a loop of the reference procedure, with the number of programs compiled.
  The weights are random with the decoder's last layer scaled by 40 and its bias centred,
  so that probabilities are decisive and binary agreement measures the arithmetic.
* na: neighborhood attention, `na2d` "xla" vs "pallas" (benchmarks/accelerator_na.py).
* train: the CRM paper step and a PNA step against the PyTorch mirrors
  (benchmarks/accelerator_train.py).

Each measurement that must not share a process (peak memory, a fresh compilation cache)
runs in its own subprocess (`--worker`). Imports no TensorFlow, TFDS or ml_collections.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SCALES = (0.125, 0.25, 0.5, 1.0)
SMALL_SCALES = (0.5, 1.0)  # --small: fewer programs to compile on CPU
FULL_SIZES = [(2048, 2048), (2160, 3840), (4000, 6000)]
SMALL_SIZES = [(72, 96)]
VARIANTS = {  # name -> Refiner keyword arguments
    "f32": {},
    "f32-highest": {"precision": "highest"},
    "bf16": {"dtype": "bfloat16"},
}


# ----------------------------------------------------------------------------- data


def make_inputs(directory: Path, small: bool) -> dict:
    """Scenes (npz files) and random decisive weights (.pth) shared by the workers."""
    import torch

    from jax_refine.data.perturb import coarse_from_lowres
    from jax_refine.data.synthetic import make_scene
    from tests.torch_mirrors import crm as mirror

    torch.manual_seed(0)
    model = mirror.randomise(mirror.CRMNet(), seed=0).eval()
    state = model.state_dict()
    state["imnet.layers.8.weight"] *= 40
    model.load_state_dict(state)
    probe_image, probe_label = make_scene(1, 64, 64)
    im, seg = mirror.normalise(probe_image, (probe_label > 0).astype(np.uint8) * 255)
    with torch.no_grad():
        coord = mirror.make_coord((64, 64))[None]
        logits = model(im, seg, coord, torch.full_like(coord, 2 / 64))
    state["imnet.layers.8.bias"] -= logits.median()
    weights = directory / "crm_weights.pth"
    torch.save(state, weights)

    sizes = SMALL_SIZES if small else FULL_SIZES
    scenes = []
    for k, (h, w) in enumerate(sizes):
        image, label = make_scene(k, h, w)
        coarse = coarse_from_lowres(label > 0, 4.0 if small else 16.0, np.random.default_rng(k))
        path = directory / f"scene_{h}x{w}.npz"
        np.savez(path, image=image, mask=(coarse > 0).astype(np.uint8) * 255)
        scenes.append(str(path))
    # The folder: crops of the largest scene, sides drawn from 2K-4K (small: 40-70 px).
    rng = np.random.default_rng(7)
    big = np.load(scenes[-1])
    lo, hi = (70, 96) if small else (2000, 4000)  # small: the scene's shape bucket
    count = 1 if small else 20  # small: the folder reuses the single-image programs
    folder = []
    for k in range(count):
        h = int(rng.integers(lo, min(hi, big["image"].shape[0]) + 1))
        w = int(rng.integers(lo, min(hi, big["image"].shape[1]) + 1))
        y = int(rng.integers(0, big["image"].shape[0] - h + 1))
        x = int(rng.integers(0, big["image"].shape[1] - w + 1))
        path = directory / f"folder_{k}.npz"
        np.savez(path, image=big["image"][y : y + h, x : x + w],
                 mask=big["mask"][y : y + h, x : x + w])
        folder.append(str(path))
    return {"weights": str(weights), "scenes": scenes, "folder": folder}


def _load(path: str) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(path)
    return data["image"], data["mask"]


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ----------------------------------------------------------------------------- workers


def worker_torch(args) -> dict:
    """The reference procedure on the device: per scene time, peak memory, binary output."""
    import torch

    from tests.torch_mirrors import crm as mirror

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = mirror.CRMNet().eval()
    model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    model.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def refine(image, mask):
        im, seg = mirror.normalise(image, mask)
        prob = mirror.refine_multiscale(model, im.to(device), seg.to(device),
                                         scales=args.scales)
        out = prob.cpu().numpy()
        sync()
        return out

    out: dict = {"scenes": [], "device": str(device)}
    for path in args.scenes:
        image, mask = _load(path)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        prob = refine(image, mask)  # warm-up (cuDNN autotuning, allocator)
        seconds = _median_time(lambda image=image, mask=mask: refine(image, mask), args.repeats)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
        np.save(Path(args.out) / f"ref_{Path(path).stem}.npy", np.packbits(prob > 0.5))
        out["scenes"].append({"path": path, "seconds": seconds, "peak_bytes": peak,
                              "foreground": float((prob > 0.5).mean())})
    images = [_load(p) for p in args.folder]
    start = time.perf_counter()
    for image, mask in images:
        refine(image, mask)
    out["folder_seconds"] = time.perf_counter() - start
    return out


def worker_jax(args) -> dict:
    """One Refiner variant: per scene first call, time, peak memory, agreement; the folder."""
    import jax
    import torch

    from jax_refine.convert.crm import crm_variables
    from jax_refine.models.crm import CRM
    from jax_refine.refine import Refiner, enable_compilation_cache

    enable_compilation_cache(args.cache_dir)
    state = torch.load(args.weights, map_location="cpu", weights_only=True)
    refiner = Refiner(CRM(), crm_variables(state), **VARIANTS[args.variant])
    device = jax.local_devices()[0]

    def peak() -> int:
        stats = device.memory_stats() or {}
        return int(stats.get("peak_bytes_in_use", 0))

    out: dict = {"scenes": [], "backend": jax.default_backend(), "jax": jax.__version__,
                 "device": device.device_kind}
    for path in args.scenes:
        image, mask = _load(path)
        traces = refiner.trace_count
        start = time.perf_counter()
        prob = refiner.refine(image, mask, args.scales)
        first = time.perf_counter() - start
        row = {"path": path, "first_call_seconds": first,
               "programs": refiner.trace_count - traces}
        if args.repeats:
            row["seconds"] = _median_time(lambda i=image, m=mask: refiner.refine(i, m, args.scales),
                                          args.repeats)
        row["peak_bytes"] = peak()
        reference = Path(args.out) / f"ref_{Path(path).stem}.npy"
        if reference.exists():
            want = np.unpackbits(np.load(reference))[: prob.size].reshape(prob.shape)
            row["agreement"] = float(((prob > 0.5) == want.astype(bool)).mean())
        row["foreground"] = float((prob > 0.5).mean())
        out["scenes"].append(row)
    if args.folder:
        images = [_load(p) for p in args.folder]
        traces = refiner.trace_count
        start = time.perf_counter()
        refiner.refine_batch([i for i, _ in images], [m for _, m in images], args.scales)
        out["folder_first_seconds"] = time.perf_counter() - start
        out["folder_programs"] = refiner.trace_count - traces
        start = time.perf_counter()
        refiner.refine_batch([i for i, _ in images], [m for _, m in images], args.scales)
        out["folder_seconds"] = time.perf_counter() - start
    return out


def run_worker(kind: str, args: list[str], timeout: float) -> dict:
    """`python accelerator.py --worker kind *args` -> its JSON dict (last line of stdout)."""
    cmd = [sys.executable, __file__, "--worker", kind, *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- sections


def crm_section(small: bool, work: Path, variants: list[str]) -> list[dict]:
    inputs = make_inputs(work, small)
    cache = work / "jax_cache"
    repeats = "1" if small else "3"
    timeout = 600
    scales = [str(s) for s in (SMALL_SCALES if small else SCALES)]
    common = ["--weights", inputs["weights"], "--out", str(work), "--cache-dir", str(cache),
              "--scales", *scales, "--scenes", *inputs["scenes"]]
    ref = run_worker("torch", [*common, "--repeats", repeats, "--folder", *inputs["folder"]],
                     timeout)
    runs = {}
    for variant in dict.fromkeys(["f32", *variants]):
        folder = ["--folder", *inputs["folder"]] if variant == "f32" else []
        try:
            runs[variant] = run_worker(
                "jax", [*common, "--variant", variant, "--repeats", repeats, *folder], timeout)
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            runs[variant] = {"error": str(err)[-500:]}
    # A fresh process, same cache: the first call of the first size loads its programs.
    try:
        cached = run_worker("jax", [*common[:-len(inputs["scenes"])], inputs["scenes"][0],
                                    "--variant", "f32", "--repeats", "0"], timeout)
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        cached = {"error": str(err)[-500:]}

    rows = []
    for k, path in enumerate(inputs["scenes"]):
        h, w = np.load(path)["mask"].shape
        r = ref["scenes"][k]
        for variant, run in runs.items():
            row = {"case": f"refine {w}x{h}", "variant": variant}
            if "error" in run:
                rows.append({**row, "error": run["error"]})
                continue
            j = run["scenes"][k]
            row.update({
                "time_ms": 1e3 * j["seconds"], "reference_ms": 1e3 * r["seconds"],
                "time_ratio": j["seconds"] / r["seconds"],
                "first_call_s": j["first_call_seconds"], "programs": j["programs"],
                "peak_gb": j["peak_bytes"] / 1e9, "reference_peak_gb": r["peak_bytes"] / 1e9,
                "memory_ratio": j["peak_bytes"] / r["peak_bytes"] if r["peak_bytes"] else None,
                "agreement": j.get("agreement"), "foreground": j["foreground"],
            })
            rows.append(row)
    first = cached.get("scenes", [{}])[0]
    rows.append({"case": "first call from the persistent cache, new process",
                 "variant": "f32", "first_call_s": first.get("first_call_seconds"),
                 "programs": first.get("programs"), **({"error": cached["error"]}
                                                        if "error" in cached else {})})
    f32 = runs["f32"]
    if "folder_seconds" in f32:
        n = len(inputs["folder"])
        rows.append({
            "case": f"folder of {n} images (refine_batch)", "variant": "f32",
            "time_ms": 1e3 * f32["folder_seconds"], "reference_ms": 1e3 * ref["folder_seconds"],
            "time_ratio": f32["folder_seconds"] / ref["folder_seconds"],
            "throughput_ratio": ref["folder_seconds"] / f32["folder_seconds"],
            "first_call_s": f32["folder_first_seconds"], "programs": f32["folder_programs"],
        })
    for row in rows:
        row["device"] = f32.get("device", "?") + " / torch " + ref["device"]
    return rows


def external_section(module: str, small: bool) -> list[dict]:
    """A section written in its own module (`run(small) -> rows`)."""
    try:
        section = __import__(module)
    except ImportError as err:
        return [{"case": module, "error": f"not available: {err}"}]
    return section.run(small)


SECTIONS = {
    "crm": crm_section,
    "na": lambda small, work, variants: external_section("accelerator_na", small),
    "train": lambda small, work, variants: external_section("accelerator_train", small),
}


def markdown(name: str, rows: list[dict]) -> str:
    """Rows as one markdown table (columns: union of keys in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value).replace("\n", " ").replace("|", "/")[:120]

    lines = [f"### {name}", "", "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny sizes, runs on CPU")
    parser.add_argument("--sections", nargs="+", choices=sorted(SECTIONS),
                        default=list(SECTIONS))
    parser.add_argument("--out", default=".", help="folder for accelerator.{json,md}")
    parser.add_argument("--worker", choices=["torch", "jax"], help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--scenes", nargs="*", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--folder", nargs="*", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="Refiner variants of the crm section")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--scales", type=float, nargs="+", default=SCALES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker_torch(args) if args.worker == "torch" else worker_jax(args)
        print(json.dumps(result))
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, tables = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sections:
            start = time.perf_counter()
            try:
                rows = SECTIONS[name](args.small, Path(tmp), args.variants)
            except Exception:  # a broken section must not lose the others' figures
                rows = [{"case": name, "error": traceback.format_exc()[-1500:]}]
            results[name] = rows
            tables.append(markdown(f"{name} ({time.perf_counter() - start:.0f} s)", rows))
            (out / "accelerator.json").write_text(json.dumps(results, indent=1))
            print(tables[-1], flush=True)
    (out / "accelerator.md").write_text("\n".join(tables))
    print("\n".join(tables))


if __name__ == "__main__":
    main()
