"""The fit loop: real Keras training on tiny data, best weights kept, resume after an interruption."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from pipeline.data.split import load_splits
from pipeline.fit_state import read_state
from pipeline.models.augment import build_augmentation
from pipeline.models.cnn import build_cnn_from
from pipeline.paths import SPLIT_DIR, work_dir
from pipeline.training import (
    WarmupCosine,
    budgeted,
    compile_model,
    fit,
    frozen_features,
    one_hot,
    run_keras_stage,
)
from tests.conftest import REPO, append, load_config


class Interrupt(Exception):
    pass


class StopAfter(keras.callbacks.Callback):
    """Dies at the end of an epoch, as a killed process would (after the epoch's state was saved)."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epochs:
            raise Interrupt


def make_model(cfg, splits, augmented: bool = False):
    keras.utils.set_random_seed(cfg.seed)
    augmentation = build_augmentation(cfg.data.augment, cfg.seed, splits.image_shape) if augmented else None
    model = build_cnn_from(cfg.cnn, splits.image_shape, len(splits.classes), augmentation=augmentation)
    compile_model(model, cfg.cnn.train, math.ceil(len(splits.train[1]) / cfg.cnn.train.batch_size))
    return model


@pytest.fixture
def setup(split_data, tmp_path):
    cfg = load_config("cnn.filters=4", "cnn.blocks=1", "cnn.dense_units=8", "cnn.train.epochs=4",
                      "cnn.train.patience=10", "cnn.train.batch_size=64", "cnn.search.enabled=false")
    return cfg, load_splits(SPLIT_DIR), tmp_path / "work"


def with_callbacks(model, *extra):
    """Make `model.fit` run `extra` callbacks besides those the fit loop passes."""
    original = model.fit
    model.fit = lambda *args, callbacks=(), **kwargs: original(*args, callbacks=[*callbacks, *extra], **kwargs)
    return model


@pytest.mark.slow  # real fits, 14-32 s on 2 cores: make test runs it, make test-fast does not
def test_interrupted_fit_resumes_from_the_last_finished_epoch(setup):
    cfg, splits, work = setup
    with pytest.raises(Interrupt):
        fit(with_callbacks(make_model(cfg, splits), StopAfter(2)), splits.train, splits.val, cfg.cnn.train, work,
            fingerprint="a", seed=0)
    assert len(read_state(work).history) == 2

    epochs_run = []
    counter = keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: epochs_run.append(epoch))
    result = fit(with_callbacks(make_model(cfg, splits), counter), splits.train, splits.val, cfg.cnn.train, work,
                 fingerprint="a", seed=0)
    assert epochs_run == [2, 3]  # epochs 0 and 1 are not trained again
    assert [row["epoch"] for row in result.history] == [0, 1, 2, 3]


@pytest.mark.slow  # real fits, 14-32 s on 2 cores: make test runs it, make test-fast does not
def test_state_of_other_settings_is_not_resumed(setup):
    cfg, splits, work = setup
    fit(make_model(cfg, splits), splits.train, splits.val, cfg.cnn.train, work, fingerprint="a", seed=0)
    result = fit(make_model(cfg, splits), splits.train, splits.val, cfg.cnn.train, work, fingerprint="b", seed=0)
    assert len(result.history) == 4


