"""Image and mask files as users mean them, and atomic writes.

Readers (Pillow) return uint8 arrays for `Refiner.refine`, or raise `ValueError` naming the
file and what was found (mode, dtype, value range):

* images -> uint8 [H, W, 3|4] or [H, W]: 8-bit files as stored; 16-bit files (mode I;16,
  e.g. 16-bit PNG/TIFF) scaled to 8 bits (v / 257, rounded); 16-bit RGB files are reduced
  to 8 bits by Pillow itself; float images (mode F) must lie in [0, 1].
* masks -> uint8 [H, W] in 0..255, 255 = foreground:
  - 8-bit grayscale, RGB(A), LA: as the reference reads them (luma, `convert('L')`);
  - label masks read as labels, nonzero = foreground: palette images (VOC / DAVIS PNGs; the
    indices, not the palette colours, so VOC's void label 255 counts as foreground), 1-bit
    images, and 8- or 16-bit masks whose values are only 0 and 1;
  - 16-bit soft masks scaled by the 16-bit range (v / 257); float masks (mode F) in [0, 1].

Predictions as the reference stores and scores them (`probability_to_uint8`,
`binarize_mask`, `binarize_probability`): CRM's `test.py` saves a probability p as the 8-bit
PNG floor(255 p) and its evaluation scripts (`eval_post*.py`) read masks as 8-bit grayscale
and keep the pixels > 128, so a prediction is foreground when floor(255 p) > 128, i.e.
p >= 129/255 ~ 0.506 (not p > 0.5). Ground truths and coarse masks are binarised with the
same > 128. Every CRM metric in jax_refine (evaluate.py, the training loop's evaluation,
the demo, the refine command line) uses these.

Writers replace the destination atomically (a temporary file in the same folder, flushed,
then `os.replace`): a full disk or a crash leaves the previous file or none, never a
truncated one.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _describe(path: Path, mode: str, array: np.ndarray) -> str:
    lo, hi = (array.min(), array.max()) if array.size else (None, None)
    return f"{path}: mode {mode}, dtype {array.dtype}, shape {array.shape}, values {lo}..{hi}"


def _open(path: str | Path, what: str):
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path} does not exist" if not path.exists()
                         else f"{what} {path} is not a file")
    try:
        im = Image.open(path)
        im.load()
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read {what} {path}: {err}") from err
    return im


def _sixteen_bit_to_8(path: Path, mode: str, array: np.ndarray, what: str) -> np.ndarray:
    """Integer [H, W] of 16-bit range (I;16, or I within 0..65535) -> uint8 (v / 257)."""
    if array.size and (array.min() < 0 or array.max() > 65535):
        raise ValueError(f"{what} {_describe(path, mode, array)}: values outside the 16-bit "
                         f"range 0..65535 are not supported")
    return np.round(array.astype(np.float64) / 257).astype(np.uint8)


def _unit_float_to_8(path: Path, mode: str, array: np.ndarray, what: str) -> np.ndarray:
    if array.size and not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
        raise ValueError(f"{what} {_describe(path, mode, array)}: float files must hold "
                         f"values in [0, 1]")
    return np.round(array.astype(np.float64) * 255).astype(np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """An image file -> uint8 RGB [H, W, 3], RGBA [H, W, 4] or grayscale [H, W] (see module)."""
    path = Path(path)
    with _open(path, "image") as im:
        mode = im.mode
        if mode in ("RGB", "RGBA", "L"):
            return np.asarray(im).copy()
        if mode.startswith("I"):  # I;16, I;16B, I (32-bit integer)
            return _sixteen_bit_to_8(path, mode, np.asarray(im), "image")
        if mode == "F":
            return _unit_float_to_8(path, mode, np.asarray(im), "image")
        try:
            return np.asarray(im.convert("RGB")).copy()
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot convert image {path} (mode {mode}) to RGB: {err}") from err


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file -> uint8 [H, W], 0..255 with 255 = foreground (see the module docstring)."""
    path = Path(path)
    with _open(path, "mask") as im:
        mode = im.mode
        if mode in ("P", "PA", "1"):  # labels: palette indices, or 1-bit
            indices = np.asarray(im if mode != "PA" else im.getchannel(0))
            return np.where(indices != 0, 255, 0).astype(np.uint8)
        if mode.startswith("I"):
            array = np.asarray(im)
            if _is_binary_label(array):
                return (array.astype(np.uint8) * 255).astype(np.uint8)
            return _sixteen_bit_to_8(path, mode, array, "mask")
        if mode == "F":
            return _unit_float_to_8(path, mode, np.asarray(im), "mask")
        try:
            gray = np.asarray(im if mode == "L" else im.convert("L")).copy()
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot convert mask {path} (mode {mode}) to grayscale: "
                             f"{err}") from err
    if _is_binary_label(gray):
        return gray * np.uint8(255)
    return gray


def _is_binary_label(array: np.ndarray) -> bool:
    """True for a 0/1 label mask (values only 0 and 1, with at least one 1)."""
    return array.size > 0 and int(array.max()) == 1 and int(array.min()) >= 0


MASK_THRESHOLD = 128  # foreground: 8-bit value > 128 (the reference's evaluation scripts)


def probability_to_uint8(prob: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> uint8 floor(255 p), the reference's 8-bit PNG of a
    prediction (`(p * 255).astype('uint8')` on float32, bit for bit; values outside [0, 1]
    are clipped first). Raises ValueError on NaN."""
    prob = np.asarray(prob, np.float32)
    if np.isnan(prob).any():
        raise ValueError(f"probabilities contain NaN (shape {prob.shape})")
    return (np.clip(prob, 0, 1) * np.float32(255)).astype(np.uint8)


def binarize_mask(mask: np.ndarray) -> np.ndarray:
    """An 8-bit mask (uint8 0..255, 255 = foreground) -> bool foreground, value > 128."""
    mask = np.asarray(mask)
    if mask.dtype != np.uint8:
        raise ValueError(f"expected an 8-bit mask (uint8 0..255), got dtype {mask.dtype}")
    return mask > MASK_THRESHOLD


def binarize_probability(prob: np.ndarray) -> np.ndarray:
    """Foreground of a probability map as the reference scores it: floor(255 p) > 128
    (p >= 129/255); bool of prob's shape."""
    return binarize_mask(probability_to_uint8(prob))


def _atomic_write(path: Path, data: bytes) -> None:
    path = Path(path)
    if path.exists():
        mode = path.stat().st_mode & 0o777
    else:  # what open() would give: 0o666 minus the umask (mkstemp's file is 0o600)
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically (temporary file + os.replace)."""
    _atomic_write(Path(path), text.encode("utf-8"))


def write_image(path: str | Path, array: np.ndarray) -> None:
    """Encode uint8 `array` in the format of `path`'s suffix and write it atomically."""
    from PIL import Image

    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image extension {path.suffix!r} "
                         f"(use one of {', '.join(IMAGE_SUFFIXES)})")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    _atomic_write(path, buffer.getvalue())


def files_by_stem(directory: Path) -> dict[str, list[Path]]:
    """Files of `directory` by stem, sorted (literal names: no glob interpretation)."""
    by_stem: dict[str, list[Path]] = {}
    for entry in sorted(Path(directory).iterdir()):
        if entry.is_file() and not entry.name.startswith("."):
            by_stem.setdefault(entry.stem, []).append(entry)
    return by_stem
