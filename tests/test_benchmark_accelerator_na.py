"""benchmarks/accelerator_na.py runs end to end on CPU (interpret mode, tiny shapes)."""

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import accelerator_na  # noqa: E402


def test_small_run_rows():
    rows = accelerator_na.run(small=True)
    assert [r["case"].split()[0] for r in rows] == ["na2d", "pna"]
    for row in rows:
        assert set(row) == set(accelerator_na.KEYS) and row["error"] == "", row
        for key in accelerator_na.KEYS[1:-1]:
            if row["case"].startswith("pna") and key.endswith("_fwd_ms"):
                assert math.isnan(row[key])  # the model: forward+backward only
                continue
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] >= 0
        assert row["max_rel_err"] < 1e-5 and row["max_rel_err_grad"] < 1e-4
