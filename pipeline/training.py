"""The one fit loop of every Keras stage: optimizer, schedule, label smoothing, weight averaging and precision from
config, early stopping on the validation split (when `patience` is set), best weights kept, and resume after an
interruption.

State lives in the stage's work directory (`models/.work/<stage>/fit/`, outside DVC's outputs, which DVC
deletes before a stage runs; frozen features and tuner state sit beside it, and the tuner's stays after a finished
run): each epoch commits the model and optimizer, the history, the best weights so far and the early-stopping
and plateau counters as one state (`pipeline.fit_state`), so a run killed at any instant and started again
continues from its last committed epoch as an uninterrupted run would, and ends with the best epoch's weights.
The state is keyed by a fingerprint of the run's settings and by the digest of the stage's code
(`pipeline.deps`): other settings, or changed code, start afresh.

With two or more `train.seeds` the final model is trained once per seed, each fit a child MLflow run of the stage's
run with its own state in `fit/seed-<s>/`; a seed that finished leaves its results and weights there, so a killed
run started again does not fit it again. The stage's outputs are the first listed seed's model, always (never the
best on the test split); its metrics add the seeds' mean and std.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from pipeline import tracking
from pipeline.batch_norm import fuse_batch_norm
from pipeline.data.split import Arrays, Splits
from pipeline.deps import code_digest
from pipeline.evaluation import evaluate
from pipeline.files import atomic_path, write_json
from pipeline.fit_state import (
    CommitEpoch,
    SaveTrainingState,
    SeededBatches,
    SeedEpochs,
    counted,
    read_state,
    restore,
    save_weights,
)
from pipeline.gradcam import write_gradcam
from pipeline.models import nested_layers
from pipeline.models.augment import compile_augmentation_on_jax
from pipeline.outputs import predict_timed, save_keras_model, write_stage_outputs
from pipeline.paths import work_dir
from pipeline.schema import Config, TrainConfig

log = logging.getLogger(__name__)

MONITOR = "val_accuracy"


@dataclass
class FitResult:
    history: list[dict[str, float]]  # one row per epoch, resumed epochs included
    fit_seconds: float  # of this process's training (not counting earlier, interrupted runs)
    best_epoch: int

    @property
    def val_accuracy(self) -> float:
        """The best epoch's, which the model keeps."""
        return self.history[self.best_epoch][MONITOR]


@dataclass
class Final:
    """A trained model that takes images, its fit, and its one evaluation on the test split."""

    model: keras.Model
    fitted: keras.Model  # what was fitted: `model` itself, or the head of a trunk stage
    fit: FitResult
    y_prob: np.ndarray
    images_per_second: float


@dataclass
class SeedRecord:
    """What a seed's finished fit leaves in its work dir (`result.json`): enough for a resumed run to skip it."""

    seed: int
    val_accuracy: float  # of the best epoch
    test_accuracy: float
    best_epoch: int
    fit_seconds: float
    weights: str  # file name, in the seed's work dir, of the trained model's weights (the head's, for a trunk stage)


def budgeted(cfg: TrainConfig, n_train: int) -> TrainConfig:
    """`cfg` with its epochs raised to see at least `cfg.min_images` images: a few thousand images still get
    enough optimizer steps."""
    if cfg.min_images is None:
        return cfg
    return dataclasses.replace(cfg, epochs=max(cfg.epochs, math.ceil(cfg.min_images / n_train)))


