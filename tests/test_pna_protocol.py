"""PNA's detectron2 training protocol (issue 21): each item against a small reference
computation written here (torch's AdamW and clip_grad_norm_, detectron2's and mmcv's warmup
formulas, detectron2's ResizeShortestEdge / RandomCrop_CategoryAreaConstraint /
ColorAugSSDTransform rules with PIL and cv2)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_refine.layers.restormer import RestormerBlock
from jax_refine.train import optim


class _Tiny(nn.Module):
    """Conv + BN, Dense + LN, GroupNorm, a Restormer block (its LNs decay, as the reference's
    custom LayerNorm) and a parameter named like a relative position bias."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        x = nn.GroupNorm(num_groups=2, name="gn")(x)
        x = RestormerBlock(num_heads=1, name="sa")(x)
        x = nn.LayerNorm(name="ln")(nn.Dense(4, name="fc")(x))
        rpb = self.param("rpb", nn.initializers.zeros, (3,))
        return nn.Dense(2, name="head")(x) + rpb[0]


@pytest.fixture(scope="module")
def tiny():
    model = _Tiny()
    example = {"x": jax.ShapeDtypeStruct((1, 4, 4, 3), jnp.float32)}
    # Random values of the parameters' shapes (no compilation).
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4, 4, 3)))["params"]
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(size=s.shape).astype(np.float32)), shapes)
    return model, example, params


def _labels(params, no_decay_keys, norm_paths):
    flat = jax.tree_util.tree_flatten_with_path(
        optim.decay_labels(no_decay_keys, norm_paths)(params))[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): v for p, v in flat}


def test_norm_layers_found_by_class(tiny):
    model, example, params = tiny
    paths = optim.norm_layer_paths(model, example)
    assert paths == {"bn", "gn", "ln"}  # not sa/norm1, sa/norm2 (plain weights upstream)
    labels = _labels(params, ("rpb",), paths)
    assert labels["bn/scale"] == labels["bn/bias"] == labels["gn/scale"] == "norm"
    assert labels["ln/scale"] == labels["ln/bias"] == "norm"
    assert labels["sa/norm1/scale"] == labels["sa/norm2/bias"] == "decay"
    assert labels["conv/kernel"] == labels["fc/bias"] == labels["sa/attn/temperature"] == "decay"
    assert labels["rpb"] == "none"


def _torch_lr(k, base, total, power, warmup, ratio):
    """detectron2 WarmupPolyLR.get_lr (linear warmup, constant_ending 0)."""
    factor = 1.0 if k >= warmup else ratio * (1 - k / warmup) + k / warmup
    return base * factor * (1.0 - k / total) ** power


