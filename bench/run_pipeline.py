"""Benchmark: the bare-Keras reference (bench/reference.py) first, then the whole default pipeline (cpu profile,
full Fashion-MNIST) from scratch, stage by stage, a no-op `dvc repro`, the smoke profile end to end, and the
hand-set cnn without a search over three seeds (the tuner's yardstick and its seed-to-seed spread); writes
docs/benchmarks.md for people and docs/benchmarks.json for machines, from one dict. Every time budget is a ratio to
the reference's seconds in the same run (docs/decisions.md).

    python bench/run_pipeline.py                 # about an hour on 2 CPU cores
    python bench/run_pipeline.py --skip-extras   # only the reference, the pipeline and a no-op repro
    python bench/run_pipeline.py --smoke-only    # only the reference and the smoke profile: their ratio, printed
    python bench/run_pipeline.py --tracking-only # only tracking's share of the baseline stage, printed

It reruns every stage (`dvc repro --force`), so the repository's metrics/ and dvc.lock then hold this run:
commit them with docs/benchmarks.md and docs/benchmarks.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
BASELINE_TARGET, BEST_TARGET = 0.84, 0.94
AUGMENT_GAIN, FINETUNE_GAIN, SEARCH_GAIN = 0.0, 0.01, 0.003  # cnn_aug > cnn; finetune >= transfer + 0.01; search
DEFAULT_SEEDS = (1, 2, 3)  # the hand-set cnn's final fit, once per seed
NO_OP_SECONDS = 3.0
TRACKING_SHARE = 0.05  # tracking's cost, at most this share of a stage
# Time budgets as ratios to the reference measured in the same run, never minutes: the old 30- and 3-minute
# budgets over the 17 minutes the reference took on the machine they were set on (../shared/design.md section 10).
BUDGETS_VS_REFERENCE = {"pipeline": 1.5, "smoke": 0.15}  # issue 11's targets
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


def run_reference() -> dict[str, Any]:
    """The bare-Keras reference, as a subprocess with this run's environment: what every time is measured against."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "reference.json"
        sh(sys.executable, str(REPO / "bench/reference.py"), "--out", str(out))
        return json.loads(out.read_text())


def run_pipeline() -> dict[str, float]:
    """Every stage, forced, in dvc.yaml's order, as in a fresh clone: {stage: wall seconds}. The work dirs go first:
    a search whose key is unchanged would otherwise be reused from an earlier run, not timed."""
    shutil.rmtree(REPO / "models/.work", ignore_errors=True)
    env = {"PIPELINE_EXECUTION_ID": f"bench-{datetime.datetime.now():%Y%m%d-%H%M%S}"}
    return {stage: sh("dvc", "repro", "--force", "--single-item", stage, env=env) for stage in stages()}


def no_op_seconds() -> float:
    """`dvc repro` with nothing changed: DVC checks every stage and runs none."""
    return sh("dvc", "repro")


def stage_alone(stage: str, *overrides: str) -> dict[str, Any]:
    """One stage run with `overrides` in a scratch directory that sees this repository's params.yaml, data/ and the
    models its dvc.yaml entry reads (cnn_aug: models/cnn), as the pipeline runs it: its metrics and seconds."""
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["deps"]
    with tempfile.TemporaryDirectory() as tmp:
        for path in ["params.yaml", "data", *(d for d in deps if isinstance(d, str) and d.startswith("models/"))]:
            (Path(tmp) / path).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / path).symlink_to(REPO / path)
        seconds = sh(sys.executable, "-m", f"pipeline.stages.{stage}", *overrides,
                     cwd=Path(tmp), env={"PYTHONPATH": str(REPO)})
        return {**json.loads((Path(tmp) / f"metrics/{stage}.json").read_text()), "stage_seconds": round(seconds, 1)}


def hand_set_cnn(*overrides: str) -> dict[str, Any]:
    """The cnn stage with its search off (and `overrides`), trained as the pipeline trains it."""
    return stage_alone("cnn", "cnn.search.enabled=false", *overrides)