@pytest.mark.parametrize("ema", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_best_epoch_weights_are_kept(setup, ema):
    """With `ema` the validation scores the averaged weights, and those are the ones kept."""
    cfg, splits, work = setup
    cfg.cnn.train.ema = ema
    model = make_model(cfg, splits)
    result = fit(model, splits.train, splits.val, cfg.cnn.train, work, fingerprint="a", seed=0)
    _, accuracy = model.evaluate(*one_hot(splits.val, len(splits.classes)))
    best = max(row["val_accuracy"] for row in result.history)
    assert accuracy == pytest.approx(best, abs=1e-6)
    assert result.history[result.best_epoch]["val_accuracy"] == best
    assert all(np.isfinite(row["learning_rate"]) for row in result.history)


@pytest.mark.parametrize("warmup", [0.0, 0.25])
def test_the_step_schedule_is_keras_cosine_decay_with_warm_up(warmup):
    """WarmupCosine sets, step by step, the rates of the Keras schedule it replaces (CosineDecay from lr/25 with
    linear warm-up to lr), ending at zero."""
    lr, steps = 3e-3, 40
    warm = int(warmup * steps)
    keras_schedule = keras.optimizers.schedules.CosineDecay(lr / 25 if warm else lr, decay_steps=steps - warm,
                                                            warmup_target=lr if warm else None, warmup_steps=warm)
    schedule = WarmupCosine(lr, steps, warmup)
    assert schedule.keras_schedule().get_config() == keras_schedule.get_config()  # what JAX compiles into the step
    ours = [schedule.rate(step) for step in range(steps + 1)]
    assert ours == pytest.approx([float(keras_schedule(step)) for step in range(steps + 1)], rel=1e-5, abs=1e-9)
    assert ours[warm] == pytest.approx(lr) and ours[-1] == pytest.approx(0, abs=1e-12)


class ScrambleBeforeValidation(keras.callbacks.Callback):
    """Replaces the weights with noise before each validation: every epoch of this fit scores near chance."""

    def on_test_begin(self, logs=None):
        rng = np.random.default_rng(0)
        for variable in self.model.trainable_variables:
            variable.assign(rng.normal(0, 1, variable.shape).astype(variable.dtype))


@pytest.mark.slow  # real fits, 14-32 s on 2 cores: make test runs it, make test-fast does not
def test_a_resumed_fit_keeps_the_best_weights_of_the_epochs_before_the_kill(setup):
    """The last epochs are forced to be the worst, so only weights saved before the interruption can score best."""
    _, splits, work = setup
    cfg = load_config("cnn.filters=8", "cnn.blocks=2", "cnn.train.epochs=7", "cnn.train.batch_size=32",
                      "cnn.train.lr=1e-2", "cnn.train.lr_schedule=constant", "cnn.train.warmup=0",
                      "cnn.search.enabled=false")
    with pytest.raises(Interrupt):
        fit(with_callbacks(make_model(cfg, splits), StopAfter(5)), splits.train, splits.val, cfg.cnn.train, work,
            fingerprint="a", seed=0)
    best_before = max(row["val_accuracy"] for row in read_state(work).history)
    model = with_callbacks(make_model(cfg, splits), ScrambleBeforeValidation())
    result = fit(model, splits.train, splits.val, cfg.cnn.train, work, fingerprint="a", seed=0)
    last_two = [row["val_accuracy"] for row in result.history[5:]]
    assert max(last_two) < best_before - 0.2  # the condition this test guards: the last epochs are not the best
    assert result.best_epoch < 5 and result.history[result.best_epoch]["val_accuracy"] == best_before
    _, accuracy = model.evaluate(*one_hot(splits.val, len(splits.classes)), verbose=0)
    assert accuracy == pytest.approx(best_before, abs=1e-6)


@pytest.mark.slow  # real fits, 14-32 s on 2 cores: make test runs it, make test-fast does not
def test_a_resumed_fit_draws_what_an_uninterrupted_one_draws(setup):
    """Epoch k's augmentations and dropout masks are drawn from (seed, k): a fit stopped after its first epoch and
    resumed trains the next two as an uninterrupted fit does. Each fit builds its model after `set_random_seed`, so
    its layers' random streams start afresh, as in a new process (fails if their state is not set per epoch; the
    batch order across a new process: test_kill's fit test)."""
    _, splits, work = setup
    cfg = load_config("cnn.filters=4", "cnn.blocks=1", "cnn.dense_units=8", "cnn.dropout=0.3", "cnn.train.epochs=3",
                      "cnn.train.batch_size=64", "cnn.search.enabled=false", "data.augment.flip=true",
                      "data.augment.crop_px=2", "data.augment.erasing=0.2")

    def run(directory, *callbacks):
        return fit(with_callbacks(make_model(cfg, splits, augmented=True), *callbacks), splits.train, splits.val,
                   cfg.cnn.train, directory, fingerprint="a", seed=cfg.seed)

    uninterrupted = run(work / "uninterrupted")
    with pytest.raises(Interrupt):
        run(work / "resumed", StopAfter(1))
    resumed = run(work / "resumed")
    assert len(resumed.history) == 3
    for row, reference in zip(resumed.history, uninterrupted.history, strict=True):
        assert row == pytest.approx(reference, rel=1e-5, abs=1e-6)


@pytest.mark.slow  # fits the model twice or more
def test_a_resumed_fit_continues_the_early_stopping_and_plateau_counters(setup):
    """A learning rate too small to change any prediction makes every epoch after the first a plateau: early stopping
    (patience 2) ends an uninterrupted fit after epoch 3, the plateau halves the rate after epoch 2. A fit killed
    after epoch 2 must end the same way; with counters restarted it would train five epochs."""
    cfg, splits, work = setup
    cfg = load_config("cnn.filters=4", "cnn.blocks=1", "cnn.batch_norm=false", "cnn.train.epochs=8",
                      "cnn.train.patience=2", "cnn.train.lr_schedule=plateau", "cnn.train.lr=1e-9",
                      "cnn.train.weight_decay=0", "cnn.train.warmup=0", "cnn.search.enabled=false")

    def run(directory, *callbacks):
        return fit(with_callbacks(make_model(cfg, splits), *callbacks), splits.train, splits.val, cfg.cnn.train,
                   directory, fingerprint="a", seed=0)

    uninterrupted = run(work / "uninterrupted")
    with pytest.raises(Interrupt):
        run(work / "resumed", StopAfter(2))
    resumed = run(work / "resumed")
    assert len({row["val_accuracy"] for row in uninterrupted.history}) == 1  # the guarded condition: a plateau
    assert len(uninterrupted.history) == len(resumed.history) == 3
    rates = [[row["learning_rate"] for row in r.history] for r in (uninterrupted, resumed)]
    assert rates[0] == rates[1] and rates[0][2] == pytest.approx(rates[0][0] / 2)
    assert resumed.best_epoch == uninterrupted.best_epoch == 0


@pytest.mark.slow  # fits the model twice or more
def test_a_fit_that_early_stopping_ended_is_not_trained_further(setup):
    cfg, splits, work = setup
    cfg.cnn.train.patience = 1
    state_file = work / "state.json"
    result = fit(make_model(cfg, splits), splits.train, splits.val, cfg.cnn.train, work, fingerprint="a", seed=0)
    state = json.loads(state_file.read_text())
    state["stopped"] = True  # as if early stopping had ended it after the epochs it trained
    state_file.write_text(json.dumps(state))
    epochs_run = []
    counter = keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: epochs_run.append(epoch))
    again = fit(with_callbacks(make_model(cfg, splits), counter), splits.train, splits.val, cfg.cnn.train, work,
                fingerprint="a", seed=0)
    assert epochs_run == [] and again.history == result.history


