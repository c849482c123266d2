"""Grad-CAM heat maps: which parts of an image made a Keras model choose a class.

The model is run as a chain of steps up to its last spatial feature maps, then on to class probabilities.
A network (a cnn, or a nested model that holds the step from feature maps to a vector: a transfer head, the
cnn behind augmentation layers) is split in two at its last feature maps, so skip connections are fine; any
other nested model (a backbone) runs whole. The class
score is the class's log-probability minus the mean over classes (the logit up to a shift, so no access
to the logits is needed, and no softmax saturation hides the gradient). Keras has no backend-neutral
gradient, so the one gradient call is made with the backend's own autodiff (TensorFlow or JAX); on another
backend, or if the chain does not reproduce the model's output, heat maps are skipped with a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np
from keras import layers, ops

from pipeline.analysis import caption, plot_images
from pipeline.models import nested_layers

log = logging.getLogger(__name__)

PASS_THROUGH = (layers.MaxPooling2D, layers.AveragePooling2D, layers.Dropout)  # add no features of their own


def chain(model: keras.Model) -> list[keras.Layer]:
    """Steps that run in order: a wrapper's layers, with the nested models that turn feature maps into vectors
    opened up; a network without such nested models split at its last feature maps (`_split`)."""
    nested = [layer for layer in model.layers
              if isinstance(layer, keras.Model) and _spatial(layer.input) and not _spatial(layer.output)]
    if not nested:
        return _split(model)
    out: list[keras.Layer] = []
    for layer in model.layers:
        if not isinstance(layer, layers.InputLayer):
            out += chain(layer) if layer in nested else [layer]
    return out


def _split(model: keras.Model) -> list[keras.Layer]:
    """[inputs -> last feature maps, last feature maps -> outputs] as two models; [model] if it has none inside."""
    maps = [layer.output for layer in model.layers
            if not isinstance(layer, (layers.InputLayer, *PASS_THROUGH)) and _spatial(layer.output)]
    if not maps:
        return [model]
    return [keras.Model(model.inputs, maps[-1]), keras.Model(maps[-1], model.outputs)]


def gradcam(model: keras.Model, images: np.ndarray, targets: np.ndarray) -> np.ndarray | None:
    """Heat maps in [0, 1], one per image (N, height, width), for class `targets[i]` of image i."""
    steps = chain(model)
    spatial = [i for i, layer in enumerate(steps) if _spatial(layer.output) and not isinstance(layer, PASS_THROUGH)]
    if not spatial:
        log.warning("Grad-CAM skipped: %s has no spatial feature maps", model.name)
        return None
    cut = spatial[-1] + 1
    features = _run(steps[:cut], ops.convert_to_tensor(images))
    # run as a chain, it must give the model's own output: to rounding, which in bfloat16 (8 mantissa bits) differs
    # where a backend fuses the ops differently (JAX: 1e-4 on an untrained net); a missing branch differs by far more
    atol = 1e-2 if _computes_in_half_precision(model) else 1e-4
    if not np.allclose(ops.convert_to_numpy(_run(steps[cut:], features)), model.predict(images, verbose=0),
                       atol=atol):
        log.warning("Grad-CAM skipped: %s is not a chain of layers", model.name)
        return None
    grads = _gradients(lambda f: _score(_run(steps[cut:], f), targets), features)
    if grads is None:
        log.warning("Grad-CAM skipped: no gradient on the %s backend", keras.backend.backend())
        return None
    weights = ops.mean(grads, axis=(1, 2), keepdims=True)  # one weight per channel: its mean gradient
    cams = ops.relu(ops.sum(weights * features, axis=-1, keepdims=True))
    cams = ops.convert_to_numpy(ops.image.resize(cams, images.shape[1:3], interpolation="bilinear"))[..., 0]
    cams = cams.astype(np.float32)  # bfloat16 under mixed precision, which matplotlib cannot scale
    peak = cams.max(axis=(1, 2), keepdims=True)
    return np.divide(cams, peak, out=np.zeros_like(cams), where=peak > 0)


def write_gradcam(path: Path, model: keras.Model, images: np.ndarray, y_true: np.ndarray, y_prob: np.ndarray,
                  classes: list[str]) -> None:
    """Each image with the heat map of its predicted class, then of its true class."""
    if not len(images):
        return
    predicted = y_prob.argmax(axis=1)
    maps = gradcam(model, np.concatenate([images, images]), np.concatenate([predicted, y_true]))
    if maps is None:
        return
    n = len(images)
    captions = [f"{caption(classes, t, p)}\nmap of {classes[p.argmax()]}" for t, p in zip(y_true, y_prob, strict=True)]
    captions += [f"same image\nmap of {classes[t]}" for t in y_true]
    order = np.stack([np.arange(n), np.arange(n) + n], axis=1).ravel()  # predicted, true, side by side
    plot_images(path, np.concatenate([images, images])[order], [captions[i] for i in order], overlays=maps[order])


def _computes_in_half_precision(layer: keras.Layer) -> bool:
    """Whether any layer, nested models' included, computes in bfloat16 or float16 (`train.precision`)."""
    return any(inner.compute_dtype in ("bfloat16", "float16") for inner in nested_layers(layer))


def _spatial(tensor) -> bool:
    if isinstance(tensor, list | tuple):  # a model's one input or output, as a list
        tensor = tensor[0]
    return len(tensor.shape) == 4


def _run(steps: list[keras.Layer], x):
    for layer in steps:
        x = layer(x, training=False)
    return x


def _score(probabilities, targets: np.ndarray):
    logp = ops.log(ops.maximum(probabilities, np.finfo("float32").tiny))  # exact unless a probability underflows
    centred = logp - ops.mean(logp, axis=1, keepdims=True)
    return ops.sum(ops.take_along_axis(centred, ops.convert_to_tensor(targets[:, None].astype("int32")), axis=1))


def _gradients(score, features):
    """d score / d features, with the backend's autodiff; None on a backend without a branch here."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(features)
            value = score(features)
        return tape.gradient(value, features)
    if backend == "jax":
        import jax

        return jax.grad(score)(features)
    return None
