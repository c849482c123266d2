"""The spinners that keep a stage's CPUs awake: one per CPU, pinned, at idle priority, gone with the block or with
a killed stage."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.awake import cpus_kept_awake

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")


def wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie its new parent has not reaped yet."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_one_idle_priority_spinner_pinned_to_each_cpu_while_the_block_runs():
    cpus = sorted(os.sched_getaffinity(0))
    with cpus_kept_awake() as spinners:
        assert len(spinners) == len(cpus)
        pids = [s.pid for s in spinners]
        for pid, cpu in zip(pids, cpus, strict=True):
            assert wait_for(lambda pid=pid: os.sched_getscheduler(pid) == os.SCHED_IDLE), "not at idle priority"
            assert os.sched_getaffinity(pid) == {cpu}
        assert all(s.poll() is None for s in spinners), "a spinner stopped inside the block"
    assert all(gone(pid) for pid in pids)


def test_off_starts_nothing():
    with cpus_kept_awake(False) as spinners:
        assert spinners == []


def test_a_killed_stage_leaves_no_spinner_behind():
    """SIGKILL runs no `finally`: the spinners notice they were orphaned and exit on their own."""
    stage = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom pipeline.awake import cpus_kept_awake\n"
         "with cpus_kept_awake() as s:\n    print(*[p.pid for p in s], flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    pids = [int(pid) for pid in stage.stdout.readline().split()]
    assert pids and not any(gone(pid) for pid in pids)
    stage.send_signal(signal.SIGKILL)
    stage.wait()
    assert wait_for(lambda: all(gone(pid) for pid in pids)), "a spinner outlived its killed stage"