def default_cnn() -> dict[str, Any]:
    """The hand-set cnn once per seed of DEFAULT_SEEDS: its validation accuracy's mean and sample std."""
    return hand_set_cnn(f"cnn.train.seeds=[{','.join(map(str, DEFAULT_SEEDS))}]")["seeds"]["val_accuracy"]


def smoke_seconds() -> float:
    """The smoke profile end to end, every stage run, in a temporary DVC workspace (its own data/ and outputs)."""
    # --force: otherwise DVC's run cache restores every stage an earlier benchmark ran with the same settings
    seconds = sh("dvc", "exp", "run", "--temp", "--force", "-S", "profile=smoke", "--name", "bench-smoke")
    subprocess.run(["dvc", "exp", "remove", "bench-smoke"], cwd=REPO, check=False)
    return seconds


def tracking_cost(repeats: int = 3) -> dict[str, Any]:
    """Tracking's cost where it weighs most, on the shortest stage that trains (baseline, about 30 s; the Keras stages
    run minutes): the stage as DVC runs it (its MLflow run with params, metrics, figures and model) against its
    `run(cfg)` with no run (MLflow never imported), alternated in one scratch directory whose store an untimed first
    run makes. Median seconds of each; `share`: the tracked run's seconds that tracking adds."""
    untracked = "from pipeline import config; from pipeline.stages.baseline import run; run(config.load())"
    tracked_command = (sys.executable, "-m", "pipeline.stages.baseline")
    with tempfile.TemporaryDirectory() as tmp:
        for path in ("params.yaml", "data"):
            (Path(tmp) / path).symlink_to(REPO / path)
        env = {"PYTHONPATH": str(REPO)}
        sh(*tracked_command, cwd=Path(tmp), env=env)
        times: dict[str, list[float]] = {"tracked": [], "untracked": []}
        for _ in range(repeats):
            times["tracked"].append(sh(*tracked_command, cwd=Path(tmp), env=env))
            times["untracked"].append(sh(sys.executable, "-c", untracked, cwd=Path(tmp), env=env))
    tracked, alone = statistics.median(times["tracked"]), statistics.median(times["untracked"])
    return {"stage": "baseline", "tracked_seconds": round(tracked, 2), "untracked_seconds": round(alone, 2),
            "share": round((tracked - alone) / tracked, 3), "budget": TRACKING_SHARE, "repeats": repeats}


def targets(reference: dict[str, Any], test: dict[str, float], seconds: dict[str, float]) -> dict[str, tuple]:
    """Issue 11's target per stage, as (what it asks, reached?), from this run's own numbers."""
    out: dict[str, tuple] = {}
    if "baseline" in test:
        out["baseline"] = (f"≥ {BASELINE_TARGET:.3f}", test["baseline"] >= BASELINE_TARGET)
    if "cnn" in test:
        out["cnn"] = (f"≥ {reference['test_accuracy']:.4f} (the reference) in ≤ its time",
                      test["cnn"] >= reference["test_accuracy"] and seconds["cnn"] <= reference["seconds"])
    if {"cnn", "cnn_aug"} <= test.keys():
        out["cnn_aug"] = ("> cnn", test["cnn_aug"] > test["cnn"] + AUGMENT_GAIN)
    if {"transfer", "finetune"} <= test.keys():
        out["finetune"] = (f"≥ transfer + {FINETUNE_GAIN}", test["finetune"] >= test["transfer"] + FINETUNE_GAIN)
    return out


