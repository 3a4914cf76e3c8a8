"""PNA's test protocol against small reference computations: the references' resize rules
and resamplers, the resize back, detectron2's SemSegEvaluator metrics, class subsets, and
the 7-class DeepGlobe setting with a converted detectron2 checkpoint mirror."""

from __future__ import annotations

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from train_helpers import load_config, with_overrides

from jax_refine import metrics
from jax_refine.data import deepglobe
from jax_refine.models import pna as pna_lib
from jax_refine.ops import image_resize
from jax_refine.train import evaluate_pna, loop

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("highest_precision")

ShortestEdge = evaluate_pna.ResizeProtocol


def _reference_shortest_edge(h, w, short, max_size):
    """detectron2 ResizeShortestEdge.get_output_shape, written out."""
    scale = short / min(h, w)
    nh, nw = (short, scale * w) if h < w else (scale * h, short)
    if max(nh, nw) > max_size:
        nh, nw = nh * max_size / max(nh, nw), nw * max_size / max(nh, nw)
    return int(nh + 0.5), int(nw + 0.5)


def test_resize_rules_of_detectron2_and_mmseg():
    d2 = ShortestEdge("shortest_edge", min_size=1024, max_size=2048)
    assert d2.output_shape(2448, 2448) == (1024, 1024)  # DeepGlobe
    assert d2.output_shape(1024, 2048) == (1024, 2048)  # Cityscapes: identity
    trans10k = ShortestEdge("shortest_edge", min_size=512, max_size=2048)
    for h, w in ((1080, 1440), (600, 800), (375, 500), (512, 4000), (3000, 333)):
        assert trans10k.output_shape(h, w) == _reference_shortest_edge(h, w, 512, 2048)
    assert trans10k.output_shape(512, 4000) == (262, 2048)  # max size binds: 512 * 2048 / 4000
    mm = ShortestEdge("keep_ratio", scale=(2048, 512))
    # mmcv.rescale_size: factor min(2048 / long, 512 / short), sides int(x * factor + 0.5).
    assert mm.output_shape(375, 500) == (512, 683)  # 500 * 512 / 375 = 682.67
    assert mm.output_shape(500, 375) == (683, 512)
    assert mm.output_shape(1000, 3000) == (512, 1536)  # short side binds: 0.512
    assert mm.output_shape(300, 5000) == (123, 2048)  # long side binds: 0.4096
    assert ShortestEdge().output_shape(37, 53) == (37, 53)
    with pytest.raises(ValueError, match="mode must be one of"):
        ShortestEdge("bogus")
    with pytest.raises(ValueError, match="needs min_size"):
        ShortestEdge("shortest_edge", min_size=512)


