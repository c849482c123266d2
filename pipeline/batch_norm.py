"""TensorFlow's fused batch-norm kernel for training Keras' BatchNormalization layers (`train.fused_batch_norm`).

Keras 3 computes a training BatchNormalization on TensorFlow from separate ops (a cast to float32, `tf.nn.moments`,
`tf.nn.batch_normalization`, then their gradients), each a pass over the activations: on the cnn's small residual
net that was half of every training step (54 s an epoch against 27 s without batch norm, 2 cores). One
FusedBatchNormV3 op (oneDNN's kernel) computes the same normalisation and moving statistics in a fraction of that
(docs/decisions.md, "Fused batch norm"). Only the training call changes, on the layer instances of the model being
trained: the layers stay Keras' own, so a saved or logged model is a plain Keras model that loads anywhere, and
inference, frozen layers and other backends keep Keras' code.
"""

from __future__ import annotations

import keras

from pipeline.models import nested_layers


def fuse_batch_norm(model: keras.Model) -> int:
    """Train `model`'s BatchNormalization layers (4-D inputs, channels last) with TensorFlow's fused kernel, when the
    backend is TensorFlow; return how many layers now do. Calling it again on the same model changes nothing."""
    if keras.backend.backend() != "tensorflow":
        return 0
    fused = 0
    for layer in nested_layers(model):
        if (type(layer) is keras.layers.BatchNormalization and layer.axis in (-1, 3) and not layer.renorm
                and not layer.synchronized):  # the op's moments are this replica's
            if "call" not in vars(layer):  # not yet: the instance's own `call` is the fused one
                layer.call = _fused_call(layer, layer.call)
            fused += 1
    return fused


def _fused_call(layer: keras.layers.BatchNormalization, keras_call):
    import tensorflow as tf

    def call(inputs, training=None, mask=None):
        """Keras' call, but for a training step on a 4-D batch: then the fused op, whose moving statistics update
        as Keras' own (momentum, and the biased batch variance: the op returns the unbiased one)."""
        if not (training and layer.trainable) or mask is not None or len(inputs.shape) != 4:
            return keras_call(inputs, training=training, mask=mask)
        channels = inputs.shape[-1]
        gamma = tf.cast(layer.gamma, "float32") if layer.scale else tf.ones([channels])
        beta = tf.cast(layer.beta, "float32") if layer.center else tf.zeros([channels])
        outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(inputs, gamma, beta, epsilon=layer.epsilon,
                                                                   data_format="NHWC", is_training=True)
        shape = tf.shape(inputs)
        count = tf.cast(shape[0] * shape[1] * shape[2], "float32")
        variance = variance * (count - 1.0) / count
        momentum = layer.momentum
        layer.moving_mean.assign(layer.moving_mean * momentum + mean * (1.0 - momentum))
        layer.moving_variance.assign(layer.moving_variance * momentum + variance * (1.0 - momentum))
        return tf.cast(outputs, layer.compute_dtype)

    return call
