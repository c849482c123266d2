"""The command-line entry shared by every stage: `python -m pipeline.stages.<name> [HYDRA OVERRIDES]`."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from pipeline import config, search_workers, tracking
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
        with (tracking.attached(search_workers.parent_run(), cfg) if search_workers.worker_id()
              else tracking.stage_run(stage_name(run), cfg)):  # a search worker's trials are its chief's stage's
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


def stop_on_signals() -> None:
    """SIGTERM raises Terminated and SIGINT KeyboardInterrupt, so that `finally` blocks close what is open."""
    signal.signal(signal.SIGTERM, _terminate)
    # Python installs its Ctrl-C handler only where SIGINT is not ignored, and a shell without job control starts
    # `cmd &` with SIGINT ignored (CI scripts, `nohup ... &`): then `kill -INT` did nothing and a stage trained on
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _terminate(signum, frame) -> None:
    raise Terminated()


def stage_name(run: Callable) -> str:
    """The stage a `run` belongs to: its module's last name (`python -m` runs it as __main__)."""
    module = run.__module__
    if module == "__main__":
        module = sys.modules["__main__"].__spec__.name
    return module.rsplit(".", 1)[-1]
