"""Image folders: directories and archives of class sub-folders, corrupt images named, three-way split."""

from __future__ import annotations

import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.image_folder import IMAGES_DIR, fetch_image_folder
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
