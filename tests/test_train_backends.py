"""Training by backend: the paper's CRM step and a PNA step lower for CUDA and TPU without a
while loop (the per-tap kernel gradient and the tiled neighbourhood attention are
CPU-only), the CPU kernel gradient is unchanged, the accelerator benchmark section runs
(tiny shapes), and in it bfloat16 CRM and PNA steps train as float32 ones do.

The bfloat16 checks read the benchmark's small rows: each of its JAX cases trains the
library's jitted step (`jit_train_step` over `crm_train_step` / `pna_train_step`) for 11
steps from the same initial state in float32 and in bfloat16, so the four XLA:CPU compiles
(~1 min on 2 cores, most of this module's time) are paid once.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import ROOT

from jax_refine.models import pna as pna_lib
from jax_refine.models.backbones import resnet
from jax_refine.models.crm import CRM
from jax_refine.train import optim, step
from jax_refine.train.state import create_state

ACCELERATORS = ["cuda", "tpu"]
# On GPU the neighbourhood attention is the Pallas kernel: the export holds its Triton
# calls, which jax.export accepts only when told to.
TRITON = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")


def lowered_text(fn, args, platform: str) -> str:
    """StableHLO text of jit(fn)(*args) exported for `platform` (args may be abstract)."""
    exported = jax.export.export(jax.jit(fn), platforms=[platform],
                                 disabled_checks=[TRITON])(*args)
    return exported.mlir_module()


def abstract_state(model, tx, example):
    return jax.eval_shape(functools.partial(create_state, model, tx, example=example),
                          jax.random.key(0))


@pytest.fixture(scope="module")
def crm_paper_step():
    """The step of configs/crm_paper.py (ResNet-50 CRM, every query, the paper's Adam) on
    abstract inputs; a batch of 2 x 32 px instead of 12 x 224 (the program is the same)."""
    model = CRM()
    tx, schedule = optim.crm_optimizer(2.25e-4, 45_000)
    b, c = 2, 32
    batch = {"image": jax.ShapeDtypeStruct((b, c, c, 3), jnp.float32),
             "mask": jax.ShapeDtypeStruct((b, c, c, 1), jnp.float32),
             "gt": jax.ShapeDtypeStruct((b, c, c, 1), jnp.float32)}
    state = abstract_state(model, tx, step.example_inputs(1, c))
    fn = functools.partial(step.crm_train_step, model=model, tx=tx, schedule=schedule)
    return fn, (state, batch)


@pytest.mark.parametrize("platform", ACCELERATORS)
def test_crm_paper_step_lowers_without_while_loops(crm_paper_step, platform):
    text = lowered_text(*crm_paper_step, platform)
    assert text.count("stablehlo.while") == 0
    # Every gradient is a convolution: the model's 47 and the Sobel loss's 6 forward, the
    # input and kernel gradients of the model's (not the stem's input gradient: 93) and the
    # input gradients of the 3 Sobel convolutions of the prediction.
    assert text.count("stablehlo.convolution") == 53 + 93 + 3


def tiny_pna(dtype=jnp.float32):
    return pna_lib.build_pna("fcn", 3, depth=18, width=8, embed_dims=(32,) * 4,
                             window_sizes=(3,) * 4, head_kwargs={"channels": 16, "num_convs": 1},
                             dtype=dtype)


@pytest.fixture(scope="module")
def pna_step():
    """A PNA step (tiny ResNet-18 + FCN + PNA head, every op of the paper's) on abstract
    inputs."""
    model = tiny_pna()
    tx, schedule = optim.pna_optimizer(1e-4, 100)
    state = abstract_state(model, tx, step.pna_example_inputs(1, (64, 64)))
    batch = {"image": jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32),
             "label": jax.ShapeDtypeStruct((2, 64, 64), jnp.int32)}
    fn = functools.partial(step.pna_train_step, model=model, tx=tx, schedule=schedule)
    return fn, (state, batch)


@pytest.mark.parametrize("platform, kernel", [("cuda", "__gpu$xla.gpu.triton"),
                                              ("tpu", "tpu_custom_call")])
def test_pna_step_lowers_with_the_fused_attention(pna_step, platform, kernel):
    """The default neighbourhood attention is chosen by the platform lowered for: the fused
    Pallas kernel on GPU/TPU (forward and backward kernels in each of the 4 stages), none of
    the CPU kernels' while loops."""
    text = lowered_text(*pna_step, platform)
    assert "stablehlo.convolution" in text
    assert text.count("stablehlo.while") == 0
    assert text.count(kernel) >= 4 * 3, text.count(kernel)


def test_conv2d_kernel_gradient_is_chosen_by_platform():
    """Per-tap (a scan: one while loop) when lowered for CPU, XLA's convolution otherwise; on
    CPU the gradient is exactly `per_tap_kernel_grad`'s."""
    args = ((2, 2), ((1, 1), (1, 1)), (1, 1))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 9, 8, resnet.PER_TAP_MIN_CHANNELS)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, resnet.PER_TAP_MIN_CHANNELS, 4)), jnp.float32)
    out, vjp = jax.vjp(lambda w: resnet.conv2d(x, w, *args), w)
    g = jnp.asarray(rng.normal(size=out.shape), jnp.float32)

    def kernel_grad(x, w, g):
        return jax.vjp(lambda w: resnet.conv2d(x, w, *args), w)[1](g)[0]

    counts = {p: lowered_text(kernel_grad, (x, w, g), p).count("stablehlo.while")
              for p in ["cpu", *ACCELERATORS]}
    assert counts == {"cpu": 1, "cuda": 0, "tpu": 0}
    got = jax.jit(kernel_grad)(x, w, g)
    per_tap = jax.jit(resnet.per_tap_kernel_grad, static_argnums=(3, 4, 5))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(per_tap(x, w, g, *args)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(resnet.xla_kernel_grad(x, w, g, *args)),
                               rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def small_section():
    pytest.importorskip("torch")
    path = ROOT / "benchmarks" / "accelerator_train.py"
    spec = importlib.util.spec_from_file_location("accelerator_train", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["accelerator_train"] = module
    spec.loader.exec_module(module)
    return module, module.run(small=True)


def test_accelerator_train_section_runs_small(small_section):
    module, rows = small_section
    assert [(r["case"], r["impl"], r["dtype"]) for r in rows] == [
        (f"{module.TASKS[t][0]}_small", impl, dtype) for t, impl, dtype in module.CASES]
    for r in rows:
        assert r["error"] == "", r["error"]
        assert tuple(r) == module.KEYS
        assert all(isinstance(v, (str, float)) for v in r.values())
        assert r["ms_per_step"] > 0 and r["timed_steps"] >= 10
        assert r["images_per_s"] == pytest.approx(r["batch"] * 1e3 / r["ms_per_step"])
        assert math.isfinite(r["vs_pytorch"]) and r["param_dtype"] == "float32"
        assert r["device"] == "cpu" and math.isnan(r["peak_device_gib"])  # no device memory


@pytest.mark.parametrize("task", ["crm", "pna"])
def test_bfloat16_step_trains_as_float32(small_section, task):
    """bfloat16 compute, float32 parameters: the first loss (same parameters) within one
    bfloat16 rounding (2^-9 relative: every convolution and dot rounds its operands to
    bfloat16 and accumulates in float32; the loss is a float32 mean over many pixels, so its
    error is smaller still; measured: 1e-5 CRM, 2e-6 PNA), yet not equal (a model that
    silently computed in float32 would give the same bits); and 10 Adam updates lower the
    loss as much as in float32 to 10% (Adam moves each parameter by about the learning rate
    whatever the gradient's scale, so 0.2% gradient noise changes the path far less;
    measured: 1.2% CRM, 1.5% PNA)."""
    module, rows = small_section
    name = module.TASKS[task][0] + "_small"
    f32, bf16 = (next(r for r in rows if r["case"] == name and r["impl"] == "jax_refine"
                      and r["dtype"] == dtype) for dtype in ("float32", "bfloat16"))
    assert bf16["loss_first"] == pytest.approx(f32["loss_first"], rel=2**-9)
    assert bf16["loss_first"] != f32["loss_first"]
    drop_f32 = f32["loss_first"] - f32["loss_last"]
    drop_bf16 = bf16["loss_first"] - bf16["loss_last"]
    assert drop_f32 > 0
    assert drop_bf16 == pytest.approx(drop_f32, rel=0.1)
    assert bf16["param_dtype"] == "float32"
