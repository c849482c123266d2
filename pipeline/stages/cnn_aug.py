"""cnn_aug: the cnn stage's best architecture trained with the data set's augmentation (`data.augment`: flip,
pad-and-crop, shift, zoom, rotation, erasing), either from scratch or, cheaper, continuing from the cnn stage's
trained model (`cnn_aug.init`).

Reads:  data/split/, models/cnn/ (best_hparams.json; model.keras for init: cnn); params `seed`, `cnn`,
        `data.augment`, `cnn_aug`, `evaluation`.
Writes: models/cnn_aug/model.keras, metrics/cnn_aug.json, plots/cnn_aug/.
"""

from __future__ import annotations

import keras

from pipeline.cli import stage_main
from pipeline.data.split import load_splits
from pipeline.files import file_digest
from pipeline.models.augment import build_augmentation, with_augmentation
from pipeline.models.cnn import build_cnn_from
from pipeline.outputs import fingerprint, load_keras_model, stage_model_file
from pipeline.paths import SPLIT_DIR
from pipeline.schema import Config
from pipeline.training import run_keras_stage
from pipeline.tuning import apply, read_best, record


def run(cfg: Config) -> dict:
    keras.utils.set_random_seed(cfg.seed)
    splits = load_splits(SPLIT_DIR)
    searched = read_best("cnn")
    architecture = apply(cfg.cnn, searched["values"])  # the cnn stage's search result
    hparams = record("cnn", architecture, searched["source"])
    needed_by = "cnn_aug with cnn_aug.init=cnn"

    def make_model(seed: int) -> keras.Model:  # afresh for every seed; the augmentation's random stream is the seed's
        augmentation = build_augmentation(cfg.data.augment, seed, splits.image_shape)
        if cfg.cnn_aug.init == "cnn":
            return with_augmentation(load_keras_model("cnn", needed_by)[0], augmentation, name="cnn_aug")
        return build_cnn_from(architecture, splits.image_shape, len(splits.classes), augmentation)

    start = file_digest(stage_model_file("cnn", needed_by)) if cfg.cnn_aug.init == "cnn" else "scratch"
    key = fingerprint(cfg.seed, architecture, cfg.data.augment, cfg.cnn_aug, start)
    return run_keras_stage("cnn_aug", make_model, cfg.cnn_aug.train, splits, key, cfg, hparams=hparams)


if __name__ == "__main__":
    stage_main(run)