@pytest.mark.slow  # real fits, 14-32 s on 2 cores: make test runs it, make test-fast does not
def test_a_stage_resumes_with_the_same_code_and_starts_afresh_after_a_change(setup, code_copy):
    cfg, splits, _ = setup
    epochs_run = []
    counter = keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: epochs_run.append(epoch))

    def run_stage(*callbacks):
        def build(seed):
            return with_callbacks(build_cnn_from(cfg.cnn, splits.image_shape, len(splits.classes)), counter,
                                  *callbacks)

        return run_keras_stage("cnn", build, cfg.cnn.train, splits, "settings", cfg)

    with pytest.raises(Interrupt):
        run_stage(StopAfter(2))
    with pytest.raises(Interrupt):
        run_stage(StopAfter(3))  # the same code: continues after epoch 2, and is killed again
    assert epochs_run == [0, 1, 2]

    append(code_copy / "pipeline/models/cnn.py", "# a fix\n")  # the cnn stage's code changes before the resume
    epochs_run.clear()
    metrics = run_stage()
    assert epochs_run == [0, 1, 2, 3] and metrics["epochs"] == 4  # no epoch of the old code's weights is kept


def test_frozen_features_are_keyed_by_the_stages_code(split_data, code_copy):
    splits = load_splits(SPLIT_DIR)
    trunk = keras.Sequential([keras.Input(splits.image_shape), keras.layers.Flatten()])
    key_file = work_dir("transfer") / "features" / "fingerprint"

    def key() -> str:
        frozen_features(trunk, splits, "transfer")
        return key_file.read_text()

    first = key()
    assert key() == first
    append(code_copy / "pipeline/models/transfer.py", "# a fix\n")
    assert key() != first


def test_min_images_raises_the_epochs_of_a_small_data_set():
    train = load_config("cnn.train.epochs=2", "cnn.train.min_images=1000").cnn.train
    assert budgeted(train, 300).epochs == 4  # ceil(1000 / 300): a small data set gets more epochs
    assert budgeted(train, 5000).epochs == 2  # a large one keeps its epochs
    assert budgeted(load_config("cnn.train.epochs=2").cnn.train, 300).epochs == 2  # min_images null


JAX_FIT = """
import numpy as np
from pipeline.models.augment import build_augmentation
from pipeline.models.cnn import build_cnn_from
from pipeline.training import compile_model, step_schedule
from tests.conftest import load_config
cfg = load_config("cnn.filters=4", "cnn.blocks=1", "cnn.train.batch_size=32", "cnn.train.epochs=1",
                  "data.augment.crop_px=2", "data.augment.flip=true", "data.augment.zoom=0.1",
                  "data.augment.rotation=0.05")
model = build_cnn_from(cfg.cnn, (28, 28, 1), 10, build_augmentation(cfg.data.augment, cfg.seed, (28, 28, 1)))
compile_model(model, cfg.cnn.train, 2)
images = np.random.default_rng(0).integers(0, 256, (64, 28, 28, 1), dtype=np.uint8)
model.fit(images, np.eye(10, dtype="float32")[np.arange(64) % 10], batch_size=32, epochs=1, verbose=0,
          callbacks=step_schedule(cfg.cnn.train, 2))
print("learning_rate", float(model.optimizer.learning_rate), "jit_compile", model.jit_compile)
"""


def test_on_jax_the_augmentation_compiles_with_the_model():
    """Keras marks its affine augmentation layers (pad-and-crop, zoom, rotation) not XLA-compatible, which turns XLA
    off for the whole model; on JAX every training step then ran op by op (157 ms against 1.7 ms on an H200). After
    `compile_model` the model, augmentation included, trains as one compiled program on JAX, and its cosine
    schedule is in that program: JAX's trainer would not see a callback's rate before the epoch's end (the rate
    of the last step, 0, is what the optimizer holds after the fit)."""
    done = subprocess.run([sys.executable, "-c", JAX_FIT], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "KERAS_BACKEND": "jax"})
    assert done.returncode == 0, done.stderr[-3000:]
    words = done.stdout.split()
    assert words[-2:] == ["jit_compile", "True"], done.stdout[-2000:]
    assert float(words[-3]) == pytest.approx(0, abs=1e-9), done.stdout[-2000:]