def built_in(policy: str, build: Callable[[], keras.Model]) -> keras.Model:
    """`build()`'s model computing in the dtype policy `policy`: built under it (Keras' global policy is process-wide:
    restored after), and made to compute in it, which a model loaded from a file (cnn_aug's cnn, finetune's transfer
    model) would not otherwise, keeping the policy it was saved with. Its output layer stays float32 (the softmax),
    as the builders make it; the weights are float32 under every policy Keras has for training."""
    before = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = build()
    finally:
        keras.mixed_precision.set_global_policy(before)
    output = model
    while getattr(output, "layers", None):
        output = output.layers[-1]
    for layer in nested_layers(model):
        if layer is not output:
            layer.dtype_policy = policy
    return model


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The optimizer at `cfg.lr`, whose cosine schedule (`WarmupCosine`) a callback applies (`step_schedule`), or on JAX
    the step itself; EMA of the weights if `ema` (SwapEMAWeights in `fit` evaluates and keeps it)."""
    cosine = cosine_schedule(cfg, steps_per_epoch)
    lr = cosine.keras_schedule() if cosine and schedule_in_step() else cfg.lr
    common = dict(use_ema=cfg.ema, ema_momentum=0.99)
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay or None, **common)
    if cfg.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=cfg.weight_decay, **common)
    return keras.optimizers.Adam(lr, weight_decay=cfg.weight_decay or None, **common)


class WarmupCosine(keras.callbacks.Callback):
    """Sets the learning rate before every step: rising linearly from lr/25 over the first `warmup` of the `steps`
    (one-cycle), then a cosine to zero at the last step. A callback, not a Keras `LearningRateSchedule`: TensorFlow's
    optimizer evaluates a schedule once per variable in the traced train step (AdamW's weight decay), each time with
    CosineDecay's warm-up `cond`, which made tracing cost 2.2 s more CPU in every fit, the tuner's trials included
    (docs/decisions.md); and the optimizer a model is saved with holds a plain number. JAX's trainer hands the step
    the optimizer's variables once per epoch, not after each callback, so there the same schedule is Keras'
    (`keras_schedule`), compiled into the step."""

    def __init__(self, lr: float, steps: int, warmup: float):
        super().__init__()
        self.lr, self.steps, self.warmup_steps = lr, steps, int(warmup * steps)
        self.step = 0

    def rate(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr / 25 + (self.lr - self.lr / 25) * step / self.warmup_steps
        done = min(step - self.warmup_steps, self.steps - self.warmup_steps) / (self.steps - self.warmup_steps)
        return 0.5 * self.lr * (1 + math.cos(math.pi * done))

    def keras_schedule(self) -> keras.optimizers.schedules.LearningRateSchedule:
        warm = self.warmup_steps
        return keras.optimizers.schedules.CosineDecay(self.lr / 25 if warm else self.lr, self.steps - warm,
                                                      warmup_target=self.lr if warm else None, warmup_steps=warm)

    def on_train_begin(self, logs=None):
        self.step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))  # resumed fits go on

    def on_train_batch_begin(self, batch, logs=None):
        self.model.optimizer.learning_rate = self.rate(self.step)
        self.step += 1


def cosine_schedule(cfg: TrainConfig, steps_per_epoch: int) -> WarmupCosine | None:
    """`cfg`'s warm-up and cosine over its epochs of `steps_per_epoch`; None for the other schedules."""
    return WarmupCosine(cfg.lr, cfg.epochs * steps_per_epoch, cfg.warmup) if cfg.lr_schedule == "cosine" else None


def schedule_in_step() -> bool:
    """Whether the cosine schedule is compiled into the train step (JAX), not set before each step (`WarmupCosine`)."""
    return keras.backend.backend() == "jax"


def step_schedule(cfg: TrainConfig, steps_per_epoch: int) -> list[keras.callbacks.Callback]:
    """The callback that sets each step's learning rate, where the step does not compute it (`schedule_in_step`)."""
    cosine = cosine_schedule(cfg, steps_per_epoch)
    return [cosine] if cosine and not schedule_in_step() else []


def compile_model(model: keras.Model, cfg: TrainConfig, steps_per_epoch: int) -> None:
    """Compile for one-hot targets (`one_hot`): Keras' sparse loss has no label smoothing. Batch norm trains with
    TensorFlow's fused kernel if `fused_batch_norm` (`pipeline.batch_norm`); on JAX, XLA compiles the augmentation
    with the model (`compile_augmentation_on_jax`). The optimizer's variables are made here: made inside the first
    traced step instead (Keras does so without a distribution strategy), they make TensorFlow trace it twice."""
    if cfg.fused_batch_norm:
        fuse_batch_norm(model)
    compile_augmentation_on_jax(model)
    model.compile(optimizer=make_optimizer(cfg, steps_per_epoch),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
                  metrics=["accuracy"])
    model.optimizer.build(model.trainable_variables)


def one_hot(data: Arrays, n_classes: int) -> Arrays:
    """(images, one-hot float32 targets) for `compile_model`'s loss."""
    x, y = data
    return np.asarray(x), np.eye(n_classes, dtype="float32")[np.asarray(y, dtype=np.int64)]


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
        cfg: TrainConfig, work_dir: Path, fingerprint: str, seed: int) -> FitResult:
    """Train a compiled model; resume from `work_dir` if an earlier run with the same fingerprint was cut short (its
    last committed epoch: `pipeline.fit_state`), on the draws of an uninterrupted run (`seed`, epoch). Ends with
    the best epoch's weights."""
    open_work_dir(work_dir, fingerprint)
    state = read_state(work_dir)
    if state.history:
        log.info("resuming after epoch %d (best %s so far %.4f)", len(state.history), MONITOR,
                 state.history[state.best_epoch][MONITOR])
    restore(model, work_dir, state)
    replay(state.history)
    schedule = []
    if cfg.patience is not None:
        schedule.append(keras.callbacks.EarlyStopping(monitor=MONITOR, mode="max", patience=cfg.patience))
    if cfg.lr_schedule == "plateau":
        schedule.append(keras.callbacks.ReduceLROnPlateau(monitor=MONITOR, mode="max", factor=0.5,
                                                          patience=max(1, (cfg.patience or 2) // 2),
                                                          min_lr=cfg.lr / 64))
    # the order matters: the learning rate is read before a plateau lowers it, the training state saved after, the
    # averaged weights (ema: what validation scored) swapped in before the best weights are saved and committed
    commit = CommitEpoch(work_dir, state, MONITOR, counted(schedule))
    n_classes = model.output_shape[-1]
    batches = SeededBatches(*one_hot(train, n_classes), cfg.batch_size, seed)
    callbacks = [SeedEpochs(batches), *step_schedule(cfg, len(batches)), _LogLearningRate(), TrackEpochs(), *schedule,
                 SaveTrainingState(work_dir),
                 *([keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if cfg.ema else []), commit]
    start = time.perf_counter()
    if not state.stopped:
        model.fit(batches, validation_data=one_hot(val, n_classes), epochs=cfg.epochs, initial_epoch=len(state.history),
                  shuffle=False, callbacks=callbacks, verbose=progress())  # shuffled by (seed, epoch), not again
    seconds = time.perf_counter() - start
    state = commit.state
    if state.best is not None:
        model.load_weights(work_dir / state.best)
    return FitResult(history=state.history, fit_seconds=seconds, best_epoch=state.best_epoch)


def replay(history: list[dict[str, float]]) -> None:
    """Log epochs trained by an earlier, interrupted run to the active run, so that it shows the whole history."""
    for epoch, row in enumerate(history, start=1):
        tracking.log_epoch({k: v for k, v in row.items() if k != "epoch"}, epoch)


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
                np.save(tmp, np.asarray(trunk.predict(x, batch_size=256, verbose=0), np.float32))  # not bfloat16
            log.info("%s features %s in %.0f s", name, trunk.output_shape[1:], time.perf_counter() - start)
        out.append((np.load(path), y))
    return out[0], out[1]


def clear_work_dir(work_dir: Path) -> None:
    """Forget an earlier run's state, once its results are written."""
    shutil.rmtree(work_dir, ignore_errors=True)


def clear_fit_state(stage: str) -> None:
    """Once the stage's results are written: forget its fit and frozen features, keep its search (keyed by what
    defines it, so a run that changes only the final budget reuses the finished trials)."""
    for name in ("fit", "features"):
        clear_work_dir(work_dir(stage) / name)


def run_keras_stage(stage: str, make_model: Callable[[int], keras.Model], cfg: TrainConfig, splits: Splits,
                    fingerprint: str, run: Config, trunk: keras.Model | None = None,
                    hparams: dict[str, Any] | None = None) -> dict:
    """Build, compile, fit (resumably), evaluate once on the test split, write the stage's outputs and model.

    `make_model(s)` builds a fresh uncompiled model after `keras.utils.set_random_seed(s)`, for `s` the run's `seed`,
    or each of `cfg.seeds` (its own seeded layers, such as augmentation, take `s` too). With a frozen `trunk`, the
    model is a head trained on the trunk's features (computed once), and the model evaluated and saved is
    trunk + head, on images. Where `tta_enabled(run, model)`, the final model is also scored with flip test-time
    augmentation (`flip_tta`).
    Epochs are raised to `cfg.min_images` images seen (`budgeted`)."""
    train, val = (splits.train, splits.val) if trunk is None else frozen_features(trunk, splits, stage)
    cfg = budgeted(cfg, len(train[1]))
    tracking.log_params({f"{stage}.train.epochs_run": cfg.epochs})  # what `min_images` made of `epochs`
    # keyed by the code too: a run resumed after a code change must not continue the old code's weights
    key = f"{fingerprint}-{code_digest(stage)}"
    if len(cfg.seeds) < 2:
        one = cfg.seeds[0] if cfg.seeds else run.seed
        final, spread = train_and_test(stage, make_model, one, cfg, (train, val), splits, trunk, key), None
    else:
        final, spread = train_seeds(stage, make_model, cfg, (train, val), splits, trunk, key)
    extra = flip_tta(final.model, splits, final.y_prob) if tta_enabled(run, final.model) else {}
    metrics = write_outputs(stage, final, splits, hparams, spread, extra)
    clear_fit_state(stage)
    log.info("%s: test accuracy %.4f (val %.4f, best epoch %d of %d)", stage, metrics["test"]["accuracy"],
             metrics["val_accuracy"], final.fit.best_epoch + 1, len(final.fit.history))
    return metrics


def train_and_test(stage: str, make_model: Callable[[int], keras.Model], seed: int, cfg: TrainConfig,
                   data: tuple[Arrays, Arrays], splits: Splits, trunk: keras.Model | None, key: str,
                   directory: Path | None = None) -> Final:
    """One seed's fit (state in `directory`, by default the stage's `fit/`) and its model's test predictions."""
    keras.utils.set_random_seed(seed)
    model = built_in(cfg.precision, lambda: make_model(seed))
    compile_model(model, cfg, math.ceil(len(data[0][1]) / cfg.batch_size))
    result = fit(model, *data, cfg, directory or work_dir(stage) / "fit", key, seed)
    return tested(stage, model, result, splits, trunk)


def tested(stage: str, model: keras.Model, result: FitResult, splits: Splits, trunk: keras.Model | None) -> Final:
    """The trained model on images (trunk + head for a trunk stage), with its predictions on the test split."""
    fitted = model
    if trunk is not None:
        images = keras.Input(shape=trunk.input_shape[1:], dtype="uint8", name="image")
        model = keras.Model(images, model(trunk(images)), name=stage)
    y_prob, speed = predict_timed(lambda x: model.predict(x, batch_size=512, verbose=0), splits.test[0])
    return Final(model, fitted, result, y_prob, speed)


def train_seeds(stage: str, make_model: Callable[[int], keras.Model], cfg: TrainConfig, data: tuple[Arrays, Arrays],
                splits: Splits, trunk: keras.Model | None, key: str) -> tuple[Final, dict[str, Any]]:
    """Train the final model once per seed of `cfg.seeds`, each in a child run of the stage's run, skipping seeds an
    interrupted run finished; return the first seed's model (the stage's output, by a fixed rule) and the spread."""
    fit_dir = work_dir(stage) / "fit"
    open_work_dir(fit_dir, key)  # other settings or code: no seed's state is kept
    first, records = None, []
    for seed in cfg.seeds:
        directory, seed_key = fit_dir / f"seed-{seed}", f"{key}-seed-{seed}"
        open_work_dir(directory, seed_key)
        record = read_seed(directory)
        with tracking.seed_run(seed, fitted=record is None):
            if record is None:
                final = train_and_test(stage, make_model, seed, cfg, data, splits, trunk, seed_key, directory)
                record = finish_seed(directory, seed, final, splits.test[1])
            else:
                log.info("%s: seed %d was fitted by an earlier run: not fitted again", stage, seed)
                replay(read_state(directory).history)
                final = reload_seed(stage, make_model, cfg, record, directory, splits, trunk) if first is None else None
            tracking.log_seed_result(record.val_accuracy, record.test_accuracy)
        log.info("%s: seed %d: val accuracy %.4f, test accuracy %.4f", stage, seed, record.val_accuracy,
                 record.test_accuracy)
        first = final if first is None else first
        records.append(record)
    spread = seed_spread(records)
    tracking.log_seed_spread(spread)
    log.info("%s: %d seeds, val accuracy %.4f ± %.4f, test accuracy %.4f ± %.4f; outputs from seed %d", stage,
             len(records), spread["val_accuracy"]["mean"], spread["val_accuracy"]["std"],
             spread["test_accuracy"]["mean"], spread["test_accuracy"]["std"], records[0].seed)
    return first, spread


def finish_seed(directory: Path, seed: int, final: Final, y_test: np.ndarray) -> SeedRecord:
    """Keep a fitted seed's weights and results in its work dir (the results last: they mark the seed done)."""
    weights = "final.weights.h5"
    save_weights(final.fitted, directory / weights)
    record = SeedRecord(seed=seed, val_accuracy=final.fit.val_accuracy,
                        test_accuracy=evaluate(y_test, final.y_prob)["accuracy"], best_epoch=final.fit.best_epoch,
                        fit_seconds=final.fit.fit_seconds, weights=weights)
    write_json(directory / "result.json", asdict(record))
    return record


def read_seed(directory: Path) -> SeedRecord | None:
    """The results of a seed that an earlier run fitted and evaluated; None if it did not finish."""
    path = directory / "result.json"
    return SeedRecord(**json.loads(path.read_text())) if path.is_file() else None


def reload_seed(stage: str, make_model: Callable[[int], keras.Model], cfg: TrainConfig, record: SeedRecord,
                directory: Path, splits: Splits, trunk: keras.Model | None) -> Final:
    """A finished seed's model, rebuilt and given its saved weights (the first seed's: the stage writes it out); its
    fit seconds are those of the run that fitted it."""
    keras.utils.set_random_seed(record.seed)
    model = built_in(cfg.precision, lambda: make_model(record.seed))
    model.load_weights(directory / record.weights)
    history = read_state(directory).history
    return tested(stage, model, FitResult(history, record.fit_seconds, record.best_epoch), splits, trunk)


def seed_spread(records: list[SeedRecord]) -> dict[str, Any]:
    """The seeds (as listed) and their val and test accuracy: mean, sample std (ddof=1) and each seed's."""

    def spread(values: list[float]) -> dict[str, Any]:
        return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)), "per_seed": values}

    return {"values": [r.seed for r in records], "val_accuracy": spread([r.val_accuracy for r in records]),
            "test_accuracy": spread([r.test_accuracy for r in records])}


