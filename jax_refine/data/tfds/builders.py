"""TFDS builders over local data (see the package docstring)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from jax_refine.data.synthetic import make_scene

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")
log = logging.getLogger(__name__)


def _folders(folders: str | Sequence[str]) -> list[Path]:
    if isinstance(folders, str):
        folders = [f for f in folders.split(",") if f]
    out = [Path(f).expanduser().absolute() for f in folders]
    if not out:
        raise ValueError("no folders given")
    for f in out:
        if not f.is_dir():
            raise FileNotFoundError(f"{f} is not a directory")
    return out


def _digest(*parts: Any) -> str:
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:10]


def _read(path: Path, mode: str) -> np.ndarray:
    """Image file -> uint8 array (mode 'RGB' [H, W, 3] or 'L' [H, W]); ValueError if broken."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode)).copy()
    except (OSError, ValueError) as err:
        raise ValueError(f"unreadable file {path}: {err}") from err


def _stored_image(path: Path, image: np.ndarray) -> Path | np.ndarray:
    """What the builders store for an RGB image read from `path`: an RGB JPEG file's own
    bytes (TFDS copies the file: no re-encoding, a JPEG decode when training), else the
    pixels (TFDS encodes them as PNG)."""
    from PIL import Image

    with Image.open(path) as im:
        return path if im.format == "JPEG" and im.mode == "RGB" else image


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the local builders: no download checksums (and no package-resource lookup,
    which needs the `importlib_resources` backport under this TFDS version)."""

    url_infos = None
    code_path = None


class _FolderBuilder(_LocalBuilder, skip_registration=True):
    """Base of the builders over user folders.

    The folders are the dataset's identity (`identity` names one build per folder set).
    Problems found while generating are collected with their paths and logged; a build with
    no usable example is an error that quotes them. `arguments` are the subclass's own
    constructor arguments: a pickled builder (inside a data source sent to worker processes)
    is rebuilt from them.
    """

    def __init__(self, *, identity: str, description: str, arguments: dict[str, Any],
                 **kwargs: Any):
        self.problems: list[str] = []
        config = tfds.core.BuilderConfig(name=identity, description=description)
        super().__init__(config=config, **kwargs)
        state = self._original_state
        self._original_state = {"data_dir": state["data_dir"], "version": state["version"],
                                **arguments}

    def _folder_info(self, features: dict[str, Any], **metadata: Any) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(features),
            metadata=tfds.core.MetadataDict(**metadata) if metadata else None,
        )

    def _report(self, message: str) -> None:
        self.problems.append(message)
        log.warning("%s: %s", self.name, message)

    def _check_any(self, count: int, where: str) -> None:
        if count == 0:
            details = "; ".join(self.problems[:10]) or "no candidate files"
            raise ValueError(f"{self.name}: no usable example in {where} ({details})")


# ----------------------------------------------------------------------------- synthetic


@dataclasses.dataclass
class SyntheticScenesConfig(tfds.core.BuilderConfig):
    """size: scene side (px); num_train / num_test: scene counts; num_classes: 1 = binary.

    Train scenes use seeds 1_000_000 + i and test scenes seeds i (disjoint)."""

    size: int = 512
    num_train: int = 64
    num_test: int = 8
    num_classes: int = 1


class SyntheticScenes(_LocalBuilder):
    """Procedural scenes (`jax_refine.data.synthetic.make_scene`) with exact labels."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [
        SyntheticScenesConfig(name="binary", description="foreground / background"),
        SyntheticScenesConfig(name="multiclass", num_classes=4, description="4 classes"),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(c.size, c.size, 3)),
                # binary: 0 / 255 (mask); multi-class: class ids 0..num_classes
                "mask": tfds.features.Image(shape=(c.size, c.size, 1)),
                "seed": np.int64,
            }),
            metadata=tfds.core.MetadataDict(num_classes=c.num_classes),
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        return {
            "train": self._generate_examples(1_000_000, c.num_train),
            "test": self._generate_examples(0, c.num_test),
        }

    def _generate_examples(self, first: int, count: int) -> Iterator[tuple[int, dict]]:
        c = self.builder_config
        for seed in range(first, first + count):
            image, label = make_scene(seed, c.size, c.size, c.num_classes)
            if c.num_classes == 1:
                label = label * np.uint8(255)
            yield seed, {"image": image, "mask": label[..., None], "seed": seed}