def test_pna_optimizer_is_torch_adamw_with_detectron2_param_groups():
    """Three steps against torch: clip_grad_norm_ on all parameters, then AdamW with one
    group per parameter (decay 0.05, norm decay 0.0, 0 for 'rpb'), lr from WarmupPolyLR."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    shapes = {"conv": {"kernel": (3, 3, 2, 4), "bias": (4,)}, "bn": {"scale": (4,), "bias": (4,)},
              "attn": {"rpb": (1, 3, 3)}}
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32),
                                    shapes, is_leaf=lambda s: isinstance(s, tuple))
    base, total, power, warmup, ratio, wd, clip = 0.1, 10, 0.9, 2, 0.25, 0.05, 0.5
    norms = {"bn"}
    tx, schedule = optim.pna_optimizer(
        base, total, weight_decay=wd, power=power, clip_norm=clip, backbone_multiplier=1.0,
        warmup_steps=warmup, warmup_ratio=ratio, weight_decay_norm=0.0,
        no_decay_keys=("rpb",), norm_paths=norms)
    labels = _labels(params, ("rpb",), norms)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in flat]
    tparams = [torch.tensor(np.asarray(v), requires_grad=True) for _, v in flat]
    decay = {"decay": wd, "norm": 0.0, "none": 0.0}
    opt = torch.optim.AdamW([{"params": [t], "weight_decay": decay[labels[n]]}
                             for t, n in zip(tparams, names, strict=True)], lr=base)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: _torch_lr(k, 1.0, total, power, warmup, ratio))
    grads = [np.stack([rng.normal(size=np.shape(v)).astype(np.float32) * 0.3
                       for _ in range(3)]) for _, v in flat]

    @jax.jit
    def three_steps(params, grads):  # one compilation: init, 3 updates, the 3 rates
        def step(carry, g):
            params, state = carry
            updates, state = tx.update(g, state, params)
            return (jax.tree_util.tree_map(jnp.add, params, updates), state), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), grads)
        return params, jax.vmap(schedule)(jnp.arange(3))

    params, rates = three_steps(params, jax.tree_util.tree_unflatten(treedef, grads))
    for step in range(3):
        for t, g in zip(tparams, grads, strict=True):
            t.grad = torch.tensor(g[step])
        torch.nn.utils.clip_grad_norm_(tparams, clip)
        opt.step()
        sched.step()
        assert float(rates[step]) == pytest.approx(
            _torch_lr(step, base, total, power, warmup, ratio), rel=1e-6)
    for (_, v), t, n in zip(jax.tree_util.tree_flatten_with_path(params)[0], tparams, names,
                            strict=True):
        np.testing.assert_allclose(np.asarray(v), t.detach().numpy(), atol=3e-6, err_msg=n)


def test_warmup_poly_schedule_is_detectron2_and_mmcv():
    base, total, power, warmup, ratio = 1e-4, 100, 0.9, 10, 1e-6
    schedule = optim.warmup_poly_schedule(base, total, power, warmup, ratio)
    for k in (0, 3, warmup - 1, warmup, warmup + 1, 57, total):
        regular = base * (1 - k / total) ** power  # mmcv PolyLrUpdaterHook, min_lr 0
        mmcv = regular if k >= warmup else regular * (1 - (1 - k / warmup) * (1 - ratio))
        assert float(schedule(k)) == pytest.approx(mmcv, rel=1e-5, abs=1e-12), k
        assert float(schedule(k)) == pytest.approx(
            _torch_lr(k, base, total, power, warmup, ratio), rel=1e-5, abs=1e-12), k
    assert float(schedule(0)) == pytest.approx(base * ratio)
    none = optim.warmup_poly_schedule(base, total, power, 0)
    assert float(none(0)) == pytest.approx(base) and float(none(50)) == pytest.approx(
        base * 0.5 ** power)


def test_clip_grad_norm_is_torch():
    grads = {"a": jnp.full(3, 0.004), "b": jnp.full(2, -0.003)}
    norm = float(np.sqrt(3 * 0.004**2 + 2 * 0.003**2))
    out, _ = optim.clip_grad_norm(0.005).update(grads, optim.clip_grad_norm(0.005).init(grads))
    np.testing.assert_allclose(out["a"], 0.004 * 0.005 / (norm + 1e-6), rtol=1e-6)
    same, _ = optim.clip_grad_norm(1.0).update(grads, None)
    np.testing.assert_array_equal(same["b"], grads["b"])


# ----------------------------------------------------------------------------- augmentation


def _tf():
    from jax_refine.data.pipeline import _tf

    return _tf()


def _output_shape(h, w, short, max_size):
    """detectron2 ResizeShortestEdge.get_output_shape."""
    scale = short * 1.0 / min(h, w)
    newh, neww = (short * 1.0, scale * w) if h < w else (scale * h, short * 1.0)
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def test_shortest_edge_resize_is_detectron2_with_pil():
    from PIL import Image

    from jax_refine.data import seg_transforms as st

    tf = _tf()
    for h, w, short, max_size in [(1024, 2048, 1536, 4096), (1024, 2048, 2048, 4096),
                                  (2448, 2448, 512, 4096), (480, 640, 972, 1024),
                                  (333, 1000, 307, 2048), (1000, 333, 870, 2048)]:
        out = st.shortest_edge_size(tf, h, w, short, max_size).numpy()
        assert tuple(out) == _output_shape(h, w, short, max_size)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), np.uint8)
    label = rng.integers(0, 6, (37, 53), np.uint8)
    # One pass each way (down and up) and both passes upsampling: Pillow's order is fixed.
    for size in [(37, 20), (37, 90), (15, 53), (80, 53), (61, 97)]:
        pil = Image.fromarray(image).resize(size[::-1], Image.BILINEAR)
        np.testing.assert_array_equal(st.resize_bilinear_pil(tf, image, size).numpy(), pil)
    for size in [(15, 20), (80, 97), (37, 40), (28, 53), (100, 11)]:
        pil = Image.fromarray(label).resize(size[::-1], Image.NEAREST)
        np.testing.assert_array_equal(st.resize_nearest_pil(tf, label, size).numpy(), pil)


def _accepted(window, max_area, ignore):
    """detectron2's acceptance test of a crop window."""
    labels, cnt = np.unique(window, return_counts=True)
    cnt = cnt[labels != ignore]
    return len(cnt) > 1 and np.max(cnt) < np.sum(cnt) * max_area