def tta_enabled(cfg: Config, model: keras.Model) -> bool:
    """Flip test-time augmentation: asked for by `evaluation.tta`, for a model that trained on mirror images (a
    horizontal `RandomFlip` among its layers, there only where the data set allows flips, `data.augment.flip`).
    A model that never saw a mirror image scores lower on them (cnn: 0.9244 plain, 0.9106 with flip TTA)."""
    return cfg.evaluation.tta and trained_on_mirror_images(model)


def trained_on_mirror_images(model: keras.Layer) -> bool:
    """Whether `model` is or holds (at any depth) a horizontal flip augmentation."""
    return any(isinstance(layer, keras.layers.RandomFlip) and "horizontal" in layer.mode
               for layer in nested_layers(model))


def flip_tta(model: keras.Model, splits: Splits, y_prob_test: np.ndarray) -> dict[str, float]:
    """Validation and test accuracy with flip test-time augmentation: the mean of the probabilities for each image
    and its mirror image (as metrics beside the plain ones); `y_prob_test`: the plain test predictions, made once."""

    def predict(x: np.ndarray) -> np.ndarray:
        return model.predict(x, batch_size=512, verbose=0)

    def accuracy(probs: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(np.argmax(probs, axis=1) == y))

    (x_val, y_val), (x_test, y_test) = splits.val, splits.test
    return {"val_accuracy_tta": accuracy(predict(x_val) + predict(x_val[:, :, ::-1]), y_val),
            "test_accuracy_tta": accuracy(y_prob_test + predict(x_test[:, :, ::-1]), y_test)}


def write_outputs(stage: str, final: Final, splits: Splits, hparams: dict[str, Any] | None,
                  spread: dict[str, Any] | None, extra: dict[str, float]) -> dict:
    """The stage's metrics (and `extra` ones), plots (Grad-CAM included) and saved model, from `final`."""
    x_test, y_test = splits.test
    model, y_prob = final.model, final.y_prob

    def explain(dest: Path, worst: np.ndarray) -> None:
        write_gradcam(dest / "gradcam.png", model, x_test[worst], y_test[worst], y_prob[worst], splits.classes)

    metrics = write_stage_outputs(stage, y_test, y_prob, splits.classes, images=x_test, explain=explain,
                                  history=final.fit.history, best_epoch=final.fit.best_epoch,
                                  val_accuracy=final.fit.val_accuracy,
                                  fit_seconds=final.fit.fit_seconds, parameters=model.count_params(),
                                  images_per_second=final.images_per_second, hparams=hparams, seeds=spread,
                                  extra=extra)
    save_keras_model(stage, model, example=x_test[:3])
    return metrics
