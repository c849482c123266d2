"""`python -m pipeline.reproduce`: a logged stage run runs again from its commit and params as a DVC experiment, in a
worktree sharing the repository's DVC cache, and its accuracies are compared with the logged ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from pipeline import reproduce
from tests.test_pipeline_e2e import SMALL, repo, run  # noqa: F401 (repo: a fixture)


def test_accuracies_agree_within_the_tolerance_and_not_beyond():
    rows = reproduce.compare({"test_accuracy": 0.90, "best_val_accuracy": 0.88},
                             {"test_accuracy": 0.905, "best_val_accuracy": 0.87}, tolerance=0.005)
    assert [(r.metric, r.within) for r in rows] == [("test_accuracy", True), ("best_val_accuracy", False)]
    agreed, line = reproduce.verdict(rows)
    assert not agreed
    assert line == "NOT reproduced: best_val_accuracy differs by -0.0100 (tolerance 0.005)"
    table = reproduce.table(rows).splitlines()
    assert table[0].split() == ["metric", "logged", "reproduced", "difference", "within", "0.005"]
    assert table[2].split() == ["best_val_accuracy", "0.8800", "0.8700", "-0.0100", "NO"]


def test_equal_accuracies_agree_at_zero_tolerance_and_a_missing_one_does_not():
    assert reproduce.verdict(reproduce.compare({"test_accuracy": 0.9}, {"test_accuracy": 0.9}, 0.0)) == (
        True, "reproduced within tolerance")
    rows = reproduce.compare({"test_accuracy": 0.9, "best_val_accuracy": 0.8}, {"test_accuracy": 0.9}, 0.01)
    assert reproduce.verdict(rows) == (
        False, "NOT reproduced: best_val_accuracy missing from the reproduction (tolerance 0.01)")
    assert reproduce.compare({"best_val_accuracy": 0.8}, {"test_accuracy": 0.9}, 0.01)[0].metric == "best_val_accuracy"


def test_params_are_the_logged_values_written_as_dvc_writes_them_with_the_commits_types():
    logged = {"seed": 42, "data": {"timeout_s": 30.0, "lr": 1e-05, "new": [3e-06, 1]}, "profile": "smoke"}
    template = {"data": {"timeout_s": 30, "lr": 2e-05}, "seed": 42, "profile": "cpu"}
    text = reproduce.params_text(logged, template)
    assert text == ("data:\n  timeout_s: 30\n  lr: 1.0e-05\n  new:\n  - 3.0e-06\n  - 1\nseed: 42\nprofile: smoke\n")
    assert yaml.safe_load(text) == logged  # the same values, read back by the stages' YAML 1.1 loader too


def store(root: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")


def stage_runs(root: Path, stage: str, extra: str = "") -> list:
    client = store(root)
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id], f"tags.`pipeline.stage` = '{stage}'{extra}",
                              order_by=["attributes.start_time ASC"])
    return [r for r in runs if r.data.tags.get("pipeline.kind", "stage") == "stage"]


def snapshot(root: Path) -> dict[str, bytes]:
    files = [root / "params.yaml", root / "dvc.lock", *sorted((root / "metrics").iterdir())]
    return {str(path.relative_to(root)): path.read_bytes() for path in files}


def artifact_text(client: MlflowClient, run_id: str, path: str, dest: Path) -> str:
    return Path(client.download_artifacts(run_id, path, str(dest))).read_text()


def test_the_worktree_lock_keeps_only_the_stage_and_what_it_reads(tmp_path):
    """A lock committed before a later `dvc repro` names outputs this cache never held; DVC would fail on them
    when it commits the experiment, so the reproduction forgets every stage it neither runs nor reads."""
    lock = tmp_path / "dvc.lock"
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        name: {"cmd": f"python -m pipeline.stages.{name}", "outs": [{"path": f"models/{name}", "md5": "0" * 32}]}
        for name in ("download", "split", "baseline", "cnn", "report")}}, sort_keys=False))
    reproduce.forget_other_stages(lock, {"download", "split", "baseline"})
    kept = yaml.safe_load(lock.read_text())
    assert kept["schema"] == "2.0" and list(kept["stages"]) == ["download", "split", "baseline"]
    assert kept["stages"]["split"]["outs"][0]["path"] == "models/split"


@pytest.mark.slow
def test_a_baseline_run_is_reproduced_as_an_experiment_in_the_same_store(repo, tmp_path, monkeypatch,  # noqa: F811
                                                                          capsys):
    run(repo, "dvc", "exp", "run", *SMALL, "baseline")
    (original,) = stage_runs(repo, "baseline")
    before = snapshot(repo)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run([sys.executable, "-m", "pipeline.reproduce", original.info.run_id], cwd=repo, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "reproduced within tolerance"
    assert [line.split()[0] for line in lines[2:4]] == ["test_accuracy", "best_val_accuracy"]
    assert all(line.split()[-1] == "yes" for line in lines[2:4])
    assert "Running stage 'baseline'" in result.stderr  # run again, not restored from DVC's run cache
    assert "applied to your workspace" not in result.stderr  # DVC's words, of the worktree: reworded

    client = store(repo)
    (new,) = stage_runs(repo, "baseline", f" and tags.`{reproduce.TAG}` = '{original.info.run_id}'")
    assert new.info.run_id in lines[0] and new.info.status == "FINISHED"
    assert new.data.params == original.data.params
    assert (artifact_text(client, new.info.run_id, "config.yaml", tmp_path / "new")
            == artifact_text(client, original.info.run_id, "config.yaml", tmp_path / "old"))
    for tag in ("mlflow.source.git.commit", "pipeline.data", "pipeline.profile"):
        assert new.data.tags[tag] == original.data.tags[tag]
    assert new.data.tags["git.dirty"] == "false"
    assert new.data.metrics["test_accuracy"] == pytest.approx(original.data.metrics["test_accuracy"], abs=0.005)

    assert snapshot(repo) == before  # the workspace is untouched: the stage ran in a worktree, since removed
    assert run(repo, "git", "worktree", "list", "--porcelain").count("worktree ") == 1
    shown = json.loads(run(repo, "dvc", "exp", "show", "-A", "--json"))
    names = {rev["name"] for commit in shown for exp in commit.get("experiments") or [] for rev in exp["revs"]}
    assert new.data.tags["dvc.exp_name"] in names

    monkeypatch.chdir(repo)
    check_bad_input(repo, original, capsys)
    check_failure_removes_the_worktree(repo, original, capsys, tmp_path)


def check_bad_input(root: Path, original, capsys: pytest.CaptureFixture) -> None:
    """Runs that cannot be reproduced stop before any work, with one line naming what is wrong (exit 2). In this
    process, from the repository: each check costs no new process's imports."""
    client = store(root)
    experiment_id = original.info.experiment_id
    head = run(root, "git", "rev-parse", "HEAD").strip()

    def fake(tags: dict[str, str]) -> str:
        made = client.create_run(experiment_id, tags={"pipeline.stage": "baseline", **tags}).info.run_id
        client.log_metric(made, "test_accuracy", 0.5)
        client.set_terminated(made)
        return made

    split = stage_runs(root, "split")[0]  # the original's (its reproduction may have run split again)
    cases = {"0" * 32: "no run 00000000000000000000000000000000 in",
             split.info.run_id: "logged none of test_accuracy, best_val_accuracy",
             fake({}): "records no git commit",
             fake({"mlflow.source.git.commit": "0123456789" * 4}): "is not in the repository",
             fake({"mlflow.source.git.commit": head}): "has no artifact config.yaml"}
    capsys.readouterr()
    for ref, message in cases.items():
        assert reproduce.main([ref]) == 2
        out, err = capsys.readouterr()
        errors = [line for line in err.splitlines() if line.strip() and "Downloading artifacts" not in line]
        assert not out and len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], err
    assert run(root, "git", "worktree", "list", "--porcelain").count("worktree ") == 1