def collect(times: dict[str, float], reference: dict[str, Any], default: dict[str, Any] | None, smoke: float | None,
            no_op: float | None = None, tracking: dict[str, Any] | None = None, metrics_dir: Path = REPO / "metrics",
            best_hparams: Path = REPO / "models/cnn/best_hparams.json") -> dict[str, Any]:
    """Everything the benchmark measured, as the one dict that both docs/benchmarks.md and .json are made from.
    `default`: the hand-set cnn's validation accuracy over seeds (`mean`, `std`, `per_seed`); `tracking`:
    `tracking_cost`'s."""
    ref = reference["seconds"]
    metrics = {s: json.loads(p.read_text()) for s in times if (p := metrics_dir / f"{s}.json").is_file()}
    test = {s: m["test"]["accuracy"] for s, m in metrics.items() if "test" in m}
    goals = targets(reference, test, times)
    stages: dict[str, dict[str, Any]] = {}
    for stage, seconds in times.items():
        m = metrics.get(stage, {})
        target, reached = goals.get(stage, (None, None))
        stages[stage] = {
            "test_accuracy": test.get(stage), "val_accuracy": m.get("val_accuracy") if stage in test else None,
            "test_accuracy_tta": m.get("test_accuracy_tta"), "val_accuracy_tta": m.get("val_accuracy_tta"),
            "seconds": round(seconds, 1), "seconds_vs_reference": round(seconds / ref, 3),
            "fit_seconds": m.get("fit_seconds"), "epochs": m.get("epochs"), "target": target, "reached": reached,
            "anchor": dict(zip(("model", "test_accuracy"), ANCHORS[stage], strict=True)) if stage in ANCHORS else None}
    best = best_prediction(stages, ways=("",))  # the stages' plain predictions
    hparams = json.loads(best_hparams.read_text()) if best_hparams.is_file() else {}
    searched = hparams.get("source") == "search" and "cnn" in metrics
    search: dict[str, Any] = {
        "best_val": metrics["cnn"]["val_accuracy"] if searched else None,
        "default_val": None if default is None else default["mean"],
        "seed_spread": None if default is None else default["std"],
        "default_per_seed": None if default is None else default["per_seed"], "default_seeds": list(DEFAULT_SEEDS)}
    if searched and default is not None:
        gap = search["best_val"] - search["default_val"]
        search.update(gain=round(gap, 4), reached=gap >= SEARCH_GAIN and gap > search["seed_spread"])
    if searched:
        search_seconds = times["cnn"] - metrics["cnn"]["fit_seconds"]  # search + evaluation + logging
        search.update(tuner=hparams["tuner"], trials=hparams["trials"], objective=hparams["objective"],
                      trial_score=hparams["score"], values=hparams["values"], seconds=round(search_seconds, 1),
                      seconds_vs_reference=round(search_seconds / ref, 3))
    pipeline_seconds = sum(times.values())
    return {
        "machine": machine(), "date": datetime.date.today().isoformat(), "command": "python bench/run_pipeline.py",
        "pipeline_seconds": round(pipeline_seconds, 1), "smoke_seconds": None if smoke is None else round(smoke, 1),
        "no_op_repro_seconds": None if no_op is None else round(no_op, 1), "no_op_budget_seconds": NO_OP_SECONDS,
        "tracking": tracking,
        "reference": reference, "stages": stages,
        "best_stage": best and {k: best[k] for k in ("stage", "val_accuracy", "test_accuracy")},
        "best_prediction": best_prediction(stages),
        "best_target": BEST_TARGET, "search": search,
        "ratios": {"pipeline_vs_reference": round(pipeline_seconds / ref, 3),
                   "smoke_vs_reference": None if smoke is None else round(smoke / ref, 3)},
        "budgets_vs_reference": {f"{k}_vs_reference": v for k, v in BUDGETS_VS_REFERENCE.items()}}


def best_prediction(stages: dict[str, dict[str, Any]], ways: tuple[str, ...] = ("", "_tta")) -> dict[str, Any] | None:
    """The best way to predict among the stages, chosen on validation accuracy, never on test: a stage's plain
    predictions (""), or where it logs them, those of the evaluation's flip TTA ("_tta", `evaluation.tta`); with its
    test accuracy."""
    options = [(s[f"val_accuracy{tta}"], name, tta) for name, s in stages.items() for tta in ways
               if s["val_accuracy"] is not None and s.get(f"val_accuracy{tta}") is not None]
    if not options:
        return None
    val, name, tta = max(options)
    return {"stage": name, "flip_tta": bool(tta), "val_accuracy": val,
            "test_accuracy": stages[name][f"test_accuracy{tta}"]}


