"""report: the stage ladder (validation and test accuracy of each model stage, the test accuracy against a
published result), the best stage chosen on the validation split, and the MLflow run of each.

In MLflow, the ladder and the best stage go on the pipeline execution's run too; a stage that DVC skipped this
time appears there as a light run tagged `reused`, linking to the run that made its outputs; and the best stage's
model is registered (one registered model per data set), the alias `champion` moving to it if it beats the
champion's validation accuracy.

Reads:  metrics/<stage>.json of the model stages that have them, and of download and split; params
        `data.anchors`.
Writes: metrics/summary.json (DVC metrics), metrics/report.md (the same, with links to the runs in the UI).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pipeline import tracking
from pipeline.cli import stage_main
from pipeline.errors import DataError
from pipeline.files import atomic_path, write_json
from pipeline.paths import METRICS_DIR
from pipeline.schema import Anchor, Config

log = logging.getLogger(__name__)

MODEL_STAGES = ("baseline", "cnn", "cnn_aug", "transfer", "finetune")  # the ladder, simplest first
LADDER = ("val_accuracy", "test_accuracy")  # what the ladder shows of each stage; the first chooses the best
DATA_STAGES = ("download", "split")  # no ladder of their own, but runs to link when DVC skips them
REPORT = METRICS_DIR / "report.md"


def run(cfg: Config) -> dict[str, Any]:
    results = {stage: json.loads(path.read_text(encoding="utf-8")) for stage in MODEL_STAGES
               if (path := METRICS_DIR / f"{stage}.json").is_file()}
    if not results:
        raise DataError(f"no {METRICS_DIR}/<stage>.json of a model stage ({', '.join(MODEL_STAGES)}): "
                        "run them first (dvc repro)")
    summary = summarize(results, cfg.data.anchors, cfg.data.name)
    links = {stage: tracking.run_link(row["mlflow_run_id"], cfg.tracking)
             for stage, row in summary["stages"].items() if row.get("mlflow_run_id")}
    write_json(METRICS_DIR / "summary.json", summary)
    with atomic_path(REPORT) as tmp:
        tmp.write_text(render(summary, links), encoding="utf-8")
    best = summary["best"]
    made_by = {stage: (row.get("mlflow_run_id"), {k: row[k] for k in LADDER})
               for stage, row in summary["stages"].items()}
    for stage in DATA_STAGES:
        if (path := METRICS_DIR / f"{stage}.json").is_file():
            made_by[stage] = (json.loads(path.read_text(encoding="utf-8")).get("mlflow_run_id"), {})
    for stage, (run_id, values) in made_by.items():
        if run_id:  # a light run for a stage DVC skipped this time, linking to the run that made its outputs
            tracking.log_reused(stage, run_id, values, cfg.tracking)
    tracking.log_summary({f"{k}/{stage}": row[k] for stage, row in summary["stages"].items() for k in LADDER},
                         REPORT, {"best_stage": best["stage"], "best_run": best.get("mlflow_run_id") or ""})
    if best.get("mlflow_run_id"):
        tracking.register_champion(best["mlflow_run_id"], cfg.tracking.experiment or cfg.data.name,
                                   best["val_accuracy"])
    log.info("report: best stage %s (validation accuracy %.4f), test accuracy %.4f", best["stage"],
             best["val_accuracy"], best["test_accuracy"])
    return summary


def summarize(results: dict[str, dict], anchors: dict[str, Anchor], data: str) -> dict[str, Any]:
    """Each stage's validation and test accuracy, macro F1, its anchor and the difference, its run; the best stage,
    chosen on validation accuracy (the test split is reported, never used to choose)."""
    stages = {}
    for stage, metrics in results.items():
        row = {"val_accuracy": metrics["val_accuracy"], "test_accuracy": metrics["test"]["accuracy"],
               "macro_f1": metrics["test"]["macro_f1"]}
        if stage in anchors:
            row.update(anchor=anchors[stage].model, anchor_accuracy=anchors[stage].accuracy,
                       vs_anchor=round(row["test_accuracy"] - anchors[stage].accuracy, 4))
        if "mlflow_run_id" in metrics:
            row["mlflow_run_id"] = metrics["mlflow_run_id"]
        stages[stage] = row
    best = max(stages, key=lambda stage: stages[stage]["val_accuracy"])
    kept = ("val_accuracy", "test_accuracy", "mlflow_run_id")
    return {"data": data, "stages": stages, "best": {"stage": best, **{k: stages[best][k] for k in kept
                                                                       if k in stages[best]}}}


def render(summary: dict[str, Any], links: dict[str, str | None]) -> str:
    """The summary as a short markdown report."""
    lines = [f"# Results on {summary['data']}", "",
             "| stage | validation accuracy | test accuracy | macro F1 | published result | its accuracy | "
             "difference | MLflow run |", "|---|---|---|---|---|---|---|---|"]
    for stage, row in summary["stages"].items():
        anchor = (row["anchor"], f"{row['anchor_accuracy']:.3f}", f"{row['vs_anchor']:+.4f}") if "anchor" in row \
            else ("", "", "")
        lines.append(f"| {stage} | {row['val_accuracy']:.4f} | {row['test_accuracy']:.4f} | {row['macro_f1']:.4f} | "
                     f"{' | '.join(anchor)} | {_run(row.get('mlflow_run_id'), links.get(stage))} |")
    best = summary["best"]
    lines += ["", f"Best (chosen on validation accuracy): **{best['stage']}**, validation accuracy "
                  f"{best['val_accuracy']:.4f}, test accuracy {best['test_accuracy']:.4f}, run "
                  f"{_run(best.get('mlflow_run_id'), links.get(best['stage']))}.", "",
              "Browse the runs with `make ui`; compare two with `make compare A=<stage or run id> B=...`.", ""]
    return "\n".join(lines)


def _run(run_id: str | None, link: str | None) -> str:
    if not run_id:
        return "-"
    return f"[`{run_id[:8]}`]({link})" if link else f"`{run_id[:8]}`"


if __name__ == "__main__":
    stage_main(run)
