"""Confusion analysis of a model's test predictions: tables (CSV) and figures (PNG) written into a directory.

Pure functions of (y_true, y_prob, images, class names), so a hand-made example checks them; every model
stage writes them into plots/<stage>/ (DVC outputs) and `pipeline.tracking` logs that directory to MLflow.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt  # the Agg backend (files, no display): MPLBACKEND is set in pipeline/__init__.py
import numpy as np
from sklearn.metrics import classification_report

from pipeline.evaluation import confusion, per_class

WORST = 16  # misclassified test images shown (most confidently wrong first)
PAIRS = 10  # most-confused (true, predicted) pairs listed
ANNOTATE_UP_TO = 20  # classes; more and the matrix cells are too small for numbers
PAIR_FIELDS = ("true", "predicted", "count", "share_of_true")
CLASS_FIELDS = ("class", "accuracy", "precision", "f1", "support")
PREDICTION_FIELDS = ("index", "true", "predicted")  # then one probability column per class
GRID_COLUMNS = 8  # images per row of a figure
CELL_INCHES, CELL_MARGIN = (1.6, 1.9), 0.1  # an image's cell in a grid (width, height), and the room around it


def write_analysis(dest: Path, y_true: np.ndarray, y_prob: np.ndarray, images: np.ndarray,
                   classes: list[str]) -> np.ndarray:
    """Write every table and figure below into `dest`; return the indices of the worst misclassified images."""
    y_true = np.asarray(y_true, dtype=np.int64)
    counts = confusion(y_true, y_prob, len(classes))
    normalized = row_normalize(counts)
    write_matrix_csv(dest / "confusion_counts.csv", counts, classes)
    write_matrix_csv(dest / "confusion_normalized.csv", normalized, classes)
    fig, axes = plt.subplots(1, 2, figsize=(2 * _matrix_inches(classes), _matrix_inches(classes)))
    draw_matrix(axes[0], counts, classes, "test confusion (counts)", fmt="d")
    draw_matrix(axes[1], normalized, classes, "test confusion (share of each true class)", fmt=".2f")
    save_figure(fig, dest / "confusion_matrix.png")
    _write_rows(dest / "confused_pairs.csv", confused_pairs(counts, classes), PAIR_FIELDS)
    accuracy_rows = per_class_accuracy(y_true, y_prob, classes)
    _write_rows(dest / "per_class_accuracy.csv", accuracy_rows, CLASS_FIELDS)
    _plot_per_class(dest / "per_class_accuracy.png", accuracy_rows)
    _plot_confidence(dest / "confidence_histogram.png", y_true, y_prob)
    (dest / "classification_report.txt").write_text(classification_report(
        y_true, y_prob.argmax(axis=1), labels=np.arange(len(classes)), target_names=classes, digits=4,
        zero_division=0), encoding="utf-8")
    worst = worst_misclassified(y_true, y_prob)
    plot_images(dest / "worst_misclassified.png", images[worst],
                [caption(classes, y_true[i], y_prob[i]) for i in worst])
    return worst


def row_normalize(counts: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (the share of each true class), 0 for a class with no examples."""
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros(counts.shape, dtype=np.float64), where=totals > 0)


def confused_pairs(counts: np.ndarray, classes: list[str], top: int = PAIRS) -> list[dict]:
    """The off-diagonal cells with the most examples: which class is taken for which, how often."""
    off = counts.astype(np.int64).copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:top]
    totals = counts.sum(axis=1)
    rows = []
    for true, predicted in zip(*np.unravel_index(order, off.shape), strict=True):
        if off[true, predicted]:
            rows.append({"true": classes[true], "predicted": classes[predicted], "count": int(off[true, predicted]),
                         "share_of_true": round(off[true, predicted] / totals[true], 4)})
    return rows


def per_class_accuracy(y_true: np.ndarray, y_prob: np.ndarray, classes: list[str]) -> list[dict]:
    """Accuracy (recall), precision, F1 and support of each class, worst accuracy first."""
    report = per_class(y_true, y_prob, classes)
    rows = [{"class": name, "accuracy": round(m["recall"], 4), "precision": round(m["precision"], 4),
             "f1": round(m["f1"], 4), "support": m["support"]} for name, m in report.items()]
    return sorted(rows, key=lambda row: row["accuracy"])


def worst_misclassified(y_true: np.ndarray, y_prob: np.ndarray, top: int = WORST) -> np.ndarray:
    """Indices of the wrong predictions made with the highest confidence, most confident first."""
    wrong = np.flatnonzero(y_prob.argmax(axis=1) != y_true)
    return wrong[np.argsort(-y_prob[wrong].max(axis=1), kind="stable")][:top]


