"""The one fit loop of every Keras stage: optimizer and schedule from config, early stopping on the
validation split, best weights kept, and resume after an interruption.

State lives in the stage's work directory (`models/.work/<stage>/fit/`, outside DVC's outputs, which DVC
deletes before a stage runs; frozen features and tuner state sit beside it): `BackupAndRestore` saves the
model and optimizer each epoch, `history.csv` grows across resumes, and the best weights so far are
checkpointed, so a killed run started again continues from its last finished epoch and still ends with the
best epoch's weights. The state is keyed by a fingerprint of the run's settings and by the digest of the
stage's code (`pipeline.deps`): other settings, or changed code, start afresh.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from pipeline import tracking
from pipeline.data.split import Arrays, Splits
from pipeline.deps import code_digest
from pipeline.files import atomic_path
from pipeline.gradcam import write_gradcam
from pipeline.outputs import predict_timed, save_keras_model, write_stage_outputs
from pipeline.paths import work_dir
from pipeline.schema import TrainConfig

log = logging.getLogger(__name__)

MONITOR = "val_accuracy"


@dataclass
class FitResult:
    history: list[dict[str, float]]  # one row per epoch, resumed epochs included
    fit_seconds: float  # of this process's training (not counting earlier, interrupted runs)
    best_epoch: int


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    lr = cfg.lr
    if cfg.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(cfg.lr, decay_steps=cfg.epochs * steps_per_epoch)
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay or None)
    if cfg.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=cfg.weight_decay)
    return keras.optimizers.Adam(lr, weight_decay=cfg.weight_decay or None)


def compile_model(model: keras.Model, cfg: TrainConfig, n_train: int) -> None:
    model.compile(optimizer=make_optimizer(cfg, math.ceil(n_train / cfg.batch_size)),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])


class _LogLearningRate(keras.callbacks.Callback):
    """Put the epoch's learning rate into the logs (schedules included), before the CSV logger reads them."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


class TrackEpochs(keras.callbacks.Callback):
    """Log each epoch's metrics to the active MLflow run, numbered from 1 as in plots/<stage>/history.csv."""

    def on_epoch_end(self, epoch, logs=None):
        tracking.log_epoch(logs or {}, epoch + 1)


