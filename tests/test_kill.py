"""Kill tests: each stage is SIGKILLed at a chosen point (tests/killer.py) and run again; the rerun resumes, reads
nothing half-written and ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline.data.split import load_splits
from pipeline.files import file_digest
from pipeline.fit_state import read_state
from pipeline.paths import SPLIT_DIR, work_dir
from tests.conftest import IDX_NAMES, UNIT, assert_complete

REPO = Path(__file__).resolve().parents[1]
SMALL_CNN = ("cnn.filters=8", "cnn.blocks=2", "cnn.train.epochs=4", "cnn.train.batch_size=32",
             "cnn.train.lr_schedule=constant", "cnn.train.lr=3e-3", "cnn.train.warmup=0")


def stage(module: str, *overrides: str, kill_at: tuple[str, int] | None = None,
          cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m pipeline.stages.<module>` on the smoke profile, killed at `kill_at` (target, nth call) if given."""
    killer = ["-m", "tests.killer", kill_at[0], str(kill_at[1])] if kill_at else []
    args = [sys.executable, *killer, "-m" if not killer else "", f"pipeline.stages.{module}", "profile=smoke", *UNIT,
            *overrides]
    return subprocess.run([a for a in args if a], cwd=cwd or Path.cwd(), capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)


def killed(result: subprocess.CompletedProcess) -> bool:
    return result.returncode == -signal.SIGKILL


def finished(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_a_download_killed_mid_file_leaves_no_partial_file_and_resumes(idx_data, workdir):
    result = stage("download", *idx_data.overrides(), kill_at=("pipeline.data.download:_verify", 2))
    assert killed(result)
    raw = workdir / "data/raw"
    names = {IDX_NAMES[key]: digest for key, digest in idx_data.sha256.items()}
    installed = [p for p in raw.iterdir() if p.name in names]
    assert len(installed) == 1 and file_digest(installed[0]) == names[installed[0].name]  # the 2nd: never renamed
    finished(stage("download", *idx_data.overrides()))
    assert_complete(raw, idx_data.sha256)  # every file verified, and nothing else there (no temporary file)


@pytest.mark.slow
def test_a_split_killed_while_writing_leaves_the_old_split_and_reruns_to_the_same_arrays(idx_data, split_data):
    before = load_splits(SPLIT_DIR)
    assert killed(stage("split", *idx_data.overrides(), "data.val_size=0.2", kill_at=("numpy:save", 3)))
    after_kill = load_splits(SPLIT_DIR)  # the previous split, whole: the new one was never moved into place
    assert np.array_equal(after_kill.val[1], before.val[1])
    finished(stage("split", *idx_data.overrides(), "data.val_size=0.2"))
    rerun = load_splits(SPLIT_DIR)
    assert len(rerun.val[1]) != len(before.val[1])
    shutil.rmtree(SPLIT_DIR)
    finished(stage("split", *idx_data.overrides(), "data.val_size=0.2"))
    assert all(np.array_equal(a, b) for a, b in zip(load_splits(SPLIT_DIR).train, rerun.train, strict=True))
    assert not [p for p in SPLIT_DIR.parent.glob(".*")]


@pytest.mark.slow
def test_a_fit_killed_at_any_point_resumes_to_the_uninterrupted_result(idx_data, split_data, tmp_path):
    """Killed twice on its way: inside a weights write (epoch 2's training state, half written), then, resumed,
    between an epoch's weights and its commit (epoch 3's). Each rerun resumes after the last committed epoch; the
    end is the uninterrupted run's."""
    overrides = (*idx_data.overrides(), "cnn.search.enabled=false", *SMALL_CNN)
    reference = tmp_path / "uninterrupted"
    shutil.copytree(Path.cwd() / "data", reference / "data")
    finished(stage("cnn", *overrides, cwd=reference))

    assert killed(stage("cnn", *overrides, kill_at=("h5py:File.close", 3)))
    fit_dir = work_dir("cnn") / "fit"
    assert len(read_state(fit_dir).history) == 1  # epoch 1 committed; epoch 2 was being saved
    resumed = stage("cnn", *overrides, kill_at=("pipeline.fit_state:write_json", 2))  # 1: epoch 2's commit
    assert killed(resumed) and "resuming after epoch 1 " in resumed.stderr
    assert len(read_state(fit_dir).history) == 2  # epoch 3's weights written, never committed
    resumed = stage("cnn", *overrides)
    finished(resumed)
    assert "resuming after epoch 2 " in resumed.stderr

    ours, theirs = (json.loads((d / "metrics/cnn.json").read_text()) for d in (Path.cwd(), reference))
    assert ours["epochs"] == theirs["epochs"] == 4
    assert ours["best_epoch"] == theirs["best_epoch"]
    # every epoch drew what the uninterrupted run's drew (batch order, augmentation and dropout by seed and epoch):
    # the histories agree to float noise, resumed epochs included
    history = [list(csv_rows(d / "plots/cnn/history.csv")) for d in (Path.cwd(), reference)]
    for row, reference_row in zip(*history, strict=True):
        assert row.keys() == reference_row.keys()
        assert all(float(row[k]) == pytest.approx(float(reference_row[k]), abs=1e-3) for k in row), (row, reference_row)
    assert not fit_dir.exists()  # a finished stage clears its fit state


def csv_rows(path: Path):
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    for line in lines[1:]:
        yield dict(zip(header, line.split(","), strict=True))


@pytest.mark.slow
def test_a_search_killed_mid_trial_retries_that_trial_only(idx_data, split_data):
    overrides = (*idx_data.overrides(), "tuner.max_trials=2", "tuner.epochs=2", "cnn.blocks=2", "cnn.train.epochs=2",
                 "cnn.train.batch_size=32")
    # per-epoch logging: trial 1's epochs are calls 1 and 2, trial 2's first epoch call 3
    assert killed(stage("cnn", *overrides, kill_at=("pipeline.tracking:log_epoch", 3)))
    trials = sorted(work_dir("cnn").glob("search/*/trial_*/trial.json"))
    first = json.loads(trials[0].read_text())
    assert first["status"] == "COMPLETED"
    finished(stage("cnn", *overrides))
    best = json.loads(Path("models/cnn/best_hparams.json").read_text())
    assert best["trials"] == 2
    assert json.loads(trials[0].read_text()) == first  # the finished trial was not run again
    client = MlflowClient(f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fashion_mnist").experiment_id],
                              "tags.`pipeline.kind` = 'trial'")
    by_status = sorted((r.info.status, r.data.tags["pipeline.trial"]) for r in runs)
    # each trial trained to its end once; the killed trial's run was closed by the rerun, which trained it again
    assert [s for s, _ in by_status] == ["FINISHED", "FINISHED", "KILLED"]
    assert len({name for status, name in by_status if status == "FINISHED"}) == 2
