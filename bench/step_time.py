"""Seconds per full-split epoch of the cnn stage's network, per way of running it: the backend is the environment's
(`KERAS_BACKEND=jax python bench/step_time.py ...`), the precision, XLA and the batch size are arguments. Random
images and labels (speed only), the repository's cnn architecture and its optimizer, schedule and loss as the stage
compiles them (params.yaml), `repeats` timed epochs of 10,240 images after an untimed compile; each printed scaled
to the 54,000 images of the full split, so that the spread within one run shows (this machine's speed swings by
1.5x between epochs).

    python bench/step_time.py                                   # the stage's precision, no XLA, batch 256
    python bench/step_time.py --precision float32 --jit --batch-size 512
    python bench/step_time.py --keras-batch-norm                # Keras' own batch-norm ops, not the fused kernel
    python bench/step_time.py --augment                         # with the data set's augmentation, as cnn_aug trains
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import keras
import numpy as np
from run_pipeline import REPO

from pipeline import config
from pipeline.models.augment import build_augmentation
from pipeline.models.cnn import build_cnn_from
from pipeline.training import compile_model

IMAGES, FULL_SPLIT = 10_240, 54_000


def epoch_seconds(precision: str | None, jit: bool, batch_size: int, repeats: int, keras_bn: bool,
                  augment: bool) -> list[float]:
    cfg = config.load(REPO / "params.yaml")
    cnn = cfg.cnn
    keras.mixed_precision.set_global_policy(precision or cnn.train.precision)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (IMAGES, 28, 28, 1), dtype=np.uint8)
    y = keras.utils.to_categorical(rng.integers(0, 10, IMAGES), 10)
    augmentation = build_augmentation(cfg.data.augment, cfg.seed, x.shape[1:]) if augment else None
    model = build_cnn_from(cnn, x.shape[1:], 10, augmentation)
    train = dataclasses.replace(cnn.train, batch_size=batch_size, fused_batch_norm=not keras_bn)
    compile_model(model, train, -(-FULL_SPLIT // train.batch_size))
    model.jit_compile = jit  # compile_model leaves it to Keras: off on a CPU-only machine
    model.fit(x[:3 * batch_size], y[:3 * batch_size], batch_size=batch_size, verbose=0)  # compile, untimed
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.fit(x, y, batch_size=batch_size, verbose=0)
        times.append((time.perf_counter() - start) * FULL_SPLIT / IMAGES)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=("mixed_bfloat16", "float32"), help="default: the cnn stage's")
    parser.add_argument("--jit", action="store_true", help="XLA (jit_compile=True); Keras' default on a CPU is off")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--keras-batch-norm", action="store_true",
                        help="Keras' own batch-norm ops, not the fused kernel (train.fused_batch_norm)")
    parser.add_argument("--augment", action="store_true", help="with the data set's augmentation (data.augment)")
    args = parser.parse_args()
    times = epoch_seconds(args.precision, args.jit, args.batch_size, args.repeats, args.keras_batch_norm,
                          args.augment)
    policy = keras.mixed_precision.global_policy().name
    norm = "keras" if args.keras_batch_norm else "fused"
    print(f"{keras.backend.backend()} {policy} jit={args.jit} batch {args.batch_size} batch norm {norm}"
          f"{' augmented' if args.augment else ''}: "
          f"{' '.join(f'{t:.0f}' for t in times)} s per full-split epoch")


if __name__ == "__main__":
    main()
