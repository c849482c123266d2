"""cnn: a convolutional network (a small residual net by default), the settings of its `search.space` (learning rate,
weight decay, label smoothing, dropout, width) searched with keras-tuner when `cnn.search.enabled`, then trained on the
full training split with the recipe of `cnn.train`.

Reads:  data/split/; params `seed`, `cnn` (architecture, `train` recipe and budget, `search` space), `tuner`,
        `data.augment.flip` and `evaluation` (flip test-time augmentation).
Writes: models/cnn/{model.keras, best_hparams.json, search/}, metrics/cnn.json, plots/cnn/.
"""

from __future__ import annotations

import keras

from pipeline.cli import stage_main
from pipeline.data.split import load_splits
from pipeline.models.cnn import build_cnn_from
from pipeline.outputs import fingerprint
from pipeline.paths import SPLIT_DIR
from pipeline.schema import Config
from pipeline.search_space import trained_values
from pipeline.training import run_keras_stage
from pipeline.tuning import tune


def run(cfg: Config) -> dict:
    keras.utils.set_random_seed(cfg.seed)
    splits = load_splits(SPLIT_DIR)

    def build(section):
        return build_cnn_from(section, splits.image_shape, len(splits.classes))

    best = tune("cnn", cfg.cnn, build, splits.train, splits.val, cfg.tuner, cfg.seed)
    return run_keras_stage("cnn", lambda seed: build(best), best.train, splits, fingerprint(cfg.seed, best), cfg,
                           hparams=trained_values("cnn", best))


if __name__ == "__main__":
    stage_main(run)
