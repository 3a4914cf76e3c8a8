"""Refiner on accelerators: device-resident cascade, batches over devices, dtype, precision,
lowering for GPU/TPU, and the accelerator benchmark's CPU run."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_refine.data.synthetic import make_scene
from jax_refine.models.crm import CRM
from jax_refine.refine import PAD, Refiner, _reflect_index, bucket_side

ROOT = Path(__file__).resolve().parents[1]
SCALES = (0.5, 1.0)
SMALL_CRM = dict(depth=18, width=8, fusion_channels=(8, 8, 8), latent_channels=16, hidden=(8, 8))


def scene(h, w, seed=0):
    image, label = make_scene(seed, h, w)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 5 : h - h // 4, w // 6 : w - w // 3] = 255  # a box: a coarse, wrong-ish mask
    return image, np.where(label > 0, mask, mask // 2)


def decisive_variables(model: CRM, seed: int = 0) -> dict:
    """Random variables whose logits are spread out (last layer x 40) and centred (its bias
    minus the median logit on a probe scene), so that binary comparisons between precisions
    are about the arithmetic, not about a model whose outputs all sit near 0.5 or at 1."""
    image, mask = scene(32, 32, seed=seed)
    image = jnp.asarray(image[None] / 255.0 - 0.5, jnp.float32)
    mask = jnp.asarray(mask[None, :, :, None] / 127.5 - 1, jnp.float32)
    coord = jnp.stack(jnp.meshgrid(*[jnp.linspace(-0.97, 0.97, 32)] * 2, indexing="ij"), -1)
    coord = coord.reshape(1, -1, 2)
    cell = jnp.full_like(coord, 2 / 32)
    init = jax.jit(model.init_with_output)
    logits, variables = init(jax.random.PRNGKey(seed), image, mask, coord, cell)
    last = f"layers_{2 * len(model.hidden)}"
    params = jax.tree.map(lambda a: a, variables["params"])
    layer = params["imnet"][last]
    # The last layer is linear: x 40 scales the logits, the bias shift centres them.
    params["imnet"][last] = {"kernel": layer["kernel"] * 40,
                             "bias": (layer["bias"] - jnp.median(logits)) * 40}
    return {"params": params, "batch_stats": variables["batch_stats"]}


@pytest.fixture(scope="module")
def small():
    model = CRM(**SMALL_CRM)
    return model, decisive_variables(model)


@pytest.fixture(scope="module")
def refiner(small):
    return Refiner(*small)


def test_reflect_index_equals_numpy_pad():
    for n in range(1, 9):
        want = np.pad(np.arange(n), PAD, mode="reflect")
        got = np.asarray(_reflect_index(n + 2 * PAD + 5, n, PAD))
        np.testing.assert_array_equal(got[: n + 2 * PAD], want)
        assert got.min() >= 0 and got.max() < n


def test_bucket_ladder_is_coarse_and_bounded():
    sides = [bucket_side(n, "ladder") for n in range(1, 8000)]
    assert all(s >= n and s % 64 == 0 for n, s in enumerate(sides, start=1))
    assert all(s <= n * 1.25 for n, s in enumerate(sides, start=1) if n > 512)
    assert len({bucket_side(n + 2 * PAD, "ladder") for n in range(2000, 6001)}) == 6


def test_refine_is_device_resident(refiner):
    """One explicit upload and one explicit download: no implicit transfer anywhere."""
    image, mask = scene(37, 53)
    with jax.transfer_guard("disallow"):
        first = refiner.refine(image, mask, SCALES)
        steps = refiner.refine_steps(image, mask, SCALES)
    np.testing.assert_array_equal(steps[-1], first)
    assert 0.05 < (first > 0.5).mean() < 0.95


def test_bfloat16_agrees_with_float32(small, refiner):
    image, mask = scene(60, 58, seed=3)  # the bucket of the test above: no new compilation
    want = refiner.refine(image, mask, SCALES)
    got = Refiner(*small, dtype="bfloat16").refine(image, mask, SCALES)
    assert got.dtype == np.float32 and np.all(np.isfinite(got))
    assert 0.05 < (want > 0.5).mean() < 0.95
    assert ((got > 0.5) == (want > 0.5)).mean() >= 0.98
    assert np.abs(got - want).mean() < 0.02


def test_invalid_dtype_precision_and_bucket_raise(small):
    for kwargs, match in (({"dtype": "int32"}, "dtype"), ({"precision": "fast"}, "precision"),
                          ({"bucket": 0}, "bucket")):
        with pytest.raises(ValueError, match=match):
            Refiner(*small, **kwargs)


def test_programs_lower_for_gpu_and_tpu(small):
    """The preparation and every scale's program lower for cuda and tpu; the loop shapes
    differ from the CPU program's (the decoder's block rows are chosen per platform)."""
    refiner = Refiner(*small, precision="default")
    exported = refiner.export((300, 500), scales=(0.25, 1.0))
    assert len(exported) == 3
    for program in exported:
        assert set(program.platforms) == {"cuda", "tpu"}
    gpu = refiner.export((300, 500), scales=(1.0,), platforms=("cuda",))[1].mlir_module()
    cpu = refiner.export((300, 500), scales=(1.0,), platforms=("cpu",))[1].mlir_module()
    assert "stablehlo.convolution" in gpu and gpu != cpu


MULTI_DEVICE = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    import jax
    from test_refine_accelerator import SMALL_CRM, decisive_variables, scene
    from jax_refine.models.crm import CRM
    from jax_refine.refine import Refiner
    model = CRM(**SMALL_CRM)
    refiner = Refiner(model, decisive_variables(model))
    sizes = [(37, 53), (40, 50), (70, 41), (35, 56), (38, 52)]  # buckets 128x128, 192x128
    pairs = [scene(h, w, seed=k) for k, (h, w) in enumerate(sizes)]
    pairs[3] = (pairs[3][0], np.zeros_like(pairs[3][1]))  # an empty mask in a batch
    with jax.transfer_guard("disallow"):
        batch = refiner.refine_batch([p[0] for p in pairs], [p[1] for p in pairs], (1.0,))
    single = [refiner.refine(*p, (1.0,)) for p in pairs]
    print(json.dumps({{
        "devices": jax.local_device_count(),
        "shapes_ok": all(b.shape == s for b, s in zip(batch, sizes)),
        "max_diff": max(float(np.abs(b - s).max()) for b, s in zip(batch, single)),
        "empty_is_zero": bool((batch[3] == 0).all()),
        "foreground": [float((b > 0.5).mean()) for b in batch],
    }}))
""")


def test_refine_batch_over_devices_equals_refine():
    """Mixed sizes (two buckets), one empty mask, sharded over 4 CPU devices."""
    flags = os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=4"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    code = MULTI_DEVICE.format(tests=str(ROOT / "tests"))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4
    assert result["shapes_ok"] and result["empty_is_zero"]
    assert result["max_diff"] <= 1e-5
    assert sum(f > 0.01 for f in result["foreground"]) == 4


def test_accelerator_benchmark_runs_small(tmp_path):
    out = subprocess.run(
        [sys.executable, "benchmarks/accelerator.py", "--small", "--sections", "crm",
         "--variants", "f32", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "accelerator.json").read_text())["crm"]
    assert any(r["case"].startswith("refine") and "agreement" in r for r in rows)
    assert "| case" in out.stdout
