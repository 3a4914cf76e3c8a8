"""Configs resolve; the loop writes summaries and a Refiner export; init_from; NaN stops."""

from __future__ import annotations

import glob
import json

import jax
import numpy as np
import pytest
from train_helpers import ROOT, compilation_cache, load_config, tiny_config  # noqa: F401

from jax_refine.data import pipeline
from jax_refine.models import pna
from jax_refine.refine import Refiner, load_checkpoint
from jax_refine.train import loop, optim

CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py"))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_resolves(name):
    from ml_collections import config_flags  # noqa: F401  (the loader train.py uses)

    config = load_config(name)
    config.lock()
    with pytest.raises(AttributeError):
        config.no_such_field = 1  # locked: typos fail
    for key in ("dataset", "batch_size", "total_steps", "learning_rate", "checkpoint_every",
                "log_every", "seed", "keep_checkpoints", "dtype", "init_from", "eval"):
        assert key in config, key
    model = loop.build_model(config)  # model fields are the task's constructor arguments
    tx, schedule = loop.build_optimizer(config)
    warmup = config.get("warmup_ratio", 1.0) if config.get("warmup_steps", 0) else 1.0
    assert float(schedule(0)) == pytest.approx(config.learning_rate * warmup)
    augment = loop.build_augment(config)
    if loop.task_name(config) == "pna":
        assert model.pna_head.num_classes == config.model.num_classes
        assert augment.crop == pipeline.crop_hw(config.crop_size)
        # The PNA export stores exactly the build_pna arguments.
        assert pna.build_pna(**loop.pna_build_kwargs(config)) == model
    else:
        assert model.depth in (18, 34, 50, 101)
        # Derived values are computed from the (possibly overridden) fields.
        boundaries = optim.piecewise_boundaries(config.total_steps, config.lr_boundaries)
        assert 0 < boundaries[0] < boundaries[1] <= config.total_steps


def test_pna_paper_configs_follow_the_official_recipes():
    voc = load_config("pna_voc_r50_fcn")
    assert (voc.model.coarse_head, voc.model.depth, voc.model.num_classes) == ("fcn", 50, 21)
    assert (voc.crop_size, voc.batch_size, voc.total_steps) == ((512, 512), 16, 20_000)
    # (pna_voc_r50_fcn is the mmseg recipe: tests/test_mmseg_configs.py)
    for name in ("pna_cityscapes_r101_deeplabv3", "pna_cityscapes_r101_fpn", "pna_deepglobe",
                 "pna_trans10k"):
        c = load_config(name)
        assert (c.learning_rate, c.weight_decay, c.lr_power, c.clip_norm, c.batch_size) == (
            1e-4, 0.01, 0.9, 0.01, 16), name
    cs = load_config("pna_cityscapes_r101_deeplabv3")
    assert (cs.model.coarse_head, cs.model.depth, cs.model.num_classes) == ("deeplabv3", 101, 19)
    assert cs.crop_size == (512, 1024) and cs.total_steps == 90_000
    assert tuple(cs.model.pool_kernel_size) == (32, 64)
    fpn = load_config("pna_cityscapes_r101_fpn")
    assert fpn.model.coarse_head == "semantic_fpn" and tuple(fpn.model.window_sizes) == (7,) * 4
    assert (fpn.loss.coarse_loss, fpn.loss.stage_loss) == ("cross_entropy", "cross_entropy")
    dg = load_config("pna_deepglobe")
    assert (dg.model.num_classes, dg.crop_size, dg.total_steps) == (7, (508, 508), 4_000)
    tr = load_config("pna_trans10k")
    assert (tr.model.upsample_mode, tr.model.num_classes, tr.total_steps) == ("bilinear", 3, 8_000)


def test_paper_config_is_the_paper_recipe():
    c = load_config("crm_paper")
    assert (c.model.depth, c.batch_size, c.total_steps, c.learning_rate) == (50, 12, 45_705,
                                                                            2.25e-4)
    assert optim.piecewise_boundaries(c.total_steps, c.lr_boundaries) == [22_500, 37_500]
    assert c.weight_decay == 1e-4 and c.crop_size == 224


def test_train_exports_refiner_and_summaries(tmp_path):
    # In-loop evaluation at the end (eval_every): one tiny held-out scene per coarse kind.
    config = tiny_config(total_steps=2, checkpoint_every=2, eval_every=2,
                         **{"eval.synthetic_size": 48, "eval.num_images": 1,
                            "eval.scales": (1.0,), "eval.num_pngs": 2})
    state = loop.train_and_evaluate(config, tmp_path / "run")
    assert int(state.step) == 2
    events = glob.glob(str(tmp_path / "run" / "tensorboard" / "events.out.tfevents.*"))
    assert events
    import tensorflow as tf

    tags = {v.tag for e in tf.compat.v1.train.summary_iterator(events[0])
            for v in e.summary.value}
    assert {"loss", "loss_bce", "loss_l1", "loss_mse", "loss_sobel", "lr", "grad_norm",
            "steps_per_sec"} <= tags
    for kind in ("perturb", "lowres"):
        assert {f"eval/synthetic48_{kind}/refined_iou", f"eval/synthetic48_{kind}/coarse_mba",
                f"eval/synthetic48_{kind}"} <= tags  # scalars and the image panel
    saved = json.loads((tmp_path / "run" / "eval" / "step_2" / "metrics.json").read_text())
    assert saved["synthetic48_lowres"]["num_images"] == 1
    model, variables = load_checkpoint(tmp_path / "run" / "refiner")
    assert model.depth == 18 and model.width == 8
    for a, b in zip(jax.tree_util.tree_leaves(variables["params"]),
                    jax.tree_util.tree_leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    refiner = Refiner.from_checkpoint(tmp_path / "run" / "refiner")
    mask = np.zeros((40, 40), np.uint8)
    mask[10:30, 10:30] = 255
    prob = refiner.refine(np.zeros((40, 40, 3), np.uint8), mask, (1.0,))
    assert prob.shape == (40, 40)

    # init_from a Refiner checkpoint: training starts from those weights.
    config2 = tiny_config(total_steps=1, checkpoint_every=1, learning_rate=0.0,
                          weight_decay=0.0, init_from=str(tmp_path / "run" / "refiner"))
    state2 = loop.train_and_evaluate(config2, tmp_path / "run2")
    for a, b in zip(jax.tree_util.tree_leaves(state2.params),
                    jax.tree_util.tree_leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_non_finite_loss_stops_with_the_step(tmp_path):
    # checkpoint_every=1: before the state check, the "last good checkpoint" held NaNs.
    config = tiny_config(total_steps=6, checkpoint_every=1, learning_rate=1e38)
    with pytest.raises(FloatingPointError,
                       match=r"non-finite loss .* at step \d+.* last finite checkpoint is "):
        loop.train_and_evaluate(config, tmp_path / "run")
    # Checkpoints hold only finite states.
    from jax_refine.train.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path / "run" / "checkpoints")
    step = ckpt.latest_step()
    if step is not None:
        import orbax.checkpoint as ocp

        out = ckpt.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
        leaves = jax.tree_util.tree_leaves(out["state"]["params"])
        assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
