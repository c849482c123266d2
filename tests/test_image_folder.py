"""Image folders: directories and archives of class sub-folders, corrupt images named, three-way split."""

from __future__ import annotations

import io
import re
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.image_folder import IMAGES_DIR, fetch_image_folder, read_image
from pipeline.data.split import class_counts, make_splits
from pipeline.errors import DataError
from pipeline.paths import RAW_DIR
from tests.conftest import load_config, make_images

CLASSES = ("cat", "dog", "fox")


def write_folder(root: Path, per_class: int = 20, corrupt: bool = True) -> Path:
    """Class sub-folders of real PNG/JPEG files of varied sizes, one corrupt file, one non-image file."""
    for label, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True)
        images = make_images(np.full(per_class, label), size=40, channels=3, seed=label)
        for i, pixels in enumerate(images):
            img = Image.fromarray(pixels).resize((40 + i, 36))
            img.save(folder / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    (root / "cat" / "Thumbs.db").write_bytes(b"not an image, and not named like one")
    if corrupt:
        (root / "dog" / "666.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def folder_config(source: Path, *extra: str):
    return load_config("data=image_folder", f"data.source={source}", "data.image_size=[24,24]", *extra)


def test_corrupt_images_are_named_and_nothing_is_written(tmp_path, workdir):
    source = write_folder(tmp_path / "pets")
    with pytest.raises(DataError) as err:
        fetch_image_folder(folder_config(source).data, RAW_DIR, backoff_s=0)
    assert "1 unreadable image(s)" in str(err.value) and "dog/666.jpg" in str(err.value)
    assert "data.on_corrupt=skip" in str(err.value) and "\n" not in str(err.value)
    assert not (RAW_DIR / IMAGES_DIR).exists()


def test_skip_leaves_corrupt_images_out(tmp_path, workdir, caplog):
    source = write_folder(tmp_path / "pets")
    counts = fetch_image_folder(folder_config(source, "data.on_corrupt=skip").data, RAW_DIR, backoff_s=0)
    assert counts == {"cat": 20, "dog": 20, "fox": 20}
    assert not (RAW_DIR / IMAGES_DIR / "dog" / "666.jpg").exists()
    assert "dog/666.jpg" in caplog.text


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archives_with_a_wrapping_folder(tmp_path, workdir, kind):
    write_folder(tmp_path / "src" / "PetImages", corrupt=False)
    archive = tmp_path / f"pets.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for path in (tmp_path / "src").rglob("*"):
                zf.write(path, path.relative_to(tmp_path / "src"))
    else:
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(tmp_path / "src" / "PetImages", arcname="PetImages")
    counts = fetch_image_folder(folder_config(archive).data, RAW_DIR, backoff_s=0)
    assert counts == {"cat": 20, "dog": 20, "fox": 20}
    assert not [p for p in RAW_DIR.iterdir() if p.name != IMAGES_DIR]  # unpacking scratch is gone


def test_archive_from_a_url_with_checksum(tmp_path, workdir, file_server):
    import hashlib

    write_folder(tmp_path / "src", corrupt=False)
    archive = Path(shutil.make_archive(str(tmp_path / "pets"), "zip", tmp_path / "src"))
    file_server.routes["/data/pets.zip"] = archive.read_bytes()
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    cfg = folder_config(tmp_path / "missing", f"data.mirrors=[{file_server.url('data')}pets.zip]",
                        f"+data.files.archive={{name: pets.zip, sha256: {digest}, md5: null}}")
    assert fetch_image_folder(cfg.data, RAW_DIR, backoff_s=0) == {"cat": 20, "dog": 20, "fox": 20}
    bad = folder_config(tmp_path / "missing", f"data.mirrors=[{file_server.url('data')}pets.zip]",
                        f"+data.files.archive={{name: pets.zip, sha256: {'0' * 64}, md5: null}}")
    with pytest.raises(DataError, match="checksum mismatch for pets.zip"):
        fetch_image_folder(bad.data, RAW_DIR, backoff_s=0)


def test_class_names_must_match_the_folders(tmp_path, workdir):
    source = write_folder(tmp_path / "pets", corrupt=False)
    with pytest.raises(DataError, match="do not match data.classes"):
        fetch_image_folder(folder_config(source, "data.classes=[cat,dog]").data, RAW_DIR, backoff_s=0)


def test_three_way_split_resizes_and_stratifies(tmp_path, workdir):
    source = write_folder(tmp_path / "pets", corrupt=False)
    cfg = folder_config(source, "data.channels=1", "data.val_size=0.25", "data.test_size=0.25")
    fetch_image_folder(cfg.data, RAW_DIR, backoff_s=0)
    splits, classes = make_splits(cfg.data, RAW_DIR, cfg.seed)
    assert classes == list(CLASSES)
    assert {name: len(y) for name, (_, y) in splits.items()} == {"train": 33, "val": 12, "test": 15}
    assert splits["train"][0].shape[1:] == (24, 24, 1)
    counts = class_counts(splits, classes)
    assert set(counts["test"].values()) == {5} and set(counts["val"].values()) == {4}


def _tar_entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"x", link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, len(data) if kind == tarfile.REGTYPE else 0, link
    return info, data


HOSTILE_TAR = {
    "dot-dot": _tar_entry("pets/../../../escaped.png"),
    "absolute": _tar_entry("/tmp/escaped.png"),
    "symlink": _tar_entry("pets/cat/link.png", tarfile.SYMTYPE, link="/etc/passwd"),
    "hard link": _tar_entry("pets/cat/hard.png", tarfile.LNKTYPE, link="pets/cat/000.jpg"),
    "device": _tar_entry("pets/cat/dev.png", tarfile.CHRTYPE),
}


@pytest.mark.parametrize("hazard", HOSTILE_TAR)
def test_an_archive_entry_outside_its_folder_a_link_or_a_device_is_named_and_nothing_is_unpacked(tmp_path, workdir,
                                                                                                    hazard):
    write_folder(tmp_path / "src" / "pets", corrupt=False)
    archive = tmp_path / "pets.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "src" / "pets", arcname="pets")
        info, data = HOSTILE_TAR[hazard]
        tf.addfile(info, io.BytesIO(data) if info.isfile() else None)
    with pytest.raises(DataError) as err:
        fetch_image_folder(folder_config(archive).data, RAW_DIR, backoff_s=0)
    message = str(err.value)
    assert "pets.tar.gz" in message and repr(info.name) in message and "\n" not in message
    assert not (RAW_DIR / IMAGES_DIR).exists() and not list(tmp_path.parent.rglob("escaped.png"))
    assert not Path("/tmp/escaped.png").exists()


@pytest.mark.parametrize("name", ["../escaped.png", "/escaped.png", "link"])
def test_a_zip_entry_outside_its_folder_or_a_link_is_named(tmp_path, workdir, name):
    write_folder(tmp_path / "src" / "pets", corrupt=False)
    archive = tmp_path / "pets.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in (tmp_path / "src").rglob("*"):
            zf.write(path, path.relative_to(tmp_path / "src"))
        info = zipfile.ZipInfo(name)
        if name == "link":
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match=f"pets.zip: entry '{re.escape(name)}' is") as err:
        fetch_image_folder(folder_config(archive).data, RAW_DIR, backoff_s=0)
    assert "\n" not in str(err.value) and not list(tmp_path.parent.rglob("escaped.png"))


def test_a_truncated_archive_is_named(tmp_path, workdir):
    write_folder(tmp_path / "src" / "pets", corrupt=False)
    archive = tmp_path / "pets.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "src" / "pets", arcname="pets")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match="pets.tar.gz: not a readable archive"):
        fetch_image_folder(folder_config(archive).data, RAW_DIR, backoff_s=0)


def hostile_images(folder: Path) -> dict[str, tuple[int, int, int] | None]:
    """Images a real folder may hold, each with the RGB its centre must decode to (None: must be named unreadable)."""
    folder.mkdir(parents=True)
    Image.new("CMYK", (30, 30), (0, 255, 255, 0)).save(folder / "cmyk.jpg")  # red, as a print workflow saves it
    Image.fromarray(np.full((30, 30), 32768, dtype=np.uint16)).save(folder / "grey16.png")  # half of 16 bits
    palette = Image.new("P", (30, 30), 1)
    palette.putpalette([0, 0, 0, 0, 128, 255] + [0] * 762)
    palette.save(folder / "palette.png")
    Image.new("RGBA", (30, 30), (0, 0, 0, 0)).save(folder / "alpha.png")  # fully transparent: the background
    Image.new("LA", (30, 30), (0, 0)).save(folder / "grey_alpha.png")
    png = (folder / "cmyk.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(png[: len(png) // 2])
    (folder / "empty.png").write_bytes(b"")
    Image.new("L", (300, 300)).save(folder / "bomb.png")  # over the lowered pixel limit of the test below
    return {"cmyk.jpg": (255, 0, 0), "grey16.png": (128, 128, 128), "palette.png": (0, 128, 255),
            "alpha.png": (255, 255, 255), "grey_alpha.png": (255, 255, 255), "truncated.jpg": None,
            "empty.png": None, "bomb.png": None}


def test_hostile_images_are_decoded_correctly_or_named(tmp_path, workdir, monkeypatch, caplog):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200 * 200)  # a decompression bomb, at the scale of a test
    source = write_folder(tmp_path / "pets", corrupt=False)
    expected = hostile_images(source / "odd")
    with pytest.raises(DataError) as err:
        fetch_image_folder(folder_config(source).data, RAW_DIR, backoff_s=0)
    assert "3 unreadable image(s)" in str(err.value) and "\n" not in str(err.value)
    counts = fetch_image_folder(folder_config(source, "data.on_corrupt=skip").data, RAW_DIR, backoff_s=0)
    assert counts["odd"] == 5
    for name, rgb in expected.items():
        kept = RAW_DIR / IMAGES_DIR / "odd" / name
        if rgb is None:
            assert not kept.exists() and f"odd/{name}" in caplog.text
        else:
            centre = read_image(kept, (8, 8), 3)[4, 4]
            assert np.abs(centre.astype(int) - rgb).max() <= 2, name


def test_symlink_loops_are_neither_classes_nor_images(tmp_path, workdir):
    source = write_folder(tmp_path / "pets", corrupt=False)
    (source / "loop").symlink_to(source / "loop")
    (source / "cat" / "self.png").symlink_to(source / "cat" / "self.png")
    (source / "dog" / "up").symlink_to(source)
    counts = fetch_image_folder(folder_config(source).data, RAW_DIR, backoff_s=0)
    assert counts == {"cat": 20, "dog": 20, "fox": 20}


def test_class_folders_differing_only_by_case_are_named(tmp_path, workdir):
    source = write_folder(tmp_path / "pets", corrupt=False)
    shutil.copytree(source / "cat", source / "Cat")
    with pytest.raises(DataError, match="class folders 'Cat' and 'cat' differ only by case"):
        fetch_image_folder(folder_config(source).data, RAW_DIR, backoff_s=0)