def test_category_area_crop_takes_the_first_window_within_the_max_area():
    from jax_refine.data import seg_transforms as st

    tf = _tf()
    label = np.zeros((40, 40), np.uint8)  # class 0, one 12x12 block of class 3 and
    label[28:, 28:] = 3  # ignored pixels: most 10x10 windows hold class 0 only
    label[:5] = 255
    for s in range(6):
        seed = tf.constant([s, 7], tf.int32)
        windows = st.crop_windows(tf, tf.shape(label), (10, 10), seed, 10).numpy()
        checks = [_accepted(label[y:y + h, x:x + w], 0.75, 255) for y, x, h, w in windows]
        expected = windows[checks.index(True)] if any(checks) else windows[-1]
        got = st.category_area_crop(tf, label, (10, 10), seed, 0.75, 255).numpy()
        np.testing.assert_array_equal(got, expected)
        if s == 0:
            assert not checks[0] and any(checks)  # the rule rejected the first crops
    small = st.category_area_crop(tf, label[:6, :8], (10, 10), seed, 0.75, 255).numpy()
    np.testing.assert_array_equal(small, [0, 0, 6, 8])  # 'absolute': min(crop, image)


def _ssd_reference(rgb, d):
    """detectron2 ColorAugSSDTransform.apply_image (RGB format) with the draws `d`."""
    import cv2

    def convert(img, alpha=1, beta=0):
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def contrast(img):
        return convert(img, alpha=d["alpha_contrast"]) if d["contrast"] else img

    def saturation(img):
        if not d["saturation"]:
            return img
        img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        img[:, :, 1] = convert(img[:, :, 1], alpha=d["alpha_saturation"])
        return cv2.cvtColor(img, cv2.COLOR_HSV2BGR)

    def hue(img):
        if not d["hue"]:
            return img
        img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        img[:, :, 0] = (img[:, :, 0].astype(int) + d["hue_shift"]) % 180
        return cv2.cvtColor(img, cv2.COLOR_HSV2BGR)

    img = np.ascontiguousarray(rgb[:, :, [2, 1, 0]])
    img = convert(img, beta=d["beta"]) if d["brightness"] else img
    img = hue(saturation(contrast(img))) if d["contrast_first"] else contrast(hue(saturation(img)))
    return img[:, :, [2, 1, 0]]