def write_matrix_csv(path: Path, matrix: np.ndarray, classes: list[str]) -> None:
    """A class-by-class matrix with class names: rows true, columns predicted."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["true \\ predicted", *classes])
        for name, row in zip(classes, matrix, strict=True):
            writer.writerow([name, *(int(v) if matrix.dtype.kind in "iu" else round(float(v), 4) for v in row)])


def read_matrix_csv(path: Path) -> tuple[np.ndarray, list[str]]:
    """The matrix and class names that `write_matrix_csv` wrote."""
    with Path(path).open(newline="") as fh:
        rows = list(csv.reader(fh))
    return np.array([[float(v) for v in row[1:]] for row in rows[1:]]), rows[0][1:]


def write_predictions(path: Path, y_true: np.ndarray, y_prob: np.ndarray, classes: list[str]) -> None:
    """Every test image's true and predicted class and class probabilities (6 significant digits), so that two
    runs can be compared image by image later (`pipeline.compare`) without running either model again."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*PREDICTION_FIELDS, *classes])
        for i, (true, prob) in enumerate(zip(y_true, y_prob, strict=True)):
            writer.writerow([i, classes[true], classes[prob.argmax()], *(f"{p:.6g}" for p in prob)])


@dataclass
class Predictions:
    """A model's test predictions as `write_predictions` wrote them, rows in test-set order."""

    y_true: np.ndarray
    predicted: np.ndarray  # as the stage decided it: the argmax of the unrounded probabilities
    y_prob: np.ndarray
    classes: list[str]

    @property
    def right(self) -> np.ndarray:
        return self.predicted == self.y_true

    @property
    def confidence(self) -> np.ndarray:
        return self.y_prob[np.arange(len(self.predicted)), self.predicted]


def read_predictions(path: Path) -> Predictions:
    """The predictions that `write_predictions` wrote."""
    with Path(path).open(newline="") as fh:
        header, *rows = list(csv.reader(fh))
    classes = header[len(PREDICTION_FIELDS):]
    index = {name: i for i, name in enumerate(classes)}
    rows.sort(key=lambda row: int(row[0]))
    labels = np.array([[index[row[1]], index[row[2]]] for row in rows], dtype=np.int64).reshape(-1, 2)
    y_prob = np.array([row[len(PREDICTION_FIELDS):] for row in rows], dtype=np.float64).reshape(-1, len(classes))
    return Predictions(labels[:, 0], labels[:, 1], y_prob, classes)


