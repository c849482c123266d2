"""download: fetch the data set into data/raw/.

Reads:  params `data` (source, mirrors, files and their checksums, retries).
Writes: data/raw/ (kept between runs: files already verified are not fetched again), metrics/download.json
        (files, megabytes, the MLflow run).
"""

from __future__ import annotations

from pipeline import tracking
from pipeline.cli import stage_main
from pipeline.data.download import fetch_files
from pipeline.data.image_folder import fetch_image_folder
from pipeline.files import write_json
from pipeline.paths import METRICS_DIR, RAW_DIR
from pipeline.schema import Config


def run(cfg: Config) -> dict:
    if cfg.data.format == "idx":
        fetch_files(cfg.data, RAW_DIR)
    else:
        fetch_image_folder(cfg.data, RAW_DIR)
    files = [path for path in RAW_DIR.rglob("*") if path.is_file()]
    metrics = {"files": len(files), "megabytes": round(sum(path.stat().st_size for path in files) / 1e6, 1)}
    if run_id := tracking.active_run_id():  # the report links a later execution that reuses these files to it
        metrics["mlflow_run_id"] = run_id
    write_json(METRICS_DIR / "download.json", metrics)
    return metrics


if __name__ == "__main__":
    stage_main(run)
