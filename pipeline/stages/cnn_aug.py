"""cnn_aug: the cnn stage's architecture trained with augmentation (flip, shift, zoom, rotation, erasing).

Reads:  data/split/; params `seed`, `cnn` (architecture), `augment` (transforms), `cnn_aug` (`train` budget).
Writes: models/cnn_aug/model.keras, metrics/cnn_aug.json, plots/cnn_aug/.
"""

from __future__ import annotations

import keras

from pipeline.cli import stage_main
from pipeline.data.split import load_splits
from pipeline.models.augment import build_augmentation
from pipeline.models.cnn import build_cnn_from
from pipeline.outputs import fingerprint
from pipeline.paths import SPLIT_DIR
from pipeline.schema import Config
from pipeline.training import run_keras_stage


def run(cfg: Config) -> dict:
    keras.utils.set_random_seed(cfg.seed)
    splits = load_splits(SPLIT_DIR)
    model = build_cnn_from(cfg.cnn, splits.image_shape, len(splits.classes),
                           augmentation=build_augmentation(cfg.augment, cfg.seed))
    key = fingerprint(cfg.seed, cfg.cnn, cfg.augment, cfg.cnn_aug)
    return run_keras_stage("cnn_aug", model, cfg.cnn_aug.train, splits, key)


if __name__ == "__main__":
    stage_main(run)
