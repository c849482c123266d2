"""The bare-Keras reference: the script a user would write instead of the pipeline (no pipeline code).

A 6-conv batch-norm CNN (32-64-128, two 3x3 convs + BN + ReLU per block, max pooling, dense head) on
Fashion-MNIST, Adam with cosine decay to 0, batch 128, 12 epochs, no augmentation, plain `model.fit`.
Split: 55,000 train / 5,000 validation, stratified (500 images of each class, seeded); the official
10,000 test images are evaluated once, at the end. The benchmark runs it in the same run as the pipeline,
so that the pipeline's times are ratios to it (docs/decisions.md).

    python bench/reference.py --out /tmp/reference.json                       # about 15 minutes on 2 cores
    python bench/reference.py --epochs 1 --limit 2000 --out /tmp/ref.json     # a quick check
"""

from __future__ import annotations

import time

START = time.perf_counter()  # the user's wait includes importing Keras

import argparse  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
from pathlib import Path  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers  # noqa: E402

SEED, VAL_PER_CLASS, BATCH = 0, 500, 128


def load_idx(directory: Path, name: str) -> np.ndarray:
    """An IDX file (`name.gz` or `name`) as a uint8 array; its header's 4th byte is the number of dimensions."""
    path = directory / f"{name}.gz"
    data = gzip.decompress(path.read_bytes()) if path.is_file() else (directory / name).read_bytes()
    ndim = data[3]
    shape = np.frombuffer(data, ">u4", count=ndim, offset=4)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def build_model(n_classes: int = 10) -> keras.Model:
    inputs = keras.Input((28, 28, 1))
    x = inputs
    for filters in (32, 64, 128):
        for _ in range(2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
            x = layers.BatchNormalization()(x)
            x = layers.ReLU()(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dropout(0.25)(x)
    return keras.Model(inputs, layers.Dense(n_classes, activation="softmax")(x))


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {', '.join(keras.distribution.list_devices())}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                        help="directory of the four IDX files")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    parser.add_argument("--epochs", type=int, default=12, help="only for a quick check")
    parser.add_argument("--limit", type=int, help="train on this many images: only for a quick check")
    args = parser.parse_args()
    keras.utils.set_random_seed(SEED)

    x = load_idx(args.data, "train-images-idx3-ubyte")[..., None].astype("float32") / 255
    y = load_idx(args.data, "train-labels-idx1-ubyte")
    x_test = load_idx(args.data, "t10k-images-idx3-ubyte")[..., None].astype("float32") / 255
    y_test = load_idx(args.data, "t10k-labels-idx1-ubyte")
    rng = np.random.default_rng(SEED)
    val = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:VAL_PER_CLASS] for c in np.unique(y)])
    train = rng.permutation(np.setdiff1d(np.arange(len(y)), val))[:args.limit]

    model = build_model()
    steps = args.epochs * math.ceil(len(train) / BATCH)
    model.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(1e-3, steps)),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(x[train], y[train], batch_size=BATCH, epochs=args.epochs,
                        validation_data=(x[val], y[val]), verbose=2)
    _, test_accuracy = model.evaluate(x_test, y_test, batch_size=512, verbose=0)

    result = {"seconds": round(time.perf_counter() - START, 1), "test_accuracy": float(test_accuracy),
              "val_accuracy": float(history.history["val_accuracy"][-1]), "epochs": args.epochs,
              "machine": machine(), "train_images": len(train), "val_images": len(val)}
    print(json.dumps(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