def draw_matrix(ax, matrix: np.ndarray, classes: list[str], title: str, fmt: str, diverging: bool = False) -> None:
    """A class-by-class heat map with class names, numbers in the cells when they fit."""
    limit = float(np.abs(matrix).max()) or 1.0
    image = ax.imshow(matrix, cmap="RdBu_r" if diverging else "Blues",
                      vmin=-limit if diverging else 0, vmax=limit)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(ticks, classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    if len(classes) <= ANNOTATE_UP_TO:
        for (r, c), value in np.ndenumerate(matrix):
            dark = abs(value) > limit * 0.6
            ax.text(c, r, format(int(value) if fmt == "d" else value, fmt), ha="center", va="center",
                    fontsize=6, color="white" if dark else "black")


def plot_images(path: Path, images: np.ndarray, captions: Sequence[str],
                overlays: np.ndarray | None = None) -> None:
    """A grid of images with captions, optionally with heat maps (values in [0, 1]) laid over them."""
    cols = min(max(len(images), 1), GRID_COLUMNS)
    rows = max(math.ceil(len(images) / cols), 1)
    fig = plt.figure(figsize=(CELL_INCHES[0] * cols, CELL_INCHES[1] * rows))
    _draw_images(fig.add_axes((0, 0, 1, 1)), images, captions, overlays, cols, empty="no misclassified images")
    _write(fig, path)


def plot_image_sections(path: Path, sections: Sequence[tuple[str, np.ndarray, Sequence[str]]]) -> None:
    """Captioned image grids, one titled section each, in one figure: (title, images, captions) per section."""
    cols = min(max(len(images) for _, images, _ in sections) or 1, GRID_COLUMNS)
    rows = [max(math.ceil(len(images) / cols), 1) for _, images, _ in sections]
    fig = plt.figure(figsize=(max(CELL_INCHES[0] * cols, 5), sum(CELL_INCHES[1] * r + 0.4 for r in rows)),
                     layout="constrained")
    subfigures = np.atleast_1d(fig.subfigures(len(sections), 1, height_ratios=rows))
    for sub, (title, images, captions) in zip(subfigures, sections, strict=True):
        _draw_images(sub.subplots(), images, captions, None, cols, empty="none")
        sub.suptitle(title, fontsize=10)
    _write(fig, path)


def _draw_images(ax, images: np.ndarray, captions: Sequence[str], overlays: np.ndarray | None, cols: int,
                 empty: str) -> None:
    """The images side by side on the one axes, in cells of CELL_INCHES (axes coordinates in inches), each
    captioned above. An axes per image made a 32-image Grad-CAM figure cost 1.9 s to draw; this, 0.8 s."""
    width, height = CELL_INCHES
    rows = max(math.ceil(len(images) / cols), 1)
    side = width - 2 * CELL_MARGIN  # square tiles; the rest of a cell's height holds its caption
    for i, image in enumerate(images):
        row, col = divmod(i, cols)
        left, top = col * width + CELL_MARGIN, (rows - row) * height - (height - side - CELL_MARGIN)
        extent = (left, left + side, top - side, top)
        gray = image.shape[-1] == 1
        ax.imshow(image[..., 0] if gray else image, cmap="gray" if gray else None, extent=extent)
        if overlays is not None:
            ax.imshow(overlays[i], cmap="jet", alpha=0.45, vmin=0, vmax=1, extent=extent)
        ax.text(left + side / 2, top + 0.04, captions[i], ha="center", va="bottom", fontsize=6)
    if not len(images):
        ax.text(width / 2, height / 2, empty, ha="center", va="center")
    ax.set_xlim(0, cols * width)
    ax.set_ylim(0, rows * height)
    ax.set_aspect("equal")
    ax.axis("off")


def plot_history(path: Path, history: list[dict[str, float]]) -> None:
    """Training curves: loss, accuracy (train and validation) and learning rate per epoch."""
    epochs = np.arange(1, len(history) + 1)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key in zip(axes, ("loss", "accuracy", "learning_rate"), strict=True):
        for prefix, label in (("", "train"), ("val_", "validation")):
            if key == "learning_rate" and prefix:
                continue
            if all(prefix + key in row for row in history):
                ax.plot(epochs, [row[prefix + key] for row in history], marker="o", markersize=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_title(key.replace("_", " "), fontsize=10)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def caption(classes: list[str], true: int, prob: np.ndarray) -> str:
    """'true X / pred Y (confidence)', for a figure."""
    return f"true {classes[true]}\npred {prediction_label(classes, prob)}"


def prediction_label(classes: list[str], prob: np.ndarray) -> str:
    """'Y (confidence)': the predicted class and its probability."""
    predicted = int(prob.argmax())
    return f"{classes[predicted]} ({prob[predicted]:.2f})"


def _plot_per_class(path: Path, rows: list[dict]) -> None:
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(rows) + 1.2))
    ax.barh([row["class"] for row in rows], [row["accuracy"] for row in rows], color="tab:blue")
    ax.invert_yaxis()  # worst on top
    ax.set_xlim(0, 1)
    ax.set_xlabel("test accuracy of the class (recall)")
    ax.set_title("per-class accuracy, worst first", fontsize=10)
    save_figure(fig, path)


def _plot_confidence(path: Path, y_true: np.ndarray, y_prob: np.ndarray) -> None:
    confidence, right = y_prob.max(axis=1), y_prob.argmax(axis=1) == y_true
    fig, ax = plt.subplots(figsize=(6, 3.2))
    bins = np.linspace(0, 1, 21)
    ax.hist(confidence[right], bins=bins, alpha=0.6, label=f"right ({right.sum()})", color="tab:green")
    ax.hist(confidence[~right], bins=bins, alpha=0.6, label=f"wrong ({(~right).sum()})", color="tab:red")
    ax.set_xlabel("confidence (highest class probability)")
    ax.set_ylabel("test images")
    ax.set_title("confidence when right and when wrong", fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _matrix_inches(classes: list[str]) -> float:
    return min(max(4.5, 0.5 * len(classes) + 2), 16)


def _write_rows(path: Path, rows: list[dict], fields: tuple[str, ...]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def save_figure(fig, path: Path) -> None:
    """A figure laid out (tight), written as the stages' PNGs are, and closed."""
    fig.tight_layout()
    _write(fig, path)


def _write(fig, path: Path) -> None:
    fig.savefig(path, dpi=100)
    plt.close(fig)
