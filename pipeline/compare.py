"""Two runs side by side: `python -m pipeline.compare RUN_A RUN_B [--out DIR] [OVERRIDES]`.

A run is named by its id or by a stage (the run that made the workspace's outputs, else its latest finished stage
run); both must have been evaluated on the same test split. Prints both runs' metrics and the difference, what
changed image by image and whether that is more than chance, and writes into --out (default compare/):

- confusion_difference.{csv,png}: their row-normalised confusion matrices, B - A (positive cells are mistakes
  B makes more often than A);
- flipped.csv: the test images right in A and wrong in B, and the reverse; flipped.png shows them, drawn from
  the local data/split/test when it is the runs' test split;
- compare.txt: what it prints. McNemar's exact test on the paired predictions says whether the runs differ
  beyond chance.

The comparison is logged as a run of kind `compare` in the data set's experiment, to open in the MLflow UI.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import matplotlib.pyplot as plt
import numpy as np
from mlflow.entities import Run
from scipy.stats import binomtest

from pipeline import config, tracking
from pipeline.analysis import (
    Predictions,
    draw_matrix,
    plot_image_sections,
    prediction_label,
    read_matrix_csv,
    read_predictions,
    save_figure,
    write_matrix_csv,
)
from pipeline.data.split import load_split
from pipeline.errors import PipelineError
from pipeline.paths import SPLIT_DIR

MATRIX = "analysis/confusion_normalized.csv"
PREDICTIONS = "analysis/test_predictions.csv"
ALPHA = 0.05  # significance level McNemar's p-value is read against
GRID = 24  # flipped images shown per direction, the wrong run's most confident mistakes first
RIGHT_TO_WRONG, WRONG_TO_RIGHT = "right_to_wrong", "wrong_to_right"  # from A to B
FILES = ("compare.txt", "confusion_difference.csv", "confusion_difference.png", "flipped.csv", "flipped.png")
FLIP_FIELDS = ("index", "true", "a_predicted", "a_confidence", "b_predicted", "b_confidence", "direction")


class McNemar(NamedTuple):
    """McNemar's exact test of two classifiers on the same test images."""

    right_to_wrong: int  # b: right in A, wrong in B
    wrong_to_right: int  # c: wrong in A, right in B
    p_value: float  # two-sided


def mcnemar(right_a: np.ndarray, right_b: np.ndarray) -> McNemar:
    """Only the images the runs disagree on tell them apart; if neither is better, each of those favours A or B
    with probability 1/2, so min(b, c) of b + c is binomial(b + c, 0.5): the exact two-sided test."""
    b = int(np.sum(right_a & ~right_b))
    c = int(np.sum(~right_a & right_b))
    p_value = binomtest(min(b, c), b + c, 0.5).pvalue if b + c else 1.0
    return McNemar(b, c, float(p_value))


def mcnemar_line(test: McNemar, alpha: float = ALPHA) -> str:
    verdict = "significant" if test.p_value < alpha else "not significant"
    return (f"McNemar exact test: A right/B wrong {test.right_to_wrong}, A wrong/B right {test.wrong_to_right}, "
            f"p = {test.p_value:.2g} (the difference is {verdict} at {alpha})")


def flipped(a: Predictions, b: Predictions) -> dict[str, np.ndarray]:
    """Indices of the images right in A and wrong in B, and the reverse; the wrong run's most confident first."""
    flips = {}
    for direction, wrong, mask in ((RIGHT_TO_WRONG, b, a.right & ~b.right), (WRONG_TO_RIGHT, a, ~a.right & b.right)):
        indices = np.flatnonzero(mask)
        flips[direction] = indices[np.argsort(-wrong.confidence[indices], kind="stable")]
    return flips


