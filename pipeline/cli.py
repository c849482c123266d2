"""The command-line entry shared by every stage: `python -m pipeline.stages.<name> [HYDRA OVERRIDES]`."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from pipeline import awake, config, search_workers, tracking
from pipeline.errors import PipelineError, Terminated
from pipeline.schema import Config

log = logging.getLogger("pipeline")


def stage_main(run: Callable[[Config], Any]) -> None:
    """Load the validated config (params.yaml, or conf/ with overrides), run the stage inside its MLflow run,
    exit 2 on bad input; on SIGTERM or SIGINT, end the runs KILLED and exit 143 or 130."""
    logging.basicConfig(level=os.environ.get("PIPELINE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    stop_on_signals()
    try:
        cfg = config.load(overrides=sys.argv[1:])
        freeze_imported_objects()
        worker = search_workers.worker_id()  # a search worker's trials are its chief's stage's, its CPUs too
        tracked = tracking.attached(search_workers.parent_run(), cfg) if worker else tracking.stage_run(
            stage_name(run), cfg)
        with awake.cpus_kept_awake(cfg.keep_cpus_awake and not worker), tracked:
            run(cfg)
    except PipelineError as e:
        log.error("%s", e)
        sys.exit(2)
    except Terminated:
        log.error("stopped by SIGTERM")
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:
        log.error("interrupted")
        sys.exit(128 + signal.SIGINT)


def freeze_imported_objects() -> None:
    """Move what the imports built (~480k objects: TensorFlow, Keras, MLflow) out of the garbage collector's sight:
    Keras' `clear_session` and keras-tuner call `gc.collect()` once per trial, and each full collection walked them
    all again. A 15-trial cnn search spent ~20 s in those walks; frozen, its run took 430 s of CPU instead of 479."""
    gc.collect()
    gc.freeze()


def stop_on_signals() -> None:
    """SIGTERM raises Terminated and SIGINT KeyboardInterrupt, so that `finally` blocks close what is open; but
    never inside a tracking-store query (see `_interrupt`)."""
    signal.signal(signal.SIGTERM, _interrupt)
    # Python installs its Ctrl-C handler only where SIGINT is not ignored, and a shell without job control starts
    # `cmd &` with SIGINT ignored (CI scripts, `nohup ... &`): then `kill -INT` did nothing and a stage trained on
    signal.signal(signal.SIGINT, _interrupt)


STORE_MODULES = ("sqlalchemy.", "alembic.")
REDELIVERY_S = 0.05


def _interrupt(signum: int, frame) -> None:
    """Raise the signal's exception, unless the main thread is inside SQLAlchemy: raised between a query's
    execution and its fetch, it leaves SQLite's statement alive in the traceback's frames, and SQLite keeps the
    closed connection, with its lock, until the statement is freed, so the KILLED bookkeeping that follows waits on
    it. Then the signal is sent again a moment later, until it lands outside."""
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(STORE_MODULES):
            threading.Timer(REDELIVERY_S, os.kill, (os.getpid(), signum)).start()
            return
        frame = frame.f_back
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def stage_name(run: Callable) -> str:
    """The stage a `run` belongs to: its module's last name (`python -m` runs it as __main__)."""
    module = run.__module__
    if module == "__main__":
        module = sys.modules["__main__"].__spec__.name
    return module.rsplit(".", 1)[-1]
