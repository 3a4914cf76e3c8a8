"""Image and mask files read as users mean them (16-bit, palette, 0/1 labels), errors that name
the file and what was found, and atomic writes."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from PIL import Image

from jax_refine import io as jio

RAMP16 = (np.arange(12 * 16, dtype=np.uint32).reshape(12, 16) * 340).astype(np.uint16)


def _save16(path, array):
    Image.fromarray(array).save(path)  # mode I;16
    assert Image.open(path).mode.startswith("I;16")


def test_16_bit_image_is_scaled_to_8_bits(tmp_path):
    _save16(tmp_path / "im.png", RAMP16)
    image = jio.read_image(tmp_path / "im.png")
    assert image.dtype == np.uint8 and image.shape == (12, 16)
    np.testing.assert_array_equal(image, np.round(RAMP16 / 257).astype(np.uint8))
    assert image.max() < 255  # the old reader clipped everything above 255 to white


def test_8_bit_images_are_read_as_stored(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(jio.read_image(tmp_path / "rgb.png"), rgb)
    Image.fromarray(rgb).convert("P").save(tmp_path / "pal.png")
    assert jio.read_image(tmp_path / "pal.png").shape == (5, 7, 3)


def test_16_bit_soft_mask_is_scaled_by_its_range(tmp_path):
    _save16(tmp_path / "m.png", RAMP16)
    mask = jio.read_mask(tmp_path / "m.png")
    np.testing.assert_array_equal(mask, np.round(RAMP16 / 257).astype(np.uint8))
    assert 0.3 < (mask > 128).mean() < 0.7  # not all foreground


@pytest.mark.parametrize("kind", ["palette", "label8", "label16", "bilevel"])
def test_label_masks_read_nonzero_as_foreground(tmp_path, kind):
    labels = np.zeros((9, 11), np.uint8)
    labels[2:6, 3:8] = 1
    labels[7, 1] = 15 if kind == "palette" else 1
    path = tmp_path / f"{kind}.png"
    if kind == "palette":  # VOC/DAVIS: indices into a colour palette
        im = Image.fromarray(labels, mode="P")
        im.putpalette([0, 0, 0, 128, 0, 0] + [200, 200, 200] * 254)
        im.save(path)
    elif kind == "label16":
        _save16(path, labels.astype(np.uint16))
    elif kind == "bilevel":
        Image.fromarray(labels.astype(bool)).save(path)
    else:
        Image.fromarray(labels).save(path)
    mask = jio.read_mask(path)
    np.testing.assert_array_equal(mask, np.where(labels != 0, 255, 0))


def test_grayscale_and_rgb_masks_as_the_reference_reads_them(tmp_path):
    soft = np.linspace(0, 255, 40, dtype=np.uint8).reshape(5, 8)
    Image.fromarray(soft).save(tmp_path / "soft.png")
    np.testing.assert_array_equal(jio.read_mask(tmp_path / "soft.png"), soft)
    rgb = np.stack([soft] * 3, axis=-1)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(jio.read_mask(tmp_path / "rgb.png"), soft)


def test_reader_errors_name_the_file_and_what_was_found(tmp_path):
    wide = np.array([[0, 70000], [5, 6]], np.int32)
    Image.fromarray(wide, mode="I").save(tmp_path / "wide.tif")
    with pytest.raises(ValueError) as info:
        jio.read_mask(tmp_path / "wide.tif")
    message = str(info.value)
    assert str(tmp_path / "wide.tif") in message
    assert "mode I" in message and "int32" in message and "0..70000" in message

    Image.fromarray(np.full((2, 2), 3.5, np.float32), mode="F").save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match=r"mode F, dtype float32.*3\.5\.\.3\.5.*\[0, 1\]"):
        jio.read_image(tmp_path / "f.tif")

    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="broken.png"):
        jio.read_image(tmp_path / "broken.png")
    with pytest.raises(ValueError, match="absent.png does not exist"):
        jio.read_mask(tmp_path / "absent.png")


def test_writes_are_atomic_on_a_full_disk(tmp_path, monkeypatch):
    out = tmp_path / "out.png"
    jio.write_image(out, np.zeros((4, 4), np.uint8))
    before = out.read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jio.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        jio.write_image(out, np.full((4, 4), 255, np.uint8))
    with pytest.raises(OSError, match="No space left"):
        jio.write_image(tmp_path / "new.png", np.full((4, 4), 255, np.uint8))
    assert out.read_bytes() == before  # the previous file is intact
    assert sorted(os.listdir(tmp_path)) == ["out.png"]  # no 0-byte PNG, no temporary file
    with pytest.raises(ValueError, match="unknown image extension '.msk'"):
        jio.write_image(tmp_path / "m.msk", np.zeros((2, 2), np.uint8))
