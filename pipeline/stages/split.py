"""split: stratified, seeded train / val / test arrays from data/raw/.

Reads:  data/raw/; params `seed`, `data` (val_size, test_size, limits, image size).
Writes: data/split/{train,val,test}/{x,y}.npy and meta.json (class names, class counts per split);
        metrics/split.json (split sizes).
"""

from __future__ import annotations

from pipeline import tracking
from pipeline.cli import stage_main
from pipeline.data.split import make_splits, write_splits
from pipeline.files import write_json
from pipeline.paths import METRICS_DIR, RAW_DIR, SPLIT_DIR
from pipeline.schema import Config


def run(cfg: Config) -> dict:
    splits, classes = make_splits(cfg.data, RAW_DIR, cfg.seed)
    write_splits(splits, classes, SPLIT_DIR)
    metrics = {"size": {name: len(y) for name, (_, y) in splits.items()}}
    if run_id := tracking.active_run_id():  # the report links a later execution that reuses these splits to it
        metrics["mlflow_run_id"] = run_id
    write_json(METRICS_DIR / "split.json", metrics)
    return metrics


if __name__ == "__main__":
    stage_main(run)
