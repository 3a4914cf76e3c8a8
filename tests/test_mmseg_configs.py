"""The mmsegmentation PNA configs: their reference settings, and one training step of each on
synthetic data with the model shrunk in widths and depths (each config's structure kept:
backbone kind and output stride, coarse head, mmseg PNA head, auxiliary head, losses,
optimiser keys)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_helpers import compilation_cache, load_config, with_overrides  # noqa: F401

from jax_refine.train import loop
from jax_refine.train.state import TrainState

# Every mmseg config runs one compiled training step with its model shrunk (same structure);
# the module's persistent compilation cache serves the configs whose shrunk programs are
# identical (the two Swin ones).
CONFIGS = ["pna_voc_r50_fcn", "pna_voc_r101_psp", "pna_voc_r101_deeplabv3",
           "pna_cocostuff10k_r50_deeplabv3", "pna_voc_swin_t", "pna_voc_swin_b"]
# A small Swin keeps its structure: shifted blocks (2 per stage), window 7, patch 4.
SMALL_SWIN = {"model.backbone_kwargs": {"embed_dims": 32, "depths": (2, 2, 2, 2),
                                        "num_heads": (1, 2, 4, 8)}}
SMALL = {
    "model.width": 8,
    "model.backbone_kwargs": {"stage_sizes": (1, 1, 1, 1)},
    "model.embed_dims": (32, 32, 32, 32),
    "model.window_sizes": (3, 3, 3, 3),
    "model.head_kwargs": {"channels": 16},
    "model.aux_head_kwargs": {"channels": 8},
    "crop_size": (64, 48),
    "batch_size": 2,
}


def test_reference_settings():
    """The values of the reference's mmseg configs (PNA repo, branch mmsegmentation)."""
    fcn = load_config("pna_voc_r50_fcn")
    assert (fcn.model.coarse_head, fcn.model.backbone, fcn.model.depth) == ("fcn", "resnet_v1c",
                                                                              50)
    assert fcn.model.pna_head == "mmseg" and fcn.model.auxiliary_head
    assert fcn.model.window_sizes == (9, 9, 9, 9)
    assert (fcn.learning_rate, fcn.weight_decay, fcn.clip_norm) == (1e-4, 1e-4, 0.0)
    assert (fcn.warmup_steps, fcn.warmup_ratio, fcn.lr_power) == (200, 1e-6, 0.9)
    assert (fcn.total_steps, fcn.batch_size, fcn.crop_size) == (20_000, 16, (512, 512))
    assert fcn.loss.coarse_loss == fcn.loss.stage_loss == "cross_entropy_all"
    assert (fcn.loss.coarse_weight, fcn.loss.stage_weight, fcn.loss.aux_weight) == (1, 0.1, 0.4)
    assert fcn.eval.resize.mode == "keep_ratio" and tuple(fcn.eval.resize.scale) == (2048, 512)
    psp, aspp = load_config("pna_voc_r101_psp"), load_config("pna_voc_r101_deeplabv3")
    assert (psp.model.coarse_head, psp.model.depth) == ("psp", 101)
    assert (aspp.model.coarse_head, aspp.model.depth) == ("aspp", 101)
    for name, backbone in (("pna_voc_swin_t", "swin_t"), ("pna_voc_swin_b", "swin_b")):
        swin = load_config(name)
        assert (swin.model.backbone, swin.model.coarse_head) == (backbone, "psp")
        assert (swin.learning_rate, swin.weight_decay, swin.lr_power) == (6e-5, 0.01, 1.0)
    coco = load_config("pna_cocostuff10k_r50_deeplabv3")
    assert (coco.model.coarse_head, coco.model.num_classes, coco.model.depth) == ("aspp", 171, 50)
    assert (coco.total_steps, coco.warmup_steps) == (40_000, 400)
    assert len(coco.dataset.builder_kwargs.class_names.split(",")) == 171
    # The detectron2 configs keep the detectron2 recipe.
    city = load_config("pna_cityscapes_r101_deeplabv3")
    assert (city.model.backbone, city.model.pna_head, city.model.auxiliary_head) == (
        "resnet", "detectron2", False)
    assert city.loss.aux_weight == 0 and city.clip_norm == 0.01