def compare(ref_a: str, ref_b: str, out: Path, overrides: Sequence[str] = ()) -> str:
    """What `main` prints; writes the files above into `out` and logs the comparison run."""
    cfg = config.load(overrides=overrides)
    experiment_id = tracking.connect(cfg)
    runs = [tracking.find_run(ref, experiment_id) for ref in (ref_a, ref_b)]
    names = [f"{run.info.run_name} {run.info.run_id[:8]}" for run in runs]
    digest = same_test_split(runs, names)
    lines = metric_table(runs, names)
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:  # an earlier comparison's files would pass for this one's
        (out / name).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        matrices = [read_matrix_csv(tracking.download(run.info.run_id, MATRIX, Path(tmp) / run.info.run_id))
                    for run in runs]
        predictions = [_predictions(run, Path(tmp) / run.info.run_id) for run in runs]
    lines += confusion_difference(matrices, names, out)
    metrics: dict[str, float] = {}
    if None in predictions:
        stale = next(name for name, p in zip(names, predictions, strict=True) if p is None)
        lines.append(f"no flipped images or McNemar test: run {stale} predates {PREDICTIONS} (run its stage again)")
    else:
        paired_lines, metrics = paired(*predictions, names, digest, out)
        lines += paired_lines
    text = "\n".join(lines)
    (out / "compare.txt").write_text(text + "\n", encoding="utf-8")
    files = [out / name for name in FILES if (out / name).is_file()]
    run_id = tracking.log_comparison(
        experiment_id, f"compare {runs[0].info.run_name} vs {runs[1].info.run_name}",
        {"compare.run_a": runs[0].info.run_id, "compare.run_b": runs[1].info.run_id,
         "pipeline.data": runs[0].data.tags.get("pipeline.data", cfg.data.name)}, metrics, files)
    return f"{text}\ncomparison run: {tracking.run_link(run_id, cfg.tracking) or run_id}"


def same_test_split(runs: list[Run], names: list[str]) -> str:
    """The test split digest both runs logged; a PipelineError if they were not evaluated on the same one."""
    digests = [tracking.logged_test_digest(run) for run in runs]
    for name, digest in zip(names, digests, strict=True):
        if digest is None:
            raise PipelineError(f"run {name} logged no test split: cannot tell whether both runs saw the same one")
    if digests[0] != digests[1]:
        raise PipelineError(f"the runs were evaluated on different test sets (test split digest {digests[0]} in "
                            f"{names[0]}, {digests[1]} in {names[1]}): compare runs made on the same data/split")
    return digests[0]


def metric_table(runs: list[Run], names: list[str]) -> list[str]:
    """Both runs' metrics and B - A, overall metrics first, then per-class ones (not the machine's load: the last
    system-metrics sample says nothing about a model)."""
    lines = [f"{'metric':<36} {names[0]:>20} {names[1]:>20} {'B - A':>10}"]
    metrics = [{k: v for k, v in run.data.metrics.items() if not k.startswith("system/")} for run in runs]
    for key in sorted(set(metrics[0]) | set(metrics[1]), key=lambda k: ("/" in k, k)):
        a, b = (m.get(key) for m in metrics)
        diff = f"{b - a:+10.4f}" if a is not None and b is not None else f"{'':>10}"
        lines.append(f"{key:<36} {_cell(a)} {_cell(b)} {diff}")
    return lines


def confusion_difference(matrices: list[tuple[np.ndarray, list[str]]], names: list[str], out: Path) -> list[str]:
    """Write confusion_difference.{csv,png} (B - A, share of each true class); the five largest changes."""
    (a_matrix, classes), (b_matrix, b_classes) = matrices
    if classes != b_classes:
        raise PipelineError(f"the runs have different classes: {classes} and {b_classes}")
    difference = b_matrix - a_matrix
    write_matrix_csv(out / "confusion_difference.csv", difference, classes)
    fig, ax = plt.subplots(figsize=(7, 6))
    draw_matrix(ax, difference, classes, f"confusion B - A (share of true class)\nA = {names[0]}, B = {names[1]}",
                fmt="+.2f", diverging=True)
    save_figure(fig, out / "confusion_difference.png")
    off = difference.copy()
    np.fill_diagonal(off, 0)
    lines = []
    for i, j in zip(*np.unravel_index(np.argsort(-np.abs(off), axis=None)[:5], off.shape), strict=True):
        if off[i, j]:
            lines.append(f"{classes[i]} taken for {classes[j]}: {a_matrix[i, j]:.3f} -> {b_matrix[i, j]:.3f}")
    lines.append(f"confusion difference: {out / 'confusion_difference.png'} (and .csv)")
    return lines


