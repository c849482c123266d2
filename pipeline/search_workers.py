"""keras-tuner's own distributed search, on this machine (`tuner.workers`, `make search WORKERS=2`).

The stage process is the chief: it serves the tuner's oracle over gRPC on a loopback port and runs no trial. It
starts `tuner.workers` copies of its own command (the same stage, config and working directory) with
KERASTUNER_TUNER_ID=tuner0..N-1, which ask the oracle for trials, train them and report back, each trial a run
nested in the chief's stage run. A worker that dies (killed, out of memory) is started again under its id, and
the oracle hands it back the trial it was running: only that trial is lost, and it is retried. Tuner state is the
chief's and lives where a single-process search keeps it, so a search can go on with more or fewer workers.
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

from pipeline import tracking
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

TUNER_ID, ORACLE_IP, ORACLE_PORT = "KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT"
PARENT_RUN = "PIPELINE_SEARCH_PARENT_RUN"  # the chief's stage run, where a worker nests its trials
RESTARTS = 3  # per worker, before the chief gives the search up
POLL_S = 1.0


def worker_id() -> str | None:
    """This process's tuner id if it is a search worker, else None."""
    tuner_id = os.environ.get(TUNER_ID)
    return tuner_id if tuner_id and ORACLE_IP in os.environ and "chief" not in tuner_id else None


def parent_run() -> str | None:
    return os.environ.get(PARENT_RUN) or None


@contextlib.contextmanager
def chief(stage: str, workers: int) -> Iterator[None]:
    """For the block, make this process the chief of a search with `workers` workers (nothing when there are
    none, or in a worker); the workers are watched, started again when they die, and stopped on the way out."""
    if workers == 0 or worker_id():
        yield
        return
    port = free_port()
    oracle = {ORACLE_IP: "127.0.0.1", ORACLE_PORT: str(port)}
    saved = {key: os.environ.get(key) for key in (TUNER_ID, *oracle)}
    os.environ.update({TUNER_ID: "chief", **oracle})
    team = _Workers([sys.executable, "-m", f"pipeline.stages.{stage}", *sys.argv[1:]],
                    {**oracle, PARENT_RUN: tracking.active_run_id() or ""}, workers, tracking.active_experiment_id())
    log.info("%s: search chief on 127.0.0.1:%d with %d workers", stage, port, workers)
    try:
        yield
    except KeyboardInterrupt:
        if team.failure:
            raise PipelineError(team.failure) from None
        raise
    finally:
        team.stop()
        for key, value in saved.items():  # as the chief found them
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def free_port() -> int:
    """A loopback TCP port that no one listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Workers:
    """N worker processes and a thread that starts a dead one again under its tuner id."""

    def __init__(self, command: list[str], env: dict[str, str], n: int, experiment_id: str | None) -> None:
        self.command, self.env, self.experiment_id = command, env, experiment_id
        self.processes = {f"tuner{i}": self._start(f"tuner{i}") for i in range(n)}
        self.restarts = dict.fromkeys(self.processes, 0)
        self.failure: str | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="search-workers", daemon=True)
        self.thread.start()

    def _start(self, tuner_id: str) -> subprocess.Popen:
        return subprocess.Popen(self.command, env={**os.environ, **self.env, TUNER_ID: tuner_id})

    def _watch(self) -> None:
        while not self.stopping.wait(POLL_S):
            for tuner_id, process in self.processes.items():
                code = process.poll()
                if code in (None, 0):
                    continue
                if self.restarts[tuner_id] == RESTARTS:
                    self.failure = (f"search worker {tuner_id} ended with exit status {code} {RESTARTS + 1} times: "
                                    f"the search stops (its log is above)")
                    _thread.interrupt_main()  # the chief waits in keras-tuner's oracle server loop
                    return
                self.restarts[tuner_id] += 1
                log.warning("search worker %s ended with exit status %s: starting it again; it retries its trial",
                            tuner_id, code)
                if self.experiment_id:  # its trial's run, left RUNNING by the dead process
                    tracking.close_orphans(self.experiment_id)
                self.processes[tuner_id] = self._start(tuner_id)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            process.wait()