def _batch(config, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b, (h, w) = config.batch_size, config.crop_size
    labels = rng.integers(0, config.model.num_classes, (b, h, w)).astype(np.int32)
    labels[:, : h // 4] = 255  # ignored rows, as the crop's padding
    return {"image": rng.uniform(0, 255, (b, h, w, 3)).astype(np.float32), "label": labels}


def random_state(model, tx, crop) -> TrainState:
    """A TrainState of random variables of the model's shapes (no init program to compile)."""
    image = jax.ShapeDtypeStruct((1, *crop, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), image)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape) + 0.5, s.dtype), shapes)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables["batch_stats"],
                      opt_state=jax.jit(tx.init)(params), rng=jax.random.PRNGKey(1))


def _step(name: str):
    config = with_overrides(load_config(name), SMALL)
    if config.model.backbone.startswith("swin"):
        config = with_overrides(config, SMALL_SWIN)
    model = loop.build_model(config)
    tx, schedule = loop.build_optimizer(config, model)
    state = random_state(model, tx, config.crop_size)
    assert "auxiliary_head" in state.params
    return config, state, _batch(config, 0), loop.build_train_step(config, model, tx, schedule)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_runs_one_training_step(name):
    config, state, batch, step = _step(name)
    new_state, metrics = jax.jit(step)(state, batch)
    assert jax.tree.map(jnp.shape, new_state.params) == jax.tree.map(jnp.shape, state.params)
    assert new_state.params["coarse_head"]["conv_seg"]["bias"].shape == (
        config.model.num_classes,)
    metrics = jax.device_get(metrics)
    assert set(metrics) >= {"loss", "loss_p0", "loss_p4", "loss_aux", "lr", "grad_norm"}
    want = metrics["loss_p0"] + 0.1 * sum(metrics[f"loss_p{i}"] for i in range(1, 5)) + (
        0.4 * metrics["loss_aux"])
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
    assert np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
    # mmcv's linear warmup starts at warmup_ratio * lr.
    np.testing.assert_allclose(metrics["lr"], config.learning_rate * config.warmup_ratio,
                               rtol=1e-6)
    # The auxiliary loss reaches its head: Adam's first moment (1 - b1) * grad is non-zero.
    mu = optax.tree_utils.tree_get(new_state.opt_state, "mu")
    assert all(bool(jnp.any(m != 0)) for m in jax.tree.leaves(mu["auxiliary_head"]))


def test_no_decay_keys_select_what_mmseg_custom_keys_select():
    """mmseg's custom_keys ('norm', 'rpb', 'relative_position_bias_table', ...) match
    LayerNorms and position biases by name but no BatchNorm (named 'bn' there); the configs'
    no_decay_keys select the same parameters of our trees (ConvNorm's BatchNorm is 'norm')."""
    from jax_refine.train import optim

    for name, extra in (("pna_voc_r50_fcn", {}), ("pna_voc_swin_t", SMALL_SWIN)):
        config = with_overrides(with_overrides(load_config(name), SMALL), extra)
        model = loop.build_model(config)
        image = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
        params = jax.eval_shape(lambda x, m=model: m.init(jax.random.PRNGKey(0), x), image)
        labels = optim.decay_labels(config.no_decay_keys)(params["params"])
        batch_norms = _module_paths(params["batch_stats"])  # layers with running statistics
        assert batch_norms
        for path, label in _flat(labels).items():
            module = path.rsplit("/", 1)[0]
            bias_table = path.endswith(("/rpb", "relative_position_bias_table"))
            layer_norm = module not in batch_norms and "norm" in module.rsplit("/", 1)[-1]
            assert (label == "none") == (bias_table or layer_norm), (name, path, label)


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(p, simple=True, separator="/"): v
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _module_paths(tree) -> set[str]:
    return {path.rsplit("/", 1)[0] for path in _flat(tree)}