@pytest.mark.parametrize("resampler", ["pil", "cv2"])
def test_device_resamplers_equal_pillow_and_opencv(resampler):
    rng = np.random.default_rng(0)
    resize = jax.jit(jax.vmap(lambda x, t: image_resize.resize_uint8(x, t, resampler)))
    # Aspect-preserving down and up scales as the protocols make them, in one padded batch.
    cases = [((98, 131), (40, 53)), ((61, 83), (37, 50)), ((45, 60), (96, 128)),
             ((64, 64), (32, 32))]
    length, taps = (96, 128), 7
    images = np.zeros((len(cases), 98, 131, 3), np.uint8)
    arrays = [[] for _ in range(4)]
    for i, ((h, w), out) in enumerate(cases):
        images[i, :h, :w] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        assert image_resize.num_taps(resampler, (h, w), out) <= taps
        for a, t in zip(arrays, image_resize.resize_taps(resampler, (h, w), out, length, taps),
                        strict=True):
            a.append(t)
    got = np.asarray(resize(images, tuple(np.stack(a) for a in arrays)))
    for i, ((h, w), (oh, ow)) in enumerate(cases):
        image = images[i, :h, :w]
        if resampler == "pil":  # detectron2's ResizeTransform.apply_image
            want = np.asarray(Image.fromarray(image).resize((ow, oh), Image.BILINEAR))
        else:  # mmcv.imresize(..., interpolation='bilinear')
            want = cv2.resize(image, (ow, oh), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_array_equal(got[i, :oh, :ow], want, err_msg=str(cases[i]))


@pytest.fixture(scope="module")
def tiny_model():
    model = pna_lib.build_pna("fcn", 4, depth=18, width=8, embed_dims=(32, 32, 32, 32),
                              window_sizes=(3, 3, 3, 3), use_sa=False,
                              head_kwargs={"channels": 16, "num_convs": 1})
    # Random variables of the right shapes without compiling `init` (CI time): kernels
    # ~ N(0, 1/fan_in) with zero mean over the fan-in (so the ReLUs' positive mean does not
    # become one class everywhere), norm scales 1, biases and running means 0, variances 1.
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if leaf.ndim >= 2:
            fan_in = int(np.prod(leaf.shape[:-1]))
            kernel = rng.normal(0, fan_in ** -0.5, leaf.shape)
            return (kernel - kernel.mean(tuple(range(leaf.ndim - 1)))).astype(np.float32)
        return np.full(leaf.shape, "scale" in name or "var" in name, np.float32)

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    return model, variables, jax.jit(lambda v, x: model.apply(v, x, train=False))


def _reference_prediction(model, variables, apply, image, protocol, bucket=64):
    """The reference pipeline written out: resize with the reference's library, pad with
    the mean to the bucket, run, upsample each stage to the padded size, crop to the
    resized image, F.interpolate back to the original size, argmax."""
    h, w = image.shape[:2]
    nh, nw = protocol.output_shape(h, w)
    if protocol.resampler == "pil":
        resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    else:
        resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    ph, pw = -(-nh // bucket) * bucket, -(-nw // bucket) * bucket
    x = np.broadcast_to(np.asarray(model.pixel_mean, np.float32), (1, ph, pw, 3)).copy()
    x[0, :nh, :nw] = resized
    stages = evaluate_pna.stage_logits_at(apply(variables, x), (ph, pw), (nh, nw))
    out = []
    for logits in stages:
        t = torch.from_numpy(np.array(logits)).permute(0, 3, 1, 2)
        t = torch.nn.functional.interpolate(t, size=(h, w), mode="bilinear",
                                            align_corners=False)
        out.append(t[0].argmax(0).numpy())
    return np.stack(out)


def test_predictor_resize_protocol_equals_the_reference_pipeline(tiny_model):
    # detectron2's protocol end to end; mmseg's differs only in the resampler and the size
    # rule, both tested above (one compilation less in CI).
    protocol = ShortestEdge("shortest_edge", min_size=48, max_size=64)
    model, variables, apply = tiny_model
    # Three sizes in one 128-px bucket, all resized into one 64-px bucket: one compilation.
    # Random 6-px blocks: high contrast that survives the downscale.
    rng = np.random.default_rng(3)
    images = [np.kron(rng.integers(0, 256, (h // 6 + 1, w // 6 + 1, 3)),
                      np.ones((6, 6, 1)))[:h, :w].astype(np.uint8)
              for h, w in ((90, 120), (96, 110), (120, 100))]
    predictor = evaluate_pna.Predictor(model, batch_size=2, resize=protocol)
    preds = predictor(variables, images)
    assert predictor.trace_count == 1
    for image, pred in zip(images, preds, strict=True):
        assert pred.shape == (5, *image.shape[:2])
        want = _reference_prediction(model, variables, apply, image, protocol)
        assert len(np.unique(want[-1])) > 1  # a real prediction, not one class everywhere
        assert np.mean(pred == want) > 0.999  # argmax ties of float32 rounding only


def _detectron2_sem_seg_metrics(conf):
    """detectron2 SemSegEvaluator.evaluate on its [pred, gt] matrix with the ignore row/col."""
    tp = conf.diagonal()[:-1].astype(float)
    pos_gt = conf[:-1, :-1].sum(0).astype(float)
    pos_pred = conf[:-1, :-1].sum(1).astype(float)
    acc_valid = pos_gt > 0
    union = pos_gt + pos_pred - tp
    iou_valid = acc_valid & (union > 0)
    iou = np.where(iou_valid, tp / np.where(union > 0, union, 1), np.nan)
    acc = np.where(acc_valid, tp / np.where(acc_valid, pos_gt, 1), np.nan)
    weights = pos_gt / pos_gt.sum()
    return {"miou": np.nanmean(iou), "fwiou": np.sum(iou[iou_valid] * weights[iou_valid]),
            "macc": np.nanmean(acc), "pacc": tp.sum() / pos_gt.sum()}


def test_confusion_matrix_metrics_are_detectron2s():
    # 4 classes: 3 never occurs in the labels but is predicted (detectron2 skips it in the
    # mIoU, mmseg counts it as 0); some pixels are ignored (255).
    gt = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 255, 255]] * 2)
    pred = np.array([[0, 0, 1, 1, 3, 2, 2, 0, 3, 1]] * 2)
    cm = metrics.ConfusionMatrix(4)
    cm.update(pred, gt)
    conf = np.zeros((5, 5), np.int64)  # detectron2: (num_classes + 1) * pred + gt, ignore = 4
    g = np.where(gt == 255, 4, gt)
    np.add.at(conf, (pred.ravel(), g.ravel()), 1)
    want = _detectron2_sem_seg_metrics(conf)
    summary = cm.summary("gt")
    for key in ("miou", "fwiou", "macc", "pacc"):
        assert summary[key] == pytest.approx(want[key]), key
    # By hand: IoU 0: 4/(6+2)=.5, 1: 2/(4+4-2)=1/3, 2: 4/6; acc 2/3, 1/2, 2/3; pACC 10/16.
    assert summary["miou"] == pytest.approx((1 / 2 + 1 / 3 + 2 / 3) / 3)
    assert summary["fwiou"] == pytest.approx((6 * 1 / 2 + 4 * 1 / 3 + 6 * 2 / 3) / 16)
    assert summary["macc"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert summary["pacc"] == pytest.approx(10 / 16)
    assert summary["per_class_iou"][3] is None
    assert cm.summary("gt_or_pred")["miou"] == pytest.approx((1 / 2 + 1 / 3 + 2 / 3 + 0) / 4)


def test_trans10k_mean_is_over_the_two_transparent_classes():
    config = load_config("pna_trans10k")
    assert tuple(config.eval.mean_classes) == (1, 2) and config.eval.iou_classes == "gt"
    assert (config.eval.resize.mode, config.eval.resize.min_size,
            config.eval.resize.max_size) == ("shortest_edge", 512, 2048)
    labels = np.array([[0, 0, 0, 0, 1, 1, 2, 2]])
    preds = np.array([[0, 0, 0, 1, 1, 0, 2, 2]])
    sample = evaluate_pna.Sample("s", np.zeros((1, 8, 3), np.uint8), labels.astype(np.uint8))
    r = evaluate_pna.evaluate_samples(lambda images: [preds[None]], iter([sample]), 3,
                                      iou_classes=config.eval.iou_classes,
                                      mean_classes=config.eval.mean_classes)
    stage = r["stages"]["P0"]
    # IoU background 3/5, things 1/3, stuff 1: the paper's mean is (1/3 + 1) / 2.
    assert stage["miou"] == pytest.approx((1 / 3 + 1) / 2)
    assert stage["per_class_iou"][0] == pytest.approx(3 / 5)
    assert stage["macc"] == pytest.approx((1 / 2 + 1) / 2)
    assert "P0 fwIoU" in evaluate_pna.markdown_table({"t": r})
    scalars = loop.eval_scalars({"t": r})
    assert {"eval/t/P0_miou", "eval/t/P0_fwiou", "eval/t/P0_macc", "eval/t/P0_pacc"} <= set(
        scalars)


def test_cityscapes_configs_evaluate_as_the_reference():
    for name in ("pna_cityscapes_r101_deeplabv3", "pna_cityscapes_r101_fpn"):
        resize = load_config(name).eval.resize
        assert (resize.mode, resize.min_size, resize.max_size) == ("shortest_edge", 1024, 2048)
    voc = load_config("pna_voc_r50_fcn").eval.resize  # mmseg's test pipeline
    assert (voc.mode, tuple(voc.scale)) == ("keep_ratio", (2048, 512))
    assert load_config("pna_detectron2_base").eval.resize.mode == "none"


def test_paper_configs_pad_each_image_as_the_references():
    """Paper configs: padding only to the size divisibility (exact); synthetic: 64-px buckets."""
    expected = {"pna_voc_r50_fcn": 1, "pna_cityscapes_r101_fpn": 32, "pna_synthetic": 64}
    for name, bucket in expected.items():
        config = load_config(name)
        model = pna_lib.build_pna(**loop.pna_build_kwargs(config))
        assert evaluate_pna.predictor_for(config, model).bucket == bucket, name


def test_deepglobe_rgb_masks_map_to_the_reference_classes(tmp_path):
    from jax_refine.io import read_image, write_image

    colours = np.concatenate([deepglobe.COLOURS, [[255, 0, 0]]]).astype(np.uint8)
    mask = np.repeat(colours[None], 2, axis=0)
    mask[1] = np.clip(mask[1].astype(int) + np.where(mask[1] > 127, -20, 20), 0, 255)  # JPEG-ish
    labels = deepglobe.rgb_to_labels(mask)
    np.testing.assert_array_equal(labels, [[0, 1, 2, 3, 4, 5, 6, 255]] * 2)
    (tmp_path / "src").mkdir()
    write_image(tmp_path / "src" / "12_mask.png", mask)
    (out,) = deepglobe.convert_folder(tmp_path / "src", tmp_path / "dst")
    assert out.name == "12_sat.png"
    np.testing.assert_array_equal(read_image(out), labels)
    with pytest.raises(ValueError, match="expected an RGB mask"):
        deepglobe.rgb_to_labels(labels)


def test_converted_detectron2_deepglobe_checkpoint_mirror_loads_with_7_classes(tmp_path):
    from jax_refine import convert
    from jax_refine.convert.common import read_checkpoint_file
    from tests.torch_mirrors import detectron2 as d2
    from tests.torch_mirrors import pna as tp
    from tests.torch_mirrors.arrays import max_err, nchw, nhwc

    config = load_config("pna_deepglobe")
    k = config.model.num_classes
    assert k == 7 and config.eval.builder_kwargs.class_names.split(",")[:2] == ["unknown",
                                                                                "urban"]
    assert tuple(config.eval.mean_classes) == (1, 2, 3, 4, 5, 6)
    # The official model, shrunk: R-52 with 1/1/2/3 blocks, FPN 64, scale heads 32, PNA 32/64.
    blocks, dims = (1, 1, 2, 3), (32, 32, 64, 64)
    image = np.random.default_rng(0).uniform(0, 255, (1, 64, 64, 3)).astype(np.float32)
    backbone = d2.DeepLabResNet(50, "deeplab", res5_dilation=1, blocks=blocks)
    mirror = tp.PNASegmentor(
        d2.FPN(backbone, out_channels=64), d2.SemSegFPNHead(k, channels=64, conv_dims=32),
        tp.PNAHead((256, 512, 1024, 2048), k, dims,
                   tuple(config.model.window_sizes)), 32)
    d2.calibrate_bn(d2.randomize(mirror, seed=7), nchw(image))
    with torch.no_grad():
        want, _ = mirror(nchw(image))
    torch.save({"model": mirror.state_dict()}, tmp_path / "deepglobe.pth")

    state_dict = read_checkpoint_file(str(tmp_path / "deepglobe.pth"))
    found = convert.pna_config(state_dict)
    assert (found["coarse_head"], found["num_classes"], found["window_sizes"]) == (
        config.model.coarse_head, k, tuple(config.model.window_sizes))
    config = with_overrides(config, {"model.embed_dims": dims, "model.head_kwargs": {
        "fpn_channels": 64, "conv_dims": 32}})
    model = pna_lib.build_pna(**loop.pna_build_kwargs(config))
    model = model.clone(backbone=pna_lib.deeplab_resnet(50, output_stride=32,
                                                        stage_sizes=blocks))
    got = jax.jit(model.apply)(convert.pna_variables(state_dict), jnp.asarray(image))
    assert len(got) == 5
    for stage, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape[-1] == 7
        assert max_err(g, nhwc(w)) <= 1e-4, f"P{stage}"
