"""Load and soak of the tracking store, in a temporary git + DVC copy of the repository on the tests' tiny data set:

1. load: four cnn experiments queued and run two at a time (`dvc queue start -j 2`), each logging every epoch of
   its trial and its final fit into the one SQLite store: all four must land, with every epoch;
2. soak: `--soak` tiny experiments (the baseline stage, a new `baseline.C` each) one after another: the seconds per
   run and the store's size (database and artefacts) after each, which must stay flat (no run slower or larger than
   the ones before it because of what the store already holds).

Prints a markdown summary for docs/reliability.md.

    python bench/load.py              # about 15 min on 2 cores
    python bench/load.py --soak 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_pipeline_e2e import SMALL, make_repo, run  # noqa: E402
from tests.test_tracking_e2e import run_queue, stage_runs  # noqa: E402

LOAD = [*SMALL, "-S", "cnn.train.min_images=null", "-S", "cnn.train.epochs=6", "-S", "tuner.epochs=2"]


def load(root: Path, log: Path) -> dict:
    """Four queued cnn experiments (seeds 1-4), two at a time: what reached the store."""
    run(root, "dvc", "exp", "run", "--queue", *LOAD, "-S", "seed=1,2,3,4", "cnn")
    start = time.perf_counter()
    run_queue(root, log, timeout_s=1800)
    seconds = time.perf_counter() - start
    runs = [r for r in stage_runs(root, "cnn") if r.data.tags.get("pipeline.kind") == "stage"]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    epochs = [len(client.get_metric_history(r.info.run_id, "val_accuracy")) for r in runs]
    expected = [int(r.data.params["cnn.train.epochs_run"]) for r in runs]
    text = log.read_text()
    return {"runs": len(runs), "finished": sum(r.info.status == "FINISHED" for r in runs), "epochs": epochs,
            "expected_epochs": expected, "seconds": seconds, "busy_retries": text.count("tracking store busy"),
            "locked": text.count("database is locked")}


def soak(root: Path, n: int) -> list[tuple[float, float]]:
    """`n` baseline experiments in a row: (seconds, store MiB after it) for each."""
    out = []
    for i in range(n):
        start = time.perf_counter()
        run(root, "dvc", "exp", "run", *SMALL, "-S", f"baseline.C={1 + i / 100:.2f}", "baseline")
        store = sum(p.stat().st_size for p in (root / "mlruns").rglob("*") if p.is_file()) / 2**20
        out.append((time.perf_counter() - start, store))
        print(f"soak {i + 1}/{n}: {out[-1][0]:.1f} s, store {store:.1f} MiB", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--soak", type=int, default=30, help="tiny experiments in a row (default: %(default)s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = make_repo(Path(tmp))
        result = load(root, Path(tmp) / "queue.log")
        rows = soak(root, args.soak)
    print(f"\nload: {result['finished']} of {result['runs']} queued cnn runs finished, val_accuracy epochs logged "
          f"{result['epochs']} (expected {result['expected_epochs']}), {result['seconds']:.0f} s for four at -j 2; "
          f"store-busy retries {result['busy_retries']}, 'database is locked' in the log {result['locked']}")
    times, sizes = [t for t, _ in rows], [s for _, s in rows]
    growth = [b - a for a, b in zip(sizes, sizes[1:], strict=False)]
    k = max(1, len(rows) // 5)
    print(f"soak: {len(rows)} runs; seconds first {k} median {statistics.median(times[:k]):.1f}, last {k} median "
          f"{statistics.median(times[-k:]):.1f}; store {sizes[0]:.1f} -> {sizes[-1]:.1f} MiB, growth per run first "
          f"{statistics.median(growth[:k] or [0]):.2f}, last {statistics.median(growth[-k:] or [0]):.2f} MiB")


if __name__ == "__main__":
    main()
