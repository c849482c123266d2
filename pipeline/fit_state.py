"""A fit's resumable state, committed whole once per epoch, so that a process killed at any instant resumes from
its last committed epoch and reads nothing half-written.

An epoch's end writes, in this order: the model and optimizer (`epoch-<n>.weights.h5`, the raw weights), the best
weights if the epoch improved on them (`best-<n>.weights.h5`, averaged where `train.ema`), then `state.json`, which
names both files and holds the history and the early-stopping and plateau counters. Each file is written to a
temporary name and renamed; `state.json`'s rename is the commit. A kill before it leaves the previous epoch's
state, whose files are still there (nothing is deleted before the commit); files no state names are removed when
the state is read, and temporary files of a killed write when the next write of the same file begins
(`pipeline.files.atomic_path`).

What an epoch draws at random, the order of its batches and the draws of the model's random layers (augmentation,
dropout), is a function of (seed, epoch) (`SeededBatches`, `SeedEpochs`), not of a stream that a new process starts
again: a resumed fit trains its epochs on the draws an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from pipeline.files import atomic_path, write_json

STATE_FILE = "state.json"
# each callback's counters that a resumed fit must continue, not restart (Keras resets them in on_train_begin)
COUNTERS = {keras.callbacks.EarlyStopping: ("wait", "best", "best_epoch"),
            keras.callbacks.ReduceLROnPlateau: ("wait", "best", "cooldown_counter")}


@dataclass
class FitState:
    """What the last committed epoch left: `history` (one row per epoch, Keras' logs), the files of its training
    state (`weights`) and of the best epoch's weights (`best`), and the callbacks' counters by class name."""

    history: list[dict[str, float]] = field(default_factory=list)
    weights: str | None = None
    best: str | None = None
    best_epoch: int = -1
    stopped: bool = False  # early stopping ended the fit: a resumed run trains no further
    counters: dict[str, dict[str, float]] = field(default_factory=dict)


def read_state(directory: Path) -> FitState:
    """The committed state in `directory` (empty if none); removes the files it does not name (written by an epoch
    that was killed before its commit)."""
    path = directory / STATE_FILE
    state = FitState(**json.loads(path.read_text())) if path.is_file() else FitState()
    _remove_unnamed(directory, state)
    return state


def _remove_unnamed(directory: Path, state: FitState) -> None:
    named = {state.weights, state.best}
    for pattern in ("epoch-*.weights.h5", "best-*.weights.h5"):
        for path in directory.glob(pattern):
            if path.name not in named:
                path.unlink()


def restore(model: keras.Model, directory: Path, state: FitState) -> None:
    """Give a compiled model the committed epoch's weights and optimizer state (step, learning rate, moments)."""
    if state.weights is None:
        return
    model.load_weights(directory / state.weights)


def save_weights(model: keras.Model, path: Path) -> None:
    with atomic_path(path) as tmp:
        model.save_weights(tmp)


class SaveTrainingState(keras.callbacks.Callback):
    """The first half of an epoch's commit: the raw weights and the optimizer, after every callback that changes the
    optimizer (a plateau's lower learning rate) and before `SwapEMAWeights` puts the averaged weights in."""

    def __init__(self, directory: Path):
        super().__init__()
        self.directory = directory

    def on_epoch_end(self, epoch, logs=None):
        save_weights(self.model, self.directory / f"epoch-{epoch + 1:04d}.weights.h5")


class CommitEpoch(keras.callbacks.Callback):
    """The last callback: saves the best weights if `monitor` improved, then commits the epoch (`state.json`), then
    removes the files of earlier epochs. On a resumed fit it restores the counters of `counted` callbacks, which
    Keras resets when a fit begins."""

    def __init__(self, directory: Path, state: FitState, monitor: str, counted: list[keras.callbacks.Callback]):
        super().__init__()
        self.directory, self.state, self.monitor, self.counted = directory, state, monitor, counted

    def on_train_begin(self, logs=None):
        for callback in self.counted:
            for name, value in self.state.counters.get(type(callback).__name__, {}).items():
                setattr(callback, name, value)

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch, **{k: float(v) for k, v in (logs or {}).items()}}
        best, best_epoch = self.state.best, self.state.best_epoch
        if best is None or row[self.monitor] > self.state.history[best_epoch][self.monitor]:
            best, best_epoch = f"best-{epoch + 1:04d}.weights.h5", epoch
            save_weights(self.model, self.directory / best)
        counters = {type(c).__name__: {name: _number(getattr(c, name)) for name in COUNTERS[type(c)]}
                    for c in self.counted}
        self.state = dataclasses.replace(
            self.state, history=[*self.state.history, row], weights=f"epoch-{epoch + 1:04d}.weights.h5", best=best,
            best_epoch=best_epoch, stopped=bool(self.model.stop_training), counters=counters)
        write_json(self.directory / STATE_FILE, dataclasses.asdict(self.state))
        _remove_unnamed(self.directory, self.state)


def counted(callbacks: list[keras.callbacks.Callback]) -> list[keras.callbacks.Callback]:
    """The callbacks among `callbacks` whose counters `CommitEpoch` keeps."""
    return [c for c in callbacks if type(c) in COUNTERS]


def _number(value) -> int | float:
    return value if isinstance(value, int) else float(keras.ops.convert_to_numpy(value))


class SeededBatches(keras.utils.PyDataset):
    """The training arrays in batches, shuffled by (seed, epoch): epoch k's order does not depend on how many epochs
    this process trained before it. `SeedEpochs` sets the epoch."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int):
        super().__init__()
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.epoch, self._order_epoch, self._order = 0, None, None

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self._order_epoch != self.epoch:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.y))
            self._order_epoch = self.epoch
        batch = np.sort(self._order[index * self.batch_size:(index + 1) * self.batch_size])  # sorted: memory order
        return self.x[batch], self.y[batch]


SEED_STATE = "seed_generator_state"  # the variable of each `keras.random.SeedGenerator`: (seed, draws so far)
DRAWS_PER_EPOCH = 2**20


class SeedEpochs(keras.callbacks.Callback):
    """At each epoch's start, sets the batches' epoch and moves every seed generator of the model to (its seed,
    epoch * 2^20): Keras does not save their state with the weights, so a resumed fit would draw epoch k's
    augmentations and dropout masks from the start of the stream."""

    def __init__(self, batches: SeededBatches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.epoch = epoch
        for variable in self.model.variables:
            if variable.name == SEED_STATE:
                seed = keras.ops.convert_to_numpy(variable)[0]
                variable.assign(np.array([seed, epoch * DRAWS_PER_EPOCH], dtype=variable.dtype))
