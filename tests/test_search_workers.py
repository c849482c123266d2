"""Distributed search (`tuner.workers`): the real cnn stage is keras-tuner's chief on loopback, two worker processes
run the trials; a worker SIGKILLed mid-trial is started again and retries that trial only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from mlflow import MlflowClient

from pipeline import search_workers, tracking
from tests.conftest import REPO, UNIT


def running_trials(client: MlflowClient) -> list:
    try:
        experiments = [e.experiment_id for e in client.search_experiments()]
        return client.search_runs(experiments, "attributes.status = 'RUNNING' and tags.`pipeline.kind` = 'trial'")
    except Exception:  # the store is not made yet
        return []


def kill_a_worker_mid_trial(chief: psutil.Process, client: MlflowClient) -> str | None:
    """SIGKILL the worker process that owns a RUNNING trial run, as the OOM killer would; that trial's name."""
    workers = set()
    for child in chief.children():
        try:
            if child.environ().get(search_workers.TUNER_ID, "").startswith("tuner"):
                workers.add(child.pid)
        except psutil.Error:
            continue
    for run in running_trials(client):
        pid = int(run.data.tags[tracking.PROCESS_TAG].split(":")[1])
        if pid in workers:
            os.kill(pid, signal.SIGKILL)
            return run.info.run_name
    return None


@pytest.mark.slow
def test_a_chief_and_two_workers_share_the_search_and_retry_a_killed_workers_trial(idx_data, split_data, workdir):
    overrides = [*idx_data.overrides(), "tuner.workers=2", "tuner.max_trials=4", "tuner.epochs=3", "cnn.blocks=2",
                 "cnn.train.epochs=1", "cnn.train.batch_size=32"]
    chief = subprocess.Popen([sys.executable, "-m", "pipeline.stages.cnn", "profile=smoke", *UNIT, *overrides],
                             cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    client = tracking.client(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")  # polled while the chief makes it
    killed, deadline = None, time.monotonic() + 600
    try:
        while chief.poll() is None and time.monotonic() < deadline:
            killed = killed or kill_a_worker_mid_trial(psutil.Process(chief.pid), client)
            time.sleep(0.2)
    finally:
        if chief.poll() is None:
            chief.kill()
    log = chief.stdout.read()
    assert chief.returncode == 0, log[-3000:]
    assert killed, "no worker was caught in a trial"
    assert "starting it again; it retries its trial" in log

    assert json.loads((workdir / "models/cnn/best_hparams.json").read_text())["trials"] == 4  # none lost, none extra
    experiment = client.get_experiment_by_name("fashion_mnist").experiment_id
    runs = client.search_runs([experiment], "")
    [stage] = [r for r in runs if r.data.tags[tracking.KIND_TAG] == "stage"]
    assert stage.info.status == "FINISHED"
    trials = [r for r in runs if r.data.tags[tracking.KIND_TAG] == "trial"]
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {stage.info.run_id}  # every trial under the stage
    done = [r for r in trials if r.info.status == "FINISHED"]
    assert len(done) == 4 and len({r.info.run_name for r in done}) == 4
    [lost] = [r for r in trials if r.info.status != "FINISHED"]  # the killed worker's, closed by its chief
    assert (lost.info.run_name, lost.info.status) == (killed, "KILLED")
    owners = {r.data.tags[tracking.PROCESS_TAG].split(":")[1] for r in done}
    assert str(chief.pid) not in owners  # the workers trained every trial; the chief served them
