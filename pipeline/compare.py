"""Two runs side by side: `python -m pipeline.compare RUN_A RUN_B [--out DIR] [OVERRIDES]`.

A run is named by its id or by a stage (its latest finished run). Prints both runs' metrics and the
difference, and writes the difference of their row-normalised confusion matrices (B - A) as CSV and PNG:
positive cells are mistakes B makes more often than A.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from pipeline import config, tracking
from pipeline.analysis import draw_matrix, read_matrix_csv, write_matrix_csv
from pipeline.errors import PipelineError

MATRIX = "analysis/confusion_normalized.csv"


def compare(ref_a: str, ref_b: str, out: Path, overrides: Sequence[str] = ()) -> str:
    """The side-by-side table; writes confusion_difference.{csv,png} into `out`."""
    cfg = config.load(overrides=overrides)
    experiment_id = tracking.connect(cfg)
    runs = [tracking.find_run(ref, experiment_id) for ref in (ref_a, ref_b)]
    names = [f"{run.info.run_name} {run.info.run_id[:8]}" for run in runs]
    lines = [f"{'metric':<36} {names[0]:>20} {names[1]:>20} {'B - A':>10}"]
    metrics = [run.data.metrics for run in runs]
    for key in sorted(set(metrics[0]) | set(metrics[1]), key=lambda k: ("/" in k, k)):
        a, b = (m.get(key) for m in metrics)
        diff = f"{b - a:+10.4f}" if a is not None and b is not None else f"{'':>10}"
        lines.append(f"{key:<36} {_cell(a)} {_cell(b)} {diff}")
    with tempfile.TemporaryDirectory() as tmp:
        (a_matrix, classes), (b_matrix, b_classes) = (
            read_matrix_csv(tracking.download(run.info.run_id, MATRIX, Path(tmp) / run.info.run_id)) for run in runs)
    if classes != b_classes:
        raise PipelineError(f"the runs have different classes: {classes} and {b_classes}")
    difference = b_matrix - a_matrix
    out.mkdir(parents=True, exist_ok=True)
    write_matrix_csv(out / "confusion_difference.csv", difference, classes)
    fig, ax = plt.subplots(figsize=(7, 6))
    draw_matrix(ax, difference, classes, f"confusion B - A (share of true class)\nA = {names[0]}, B = {names[1]}",
                fmt="+.2f", diverging=True)
    fig.tight_layout()
    fig.savefig(out / "confusion_difference.png", dpi=100)
    plt.close(fig)
    off = difference.copy()
    np.fill_diagonal(off, 0)
    for i, j in zip(*np.unravel_index(np.argsort(-np.abs(off), axis=None)[:5], off.shape), strict=True):
        if off[i, j]:
            lines.append(f"{classes[i]} taken for {classes[j]}: {a_matrix[i, j]:.3f} -> {b_matrix[i, j]:.3f}")
    lines.append(f"confusion difference: {out / 'confusion_difference.png'} (and .csv)")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return f"{value:>20.4f}" if value is not None else f"{'-':>20}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.compare", description=__doc__.splitlines()[0])
    parser.add_argument("run_a", help="run id, or a stage name for its latest finished run")
    parser.add_argument("run_b", help="run id, or a stage name for its latest finished run")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/ (e.g. tracking.uri=...)")
    parser.add_argument("--out", type=Path, default=Path("compare"), help="where the confusion difference goes")
    args = parser.parse_args(argv)
    try:
        print(compare(args.run_a, args.run_b, args.out, args.overrides))
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
