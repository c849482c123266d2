"""The benchmark's report: times as ratios to the bare-Keras reference, one dict behind both docs/benchmarks files."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run_pipeline", REPO / "bench/run_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REFERENCE = {"seconds": 1000.0, "test_accuracy": 0.933, "val_accuracy": 0.935, "epochs": 12, "machine": "test"}
TIMES = {"split": 8.0, "baseline": 40.0, "cnn": 700.0, "cnn_aug": 300.0, "report": 8.0}  # 1056 s: 1.06 x


def write_metrics(directory: Path) -> Path:
    """Metrics files as the stages write them; cnn_aug has the better test but the worse validation accuracy."""
    directory.mkdir()
    for stage, val, test in [("baseline", 0.866, 0.843), ("cnn", 0.932, 0.924), ("cnn_aug", 0.925, 0.940)]:
        metrics = {"val_accuracy": val, "test": {"accuracy": test}, "epochs": 8, "fit_seconds": TIMES[stage] - 100}
        if stage == "cnn_aug":  # flip TTA: better on validation than the best plain stage, worse on test than plain
            metrics.update(val_accuracy_tta=0.934, test_accuracy_tta=0.938)
        (directory / f"{stage}.json").write_text(json.dumps(metrics))
    hparams = directory / "best_hparams.json"
    hparams.write_text(json.dumps({"source": "search", "tuner": "random", "trials": 4, "objective": "val_accuracy",
                                   "score": 0.85, "values": {"blocks": 2}}))
    return hparams


@pytest.fixture
def results(bench: ModuleType, tmp_path: Path) -> dict:
    hparams = write_metrics(tmp_path / "metrics")
    default = {"mean": 0.930, "std": 0.0015, "per_seed": [0.9285, 0.9300, 0.9315]}
    tracking = {"stage": "baseline", "tracked_seconds": 31.0, "untracked_seconds": 30.0, "share": 0.032,
                "budget": 0.05, "repeats": 3}
    return bench.collect(TIMES, REFERENCE, default=default, smoke=120.0, no_op=1.4, tracking=tracking,
                         metrics_dir=tmp_path / "metrics", best_hparams=hparams)


def test_results_hold_the_keys_machines_read(results: dict) -> None:
    assert {"machine", "date", "pipeline_seconds", "reference", "stages", "search", "ratios"} <= results.keys()
    assert {"seconds", "test_accuracy"} <= results["reference"].keys()
    assert results["pipeline_seconds"] == 1056.0
    for stage in TIMES:
        assert {"test_accuracy", "val_accuracy", "seconds"} <= results["stages"][stage].keys()
    assert results["stages"]["split"]["test_accuracy"] is None
    assert results["stages"]["cnn"]["val_accuracy"] == 0.932
    assert results["search"] == {**results["search"], "best_val": 0.932, "default_val": 0.930, "seed_spread": 0.0015}
    assert results["ratios"] == {"pipeline_vs_reference": 1.056, "smoke_vs_reference": 0.12}


def test_best_stage_is_chosen_on_validation_not_test(results: dict) -> None:
    assert results["best_stage"]["stage"] == "cnn"  # cnn_aug's test accuracy is higher, its validation lower


def test_best_prediction_counts_flip_tta_chosen_on_validation(bench: ModuleType, results: dict) -> None:
    assert results["best_prediction"] == {"stage": "cnn_aug", "flip_tta": True, "val_accuracy": 0.934,
                                          "test_accuracy": 0.938}  # its test accuracy, though plain's is higher
    assert "cnn_aug with flip TTA (val 0.9340), test accuracy 0.9380" in bench.render(results)


def test_targets_are_judged_on_the_runs_own_numbers(results: dict) -> None:
    stages = results["stages"]
    assert stages["cnn"]["reached"] is False  # 0.924 < the reference's 0.933
    assert stages["cnn_aug"]["reached"] is True and stages["cnn_aug"]["target"] == "> cnn"
    assert stages["baseline"]["reached"] is True and stages["split"]["target"] is None
    assert results["search"]["gain"] == 0.002 and results["search"]["reached"] is False  # under +0.003


def test_markdown_states_times_as_ratios_to_the_reference(bench: ModuleType, results: dict) -> None:
    text = bench.render(results)
    assert "1.06 × the reference" in text  # the whole dvc repro
    assert "0.12 × the reference" in text  # smoke
    assert "0.10 × the reference (stage time less the final fit)" in text  # the cnn search
    assert "| cnn | 0.9240 |" in text and "| 700 | 0.70 |" in text  # stage seconds and their ratio
    assert "test accuracy 0.9330" in text and "16.7 min" in text  # the reference itself
    assert "Best stage, chosen on validation accuracy: cnn" in text
    assert "0.9320 vs 0.9300 (mean of seeds [1, 2, 3]) = +0.0020" in text and "spread (std) 0.0015" in text
    assert "No-op `dvc repro` (nothing changed): 1.4 s (budget ≤ 3 s: within)" in text
    assert "31.0 s with its MLflow run against 30.0 s without = 3.2% of the stage (budget ≤ 5%: within)" in text
    assert "budget 30 min" not in text and "min (budget" not in text  # no absolute budget


def test_markdown_and_json_are_written_from_one_dict(bench: ModuleType, results: dict, tmp_path: Path) -> None:
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nold table\n\n## Notes\n\nHand-written.\n")
    bench.write_outputs(results, page)
    assert json.loads((tmp_path / "benchmarks.json").read_text()) == results
    text = page.read_text()
    assert text.startswith(bench.render(results)) and text.endswith("## Notes\n\nHand-written.\n")
    assert "old table" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["benchmarks.json", "benchmarks.md", "metrics"]  # no temp


def test_reference_imports_no_pipeline_code() -> None:
    """The reference is what a user writes instead of the pipeline: Keras and numpy, nothing of ours."""
    tree = ast.parse((REPO / "bench/reference.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported - set(sys.stdlib_module_names) == {"keras", "numpy"}
