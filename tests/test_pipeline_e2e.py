"""End to end: real DVC with Hydra composition in a temporary copy of the repository, on tiny data."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import REPO, write_idx_dataset

pytestmark = pytest.mark.slow

COPIED = ["conf", "pipeline", "dvc.yaml", "params.yaml", ".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore",
          "mlruns/.gitignore"]  # the MLflow store of the stages' runs is git-ignored, as in the project


def environment() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
            "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost"}


def run(cwd: Path, *args: str) -> str:
    result = subprocess.run(args, cwd=cwd, env=environment(), capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path)


def make_repo(tmp_path: Path) -> Path:
    """A git + DVC repository holding this project's pipeline and a tiny data set config of its own (`data=tiny`)."""
    root = tmp_path / "repo"
    for name in COPIED:
        src, dest = REPO / name, root / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
         else shutil.copy2(src, dest))
    data = write_idx_dataset(tmp_path / "tiny-source")
    tiny = yaml.safe_load((REPO / "conf/data/fashion_mnist.yaml").read_text())
    tiny.update(name="tiny", source=str(data.directory), mirrors=[], apt_package=None)
    tiny["augment"]["flip"] = False  # the square's column is the class: a mirror image changes it
    for key, digest in data.sha256.items():
        tiny["files"][key].update(sha256=digest, md5=None)
    (root / "conf/data/tiny.yaml").write_text(yaml.safe_dump(tiny, sort_keys=False))
    run(root, "git", "init", "-q")
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-q", "-m", "pipeline")
    return root


SMALL = ["-S", "data=tiny", "-S", "profile=smoke", "-S", "tuner.max_trials=1"]
MODEL_STAGES = ("baseline", "cnn", "cnn_aug", "transfer", "finetune")


def test_dvc_exp_run_composes_config_and_reruns_only_what_changed(repo):
    out = run(repo, "dvc", "exp", "run", *SMALL)
    for stage in ("download", "split", *MODEL_STAGES):
        assert f"Running stage '{stage}'" in out
        assert stage == "download" or (repo / "metrics" / f"{stage}.json").is_file()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert (params["data"]["name"], params["profile"]) == ("tiny", "smoke")  # DVC composed conf/
    assert json.loads((repo / "metrics/split.json").read_text())["size"] == {"train": 270, "val": 30, "test": 100}
    assert (repo / "data/split/train/x.npy").is_file()
    assert "up to date" in run(repo, "dvc", "status")
    accuracy = {s: json.loads((repo / f"metrics/{s}.json").read_text())["test"]["accuracy"] for s in MODEL_STAGES}
    assert min(accuracy.values()) >= 0.5, accuracy  # chance is 0.1: every stage learns on the smoke budget

    check_records(repo)

    # nothing changed: nothing runs
    out = run(repo, "dvc", "repro")
    assert "Running stage" not in out

    # a model stage's own setting: only that stage (and the report) reruns; the others appear as reused runs
    out = run(repo, "dvc", "exp", "run", *SMALL, "-S", "baseline.C=0.5")
    assert "Running stage 'baseline'" in out
    for stage in ("download", "split", *MODEL_STAGES[1:]):
        assert f"Stage '{stage}' didn't change, skipping" in out
    client, experiment = store(repo)
    [second] = client.search_runs([experiment], "tags.`pipeline.kind` = 'execution'", max_results=1,
                                  order_by=["attributes.start_time DESC"])
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{second.info.run_id}'")
    kinds = {r.data.tags["pipeline.stage"]: r.data.tags["pipeline.kind"] for r in children}
    assert kinds == {"baseline": "stage", "report": "stage",
                     **{s: "reused" for s in ("download", "split", *MODEL_STAGES[1:])}}

    # metrics and plots are where dvc finds them
    assert set(json.loads(run(repo, "dvc", "metrics", "show", "--json"))[""]["data"]) >= {
        f"metrics/{stage}.json" for stage in ("split", *MODEL_STAGES)}
    run(repo, "dvc", "plots", "show", "-o", "plots-html")
    assert (repo / "plots-html" / "index.html").is_file()

    # an edit in conf/ reaches DVC through the composition, too; a value that only the split stage reads: split
    # reruns, download does not (targeted at split, so the model stages downstream are not trained again here)
    tiny = repo / "conf/data/tiny.yaml"
    tiny.write_text(tiny.read_text().replace("val_size: 0.1", "val_size: 0.3"))
    out = run(repo, "dvc", "exp", "run", *SMALL, "split")
    assert "Stage 'download' didn't change, skipping" in out and "Running stage 'split'" in out
    assert json.loads((repo / "metrics/split.json").read_text())["size"]["val"] == 90

    shown = json.loads(run(repo, "dvc", "exp", "show", "--json"))
    baseline = next(entry for entry in shown if entry["rev"] != "workspace")
    assert len(baseline["experiments"]) == 3  # `dvc exp show` lists every experiment

    # its table opens on every stage's validation and test accuracy; data counts come after them
    header = next(csv.reader(run(repo, "dvc", "exp", "show", "--csv").splitlines()))
    accuracy = [header.index(f"metrics/{stage}.json:{key}") for stage in MODEL_STAGES
                for key in ("val_accuracy", "test.accuracy")]
    assert max(accuracy) < header.index("size.train") and not [h for h in header if "class_count" in h]
    assert "metrics/cnn.json:hparams.cnn.dropout" in header  # the values the cnn trained with, searched

    # last, as it leaves the workspace half-run: a sweep over a key the search sets stops before any work,
    # saying how to get out
    failed = subprocess.run(["dvc", "exp", "run", *SMALL, "-S", "cnn.dropout=0.3"], cwd=repo, capture_output=True,
                            text=True, env=environment())
    assert failed.returncode != 0
    assert "cnn.dropout is overridden, but the cnn search sets it" in failed.stdout + failed.stderr
    assert "Traceback" not in failed.stdout + failed.stderr


