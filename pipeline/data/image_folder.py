"""Folders of class sub-folders of images (`cats/001.jpg`, `dogs/002.jpg`), from a directory or an archive.

Fetching copies the readable images into `data/raw/images/<class>/`, so DVC versions exactly what was
used; every image is decoded once here, and unreadable ones are named (and the stage stops, or skips
them with `data.on_corrupt: skip`).
"""

from __future__ import annotations

import logging
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.download import SourceFailed, download, is_url, remove_strays, retrying, sources_of
from pipeline.errors import DataError
from pipeline.files import atomic_path, file_digest
from pipeline.schema import DataConfig

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
IMAGES_DIR = "images"


def read_image(path: Path, size: tuple[int, int], channels: int) -> np.ndarray:
    """Decode an image, convert it to grayscale or RGB and resize it to (height, width); uint8 HWC."""
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB").resize((size[1], size[0]), Image.BILINEAR)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None
    return np.asarray(img, dtype=np.uint8).reshape(size[0], size[1], channels)


def list_images(root: Path) -> dict[str, list[Path]]:
    """{class name: sorted image paths} for each sub-folder of `root` that holds images."""
    classes = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if images:
            classes[folder.name] = images
    return classes


def fetch_image_folder(data: DataConfig, dest: Path, backoff_s: float = 1.0) -> dict[str, int]:
    """Copy the readable images of the first source that has them into `dest/images/`; {class: count}."""
    dest.mkdir(parents=True, exist_ok=True)
    failures = []
    with tempfile.TemporaryDirectory(prefix=".unpack-", dir=dest) as scratch:
        for source in sources_of(data):
            try:
                root = _class_root(_materialise(source, data, Path(scratch), backoff_s))
            except (DataError, OSError) as e:
                log.warning("%s: %s", source, e)
                failures.append(f"{source}: {e}")
                continue
            counts = _copy_readable(root, data, dest / IMAGES_DIR)
            break
        else:
            tried = "; ".join(failures) or "data.source and data.mirrors are empty"
            raise DataError(f"no folder of class sub-folders of images found ({tried}). "
                            "To fix: point data.source at a directory (or .zip/.tar archive) of class sub-folders")
    remove_strays(dest, keep={IMAGES_DIR})
    return counts


def _materialise(source: str, data: DataConfig, scratch: Path, backoff_s: float) -> Path:
    """A local directory for `source`: itself, or the archive it names (downloaded if a URL) unpacked."""
    archive = Path(source)
    if is_url(source):
        archive = scratch / source.rstrip("/").rsplit("/", 1)[-1]
        try:
            retrying(lambda: download(source, archive, data.timeout_s), data.retries, backoff_s)
        except SourceFailed as e:
            raise DataError(str(e)) from None
    if archive.is_dir():
        return archive
    if not archive.is_file():
        raise DataError("no such file or directory")
    spec = data.files.get("archive")
    if spec and spec.sha256 and file_digest(archive) != spec.sha256:
        raise DataError(f"checksum mismatch for {archive.name} (expected sha256 {spec.sha256[:12]}...)")
    if spec and spec.md5 and file_digest(archive, "md5") != spec.md5:
        raise DataError(f"checksum mismatch for {archive.name} (expected md5 {spec.md5})")
    out = scratch / "unpacked"
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(out)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            tf.extractall(out, filter="data")
    else:
        raise DataError(f"{archive.name} is neither a directory nor a .zip/.tar archive")
    return out


def _class_root(root: Path) -> Path:
    """The folder whose sub-folders are the classes (archives often wrap everything in one folder)."""
    while not list_images(root):
        entries = [p for p in root.iterdir() if not p.name.startswith((".", "__MACOSX"))]
        if len(entries) != 1 or not entries[0].is_dir():
            raise DataError(f"no class sub-folders with images in {root}")
        root = entries[0]
    return root


def _copy_readable(root: Path, data: DataConfig, dest: Path) -> dict[str, int]:
    found = list_images(root)
    if len(found) < 2:
        raise DataError(f"{root}: found {len(found)} class sub-folder(s) with images; need at least 2")
    if data.classes and sorted(data.classes) != sorted(found):
        raise DataError(f"{root}: sub-folders {sorted(found)} do not match data.classes {sorted(data.classes)}")
    corrupt, counts = [], {}
    with atomic_path(dest, directory=True) as tmp:
        for name, images in found.items():
            (tmp / name).mkdir()
            for path in images:
                try:
                    with Image.open(path) as img:
                        img.load()
                except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
                    corrupt.append(f"{name}/{path.name}")
                    log.warning("%s: not a readable image (%s)", path, e)
                    continue
                shutil.copyfile(path, tmp / name / path.name)
            counts[name] = len(list((tmp / name).iterdir()))
        if corrupt and data.on_corrupt == "error":
            shown = ", ".join(corrupt[:10]) + (f" and {len(corrupt) - 10} more" if len(corrupt) > 10 else "")
            raise DataError(f"{len(corrupt)} unreadable image(s) in {root}: {shown}. "
                            "To fix: remove them, or set data.on_corrupt=skip to leave them out")
    if corrupt:
        log.warning("left out %d unreadable image(s): %s", len(corrupt), ", ".join(corrupt))
    log.info("%d images in %d classes: %s", sum(counts.values()), len(counts), counts)
    return counts
