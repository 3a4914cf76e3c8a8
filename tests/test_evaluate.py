"""CRM evaluation: dataset-level IoU, per-image mBA, pass-through rule, outputs, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from train_helpers import ROOT

from jax_refine import metrics
from jax_refine.models.crm import CRM
from jax_refine.refine import save_checkpoint
from jax_refine.train import evaluate as ev


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = CRM(depth=18, width=8, fusion_channels=(8, 8, 8), latent_channels=16,
                hidden=(8, 8, 8, 8))
    x = jnp.zeros((1, 32, 32, 3))
    m = jnp.zeros((1, 32, 32, 1))
    q = jnp.zeros((1, 4, 2))
    variables = model.init(jax.random.key(0), x, m, q, q)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "refiner", model, variables)


def _big_folder(path, rng):
    path.mkdir()
    for name, coarse_pixels in (("a", None), ("b", 3)):
        image = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        gt = np.zeros((40, 48), np.uint8)
        gt[10:30, 12:36] = 255
        if coarse_pixels is None:
            seg = np.zeros_like(gt)
            seg[12:30, 10:34] = 255
        else:  # fewer than 4 pixels (< 32 * 32 in 0..255 units): passed through
            seg = np.zeros_like(gt)
            seg[0, :coarse_pixels] = 255
        Image.fromarray(image).save(path / f"{name}_im.jpg")
        Image.fromarray(gt).save(path / f"{name}_gt.png")
        Image.fromarray(seg).save(path / f"{name}_seg.png")


class _Identity:
    """A stand-in Refiner whose every step returns the coarse mask (probability 1 / 0)."""

    def __init__(self):
        self.calls = 0

    def refine_steps(self, image, mask, scales):
        self.calls += 1
        return [mask.astype(np.float32)] * len(scales)

    def refine_batch(self, images, masks, scales):
        self.calls += 1
        return [mask.astype(np.float32) for mask in masks]


class _Growing:
    """A stand-in Refiner whose step k returns the coarse mask dilated by k pixels."""

    def refine_steps(self, image, mask, scales):
        kernel = np.ones((3, 3), np.uint8)
        return [cv2.dilate(mask.astype(np.uint8), kernel, iterations=k).astype(np.float32)
                for k in range(len(scales))]


def test_metrics_are_dataset_iou_and_mean_mba(tmp_path):
    rng = np.random.default_rng(0)
    _big_folder(tmp_path / "big", rng)
    refiner = _Identity()
    samples = list(ev.big_folder(tmp_path / "big"))
    result = ev.evaluate_samples(refiner, iter(samples), (1.0,), out_dir=tmp_path / "png",
                                 num_pngs=1)
    assert refiner.calls == 1  # 'b' has a 3-pixel coarse mask: passed through unrefined
    inter = sum(metrics.intersection_union(s.coarse, s.gt)[0] for s in samples)
    union = sum(metrics.intersection_union(s.coarse, s.gt)[1] for s in samples)
    assert result["coarse"]["iou"] == pytest.approx(inter / union)
    mba = np.nanmean([metrics.boundary_accuracy(s.coarse, s.gt) for s in samples])
    assert result["coarse"]["mba"] == pytest.approx(mba)
    assert result["refined"] == result["coarse"]
    assert result["steps"] == [{"scale": 1.0, **result["coarse"]}]
    assert result["num_images"] == 2 and len(result["pngs"]) == 1
    png = np.asarray(Image.open(result["pngs"][0]))
    assert png.shape == (512, 4 * round(48 * 512 / 40), 3)  # image | coarse | refined | GT
    table = ev.markdown_table({"big": result})
    assert table.splitlines()[0].startswith("| set |") and "| big | 2 |" in table


def test_batched_evaluation_scores_the_last_step(tmp_path):
    """per_step=False (the training loop's): one refine_batch call per chunk, same scores."""
    rng = np.random.default_rng(0)
    _big_folder(tmp_path / "big", rng)
    samples = list(ev.big_folder(tmp_path / "big"))
    per_image = ev.evaluate_samples(_Identity(), iter(samples), (0.5, 1.0))
    refiner = _Identity()
    batched = ev.evaluate_samples(refiner, iter(samples), (0.5, 1.0), per_step=False)
    assert refiner.calls == 1  # 'a' refined in one batch, 'b' passed through
    assert batched["refined"] == per_image["refined"] and batched["coarse"] == per_image["coarse"]
    assert batched["steps"] == [{"scale": 1.0, **per_image["refined"]}]


def test_every_step_of_the_schedule_is_scored(tmp_path):
    rng = np.random.default_rng(0)
    _big_folder(tmp_path / "big", rng)
    samples = list(ev.big_folder(tmp_path / "big"))
    scales = (0.25, 0.5, 1.0)
    result = ev.evaluate_samples(_Growing(), iter(samples), scales)
    assert [step["scale"] for step in result["steps"]] == list(scales)
    for k, step in enumerate(result["steps"]):
        preds = [cv2.dilate(s.coarse, np.ones((3, 3), np.uint8), iterations=k)
                 if s.name == "a" else s.coarse for s in samples]  # 'b' is passed through
        pairs = list(zip(preds, [s.gt for s in samples], strict=True))
        inter, union = np.sum([metrics.intersection_union(p, gt) for p, gt in pairs], axis=0)
        assert step["iou"] == pytest.approx(inter / union)
        mba = np.nanmean([metrics.boundary_accuracy(p, gt) for p, gt in pairs])
        assert step["mba"] == pytest.approx(mba)
    assert result["refined"] == {k: v for k, v in result["steps"][-1].items() if k != "scale"}
    assert result["steps"][0]["iou"] != result["steps"][2]["iou"]
    rows = ev.steps_table({"big": result}).splitlines()
    assert rows[0] == "| set | after scale | IoU | mBA |" and rows[3].startswith("| big | 0.5 |")


def test_big_folder_errors(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match="no \\*_im"):
        list(ev.big_folder(tmp_path / "x"))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x" / "a_im.jpg")
    with pytest.raises(ValueError, match="missing a_gt"):
        list(ev.big_folder(tmp_path / "x"))


def test_synthetic_coarse_kinds():
    gt = np.zeros((256, 256), np.uint8)
    gt[60:200, 50:180] = 1
    for kind in ("perturb", "lowres"):
        coarse = ev.synthetic_coarse(gt, kind, 0)
        assert coarse.shape == gt.shape and set(np.unique(coarse)) <= {0, 1}
        assert 0.5 < metrics.iou(coarse, gt) < 1.0
    with pytest.raises(ValueError, match="unknown coarse kind"):
        ev.synthetic_coarse(gt, "nope", 0)


def test_evaluate_writes_metrics(checkpoint, tmp_path):
    results = ev.evaluate(checkpoint, tmp_path / "out", num_images=1, synthetic_size=64,
                          scales=(0.5, 1.0), num_pngs=2)
    assert set(results) == {"synthetic64_perturb", "synthetic64_lowres"}
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(results))
    for r in results.values():
        assert 0 <= r["refined"]["iou"] <= 1 and len(r["pngs"]) == 1


def test_evaluate_command_line(checkpoint, tmp_path):
    rng = np.random.default_rng(1)
    _big_folder(tmp_path / "big", rng)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), "--config",
         str(ROOT / "configs" / "crm_synthetic.py"), "--checkpoint", str(checkpoint),
         "--out", str(tmp_path / "out"), f"--config.eval.folder={tmp_path / 'big'}",
         "--config.eval.scales=(1.0,)"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| big | 2 |" in proc.stdout
    assert (tmp_path / "out" / "metrics.json").is_file()
