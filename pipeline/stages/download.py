"""download: fetch the data set into data/raw/.

Reads:  params `data` (source, mirrors, files and their checksums, retries).
Writes: data/raw/ (kept between runs: files already verified are not fetched again).
"""

from __future__ import annotations

from pipeline.cli import stage_main
from pipeline.data.download import fetch_files
from pipeline.data.image_folder import fetch_image_folder
from pipeline.paths import RAW_DIR
from pipeline.schema import Config


def run(cfg: Config) -> None:
    if cfg.data.format == "idx":
        fetch_files(cfg.data, RAW_DIR)
    else:
        fetch_image_folder(cfg.data, RAW_DIR)


if __name__ == "__main__":
    stage_main(run)
