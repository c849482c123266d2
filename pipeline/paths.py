"""Fixed output locations, relative to the repository root where DVC runs every stage (see dvc.yaml)."""

from pathlib import Path

RAW_DIR = Path("data/raw")
SPLIT_DIR = Path("data/split")
MODELS_DIR = Path("models")
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")