def check_failure_removes_the_worktree(root: Path, original, capsys: pytest.CaptureFixture, tmp: Path) -> None:
    """A run whose logged config the commit's stages reject (seed -1) fails in the worktree: exit 2, the failing
    DVC command named on the last line, and the worktree removed."""
    client = store(root)
    config = yaml.safe_load(artifact_text(client, original.info.run_id, "config.yaml", tmp / "bad"))
    made = client.create_run(original.info.experiment_id, tags={
        "pipeline.stage": "baseline", "mlflow.source.git.commit": original.data.tags["mlflow.source.git.commit"]})
    client.log_metric(made.info.run_id, "test_accuracy", 0.5)
    client.log_text(made.info.run_id, yaml.safe_dump({**config, "seed": -1}, sort_keys=False), "config.yaml")
    client.set_terminated(made.info.run_id)
    capsys.readouterr()
    assert reproduce.main([made.info.run_id]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert not out and lines[-1].startswith("error: `dvc repro download split` failed"), err
    assert "seed=-1 is out of range" in err  # the stage's own one-line error, passed on
    workspace = next(line for line in lines if line.startswith("reproducing run")).rsplit(" in ", 1)[1]
    assert not Path(workspace).exists()
    assert run(root, "git", "worktree", "list", "--porcelain").count("worktree ") == 1
