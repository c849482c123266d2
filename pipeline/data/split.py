"""Stratified, seeded train / validation (/ test) splits, stored as compact uint8 arrays.

`data/split/<split>/x.npy` holds images (N, height, width, channels) and `y.npy` labels; `meta.json`
the class names, the image shape and the count of each class in each split. The same raw data, config
and seed give byte-identical files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from pipeline import tracking
from pipeline.data.idx import read_idx
from pipeline.data.image_folder import IMAGES_DIR, list_images, read_image
from pipeline.errors import DataError
from pipeline.files import atomic_path
from pipeline.schema import DataConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
Arrays = tuple[np.ndarray, np.ndarray]


def make_splits(data: DataConfig, raw: Path, seed: int) -> tuple[dict[str, Arrays], list[str]]:
    """Split the raw data into train, val and test arrays; also return the class names."""
    needed = [raw / IMAGES_DIR] if data.format == "image_folder" else [raw / s.name for s in data.files.values()]
    if missing := [path for path in needed if not path.exists()]:
        raise DataError(f"{missing[0]} not found: the download stage fetches it (dvc repro download)")
    if data.format == "idx":
        pool, test, classes = _idx_arrays(data, raw)
    else:
        pool, test, classes = _folder_arrays(data, raw, seed)
    pool = _subset(pool, data.limit_train, seed, "data.limit_train")
    test = _subset(test, data.limit_test, seed, "data.limit_test")
    train, val = _stratified(pool, data.val_size, seed, "data.val_size")
    return {"train": train, "val": val, "test": test}, classes


def _idx_arrays(data: DataConfig, raw: Path) -> tuple[Arrays, Arrays, list[str]]:
    files = {key: read_idx(raw / spec.name) for key, spec in data.files.items()}
    expected = (*data.image_size, data.channels)
    arrays = []
    for part in ("train", "test"):
        x, y = files[f"{part}_images"], files[f"{part}_labels"]
        x = x.reshape(*x.shape, 1) if x.ndim == 3 else x
        if x.shape[1:] != expected:
            raise DataError(f"{part} images are {x.shape[1:]}, but data.image_size and data.channels say {expected}")
        if len(x) != len(y):
            raise DataError(f"{part}: {len(x)} images but {len(y)} labels")
        if y.max(initial=0) >= len(data.classes):
            raise DataError(f"{part} labels go up to {y.max()}, but data.classes names {len(data.classes)} classes")
        arrays.append((x, y))
    return arrays[0], arrays[1], list(data.classes)


def _folder_arrays(data: DataConfig, raw: Path, seed: int) -> tuple[Arrays, Arrays, list[str]]:
    found = list_images(raw / IMAGES_DIR)
    classes = sorted(found)
    size = tuple(data.image_size)
    xs, ys = [], []
    for label, name in enumerate(classes):
        for path in found[name]:
            xs.append(read_image(path, size, data.channels))
            ys.append(label)
    log.info("read %d images of %d classes at %s", len(xs), len(classes), size)
    pool, test = _stratified((np.stack(xs), np.asarray(ys, dtype=np.uint8)), data.test_size, seed, "data.test_size")
    return pool, test, classes


def _subset(arrays: Arrays, limit: int | None, seed: int, key: str) -> Arrays:
    if limit is None or limit >= len(arrays[1]):
        return arrays
    kept, _ = _stratified(arrays, len(arrays[1]) - limit, seed, key)
    return kept


def _stratified(arrays: Arrays, held_out: float | int, seed: int, key: str) -> tuple[Arrays, Arrays]:
    """Split into (kept, held out), with every class in the same proportion in both; order kept."""
    x, y = arrays
    try:
        kept, held = train_test_split(np.arange(len(y)), test_size=held_out, stratify=y, random_state=seed)
    except ValueError as e:
        raise DataError(f"cannot split {len(y)} examples with {key}={held_out}: {e}") from None
    kept, held = np.sort(kept), np.sort(held)
    return (x[kept], y[kept]), (x[held], y[held])


def write_splits(splits: dict[str, Arrays], classes: list[str], dest: Path) -> None:
    """Write the arrays and meta.json into `dest`, replacing it only once everything is written."""
    with atomic_path(dest, directory=True) as tmp:
        for name, (x, y) in splits.items():
            (tmp / name).mkdir()
            np.save(tmp / name / "x.npy", np.ascontiguousarray(x, dtype=np.uint8))
            np.save(tmp / name / "y.npy", np.ascontiguousarray(y, dtype=np.uint8))
        meta = {"classes": classes, "image_shape": list(splits["train"][0].shape[1:]),
                "class_count": class_counts(splits, classes)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def load_split(name: str, root: Path) -> Arrays:
    """The (images, labels) of one split, memory-mapped: cheap to open, read as used."""
    if not (root / name / "x.npy").is_file():
        raise DataError(f"{root / name}: no split here; run `dvc repro split` first")
    return np.load(root / name / "x.npy", mmap_mode="r"), np.load(root / name / "y.npy", mmap_mode="r")


def load_classes(root: Path) -> list[str]:
    """The class names, in label order."""
    return json.loads((root / "meta.json").read_text(encoding="utf-8"))["classes"]


@dataclass
class Splits:
    """Everything a model stage reads: the three splits, in memory, and the class names."""

    train: Arrays
    val: Arrays
    test: Arrays
    classes: list[str]

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train[0].shape[1:])


def load_splits(root: Path) -> Splits:
    """The three splits in memory, each logged as an input of the active MLflow run (with its digest)."""
    arrays = {name: tuple(np.asarray(a) for a in load_split(name, root)) for name in SPLITS}
    tracking.log_splits(arrays, root)
    return Splits(*arrays.values(), classes=load_classes(root))


def class_counts(splits: dict[str, Arrays], classes: list[str]) -> dict[str, dict[str, int]]:
    """{split: {class name: count}}, for meta.json (not a metric: three columns per class in `dvc exp show`)."""
    return {name: {c: int(n) for c, n in zip(classes, np.bincount(y, minlength=len(classes)), strict=True)}
            for name, (_, y) in splits.items()}