def _vs_budget(ratio: float, budget: float) -> str:
    return f"{ratio:.2f} × the reference (budget ≤ {budget:g} ×: {'within' if ratio <= budget else 'over'})"


def render(results: dict[str, Any]) -> str:
    """docs/benchmarks.md from `collect`'s dict alone (pure), so the page and the JSON cannot disagree."""
    ref, search, budgets = results["reference"], results["search"], results["budgets_vs_reference"]
    lines = [
        "# Benchmarks", "",
        f"Measured {results['date']} on {results['machine']}, by `{results['command']}` (cpu profile, full "
        "Fashion-MNIST: 54,000 train / 6,000 validation / 10,000 test images); the same numbers are in "
        "`docs/benchmarks.json`.", "",
        f"**Reference** (`bench/reference.py`, run first in the same benchmark run: the bare Keras script a user "
        f"would write, a 6-conv batch-norm CNN 32-64-128, Adam + cosine, batch 128, {ref['epochs']} epochs, no "
        f"augmentation, {ref.get('train_images', 55_000):,} / {ref.get('val_images', 5_000):,} stratified split): "
        f"test accuracy {ref['test_accuracy']:.4f}, val accuracy "
        f"{ref['val_accuracy']:.4f}, {ref['seconds'] / 60:.1f} min. Machines of this kind differ 2x in speed, so "
        "every time budget below is a ratio to this run's reference, never minutes.", "",
        "| stage | test accuracy | with flip TTA | target (issue 11) | reached | anchor (design.md section 7) "
        "| val accuracy | fit s | stage s | × reference |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for stage, s in results["stages"].items():
        times = f"{s['seconds']:.0f} | {s['seconds_vs_reference']:.2f} |"
        if s["test_accuracy"] is None:
            lines.append(f"| {stage} | | | | | | | | {times}")
            continue
        anchor = f"{s['anchor']['model']} {s['anchor']['test_accuracy']:.3f}" if s["anchor"] else ""
        tta = "" if s["test_accuracy_tta"] is None else f"{s['test_accuracy_tta']:.4f}"
        reached = "" if s["reached"] is None else "yes" if s["reached"] else "no"
        lines.append(f"| {stage} | {s['test_accuracy']:.4f} | {tta} | {s['target'] or ''} | {reached} | {anchor} | "
                     f"{s['val_accuracy']:.4f} | {s['fit_seconds']:.0f} | {times}")
    lines.append("")
    if best := results["best_stage"]:
        test, goal = best["test_accuracy"], results["best_target"]
        lines.append(f"- Best stage, chosen on validation accuracy: {best['stage']}, test accuracy {test:.4f} "
                     f"(target ≥ {goal}: {'reached' if test >= goal else 'not reached'}); "
                     f"{test - ref['test_accuracy']:+.4f} against the reference's {ref['test_accuracy']:.4f} on the "
                     "same 10,000 test images.")
    if (chosen := results.get("best_prediction")) and chosen["flip_tta"]:
        test, goal = chosen["test_accuracy"], results["best_target"]
        lines.append(f"- Best prediction, chosen on validation accuracy with the evaluation's flip TTA counted: "
                     f"{chosen['stage']} with flip TTA (val {chosen['val_accuracy']:.4f}), test accuracy {test:.4f} "
                     f"(target ≥ {goal}: {'reached' if test >= goal else 'not reached'}).")
    lines.append(f"- Whole `dvc repro` (forced, stage by stage): {results['pipeline_seconds'] / 60:.1f} min = "
                 + _vs_budget(results["ratios"]["pipeline_vs_reference"], budgets["pipeline_vs_reference"]) + ".")
    if "trials" in search:
        lines.append(f"- cnn search: {search['trials']} {search['tuner']} trials, best {search['objective']} "
                     f"{search['trial_score']:.4f} on the trial budget, values {search['values']}; "
                     f"{search['seconds_vs_reference']:.2f} × the reference (stage time less the final fit).")
    if search["best_val"] is not None and search["default_val"] is not None:
        gap, spread = search["best_val"] - search["default_val"], search["seed_spread"]
        lines.append(f"- Searched vs hand-set cnn on validation accuracy (the same final budget on the full training "
                     f"split): {search['best_val']:.4f} vs {search['default_val']:.4f} (mean of seeds "
                     f"{search['default_seeds']}) = {gap:+.4f}; the hand-set cnn's seed-to-seed spread (std) "
                     f"{spread:.4f} (target: ≥ +{SEARCH_GAIN} and above the spread: "
                     f"{'reached' if search['reached'] else 'not reached'}).")
    if results["smoke_seconds"] is not None:
        lines.append(f"- Smoke profile end to end (`dvc exp run --temp -S profile=smoke`): "
                     f"{results['smoke_seconds'] / 60:.1f} min = "
                     + _vs_budget(results["ratios"]["smoke_vs_reference"], budgets["smoke_vs_reference"]) + ".")
    if results["no_op_repro_seconds"] is not None:
        no_op, budget = results["no_op_repro_seconds"], results["no_op_budget_seconds"]
        lines.append(f"- No-op `dvc repro` (nothing changed): {no_op:.1f} s (budget ≤ {budget:g} s: "
                     f"{'within' if no_op <= budget else 'over'}).")
    if cost := results.get("tracking"):
        lines.append(f"- Tracking's cost on the {cost['stage']} stage (the shortest that trains; median of "
                     f"{cost['repeats']}): {cost['tracked_seconds']:.1f} s with its MLflow run against "
                     f"{cost['untracked_seconds']:.1f} s without = {cost['share']:.1%} of the stage (budget ≤ "
                     f"{cost['budget']:.0%}: {'within' if cost['share'] <= cost['budget'] else 'over'}).")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file in the same directory and a rename: no reader sees half a file."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(text)
    try:
        os.replace(tmp.name, path)
    except BaseException:
        Path(tmp.name).unlink(missing_ok=True)
        raise


def write_outputs(results: dict[str, Any], markdown: Path) -> str:
    """The JSON beside the markdown page, both from `results`; hand-written notes below the table survive."""
    previous = markdown.read_text() if markdown.is_file() else ""
    notes = previous.split("\n## Notes", 1)[1] if "\n## Notes" in previous else "\n"
    text = render(results)
    write_atomic(markdown.with_suffix(".json"), json.dumps(results, indent=2) + "\n")
    write_atomic(markdown, text + "\n## Notes" + notes)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-extras", action="store_true", help="only the reference, the pipeline and a no-op repro")
    parser.add_argument("--smoke-only", action="store_true",
                        help="only the reference and the smoke profile: their ratio, printed as JSON; docs/ untouched")
    parser.add_argument("--tracking-only", action="store_true",
                        help="only tracking's share of the baseline stage, printed as JSON; docs/ untouched")
    parser.add_argument("--out", type=Path, default=REPO / "docs/benchmarks.md", help="and .json beside it")
    args = parser.parse_args()
    if args.tracking_only:
        print(json.dumps(tracking_cost()))
        return
    reference = run_reference()
    if args.smoke_only:
        smoke = smoke_seconds()
        print(json.dumps({"date": f"{datetime.date.today()}", "machine": machine(),
                          "reference_seconds": round(reference["seconds"], 1), "smoke_seconds": round(smoke, 1),
                          "smoke_vs_reference": round(smoke / reference["seconds"], 3),
                          "budget": BUDGETS_VS_REFERENCE["smoke"]}))
        return
    times = run_pipeline()
    no_op = no_op_seconds()
    smoke = None if args.skip_extras else smoke_seconds()
    default = None if args.skip_extras else default_cnn()
    tracking = None if args.skip_extras else tracking_cost()
    print(write_outputs(collect(times, reference, default, smoke, no_op, tracking), args.out))


if __name__ == "__main__":
    main()
