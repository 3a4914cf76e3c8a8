"""PNA through the shared training system: a tiny model trains a few steps, exports, resumes
exactly, stops on a non-finite loss; per-stage evaluation and evaluate.py's dispatch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from train_helpers import (  # noqa: F401
    ROOT,
    compilation_cache,
    load_config,
    with_overrides,
)

from jax_refine.models import pna as pna_lib
from jax_refine.train import evaluate_pna, loop

TINY_PNA = {
    "model.depth": 18,
    "model.width": 8,
    "model.embed_dims": (32, 32, 32, 32),
    "model.window_sizes": (3, 3, 3, 3),
    "model.head_kwargs": {"channels": 16, "num_convs": 1},
    "dataset.min_size": 64,
    "dataset.max_size": 96,
    "crop_size": (64, 64),
    "batch_size": 2,
    "total_steps": 4,
    "checkpoint_every": 2,
    "log_every": 1,
    "eval.synthetic_size": 64,
    "eval.num_images": 2,
    "eval.num_pngs": 1,
}


def tiny_pna_config(**overrides):
    return with_overrides(load_config("pna_synthetic"), {**TINY_PNA, **overrides})


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]


def test_pna_trains_exports_and_resumes_exactly(tmp_path):
    config = tiny_pna_config(eval_every=4)  # per-stage mIoU inside the loop at the end
    state = loop.train_and_evaluate(config, tmp_path / "run")
    assert int(state.step) == 4
    model, variables, kwargs = pna_lib.load_checkpoint(tmp_path / "run" / "pna")
    assert kwargs["depth"] == 18 and model.pna_head.embed_dims == (32, 32, 32, 32)
    for a, b in zip(_leaves(variables["params"]), _leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    import tensorflow as tf

    tags = {v.tag for e in tf.compat.v1.train.summary_iterator(str(events[0]))
            for v in e.summary.value}
    assert {"loss", "loss_p0", "loss_p4", "lr", "grad_norm", "eval/synthetic64/P0_miou",
            "eval/synthetic64/P4_miou", "eval/synthetic64"} <= tags
    in_loop = json.loads((tmp_path / "run" / "eval" / "step_4" / "metrics.json").read_text())
    config.eval_every = 0

    # Exact resume: drop the last checkpoint and the export; the rerun restarts at step 2
    # (state, rng and data position restored) and ends with the same parameters.
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")
    shutil.rmtree(tmp_path / "run" / "pna")
    resumed = loop.train_and_evaluate(config, tmp_path / "run")
    for part in ("params", "batch_stats", "opt_state"):
        for a, b in zip(_leaves(getattr(resumed, part)), _leaves(getattr(state, part)),
                        strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)

    # Per-stage evaluation of the export on held-out scenes.
    results = evaluate_pna.evaluate(config, tmp_path / "run" / "pna", tmp_path / "eval")
    (name, r), = results.items()
    assert name == "synthetic64" and r["num_images"] == 2
    assert list(r["stages"]) == ["P0", "P1", "P2", "P3", "P4"]
    assert all(0.0 <= s["miou"] <= 1.0 for s in r["stages"].values())
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == results
    assert len(r["pngs"]) == 1
    from PIL import Image

    assert Image.open(r["pngs"][0]).size == (4 * 256, 256)  # image | P0 | P4 | GT
    table = evaluate_pna.markdown_table(results)
    assert "| synthetic64 | 2 |" in table and "P4 mIoU" in table
    # evaluate.py's code is the loop's: the same scores for the same weights.
    assert {k: v["miou"] for k, v in r["stages"].items()} == pytest.approx(
        {k: v["miou"] for k, v in in_loop["synthetic64"]["stages"].items()}, abs=1e-6)

    # Shape buckets: two image sizes in one 64-px bucket compile once; an image that fills
    # its bucket gets the one-image computation's argmaxes.
    predictor = evaluate_pna.Predictor(model, batch_size=2)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
              rng.integers(0, 256, (50, 37, 3), dtype=np.uint8)]
    preds = predictor(variables, images)
    assert predictor.trace_count == 1 and preds[1].shape == (5, 50, 37)
    stages = model.apply(variables, images[0][None].astype(np.float32), train=False)
    direct = np.stack([np.asarray(x[0]).argmax(-1)
                       for x in evaluate_pna.stage_logits_at(stages, (64, 64), (64, 64))])
    assert np.mean(preds[0] == direct) > 0.999


def test_pna_non_finite_loss_stops_with_the_step(tmp_path):
    config = tiny_pna_config(learning_rate=1e38, clip_norm=1e38, checkpoint_every=1)
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at step \d+"):
        loop.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run" / "pna").exists()


def test_stage_evaluation_matches_a_direct_computation():
    """Upsample each stage to the (padded) input, crop, argmax, confusion matrix."""
    rng = np.random.default_rng(0)
    k, h, w = 3, 45, 39
    sizes = [(2, 2), (4, 4), (16, 16)]  # a padded 64x64 input at strides 32, 16 and 4
    stages = [rng.normal(0, 1, (1, *s, k)).astype(np.float32) for s in sizes]
    padded = (64, 64)
    out = evaluate_pna.stage_logits_at(stages, padded, (h, w))
    torch = pytest.importorskip("torch")
    for x, got in zip(stages, out, strict=True):
        ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2),
                                              size=padded, mode="bilinear",
                                              align_corners=False)
        ref = ref.permute(0, 2, 3, 1).numpy()[:, :h, :w]
        np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5)
    labels = rng.integers(0, k, (h, w)).astype(np.uint8)
    labels[:3] = 255
    preds = [np.asarray(x[0]).argmax(-1) for x in out]
    sample = evaluate_pna.Sample("s", np.zeros((h, w, 3), np.uint8), labels)
    r = evaluate_pna.evaluate_samples(lambda images: [np.stack(preds)], iter([sample]), k)
    for i, pred in enumerate(preds):
        valid = labels != 255
        ious = []
        for c in range(k):
            inter = np.sum((pred == c) & (labels == c) & valid)
            union = np.sum(((pred == c) | (labels == c)) & valid)
            if union:
                ious.append(inter / union)
        assert r["stages"][f"P{i}"]["miou"] == pytest.approx(np.mean(ious))


def test_palette_is_voc_and_ignore_is_white():
    p = evaluate_pna.palette()
    assert p[0].tolist() == [0, 0, 0] and p[1].tolist() == [128, 0, 0]
    assert p[2].tolist() == [0, 128, 0] and p[15].tolist() == [192, 128, 128]
    assert p[255].tolist() == [255, 255, 255]


@pytest.mark.slow
def test_train_and_evaluate_commands(tmp_path):
    flags = []
    for key, value in TINY_PNA.items():
        if isinstance(value, tuple):
            value = "(" + ",".join(str(v) for v in value) + ",)"
        if not isinstance(value, dict):
            flags.append(f"--config.{key}={value}")
    flags += ["--config.model.head_kwargs.channels=16", "--config.model.head_kwargs.num_convs=1",
              "--config.total_steps=1"]
    config = str(ROOT / "configs" / "pna_synthetic.py")
    for script in ("train.py", "evaluate.py"):
        proc = subprocess.run([sys.executable, str(ROOT / script), "--config", config,
                               "--workdir", str(tmp_path / "run"), *flags], cwd=ROOT,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| synthetic64 | 2 |" in proc.stdout
    assert (tmp_path / "run" / "eval" / "metrics.json").is_file()


def test_folder_samples_read_a_semantic_folder_split(tmp_path):
    from PIL import Image

    from jax_refine.data import tfds as jtfds

    rng = np.random.default_rng(0)
    for d in ("img", "lbl"):
        (tmp_path / d).mkdir()
    labels = {}
    for k in range(3):  # 0 and 2 PNG, 1 JPEG (stored as its file)
        Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(
            tmp_path / "img" / f"{k}.{'jpg' if k == 1 else 'png'}")
        labels[str(k)] = rng.integers(0, 2, (20, 28)).astype(np.uint8)
        labels[str(k)][0] = 255
        Image.fromarray(labels[str(k)]).save(tmp_path / "lbl" / f"{k}.png")
    kwargs = {"images": str(tmp_path / "img"), "labels": str(tmp_path / "lbl"),
              "class_names": "a,b", "split": "val"}
    records = jtfds.data_source("semantic_folder", data_dir=str(tmp_path / "tfds"),
                                split="val", builder_kwargs=kwargs)
    samples = list(evaluate_pna.folder_samples(records, limit=2))
    assert len(samples) == 2
    for s in samples:
        assert s.image.shape == (20, 28, 3) and s.label.shape == (20, 28)
        np.testing.assert_array_equal(s.label, labels[s.name])
        if s.name == "1":  # the JPEG: Pillow's pixels, as the references decode it
            np.testing.assert_array_equal(s.image, np.asarray(Image.open(tmp_path / "img" /
                                                                         "1.jpg")))
