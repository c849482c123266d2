"""cnn: a convolutional network of the configured architecture, trained on the training split.

Reads:  data/split/; params `seed`, `cnn` (architecture and `train` budget).
Writes: models/cnn/model.keras, metrics/cnn.json, plots/cnn/ (per-epoch curves, confusion).
"""

from __future__ import annotations

import keras

from pipeline.cli import stage_main
from pipeline.data.split import load_splits
from pipeline.models.cnn import build_cnn_from
from pipeline.outputs import fingerprint
from pipeline.paths import SPLIT_DIR
from pipeline.schema import Config
from pipeline.training import run_keras_stage


def run(cfg: Config) -> dict:
    keras.utils.set_random_seed(cfg.seed)
    splits = load_splits(SPLIT_DIR)
    model = build_cnn_from(cfg.cnn, splits.image_shape, len(splits.classes))
    return run_keras_stage("cnn", model, cfg.cnn.train, splits, fingerprint(cfg.seed, cfg.cnn))


if __name__ == "__main__":
    stage_main(run)
