"""download: ordered sources, checksums, retries, atomic writes, resume, and the error when all fail."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os

import numpy as np
import pytest

from pipeline.data.download import fetch_files
from pipeline.data.split import load_split
from pipeline.errors import DataError
from pipeline.paths import SPLIT_DIR
from pipeline.stages import download, split
from tests.conftest import IDX_NAMES, IdxData, assert_complete, load_config, write_idx_dataset


def md5_only(data: IdxData, *extra: str) -> list[str]:
    """Overrides that configure `data` as MNIST is configured: only the md5 of each official .gz is known."""
    md5 = {k: hashlib.md5((data.directory / f"{IDX_NAMES[k]}.gz").read_bytes()).hexdigest() for k in IDX_NAMES}
    return [f"data.source={data.directory}", "data.mirrors=[]", *(f"data.files.{k}.sha256=null" for k in IDX_NAMES),
            *(f"data.files.{k}.md5={v}" for k, v in md5.items()), *extra]


def test_local_directory_gives_uncompressed_verified_files(idx_data, tmp_path):
    raw = tmp_path / "raw"
    sums = fetch_files(load_config(*idx_data.overrides()).data, raw, backoff_s=0)
    assert_complete(raw, idx_data.sha256)
    assert sums == {IDX_NAMES[k]: v for k, v in idx_data.sha256.items()}
    header = (raw / IDX_NAMES["train_images"]).read_bytes()[:4]
    assert header == b"\x00\x00\x08\x03"  # stored uncompressed


def test_uncompressed_source_files_are_accepted(tmp_path):
    data = write_idx_dataset(tmp_path / "plain", gz=False)
    fetch_files(load_config(*data.overrides()).data, tmp_path / "raw", backoff_s=0)
    assert_complete(tmp_path / "raw", data.sha256)


def test_checksum_mismatch_falls_through_to_the_next_mirror(idx_data, file_server, tmp_path, caplog):
    bad = write_idx_dataset(tmp_path / "bad", seed=7)  # valid files, other content
    bad_url, good_url = file_server.serve_dir("bad", bad.directory), file_server.serve_dir("good", idx_data.directory)
    cfg = load_config(*idx_data.overrides(), "data.source=null", f"data.mirrors=[{bad_url},{good_url}]")
    fetch_files(cfg.data, tmp_path / "raw", backoff_s=0)
    assert_complete(tmp_path / "raw", idx_data.sha256)
    assert "checksum mismatch" in caplog.text
    assert file_server.hits[f"/bad/{IDX_NAMES['train_images']}.gz"] == cfg.data.retries  # retried, then next


def test_only_a_bad_mirror_is_an_error_naming_the_mismatch(idx_data, file_server, tmp_path):
    bad = write_idx_dataset(tmp_path / "bad", seed=7)
    url = file_server.serve_dir("b", bad.directory)
    cfg = load_config(*idx_data.overrides(), "data.source=null", f"data.mirrors=[{url}]")
    with pytest.raises(DataError, match="checksum mismatch"):
        fetch_files(cfg.data, tmp_path / "raw", backoff_s=0)
    assert not (tmp_path / "raw" / IDX_NAMES["train_images"]).exists()  # nothing unverified is left


def test_transfer_cut_short_is_retried(idx_data, file_server, tmp_path, caplog):
    url = file_server.serve_dir("m", idx_data.directory)
    path = f"/m/{IDX_NAMES['train_labels']}.gz"
    file_server.cut_short.add(path)
    cfg = load_config(*idx_data.overrides(), "data.source=null", f"data.mirrors=[{url}]", "data.retries=2")
    with pytest.raises(DataError, match="IncompleteRead|incomplete"):
        fetch_files(cfg.data, tmp_path / "raw", backoff_s=0)
    assert file_server.hits[path] == 2
    file_server.cut_short.clear()
    fetch_files(cfg.data, tmp_path / "raw", backoff_s=0)
    assert_complete(tmp_path / "raw", idx_data.sha256)
    assert not [p for p in (tmp_path / "raw").iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_partial_file_in_place_is_fetched_again(idx_data, tmp_path):
    raw = tmp_path / "raw"
    cfg = load_config(*idx_data.overrides()).data
    fetch_files(cfg, raw, backoff_s=0)
    target = raw / IDX_NAMES["train_images"]
    target.write_bytes(target.read_bytes()[:1000])  # as a killed non-atomic copy would leave it
    fetch_files(cfg, raw, backoff_s=0)
    assert_complete(raw, idx_data.sha256)


def test_resume_fetches_only_what_is_missing(idx_data, file_server, tmp_path):
    raw = tmp_path / "raw"
    url = file_server.serve_dir("m", idx_data.directory)
    cfg = load_config(*idx_data.overrides(), "data.source=null", f"data.mirrors=[{url}]").data
    fetch_files(cfg, raw, backoff_s=0)
    kept = raw / IDX_NAMES["train_images"]
    os.utime(kept, (1, 1))
    (raw / IDX_NAMES["test_labels"]).unlink()
    file_server.hits.clear()
    fetch_files(cfg, raw, backoff_s=0)
    assert set(file_server.hits) == {f"/m/{IDX_NAMES['test_labels']}.gz"}
    assert kept.stat().st_mtime == 1  # untouched
    assert_complete(raw, idx_data.sha256)


def test_files_of_another_data_set_are_removed(idx_data, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "stale-images-idx3-ubyte").write_bytes(b"old")
    fetch_files(load_config(*idx_data.overrides()).data, raw, backoff_s=0)
    assert_complete(raw, idx_data.sha256)


def test_md5_of_the_official_archive_verifies_when_no_sha256_is_known(idx_data, tmp_path):
    overrides = md5_only(idx_data)
    raw = tmp_path / "raw"
    fetch_files(load_config(*overrides).data, raw, backoff_s=0)
    assert_complete(raw, idx_data.sha256)  # the content digest is recorded for later resumes
    # a later run trusts the recorded digest and does not need the source any more
    fetch_files(load_config(*overrides, "data.source=/nonexistent").data, raw, backoff_s=0)
    # a digest recorded under another md5 vouches for nothing: the file is verified again, and the wrong md5 caught
    with pytest.raises(DataError, match="checksum mismatch"):
        fetch_files(load_config(*overrides, f"data.files.test_labels.md5={'0' * 32}").data, raw, backoff_s=0)


def test_switching_data_sets_never_passes_the_other_sets_files(workdir, tmp_path, caplog):
    """As `dvc exp run -S data=mnist` after Fashion-MNIST: the same file names, and no content sha256 configured
    for the second set, must still give the second set's pixels, and switching back the first's."""
    caplog.set_level(logging.INFO, logger="pipeline")
    first, second = write_idx_dataset(tmp_path / "first", seed=0), write_idx_dataset(tmp_path / "second", seed=1)
    configs = {"first": load_config(*first.overrides("data.name=first")),  # content sha256s, as Fashion-MNIST
               "second": load_config(*md5_only(second, "data.name=second"))}  # md5 of the .gz only, as MNIST

    def download_and_split(name: str, data: IdxData) -> tuple[int, int]:
        """Run both stages; check data/split holds `data`'s pixels; return (files fetched, files kept)."""
        caplog.clear()
        download.run(configs[name])
        split.run(configs[name])
        np.testing.assert_array_equal(load_split("test", SPLIT_DIR)[0][..., 0], data.arrays["test_images"])
        train = np.concatenate([load_split(part, SPLIT_DIR)[0] for part in ("train", "val")])[..., 0]
        assert sorted(map(bytes, train)) == sorted(map(bytes, data.arrays["train_images"]))
        return caplog.text.count("fetched from"), caplog.text.count("already present and verified")

    assert download_and_split("first", first) == (4, 0)
    assert download_and_split("second", second) == (4, 0)  # the first set's digests vouch for none of its files
    assert download_and_split("second", second) == (0, 4)  # its own recorded digests do
    # back: the first set's content sha256s pass the one file whose bytes the sets share (test labels 0-9 repeated)
    assert first.sha256["test_labels"] == second.sha256["test_labels"]
    assert download_and_split("first", first) == (3, 1)
    assert download_and_split("first", first) == (0, 4)


def test_all_sources_down_is_one_clear_line(idx_data, tmp_path):
    cfg = load_config(*idx_data.overrides(), "data=fashion_mnist", "data.source=/nonexistent",
                      "data.mirrors=[http://127.0.0.1:9/fashion/]", "data.retries=2").data
    with pytest.raises(DataError) as err:
        fetch_files(cfg, tmp_path / "raw", backoff_s=0)
    message = str(err.value)
    assert "\n" not in message
    assert "train-images-idx3-ubyte" in message and "/nonexistent" in message and "127.0.0.1:9" in message
    assert "dataset-fashion-mnist" in message and "data.source" in message
    assert "after 2 attempts" in message


def test_corrupt_gzip_is_rejected(idx_data, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in idx_data.directory.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    gz = broken / f"{IDX_NAMES['test_images']}.gz"
    gz.write_bytes(gz.read_bytes()[: len(gz.read_bytes()) // 2])
    cfg = load_config(*idx_data.overrides(), f"data.source={broken}")
    with pytest.raises(DataError, match="not readable"):
        fetch_files(cfg.data, tmp_path / "raw", backoff_s=0)
    assert gzip.decompress((idx_data.directory / gz.name).read_bytes())  # the test's own source is intact