def paired(a: Predictions, b: Predictions, names: list[str], digest: str,
           out: Path) -> tuple[list[str], dict[str, float]]:
    """The image-by-image part: flipped.csv and .png, McNemar's test; its lines and the comparison run's metrics."""
    if a.classes != b.classes or not np.array_equal(a.y_true, b.y_true):
        raise PipelineError("the runs' test predictions are for different test labels: compare runs made on the "
                            "same data/split")
    flips = flipped(a, b)
    write_flipped(out / "flipped.csv", a, b, flips)
    test = mcnemar(a.right, b.right)
    metrics = {"mcnemar_p_value": test.p_value, "flipped_right_to_wrong": test.right_to_wrong,
               "flipped_wrong_to_right": test.wrong_to_right,
               "accuracy_difference": (test.wrong_to_right - test.right_to_wrong) / len(a.y_true)}
    lines = [f"flipped: {test.right_to_wrong} right in A and wrong in B, {test.wrong_to_right} the reverse: "
             f"{out / 'flipped.csv'}", draw_flipped(out / "flipped.png", a, b, flips, names, digest),
             mcnemar_line(test)]
    return lines, metrics


def write_flipped(path: Path, a: Predictions, b: Predictions, flips: dict[str, np.ndarray]) -> None:
    classes = a.classes
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(FLIP_FIELDS)
        for direction, indices in flips.items():
            for i in indices:
                writer.writerow([i, classes[a.y_true[i]], classes[a.predicted[i]], f"{a.confidence[i]:.4f}",
                                 classes[b.predicted[i]], f"{b.confidence[i]:.4f}", direction])


def draw_flipped(path: Path, a: Predictions, b: Predictions, flips: dict[str, np.ndarray], names: list[str],
                 digest: str) -> str:
    """flipped.png, when the local test split is the runs' (the runs logged its digest, not its images); the line
    that says where it is, or why it is missing."""
    images = local_test_images(digest)
    if images is None:
        return (f"no grid of flipped images: it needs the runs' test split (digest {digest}) in "
                f"{SPLIT_DIR / 'test'}, which is missing or another split")
    titles = {RIGHT_TO_WRONG: f"right in A ({names[0]}), wrong in B ({names[1]})",
              WRONG_TO_RIGHT: f"wrong in A ({names[0]}), right in B ({names[1]})"}
    sections = []
    for direction, indices in flips.items():
        shown = indices[:GRID]
        more = f", the {len(shown)} most confidently wrong shown" if len(indices) > len(shown) else ""
        captions = [f"#{i} true {a.classes[a.y_true[i]]}\nA {prediction_label(a.classes, a.y_prob[i])}\n"
                    f"B {prediction_label(b.classes, b.y_prob[i])}" for i in shown]
        sections.append((f"{titles[direction]}: {len(indices)} images{more}", images[shown], captions))
    plot_image_sections(path, sections)
    return f"flipped images: {path}"


def local_test_images(digest: str) -> np.ndarray | None:
    """data/split/test's images if that split has `digest`, else None."""
    try:
        x, y = load_split("test", SPLIT_DIR)
    except PipelineError:
        return None
    return x if tracking.split_digest(x, y) == digest else None


def _predictions(run: Run, dest: Path) -> Predictions | None:
    """The run's logged test predictions; None for a run logged before stages wrote them."""
    try:
        return read_predictions(tracking.download(run.info.run_id, PREDICTIONS, dest))
    except tracking.TrackingError:
        return None


def _cell(value: float | None) -> str:
    return f"{value:>20.4f}" if value is not None else f"{'-':>20}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.compare", description=__doc__.splitlines()[0])
    parser.add_argument("run_a", help="run id, or a stage name: the run of its metrics/<stage>.json, else its latest")
    parser.add_argument("run_b", help="run id, or a stage name: the run of its metrics/<stage>.json, else its latest")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/ (e.g. tracking.uri=...)")
    parser.add_argument("--out", type=Path, default=Path("compare"), help="where the comparison's files go")
    args = parser.parse_args(argv)
    try:
        print(compare(args.run_a, args.run_b, args.out, args.overrides))
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
