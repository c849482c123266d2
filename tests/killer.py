"""Run a module as `python -m` would, killed with SIGKILL at a chosen point: no `finally`, no cleanup, as the OOM
killer or a power cut would stop it. The kill tests (tests/test_kill.py) run stages through it.

    python -m tests.killer pipeline.fit_state:write_json 2 pipeline.stages.cnn cnn.train.epochs=4

kills the process just before the 2nd call of `pipeline.fit_state.write_json`; `module:Class.method` patches a
method (`h5py:File.close`: inside an HDF5 file's write, before it is complete).
"""

from __future__ import annotations

import importlib
import os
import runpy
import signal
import sys


def kill_at(target: str, nth: int) -> None:
    """Patch `target` to SIGKILL this process on its `nth` call."""
    module, _, attribute = target.partition(":")
    *parents, name = attribute.split(".")
    owner = importlib.import_module(module)
    for parent in parents:
        owner = getattr(owner, parent)
    original, calls = getattr(owner, name), 0

    def killing(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, name, killing)


if __name__ == "__main__":
    target, nth, module, *args = sys.argv[1:]
    kill_at(target, int(nth))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
