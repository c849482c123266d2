"""`python -m pipeline.ui [OVERRIDES]` (`make ui`): the MLflow UI on the project's store, on loopback by default."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from pipeline import config, tracking
from pipeline.errors import PipelineError


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = config.load(overrides=list(sys.argv[1:] if argv is None else argv))
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = tracking.ui_command(cfg.tracking)
    if command is None:
        print(f"the tracking server {cfg.tracking.uri} serves the UI itself: open it in a browser")
        return 0
    store = tracking.store_uri(cfg.tracking)
    tracking.client(store)  # a new store's tables, made under the lock a stage starting beside the UI takes too
    print(f"MLflow UI on http://{cfg.tracking.ui_host}:{cfg.tracking.ui_port} (store {store}); Ctrl-C stops it",
          flush=True)
    os.execvpe(command[0], command, tracking.server_environment())


if __name__ == "__main__":
    sys.exit(main())