# ----------------------------------------------------------------------------- refinement


class RefineFolder(_FolderBuilder):
    """Refinement pairs from local folders.

    Args (constructor):
      folders: folder paths (list or comma-separated string), all of them in 'train'.
      layout: 'pairs' (name.jpg + name.png, recursive: FSS-1000 class/name.*) or 'big'
        (name_im.*, name_gt.*, optional name_seg.* coarse masks).
    Features: image [H, W, 3], mask [H, W, 1] (0..255 GT), coarse [H, W, 1] (BIG only;
    all zeros and has_coarse False when absent), name (relative path).
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "RGB JPEG images stored as their files (no PNG re-encoding)."}

    def __init__(self, *, folders: str | Sequence[str] = "", layout: str = "pairs",
                 **kwargs: Any):
        if layout not in ("pairs", "big"):
            raise ValueError(f"layout must be 'pairs' or 'big', got {layout!r}")
        self.folders = _folders(folders)
        self.layout = layout
        super().__init__(
            identity=f"{layout}_{_digest([str(f) for f in self.folders])}",
            arguments={"folders": [str(f) for f in self.folders], "layout": layout},
            description=f"{layout} from {', '.join(str(f) for f in self.folders)}",
            **kwargs,
        )

    def _info(self) -> tfds.core.DatasetInfo:
        return self._folder_info({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "mask": tfds.features.Image(shape=(None, None, 1)),
            "coarse": tfds.features.Image(shape=(None, None, 1)),
            "has_coarse": np.bool_,
            "name": tfds.features.Text(),
        })

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _candidates(self) -> Iterator[tuple[str, Path, Path, Path | None]]:
        """(key, image, mask, coarse) per candidate; unpaired files are reported."""
        for folder in self.folders:
            files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
            if self.layout == "pairs":
                images = {p.with_suffix(""): p for p in files if p.suffix.lower() != ".png"}
                masks = {p.with_suffix(""): p for p in files if p.suffix.lower() == ".png"}
                for stem, mask in masks.items():
                    if stem not in images:
                        self._report(f"mask without image: {mask}")
                for stem, image in images.items():
                    if stem not in masks:
                        self._report(f"image without mask: {image}")
                        continue
                    yield str(stem.relative_to(folder.parent)), image, masks[stem], None
            else:
                by_tag: dict[str, dict[str, Path]] = {"im": {}, "gt": {}, "seg": {}}
                for p in files:
                    stem = p.with_suffix("").name
                    for tag in by_tag:
                        if stem.endswith(f"_{tag}"):
                            by_tag[tag][str(p.parent / stem[: -len(tag) - 1])] = p
                for name, gt in by_tag["gt"].items():
                    if name not in by_tag["im"]:
                        self._report(f"mask without image: {gt}")
                for name, image in sorted(by_tag["im"].items()):
                    if name not in by_tag["gt"]:
                        self._report(f"image without ground truth: {image}")
                        continue
                    key = str(Path(name).relative_to(folder.parent))
                    yield key, image, by_tag["gt"][name], by_tag["seg"].get(name)

    def _generate_examples(self) -> Iterator[tuple[str, dict]]:
        count = 0
        for key, image_path, mask_path, coarse_path in self._candidates():
            try:
                image = _read(image_path, "RGB")
                mask = _read(mask_path, "L")
                coarse = _read(coarse_path, "L") if coarse_path else None
            except ValueError as err:
                self._report(str(err))
                continue
            sizes = [image.shape[:2], mask.shape] + ([coarse.shape] if coarse is not None
                                                     else [])
            if len(set(sizes)) != 1:
                paths = [image_path, mask_path] + ([coarse_path] if coarse_path else [])
                self._report(f"size mismatch {sizes}: {', '.join(map(str, paths))}")
                continue
            count += 1
            yield key, {
                "image": _stored_image(image_path, image),
                "mask": mask[..., None],
                "coarse": (coarse if coarse is not None else np.zeros_like(mask))[..., None],
                "has_coarse": coarse is not None,
                "name": key,
            }
        self._check_any(count, ", ".join(map(str, self.folders)))


# ----------------------------------------------------------------------------- semantic


class SemanticFolder(_FolderBuilder):
    """Semantic segmentation from an image folder and a label-map folder.

    Args (constructor):
      images: folder of images (name.jpg / .png ...).
      labels: folder of PNG label maps name.png (class ids; 255 = ignore).
      class_names: list or comma-separated string, or a text file with one name per line.
      split: split name for these folders ('train').
    Features: image [H, W, 3], label [H, W, 1] uint8, name. Metadata: class_names,
    ignore_label (255).
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "RGB JPEG images stored as their files (no PNG re-encoding)."}
    IGNORE_LABEL = 255

    def __init__(self, *, images: str = "", labels: str = "",
                 class_names: str | Sequence[str] = "", split: str = "train", **kwargs: Any):
        self.image_dir, self.label_dir = _folders([images, labels])
        if isinstance(class_names, str):
            path = Path(class_names)
            if path.is_file():
                class_names = [n.strip() for n in path.read_text().splitlines() if n.strip()]
            else:
                class_names = [n for n in class_names.split(",") if n]
        if not class_names:
            raise ValueError("class_names is empty")
        self.class_names = list(class_names)
        self.split_name = split
        digest = _digest(str(self.image_dir), str(self.label_dir), self.class_names)
        super().__init__(
            identity=f"{split}_{digest}",
            arguments={"images": str(self.image_dir), "labels": str(self.label_dir),
                       "class_names": self.class_names, "split": split},
            description=f"{self.image_dir} + {self.label_dir}",
            **kwargs,
        )

    def _info(self) -> tfds.core.DatasetInfo:
        return self._folder_info(
            {
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.Image(shape=(None, None, 1)),
                "name": tfds.features.Text(),
            },
            class_names=self.class_names,
            ignore_label=self.IGNORE_LABEL,
        )

    def _split_generators(self, dl_manager):
        return {self.split_name: self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[str, dict]]:
        images = {p.stem: p for p in sorted(self.image_dir.iterdir())
                  if p.suffix.lower() in IMAGE_EXTS}
        labels = {p.stem: p for p in sorted(self.label_dir.iterdir())
                  if p.suffix.lower() == ".png"}
        for stem in sorted(set(labels) - set(images)):
            self._report(f"label without image: {labels[stem]}")
        for stem in sorted(set(images) - set(labels)):
            self._report(f"image without label: {images[stem]}")
        count = 0
        num_classes = len(self.class_names)
        for stem in sorted(set(images) & set(labels)):
            try:
                image = _read(images[stem], "RGB")
                label = _read(labels[stem], "L")
            except ValueError as err:
                self._report(str(err))
                continue
            if image.shape[:2] != label.shape:
                self._report(f"size mismatch {image.shape[:2]} vs {label.shape}: "
                             f"{images[stem]}, {labels[stem]}")
                continue
            bad = np.unique(label[(label >= num_classes) & (label != self.IGNORE_LABEL)])
            if bad.size:
                self._report(f"label ids {bad.tolist()} outside 0..{num_classes - 1} "
                             f"(and not 255): {labels[stem]}")
                continue
            count += 1
            yield stem, {"image": _stored_image(images[stem], image),
                         "label": label[..., None], "name": stem}
        self._check_any(count, f"{self.image_dir} + {self.label_dir}")
