"""split: stratified, seeded, deterministic; the official test set stays the test set."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from pipeline.data.download import fetch_files
from pipeline.data.split import class_counts, load_classes, load_split, make_splits, write_splits
from pipeline.errors import DataError
from pipeline.paths import METRICS_DIR, RAW_DIR, SPLIT_DIR
from pipeline.stages import split as split_stage
from tests.conftest import load_config


@pytest.fixture
def raw(idx_data, workdir):
    fetch_files(load_config(*idx_data.overrides()).data, RAW_DIR, backoff_s=0)
    return idx_data


def digests(directory):
    return {p.relative_to(directory): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_stage_writes_arrays_meta_and_class_counts(raw):
    cfg = load_config(*raw.overrides())
    metrics = split_stage.run(cfg)
    assert metrics == {"size": {"train": 270, "val": 30, "test": 100}}  # only sizes: `dvc exp show` lists them all
    assert json.loads((METRICS_DIR / "split.json").read_text()) == metrics
    x, y = load_split("train", SPLIT_DIR)
    assert x.shape == (270, 28, 28, 1) and x.dtype == np.uint8 and y.dtype == np.uint8
    assert load_classes(SPLIT_DIR) == cfg.data.classes
    meta = json.loads((SPLIT_DIR / "meta.json").read_text())
    assert meta["class_count"]["val"] == {name: 3 for name in cfg.data.classes}
    assert meta["class_count"]["test"] == {name: 10 for name in cfg.data.classes}


def test_official_test_set_is_kept_whole_and_in_order(raw):
    splits, _ = make_splits(load_config(*raw.overrides()).data, RAW_DIR, seed=1)
    x_test, y_test = splits["test"]
    np.testing.assert_array_equal(x_test[..., 0], raw.arrays["test_images"])
    np.testing.assert_array_equal(y_test, raw.arrays["test_labels"])


def test_train_and_val_partition_the_training_data(raw):
    splits, _ = make_splits(load_config(*raw.overrides()).data, RAW_DIR, seed=1)
    together = np.concatenate([splits["train"][0], splits["val"][0]])[..., 0]
    assert sorted(map(bytes, together)) == sorted(map(bytes, raw.arrays["train_images"]))


@pytest.mark.parametrize("val_size", [0.1, 0.2, 0.5])
def test_stratified_class_proportions(raw, val_size):
    cfg = load_config(*raw.overrides(f"data.val_size={val_size}"))
    splits, classes = make_splits(cfg.data, RAW_DIR, seed=3)
    counts = class_counts(splits, classes)
    for name in classes:
        assert counts["val"][name] == pytest.approx(30 * val_size, abs=1)
        assert counts["train"][name] + counts["val"][name] == 30


def test_same_seed_gives_byte_identical_output(raw, tmp_path):
    cfg = load_config(*raw.overrides())
    for name in ("a", "b"):
        write_splits(*make_splits(cfg.data, RAW_DIR, cfg.seed), tmp_path / name)
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    write_splits(*make_splits(cfg.data, RAW_DIR, cfg.seed + 1), tmp_path / "c")
    assert digests(tmp_path / "a") != digests(tmp_path / "c")


def test_limits_take_stratified_subsets(raw):
    cfg = load_config(*raw.overrides("data.limit_train=100", "data.limit_test=50"))
    splits, classes = make_splits(cfg.data, RAW_DIR, cfg.seed)
    assert len(splits["train"][1]) + len(splits["val"][1]) == 100 and len(splits["test"][1]) == 50
    assert set(class_counts(splits, classes)["test"].values()) == {5}


def test_labels_beyond_the_class_names_are_an_error(raw):
    cfg = load_config(*raw.overrides("data.classes=[a,b,c]"))
    with pytest.raises(DataError, match="labels go up to 9, but data.classes names 3 classes"):
        make_splits(cfg.data, RAW_DIR, cfg.seed)


def test_image_size_mismatch_is_an_error(raw):
    cfg = load_config(*raw.overrides("data.image_size=[32,32]"))
    with pytest.raises(DataError, match=r"train images are \(28, 28, 1\), but data.image_size"):
        make_splits(cfg.data, RAW_DIR, cfg.seed)


def test_failed_split_keeps_the_previous_output(raw):
    cfg = load_config(*raw.overrides())
    split_stage.run(cfg)
    before = digests(SPLIT_DIR)
    with pytest.raises(DataError):
        split_stage.run(load_config(*raw.overrides("data.val_size=0.999")))
    assert digests(SPLIT_DIR) == before
