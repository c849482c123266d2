"""Fixed output locations, relative to the repository root where DVC runs every stage (see dvc.yaml)."""

from pathlib import Path

RAW_DIR = Path("data/raw")
SPLIT_DIR = Path("data/split")
MODELS_DIR = Path("models")
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")
WORK_DIR = MODELS_DIR / ".work"  # resumable state of interrupted runs; not a DVC output


def model_dir(stage: str) -> Path:
    return MODELS_DIR / stage


def work_dir(stage: str) -> Path:
    return WORK_DIR / stage
