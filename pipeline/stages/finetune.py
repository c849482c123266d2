"""finetune: the transfer model with its top backbone blocks unfrozen, trained end to end at a low learning
rate, optionally with augmentation; blocks and learning rate searched with keras-tuner when
`finetune.search.enabled`.

Reads:  data/split/, models/transfer/; params `seed`, `transfer.backbone`, `data.augment`, `finetune`, `tuner`,
        `evaluation`.
Writes: models/finetune/{model.keras, best_hparams.json}, metrics/finetune.json, plots/finetune/.
"""

from __future__ import annotations

import logging

import keras

from pipeline.cli import stage_main
from pipeline.data.split import load_splits
from pipeline.files import file_digest
from pipeline.models.augment import build_augmentation, with_augmentation
from pipeline.models.transfer import unfreeze_top_blocks
from pipeline.outputs import fingerprint, load_keras_model, stage_model_file
from pipeline.paths import SPLIT_DIR
from pipeline.schema import Config
from pipeline.search_space import trained_values
from pipeline.training import run_keras_stage
from pipeline.tuning import tune

log = logging.getLogger(__name__)


def run(cfg: Config) -> dict:
    keras.utils.set_random_seed(cfg.seed)
    splits = load_splits(SPLIT_DIR)
    source = file_digest(stage_model_file("transfer", needed_by="finetune"))  # keys the resumable state

    def build(section, seed: int = cfg.seed):
        model, _ = load_keras_model("transfer", needed_by="finetune")  # afresh for every candidate, and every seed
        blocks = unfreeze_top_blocks(model, cfg.transfer.backbone, section.unfreeze_blocks)
        log.info("fine-tuning %s of %s", ", ".join(blocks), cfg.transfer.backbone)
        if not section.augment:
            return model
        return with_augmentation(model, build_augmentation(cfg.data.augment, seed, splits.image_shape), name="finetune")

    best = tune("finetune", cfg.finetune, build, splits.train, splits.val, cfg.tuner, cfg.seed)
    key = fingerprint(cfg.seed, cfg.data.augment, best, source)
    return run_keras_stage("finetune", lambda seed: build(best, seed), best.train, splits, key, cfg,
                           hparams=trained_values("finetune", best))


if __name__ == "__main__":
    stage_main(run)
