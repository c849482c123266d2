"""baseline: scikit-learn logistic regression on pixels scaled to [0, 1].

Reads:  data/split/; params `seed`, `baseline` (C, max_iter, solver).
Writes: models/baseline/model.joblib, metrics/baseline.json, plots/baseline/.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from sklearn.linear_model import LogisticRegression

from pipeline.cli import stage_main
from pipeline.data.split import load_splits
from pipeline.outputs import predict_timed, save_sklearn_model, write_stage_outputs
from pipeline.paths import SPLIT_DIR
from pipeline.schema import Config

log = logging.getLogger(__name__)


def flatten(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).astype(np.float32) / 255.0


def run(cfg: Config) -> dict:
    splits = load_splits(SPLIT_DIR)
    model = LogisticRegression(C=cfg.baseline.C, max_iter=cfg.baseline.max_iter, solver=cfg.baseline.solver,
                               random_state=cfg.seed)
    start = time.perf_counter()
    model.fit(flatten(splits.train[0]), splits.train[1])
    fit_seconds = time.perf_counter() - start
    x_test = flatten(splits.test[0])
    save_sklearn_model("baseline", model, example=x_test[:3])  # logged on the run's thread while the stage goes on
    y_prob, speed = predict_timed(model.predict_proba, x_test)
    metrics = write_stage_outputs("baseline", splits.test[1], y_prob, splits.classes, images=splits.test[0],
                                  val_accuracy=float(model.score(flatten(splits.val[0]), splits.val[1])),
                                  fit_seconds=fit_seconds, parameters=model.coef_.size + model.intercept_.size,
                                  images_per_second=speed)
    log.info("baseline: test accuracy %.4f", metrics["test"]["accuracy"])
    return metrics


if __name__ == "__main__":
    stage_main(run)