def store(root: Path, uri: str | None = None) -> tuple[MlflowClient, str]:
    """The client of the repository's local store, or of `uri`, and the tiny data set's experiment."""
    client = MlflowClient(uri or f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    return client, client.get_experiment_by_name("tiny").experiment_id


def check_records(root: Path, uri: str | None = None, searched: bool = True) -> None:
    """After one `dvc exp run`: one tree, trained params (and the cnn search's trials under its run, if `searched`),
    a champion, nothing RUNNING, compare."""
    client, experiment = store(root, uri)
    runs = client.search_runs([experiment], "")
    assert not [r.info.run_name for r in runs if r.info.status != "FINISHED"]
    [execution] = [r for r in runs if r.data.tags["pipeline.kind"] == "execution"]
    stages = {r.data.tags["pipeline.stage"]: r for r in runs if r.data.tags["pipeline.kind"] == "stage"}
    assert set(stages) == {"download", "split", *MODEL_STAGES, "report"}
    assert {r.data.tags["mlflow.parentRunId"] for r in stages.values()} == {execution.info.run_id}
    assert execution.info.run_name == stages["cnn"].data.tags["dvc.exp_name"]
    trials = [r for r in runs if r.data.tags["pipeline.kind"] == "trial"]
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == ({stages["cnn"].info.run_id} if searched else set())

    trained = json.loads((root / "models/cnn/best_hparams.json").read_text())["trained"]
    assert stages["cnn"].data.tags["pipeline.params_source"] == ("search" if searched else "config")
    assert {k: stages["cnn"].data.params[k] for k in trained} == {k: str(v) for k, v in trained.items()}
    summary = json.loads((root / "metrics/summary.json").read_text())
    best = max(summary["stages"], key=lambda s: summary["stages"][s]["val_accuracy"])
    assert summary["best"]["stage"] == best == execution.data.tags["best_stage"]
    assert client.get_model_version_by_alias("tiny", "champion").run_id == stages[best].info.run_id
    assert execution.data.metrics["val_accuracy/cnn"] == json.loads((root / "metrics/cnn.json").read_text())[
        "val_accuracy"]

    printed = run(root, sys.executable, "-m", "pipeline.compare", "cnn", "cnn_aug")
    assert "McNemar exact test" in printed and (root / "compare" / "flipped.csv").is_file()



def test_a_remote_round_trip_makes_repro_a_no_op_in_a_fresh_clone(repo, tmp_path):
    """`dvc push` to a remote (a local directory here; S3 and others in the README), then a fresh `git clone` +
    `dvc pull` has every output DVC tracks, and `dvc repro` runs nothing."""
    run(repo, "dvc", "exp", "run", *SMALL, "baseline")
    remote = tmp_path / "remote"
    run(repo, "dvc", "remote", "add", "--default", "team", str(remote))
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "baseline on tiny data, and the team's remote")
    assert "pushed" in run(repo, "dvc", "push")

    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    assert not (clone / "data/split").exists()
    run(clone, "dvc", "pull", "--with-deps", "baseline")  # the stage and those before it: all this test ran
    assert (clone / "data/split/train/x.npy").read_bytes() == (repo / "data/split/train/x.npy").read_bytes()
    assert (clone / "models/baseline/model.joblib").is_file()
    out = run(clone, "dvc", "repro", "baseline")
    assert "Running stage" not in out and "up to date" in run(clone, "dvc", "status", "baseline")
