"""End to end: DVC runs stages in the workspace and, from its queue (`dvc queue start -j 2`), two at a time in
temporary workspaces; every run reaches the main repository's store and tells what `dvc exp show` tells."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.test_pipeline_e2e import SMALL, repo, run  # noqa: F401 (repo: a fixture)

pytestmark = pytest.mark.slow


def stage_runs(root: Path, stage: str) -> list:
    client = MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    return client.search_runs([experiment.experiment_id], f"tags.`pipeline.stage` = '{stage}'",
                              order_by=["attributes.start_time ASC"])


def start_queue(root: Path, log: Path) -> None:
    """`dvc queue start -j 2`. Its workers outlive it holding its output, so that goes to a file, not a pipe."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with log.open("w") as out:
        subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                       check=True)


def run_queue(root: Path, log: Path, timeout_s: float = 600) -> None:
    """Run the queued experiments two at a time, wait for all of them, stop the workers; none may fail."""
    start_queue(root, log)
    try:
        deadline = time.monotonic() + timeout_s
        while any(word in run(root, "dvc", "queue", "status") for word in ("Queued", "Running")):
            assert time.monotonic() < deadline, run(root, "dvc", "queue", "status")
            time.sleep(5)
    finally:
        run(root, "dvc", "queue", "stop")
        deadline = time.monotonic() + 60
        while "0 active, 0 idle" not in run(root, "dvc", "queue", "status") and time.monotonic() < deadline:
            time.sleep(2)
    assert "Failed" not in run(root, "dvc", "queue", "status"), log.read_text()[-3000:]


def exp_results(root: Path) -> dict[str, tuple[float, str]]:
    """{experiment name: (baseline test accuracy, MLflow run id)} as `dvc exp show` has them."""
    shown = json.loads(run(root, "dvc", "exp", "show", "--json"))
    results = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for revision in exp["revs"]:
                metrics = revision["data"]["metrics"].get("metrics/baseline.json", {}).get("data")
                if metrics:
                    results[revision["name"]] = (metrics["test"]["accuracy"], metrics["mlflow_run_id"])
    return results


def test_runs_from_the_workspace_and_from_queued_experiments_reach_the_main_store(repo, tmp_path):  # noqa: F811
    root = repo
    run(root, "dvc", "exp", "run", *SMALL, "baseline")
    first = {stage: stage_runs(root, stage) for stage in ("download", "split", "baseline")}
    assert all(len(runs) == 1 for runs in first.values())
    tags = [runs[0].data.tags for runs in first.values()]
    assert len({t["pipeline.execution_id"] for t in tags}) == 1  # one `dvc exp run`, one execution id
    head = run(root, "git", "rev-parse", "HEAD").strip()
    assert all(t["mlflow.source.git.commit"] == head and t["git.dirty"] == "false" for t in tags)
    assert len({t["dvc.exp_name"] for t in tags}) == 1

    run(root, "dvc", "repro", "baseline")  # nothing changed: DVC skips every stage, nothing is logged
    assert len(stage_runs(root, "baseline")) == 1

    # a 2-point sweep (DVC's grid syntax), queued, then run two at a time
    run(root, "dvc", "exp", "run", "--queue", *SMALL, "-S", "baseline.C=0.2,0.3", "baseline")
    run_queue(root, tmp_path / "queue.log")

    baseline_runs = stage_runs(root, "baseline")  # the queued ones ran in temporary workspaces: DVC_ROOT
    assert baseline_runs[0].info.run_id == first["baseline"][0].info.run_id
    assert sorted(r.data.params["baseline.C"] for r in baseline_runs[1:]) == ["0.2", "0.3"]
    assert all(r.info.status == "FINISHED" for r in baseline_runs)
    assert len(stage_runs(root, "split")) == 1  # restored from DVC's run cache in the temporary workspaces
    assert len({r.data.tags["pipeline.execution_id"] for r in baseline_runs}) == 3

    # `dvc exp show` and MLflow tell the same story: each experiment's run, by name, with the same accuracy
    by_id = {r.info.run_id: r for r in baseline_runs}
    shown = exp_results(root)
    assert len(shown) == 3
    for name, (accuracy, run_id) in shown.items():
        assert by_id[run_id].data.tags["dvc.exp_name"] == name
        assert by_id[run_id].data.metrics["test_accuracy"] == pytest.approx(accuracy)
