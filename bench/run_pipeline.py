"""Benchmark: the whole default pipeline (cpu profile, full Fashion-MNIST) from scratch, stage by stage,
then the smoke profile end to end and the hand-set cnn without a search (the tuner's yardstick); writes
docs/benchmarks.md with the machine and the date.

    python bench/run_pipeline.py                 # about 45 minutes on 2 CPU cores
    python bench/run_pipeline.py --skip-extras   # only the pipeline

It reruns every stage (`dvc repro --force`), so the repository's metrics/ and dvc.lock then hold this run:
commit them with docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"baseline": 0.84, "cnn": 0.925, "cnn_aug": 0.935, "finetune": 0.93}  # issue 4, cpu profile
BEST_TARGET, BUDGET_MINUTES, SMOKE_BUDGET_MINUTES = 0.94, 30, 3
ANCHORS = {"baseline": ("logistic regression (scikit-learn)", 0.842), "cnn": ("2 conv + pooling", 0.916),
           "cnn_aug": ("2 conv + 2 FC, with flip augmentation", 0.939), "transfer": ("VGG16", 0.935),
           "finetune": ("VGG16", 0.935)}  # ../shared/design.md section 7


def sh(*args: str, cwd: Path = REPO, env: dict | None = None) -> float:
    """Run a command, streaming its output; return its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run(args, cwd=cwd, env={**os.environ, **(env or {})}, check=True)
    return time.perf_counter() - start


def stages() -> list[str]:
    return list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB, {platform.system()} {platform.release()}, no GPU"


def run_pipeline() -> dict[str, float]:
    """Every stage, forced, in dvc.yaml's order: {stage: wall seconds}."""
    env = {"PIPELINE_EXECUTION_ID": f"bench-{datetime.datetime.now():%Y%m%d-%H%M%S}"}
    return {stage: sh("dvc", "repro", "--force", "--single-item", stage, env=env) for stage in stages()}


def default_cnn_val_accuracy() -> float:
    """The hand-set cnn (search off), trained as the pipeline trains, in a scratch directory."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "data").symlink_to(REPO / "data")
        sh(sys.executable, "-m", "pipeline.stages.cnn", "cnn.search.enabled=false", cwd=Path(tmp),
           env={"PYTHONPATH": str(REPO)})
        return json.loads((Path(tmp) / "metrics/cnn.json").read_text())["val_accuracy"]


def smoke_seconds() -> float:
    """The smoke profile end to end, in a temporary DVC workspace (its own data/ and outputs)."""
    seconds = sh("dvc", "exp", "run", "--temp", "-S", "profile=smoke", "--name", "bench-smoke")
    subprocess.run(["dvc", "exp", "remove", "bench-smoke"], cwd=REPO, check=False)
    return seconds


def report(times: dict[str, float], default_val: float | None, smoke: float | None) -> str:
    metrics = {s: json.loads(p.read_text()) for s in times if (p := REPO / "metrics" / f"{s}.json").is_file()}
    total = sum(times.values()) / 60
    lines = [
        "# Benchmarks", "",
        f"Measured {datetime.date.today()} on {machine()}, by `python bench/run_pipeline.py` "
        "(cpu profile, full Fashion-MNIST: 54,000 train / 6,000 validation / 10,000 test images).", "",
        "| stage | test accuracy | target | anchor (design.md section 7) | reached | val accuracy | fit s | stage s |",
        "|---|---|---|---|---|---|---|---|"]
    for stage, seconds in times.items():
        m = metrics.get(stage)
        if not m or "test" not in m:
            lines.append(f"| {stage} | | | | | | | {seconds:.0f} |")
            continue
        acc, target = m["test"]["accuracy"], TARGETS.get(stage)
        anchor = "{} {:.3f}".format(*ANCHORS[stage]) if stage in ANCHORS else ""
        wanted, reached = (f"≥ {target:.3f}", "yes" if acc >= target else "no") if target else ("", "")
        lines.append(f"| {stage} | {acc:.4f} | {wanted} | {anchor} | {reached} | {m['val_accuracy']:.4f} | "
                     f"{m['fit_seconds']:.0f} | {seconds:.0f} |")
    chosen = max((m["val_accuracy"], s) for s, m in metrics.items() if "test" in m)[1]  # on validation, never test
    best = metrics[chosen]["test"]["accuracy"]
    lines += ["", f"- Best stage, chosen on validation accuracy: {chosen}, test accuracy {best:.4f} (target ≥ "
              f"{BEST_TARGET}: {'reached' if best >= BEST_TARGET else 'not reached'}).",
              f"- Whole `dvc repro` (forced, stage by stage): {total:.1f} min (budget {BUDGET_MINUTES} min: "
              f"{'within' if total <= BUDGET_MINUTES else 'over'})."]
    search = REPO / "models/cnn/best_hparams.json"
    if search.is_file() and (best_hparams := json.loads(search.read_text())).get("source") == "search":
        trials_seconds = times["cnn"] - metrics["cnn"]["fit_seconds"]  # search + evaluation + logging
        lines.append(f"- cnn search: {best_hparams['trials']} {best_hparams['tuner']} trials, best "
                     f"{best_hparams['objective']} {best_hparams['score']:.4f} on the trial budget, values "
                     f"{best_hparams['values']}; about {best_hparams['trials'] / trials_seconds * 3600:.0f} trials "
                     "per hour (stage time less the final fit).")
        if default_val is not None:
            gap = metrics["cnn"]["val_accuracy"] - default_val
            lines.append(f"- Best vs hand-set cnn on validation accuracy (both trained on the full training split): "
                         f"{metrics['cnn']['val_accuracy']:.4f} vs {default_val:.4f} ({gap:+.4f}).")
    if smoke is not None:
        lines.append(f"- Smoke profile end to end (`dvc exp run --temp -S profile=smoke`): {smoke / 60:.1f} min "
                     f"(budget {SMOKE_BUDGET_MINUTES} min).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-extras", action="store_true", help="only the pipeline, no default cnn or smoke run")
    parser.add_argument("--out", type=Path, default=REPO / "docs/benchmarks.md")
    args = parser.parse_args()
    times = run_pipeline()
    smoke = None if args.skip_extras else smoke_seconds()
    default_val = None if args.skip_extras else default_cnn_val_accuracy()
    text = report(times, default_val, smoke)
    previous = args.out.read_text() if args.out.is_file() else ""
    notes = previous.split("\n## Notes", 1)[1] if "\n## Notes" in previous else "\n"
    args.out.write_text(text + "\n## Notes" + notes)  # hand-written notes below the table survive a rerun
    print(text)


if __name__ == "__main__":
    main()
