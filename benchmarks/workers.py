"""Run one side of a benchmark in a fresh Python process (shared by the benchmarks).

A worker is the benchmark script itself called with `--worker KIND ...`; it prints a JSON
dict as its last line of stdout. Each side gets its own process so that peak-memory
readings and thread pools do not mix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_worker(script: str, kind: str, args: list[str], threads: int) -> dict:
    """`python script --worker kind *args` with the repository on PYTHONPATH -> its JSON dict.

    The torch side gets OMP_NUM_THREADS=threads. Raises RuntimeError with the worker's stderr
    tail if it fails.
    """
    cmd = [sys.executable, script, "--worker", kind, *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if kind == "torch":
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
