"""transfer: a pretrained backbone, frozen and cut at a layer, with a new head trained on its features
(computed once); the head's settings searched with keras-tuner when `transfer.search.enabled`.

Reads:  data/split/; params `seed`, `transfer` (backbone, weights, image size, cut, head, budget, search), `tuner`,
        `data.augment.flip` and `evaluation`.
Writes: models/transfer/{model.keras (trunk + head, on raw images), best_hparams.json}, metrics/transfer.json,
        plots/transfer/.
"""

from __future__ import annotations

import keras

from pipeline.cli import stage_main
from pipeline.data.split import load_splits
from pipeline.models.transfer import build_head, build_trunk
from pipeline.outputs import fingerprint
from pipeline.paths import SPLIT_DIR
from pipeline.schema import Config
from pipeline.search_space import trained_values
from pipeline.training import built_in, frozen_features, run_keras_stage
from pipeline.tuning import tune


def run(cfg: Config) -> dict:
    keras.utils.set_random_seed(cfg.seed)
    splits = load_splits(SPLIT_DIR)
    trunk = built_in(cfg.transfer.trunk_precision, lambda: build_trunk(cfg.transfer, splits.image_shape))

    def build(section):
        return build_head(section, trunk.output_shape[1:], len(splits.classes))

    best = tune("transfer", cfg.transfer, build, *frozen_features(trunk, splits, "transfer"), cfg.tuner, cfg.seed)
    # a fresh head per seed, on the features computed once
    return run_keras_stage("transfer", lambda seed: build(best), best.train, splits, fingerprint(cfg.seed, best),
                           cfg, trunk=trunk, hparams=trained_values("transfer", best))


if __name__ == "__main__":
    stage_main(run)
