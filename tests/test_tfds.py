"""Local TFDS builders on small generated folders (with broken and mismatched files)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jax_refine.data import tfds as jtfds


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _pair(rng, h=24, w=32):
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = ((rng.random((h, w)) > 0.5) * 255).astype(np.uint8)
    return image, mask


def _records(source):
    out = [dict(source[i]) for i in range(len(source))]
    for r in out:
        if isinstance(r.get("name"), bytes):
            r["name"] = r["name"].decode()
    return out


def test_synthetic_scenes_binary_and_multiclass(tmp_path):
    for name, classes in (("binary", 1), ("multiclass", 3)):
        config = jtfds.SyntheticScenesConfig(name=f"t_{name}", size=48, num_train=2,
                                             num_test=1, num_classes=classes)
        train = _records(jtfds.data_source("synthetic_scenes", data_dir=str(tmp_path),
                                           builder_config=config))
        assert len(train) == 2
        assert train[0]["image"].shape == (48, 48, 3) and train[0]["mask"].shape == (48, 48, 1)
        values = set(np.unique(np.concatenate([r["mask"].ravel() for r in train])).tolist())
        if classes == 1:
            assert values <= {0, 255}
        else:
            assert values <= set(range(classes + 1)) and max(values) > 1
    builder = jtfds.builder("synthetic_scenes", data_dir=str(tmp_path), builder_config=config)
    assert builder.info.metadata["num_classes"] == 3
    assert (tmp_path / "synthetic_scenes").is_dir()  # the build lives under data_dir


def test_refine_folder_pairs_reports_bad_files(tmp_path, caplog):
    rng = np.random.default_rng(0)
    a, b = tmp_path / "msra", tmp_path / "fss"
    for k in range(2):
        image, mask = _pair(rng)
        _save(a / f"im{k}.jpg", image)
        _save(a / f"im{k}.png", mask)
    image, mask = _pair(rng)
    _save(b / "cat" / "1.jpg", image)  # FSS-1000 layout class/name.jpg + class/name.png
    _save(b / "cat" / "1.png", mask)
    (a / "broken.jpg").write_bytes(b"not a jpeg")  # unreadable
    _save(a / "broken.png", mask)
    _save(a / "big.jpg", _pair(rng, 30, 30)[0])  # size mismatch with its mask
    _save(a / "big.png", mask)
    _save(a / "orphan.png", mask)  # mask without image
    builder = jtfds.builder("refine_folder", data_dir=str(tmp_path / "tfds"),
                            builder_kwargs={"folders": f"{a},{b}"})
    builder.download_and_prepare()
    records = _records(builder.as_data_source("train"))
    assert sorted(r["name"] for r in records) == ["fss/cat/1", "msra/im0", "msra/im1"]
    assert not any(r["has_coarse"] for r in records)
    problems = "\n".join(builder.problems)
    for bad in ("broken.jpg", "big.jpg", "orphan.png"):
        assert bad in problems, problems
    assert "size mismatch" in problems and "mask without image" in problems
    # RGB JPEGs are stored as their files (decoded when read) and the data source pickles
    # (worker processes of the training pipeline rebuild the builder from its arguments).
    raw = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    stored = {r["name"]: r["image"] for r in _records(raw)}
    assert stored["msra/im0"] == (a / "im0.jpg").read_bytes()
    source = builder.as_data_source("train")
    copy = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(copy[1]["image"], source[1]["image"])


def test_refine_folder_big_layout(tmp_path):
    rng = np.random.default_rng(1)
    image, gt = _pair(rng)
    _save(tmp_path / "big" / "a_im.jpg", image)
    _save(tmp_path / "big" / "a_gt.png", gt)
    _save(tmp_path / "big" / "a_seg.png", 255 - gt)
    _save(tmp_path / "big" / "b_im.jpg", image)
    _save(tmp_path / "big" / "b_gt.png", gt)  # no coarse mask: allowed
    source = jtfds.data_source("refine_folder", data_dir=str(tmp_path / "tfds"),
                               builder_kwargs={"folders": [str(tmp_path / "big")],
                                               "layout": "big"})
    records = {r["name"]: r for r in _records(source)}
    assert set(records) == {"big/a", "big/b"}
    assert records["big/a"]["has_coarse"] and not records["big/b"]["has_coarse"]
    np.testing.assert_array_equal(records["big/a"]["mask"][..., 0], gt)
    np.testing.assert_array_equal(records["big/a"]["coarse"][..., 0], 255 - gt)


def test_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.jpg").write_bytes(b"broken")
    (tmp_path / "empty" / "x.png").write_bytes(b"broken")
    builder = jtfds.builder("refine_folder", data_dir=str(tmp_path / "tfds"),
                            builder_kwargs={"folders": str(tmp_path / "empty")})
    with pytest.raises(ValueError, match="no usable example.*x.jpg"):
        builder.download_and_prepare()


def test_semantic_folder(tmp_path):
    rng = np.random.default_rng(2)
    for k in range(2):
        _save(tmp_path / "img" / f"{k}.jpg", _pair(rng)[0])
        label = rng.integers(0, 3, (24, 32)).astype(np.uint8)
        label[0, :4] = 255  # ignore
        _save(tmp_path / "lbl" / f"{k}.png", label)
    _save(tmp_path / "img" / "bad.jpg", _pair(rng)[0])
    _save(tmp_path / "lbl" / "bad.png", np.full((24, 32), 7, np.uint8))  # id out of range
    _save(tmp_path / "lbl" / "lonely.png", np.zeros((24, 32), np.uint8))
    builder = jtfds.builder("semantic_folder", data_dir=str(tmp_path / "tfds"),
                            builder_kwargs={"images": str(tmp_path / "img"),
                                            "labels": str(tmp_path / "lbl"),
                                            "class_names": "background,cat,dog"})
    builder.download_and_prepare()
    assert builder.info.metadata["class_names"] == ["background", "cat", "dog"]
    assert builder.info.metadata["ignore_label"] == 255
    records = _records(builder.as_data_source("train"))
    assert sorted(r["name"] for r in records) == ["0", "1"]
    assert records[0]["label"][0, 0, 0] == 255
    assert any("bad.png" in p for p in builder.problems)
    assert any("lonely.png" in p for p in builder.problems)
    copy = pickle.loads(pickle.dumps(builder.as_data_source("train")))
    np.testing.assert_array_equal(copy[0]["label"], records[0]["label"])


def test_unknown_builder_and_missing_data_dir():
    with pytest.raises(ValueError, match="unknown dataset"):
        jtfds.builder("nope", data_dir="/tmp/x")
    with pytest.raises(ValueError, match="data_dir"):
        jtfds.builder("synthetic_scenes", data_dir="")
