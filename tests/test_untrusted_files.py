"""Untrusted weight files and checkpoint directories: nothing in them runs, every problem is
named (file, key, expected and found shapes), and exports never look complete when they are
not."""

from __future__ import annotations

import builtins
import collections
import json
import pickle

import numpy as np
import pytest

from jax_refine.convert.common import read_checkpoint_file
from jax_refine.models import checkpoint_dir

torch = pytest.importorskip("torch")

from jax_refine.convert.__main__ import main as convert_main  # noqa: E402
from jax_refine.train.checkpoint import (  # noqa: E402
    load_init_variables,
    load_pna_init_variables,
)


class Payload:
    """Unpickling this object would create `marker` (what a malicious file would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def _planted(tmp_path, kind):
    """A weights file with a `__reduce__` payload next to real-looking tensors."""
    marker = tmp_path / f"ran_{kind}"
    arrays = {"conv1.weight": np.zeros((2, 2), np.float32)}
    if kind == "pkl":  # detectron2 model-zoo layout
        path = tmp_path / "R-52.pkl"
        path.write_bytes(pickle.dumps({"model": {**arrays, "evil": Payload(marker)}},
                                      protocol=2))
    elif kind == "pth-zip":  # torch.save's archive
        path = tmp_path / "model.pth"
        torch.save({"conv1.weight": torch.zeros(2, 2), "evil": Payload(marker)}, path)
    else:  # a bare pickle named .pth
        path = tmp_path / "model_raw.pth"
        path.write_bytes(pickle.dumps({"state_dict": Payload(marker)}, protocol=2))
    return path, marker


ENTRY_POINTS = {
    "convert crm": lambda path, out: convert_main(["crm", str(path), str(out)]),
    "convert pna": lambda path, out: convert_main(["pna", str(path), str(out)]),
    "init_from crm": lambda path, out: load_init_variables(path, {}, {}),
    "init_from pna": lambda path, out: load_pna_init_variables(path, {}, {}),
}


@pytest.mark.parametrize("kind", ["pkl", "pth-zip", "pth-raw"])
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_planted_payload_never_runs(tmp_path, capsys, kind, entry):
    path, marker = _planted(tmp_path, kind)
    try:
        status = ENTRY_POINTS[entry](path, tmp_path / "out")
        assert status == 1
        message = capsys.readouterr().err
    except ValueError as err:
        message = str(err)
    assert not marker.exists(), f"{entry} ran the payload of {path.name}"
    assert str(path) in message and "refus" in message
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_numpy_pickles_still_load(tmp_path, protocol):
    weights = collections.OrderedDict(
        a=np.arange(6, dtype=np.float32).reshape(2, 3), b=np.int64(3), c=np.ones(2, np.float16))
    path = tmp_path / "w.pkl"
    path.write_bytes(pickle.dumps({"model": weights, "__author__": "test"}, protocol=protocol))
    loaded = read_checkpoint_file(path)
    assert list(loaded) == ["a", "b", "c"]
    np.testing.assert_array_equal(loaded["a"], weights["a"])
    assert loaded["b"] == 3 and loaded["c"].dtype == np.float16


@pytest.mark.parametrize("content, suffix, match", [
    (b"", ".pth", "is empty"),
    (b"<!DOCTYPE html><html><body>Not Found</body></html>", ".pth", "HTML"),
    (b"\n  <html>", ".pkl", "HTML"),
    (b"version https://git-lfs.github.com/spec/v1\n", ".pth", "text file"),
    (b"\x00\x01\x02garbage", ".pth", "not a PyTorch checkpoint"),
    (b"garbage that is not a pickle", ".pkl", "cannot read checkpoint"),
])
def test_non_checkpoint_files_are_named(tmp_path, capsys, content, suffix, match):
    path = tmp_path / f"download{suffix}"
    path.write_bytes(content)
    assert convert_main(["crm", str(path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert match in err and str(path) in err and "weights_only" not in err
    assert convert_main(["crm", str(tmp_path / "absent.pth"), str(tmp_path / "out")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_convert_checks_every_shape_against_the_model(tmp_path, capsys):
    from tests.torch_mirrors import crm as mirror

    state = mirror.randomise(mirror.CRMNet(), seed=1).state_dict()
    state["imnet.layers.0.weight"] = torch.zeros(32, 200)
    state["aspp_.last_conv.0.weight"] = torch.zeros(256, 128, 3, 3)
    path = tmp_path / "crm.pth"
    torch.save(state, path)
    assert convert_main(["crm", str(path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "2 tensor(s) do not fit the model" in err
    assert ("imnet.layers.0.weight -> params/imnet/layers_0/kernel: expected shape (262, 32), "
            "found (200, 32)") in err
    assert ("aspp_.last_conv.0.weight -> params/aspp_/last_conv_0/kernel: expected shape "
            "(3, 3, 256, 256), found (3, 3, 128, 256)") in err
    assert not (tmp_path / "out").exists()


TINY = {"params": {"dense": {"kernel": np.ones((2, 3), np.float32)}},
        "batch_stats": {"bn": {"mean": np.zeros(3, np.float32)}}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return checkpoint_dir.save(tmp_path_factory.mktemp("ckpt") / "c", "jax_refine.crm",
                               {"depth": 18}, TINY)


@pytest.mark.parametrize("text, match", [
    ('{"format": "jax_refine.crm", "model": {"depth": 18,}', "invalid JSON at line 1"),
    ('[1, 2]', "expected a JSON object, found a list"),
    ('{"format": "jax_refine.crm"}', "key 'model' must be an object"),
    ('{"format": "jax_refine.crm", "model": [18]}', "key 'model' must be an object"),
    ('{"format": "jax_refine.crm", "model": {"detph": 18}}',
     "unknown key 'model.detph' (did you mean 'depth'?)"),
    ('{"format": "jax_refine.pna", "model": {}}', "format 'jax_refine.pna', expected"),
])
def test_config_json_problems_name_the_file_and_key(saved, tmp_path, text, match):
    import shutil

    directory = tmp_path / "c"
    shutil.copytree(saved, directory)
    (directory / "config.json").write_text(text)
    with pytest.raises(ValueError, match="config.json") as info:
        checkpoint_dir.load(directory, "jax_refine.crm")
    assert match in str(info.value) and str(directory) in str(info.value)


def test_truncated_weights_are_named(saved, tmp_path):
    import shutil

    directory = tmp_path / "c"
    shutil.copytree(saved, directory)
    kwargs, variables = checkpoint_dir.load(directory, "jax_refine.crm")
    assert kwargs == {"depth": 18}
    np.testing.assert_array_equal(variables["params"]["dense"]["kernel"], 1)
    files = sorted((p for p in (directory / "variables").rglob("*") if p.is_file()),
                   key=lambda p: p.stat().st_size)
    for p in files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(ValueError, match="cannot read the weights") as info:
        checkpoint_dir.load(directory, "jax_refine.crm")
    assert str(directory / "variables") in str(info.value)


def test_export_writes_weights_first_and_config_last(saved, tmp_path, monkeypatch):
    import shutil

    import orbax.checkpoint as ocp

    directory = tmp_path / "c"
    shutil.copytree(saved, directory)

    def crash(self, *args, **kwargs):
        assert not (directory / "config.json").exists()  # the old config went first
        raise OSError("disk full")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint_dir.save(directory, "jax_refine.crm", {"depth": 18}, TINY)
    assert not (directory / "config.json").exists()  # not a checkpoint, and does not look like one
    with pytest.raises(FileNotFoundError, match="no config.json"):
        checkpoint_dir.load(directory, "jax_refine.crm")
    monkeypatch.undo()
    checkpoint_dir.save(directory, "jax_refine.crm", {"depth": 34}, TINY)
    assert json.loads((directory / "config.json").read_text())["model"] == {"depth": 34}
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]
