"""Keep the CPUs a stage may use from going idle while it runs (`keep_cpus_awake`), with one idle-priority spinner
process per CPU.

On the 2-core VMs this project is measured on, TensorFlow's two worker threads stopped running side by side for
spells whenever the CPUs they wait on were left to idle: an epoch of the cnn took 27 s or 54 s, both CPUs half idle
in the slow ones, while two busy loops kept full speed throughout. A spinner at SCHED_IDLE runs only when nothing
else wants its CPU, so it takes no time from the stage or from anything else on the machine, but its CPU never
halts; with it the same epochs took 20-27 s (docs/decisions.md, "Idle CPUs kept awake"). Linux only (SCHED_IDLE);
elsewhere, or with the setting off, nothing is started."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

# Pinned to its CPU at idle priority, it spins until its parent is gone: a stage killed with SIGKILL (no `finally`)
# leaves the spinner reparented, and it exits within a few milliseconds.
SPINNER = """
import os, sys
cpu, parent = int(sys.argv[1]), int(sys.argv[2])
os.sched_setaffinity(0, {cpu})
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
while os.getppid() == parent:
    for _ in range(100_000):
        pass
"""


@contextlib.contextmanager
def cpus_kept_awake(enabled: bool = True) -> Iterator[list[subprocess.Popen]]:
    """One spinner per CPU this process may run on, for the duration of the block; the spinners, [] where none."""
    if not enabled or not hasattr(os, "SCHED_IDLE"):
        yield []
        return
    spinners = [subprocess.Popen([sys.executable, "-c", SPINNER, str(cpu), str(os.getpid())],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
                for cpu in sorted(os.sched_getaffinity(0))]
    try:
        yield spinners
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait()
