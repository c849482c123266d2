"""Folders of class sub-folders of images (`cats/001.jpg`, `dogs/002.jpg`), from a directory or an archive.

Fetching copies the readable images into `data/raw/images/<class>/`, so DVC versions exactly what was
used; every image is decoded once here, and unreadable ones are named (and the stage stops, or skips
them with `data.on_corrupt: skip`).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import stat
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.download import SourceFailed, download, is_url, remove_strays, retrying, sources_of
from pipeline.errors import DataError
from pipeline.files import atomic_path, file_digest
from pipeline.schema import DataConfig

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
IMAGES_DIR = "images"


UNREADABLE = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError,
              Image.DecompressionBombWarning, SyntaxError)  # SyntaxError: some of PIL's parsers on a broken file


def read_image(path: Path, size: tuple[int, int], channels: int) -> np.ndarray:
    """Decode an image, convert it to grayscale or RGB and resize it to (height, width); uint8 HWC."""
    try:
        with _opened(path) as img:
            img = _eight_bit(img).convert("L" if channels == 1 else "RGB").resize((size[1], size[0]), Image.BILINEAR)
    except UNREADABLE as e:
        raise DataError(f"{path}: not a readable image ({e})") from None
    return np.asarray(img, dtype=np.uint8).reshape(size[0], size[1], channels)


@contextlib.contextmanager
def _opened(path: Path):
    """The image, fully decoded; more than PIL's MAX_IMAGE_PIXELS (about 89 megapixels: 0.35 GB decoded) is refused
    as a decompression bomb instead of only warned about, so memory stays bounded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.load()
            yield img


def _eight_bit(img: Image.Image) -> Image.Image:
    """8 bits per channel, what `convert` expects: 16-bit grey scaled (PIL's own conversion clips at 255), and
    transparency composited over white (a transparent background is not black)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        return Image.fromarray((np.asarray(img, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return img


def list_images(root: Path) -> dict[str, list[Path]]:
    """{class name: sorted image paths} for each sub-folder of `root` that holds images (a symlink loop is neither
    a folder nor a file here)."""
    classes = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if images:
            classes[folder.name] = images
    folded = {}
    for name in classes:
        if (twin := folded.setdefault(name.casefold(), name)) != name:
            raise DataError(f"{root}: class folders {twin!r} and {name!r} differ only by case (one class on a "
                            "case-insensitive file system, two here). To fix: merge or rename them")
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
    _unpack(archive, out)
    return out


def _unpack(archive: Path, out: Path) -> None:
    """Unpack a .zip or .tar archive into `out`, checked first: an entry that would land outside `out` (`../`, an
    absolute path), a link, a device file or more bytes than the disk has free stops it, named in one line."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                entries = [(i.filename, _zip_kind(i), i.file_size) for i in zf.infolist()]
                _check_entries(archive, entries, out)
                zf.extractall(out)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                members = tf.getmembers()
                _check_entries(archive, [(m.name, _tar_kind(m), m.size) for m in members], out)
                tf.extractall(out, members=members, filter="data")  # checks again, as Python's own safety
        else:
            raise DataError(f"{archive.name} is neither a directory nor a .zip/.tar archive")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise DataError(f"{archive.name}: not a readable archive ({type(e).__name__}: {e})") from None


def _zip_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16
    return "link" if stat.S_ISLNK(mode) else "folder" if info.is_dir() else "file"


def _tar_kind(member: tarfile.TarInfo) -> str:
    return ("folder" if member.isdir() else "file" if member.isfile() else
            "link" if member.issym() or member.islnk() else "device or special file")


def _check_entries(archive: Path, entries: list[tuple[str, str, int]], out: Path) -> None:
    for name, kind, _ in entries:
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if name.startswith(("/", "\\")) or (parts and ":" in parts[0]):
            problem = "an absolute path"
        elif ".." in parts:
            problem = "a path leading out of the archive's folder"
        elif kind not in ("file", "folder"):
            problem = f"a {kind}"
        else:
            continue
        raise DataError(f"{archive.name}: entry {name!r} is {problem}; an archive of images may hold only files and "
                        "folders inside it, so nothing was unpacked")
    size, free = sum(entry[2] for entry in entries), shutil.disk_usage(out.parent).free
    if size > free:
        raise DataError(f"{archive.name}: would unpack to {size / 2**30:.1f} GiB, more than the {free / 2**30:.1f} "
                        "GiB free; nothing was unpacked")


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
                    with _opened(path) as img:
                        _eight_bit(img)
                except UNREADABLE as e:
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