def fit(model: keras.Model, train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
        cfg: TrainConfig, work_dir: Path, fingerprint: str) -> FitResult:
    """Train a compiled model; resume from `work_dir` if an earlier run with the same fingerprint was cut short."""
    open_work_dir(work_dir, fingerprint)
    history_csv, best_weights = work_dir / "history.csv", work_dir / "best.weights.h5"
    previous = read_history(history_csv)
    best_so_far = max((row[MONITOR] for row in previous), default=None)
    if previous:
        log.info("resuming after epoch %d (best %s so far %.4f)", len(previous), MONITOR, best_so_far)
    for epoch, row in enumerate(previous, start=1):  # this run shows the whole history, interrupted epochs too
        tracking.log_epoch({k: v for k, v in row.items() if k != "epoch"}, epoch)
    callbacks = [
        _LogLearningRate(),
        TrackEpochs(),
        keras.callbacks.BackupAndRestore(str(work_dir / "backup")),
        keras.callbacks.CSVLogger(str(history_csv), append=True),
        keras.callbacks.ModelCheckpoint(str(best_weights), monitor=MONITOR, mode="max", save_best_only=True,
                                        save_weights_only=True, initial_value_threshold=best_so_far),
        keras.callbacks.EarlyStopping(monitor=MONITOR, mode="max", patience=cfg.patience),
    ]
    if cfg.lr_schedule == "plateau":
        callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor=MONITOR, mode="max", factor=0.5,
                                                           patience=max(1, cfg.patience // 2), min_lr=cfg.lr / 64))
    start = time.perf_counter()
    model.fit(np.asarray(train[0]), np.asarray(train[1]), validation_data=(np.asarray(val[0]), np.asarray(val[1])),
              epochs=cfg.epochs, batch_size=cfg.batch_size, shuffle=True, callbacks=callbacks, verbose=progress())
    seconds = time.perf_counter() - start
    if best_weights.exists():
        model.load_weights(best_weights)
    history = read_history(history_csv)
    best_epoch = int(np.argmax([row[MONITOR] for row in history])) if history else -1
    return FitResult(history=history, fit_seconds=seconds, best_epoch=best_epoch)


def progress() -> int:
    """Keras' progress bar on a terminal, one line per epoch elsewhere: in a log file (`dvc queue logs`, CI) the bar's
    carriage-return redraws made megabytes of log."""
    return 1 if sys.stdout.isatty() else 2


def open_work_dir(work_dir: Path, fingerprint: str) -> None:
    """Keep the state in `work_dir` if it belongs to the same settings, else start afresh."""
    key_file = work_dir / "fingerprint"
    if work_dir.exists() and (not key_file.is_file() or key_file.read_text() != fingerprint):
        log.info("%s holds state of other settings: starting afresh", work_dir)
        clear_work_dir(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    key_file.write_text(fingerprint)


def frozen_features(trunk: keras.Model, splits: Splits, stage: str) -> tuple[Arrays, Arrays]:
    """The frozen trunk's features of the train and val splits, computed once: kept in the stage's work dir
    (keyed by the stage's code, the trunk's architecture and weights and the images), so that a resumed run, and
    the tuner's trials, do not compute them again."""
    digest = hashlib.sha256((code_digest(stage) + trunk.to_json()).encode())
    for array in (*trunk.get_weights(), splits.train[0], splits.val[0]):
        digest.update(np.ascontiguousarray(array).data)
    directory = work_dir(stage) / "features"
    open_work_dir(directory, digest.hexdigest()[:16])
    out = []
    for name, (x, y) in (("train", splits.train), ("val", splits.val)):
        path = directory / f"{name}.npy"
        if not path.is_file():
            start = time.perf_counter()
            with atomic_path(path) as tmp:
                np.save(tmp, trunk.predict(x, batch_size=256, verbose=0))
            log.info("%s features %s in %.0f s", name, trunk.output_shape[1:], time.perf_counter() - start)
        out.append((np.load(path), y))
    return out[0], out[1]


def read_history(path: Path) -> list[dict[str, float]]:
    """The per-epoch rows a CSVLogger wrote; empty if none."""
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def clear_work_dir(work_dir: Path) -> None:
    """Forget an earlier run's state, once its results are written."""
    shutil.rmtree(work_dir, ignore_errors=True)


def run_keras_stage(stage: str, model: keras.Model, cfg: TrainConfig, splits: Splits, fingerprint: str,
                    trunk: keras.Model | None = None, hparams: dict[str, Any] | None = None) -> dict:
    """Compile, fit (resumably), evaluate once on the test split, write the stage's outputs and model.

    With a frozen `trunk`, `model` is a head trained on the trunk's features (computed once), and the
    model evaluated and saved is trunk + head, on images."""
    train, val = (splits.train, splits.val) if trunk is None else frozen_features(trunk, splits, stage)
    compile_model(model, cfg, len(train[1]))
    # keyed by the code too: a run resumed after a code change must not continue the old code's weights
    result = fit(model, train, val, cfg, work_dir(stage) / "fit", f"{fingerprint}-{code_digest(stage)}")
    if trunk is not None:
        images = keras.Input(shape=trunk.input_shape[1:], dtype="uint8", name="image")
        model = keras.Model(images, model(trunk(images)), name=stage)
    x_test, y_test = splits.test
    y_prob, speed = predict_timed(lambda x: model.predict(x, batch_size=512, verbose=0), x_test)


    def explain(dest: Path, worst: np.ndarray) -> None:
        write_gradcam(dest / "gradcam.png", model, x_test[worst], y_test[worst], y_prob[worst], splits.classes)

    metrics = write_stage_outputs(stage, y_test, y_prob, splits.classes, images=x_test, explain=explain,
                                  history=result.history, val_accuracy=result.history[result.best_epoch][MONITOR],
                                  fit_seconds=result.fit_seconds, parameters=model.count_params(),
                                  images_per_second=speed, hparams=hparams)
    save_keras_model(stage, model, example=x_test[:3])
    clear_work_dir(work_dir(stage))
    log.info("%s: test accuracy %.4f (val %.4f, best epoch %d of %d)", stage, metrics["test"]["accuracy"],
             metrics["val_accuracy"], result.best_epoch + 1, len(result.history))
    return metrics