def test_color_aug_ssd_is_detectron2_with_cv2():
    from jax_refine.data import seg_transforms as st

    tf = _tf()
    rng = np.random.default_rng(0)
    # 64-pixel rows: OpenCV converts them with its vectorised code only.
    rgb = rng.integers(0, 256, (32, 64, 3), np.uint8)
    draws = [{k: v.numpy() for k, v in st.ssd_draws(tf, tf.constant([s, 1])).items()}
             for s in range(40)]
    for d in draws[:8]:
        d = {**d, "brightness": True, "contrast": True, "saturation": True, "hue": True}
        np.testing.assert_array_equal(st.color_aug_ssd(tf, rgb, d).numpy(),
                                      _ssd_reference(rgb, d))
    np.testing.assert_array_equal(st.color_aug_ssd(tf, rgb, draws[8]).numpy(),
                                  _ssd_reference(rgb, draws[8]))
    beta = np.array([d["beta"] for d in draws])
    alphas = np.array([[d["alpha_contrast"], d["alpha_saturation"]] for d in draws])
    shifts = np.array([d["hue_shift"] for d in draws])
    assert beta.min() >= -32 and beta.max() <= 32 and np.ptp(beta) > 40
    assert alphas.min() >= 0.5 and alphas.max() <= 1.5 and np.ptp(alphas) > 0.7
    assert shifts.min() >= -18 and shifts.max() <= 18 and shifts.dtype == np.int32
    for key in ("brightness", "contrast", "saturation", "hue", "contrast_first"):
        assert 5 < sum(bool(d[key]) for d in draws) < 35, key


def examples_eager_and_in_tf_data(tf, augment, image, label, ks) -> list[dict]:
    """`augment`'s examples ks, computed eagerly and inside a tf.data map: asserts they are
    equal and returns the tf.data ones (numpy)."""
    ks = tf.constant(ks, tf.int64)
    eager = [augment(tf, image, label, k) for k in ks]
    ds = tf.data.Dataset.from_tensor_slices(ks).map(lambda k: augment(tf, image, label, k))
    graph = list(ds.as_numpy_iterator())
    for e, g in zip(eager, graph, strict=True):
        np.testing.assert_array_equal(e["image"].numpy(), g["image"])
        np.testing.assert_array_equal(e["label"].numpy(), g["label"])
    return graph


def test_pna_augment_detectron2_mode_eager_equals_tf_data():
    """The detectron2 configs' transform (shortest edge, area crop, SSD colour, flip, bottom /
    right padding) gives the same example eagerly and inside tf.data's graph."""
    from jax_refine.data import pipeline

    tf = _tf()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 45, 3), np.uint8)
    label = np.zeros((30, 45), np.uint8)
    label[10:, 20:] = 2
    augment = pipeline.PnaAugment(3, crop=(24, 40), resize="shortest_edge", min_sizes=(20, 28),
                                  max_size=40, single_category_max_area=0.75, colour="ssd")
    for g in examples_eager_and_in_tf_data(tf, augment, image, label, (5, 6)):
        valid = g["label"] != 255
        rows, cols = valid.any(1).sum(), valid.any(0).sum()
        assert valid[:rows, :cols].all()  # padding at the bottom / right only
        resized = [_output_shape(30, 45, s, 40) for s in (20, 28)]  # (20, 30), (27, 40)
        assert any(rows == min(24, h) and cols == min(40, w) for h, w in resized)
        assert np.allclose(g["image"][~valid], 255 * np.asarray(pipeline.IMAGENET_MEAN))


@pytest.mark.parametrize("name", ["pna_cityscapes_r101_fpn", "pna_deepglobe", "pna_trans10k"])
def test_semantic_fpn_configs_score_p0_with_plain_cross_entropy(name):
    """detectron2's SemSegFPNHead.losses is F.cross_entropy(ignore_index=255) whatever
    LOSS_TYPE says; the configs' P0 term is exactly that (mean over the valid pixels)."""
    from train_helpers import load_config

    from jax_refine import losses

    config = load_config(name)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    labels = rng.integers(0, 3, (2, 4, 4))
    labels[0, :2] = 255
    _, terms = losses.pna_loss([jnp.asarray(logits)], jnp.asarray(labels), **config.loss)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    valid = labels != 255
    nll = -np.take_along_axis(log_p, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    assert float(terms["p0"]) == pytest.approx(nll[valid].mean(), rel=1e-6)
    assert config.loss.stage_loss == ("cross_entropy" if "cityscapes" in name
                                      else "hard_pixel_mining")
    augment = config.augment
    assert (augment.resize, augment.colour, augment.single_category_max_area) == (
        "shortest_edge", "ssd", 0.75)
    assert (config.weight_decay_norm, config.warmup_steps, config.clip_norm) == (0.0, 0, 0.01)
