"""The fused batch-norm kernel trains exactly what Keras' own ops train, and leaves a plain Keras model behind."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from pipeline.batch_norm import fuse_batch_norm
from pipeline.models.cnn import build_cnn_from
from pipeline.training import built_in, compile_model
from tests.conftest import load_config


def bn_model() -> keras.Model:
    inputs = keras.Input((6, 5, 4))
    outputs = layers.BatchNormalization(momentum=0.9, beta_initializer="random_normal",
                                        gamma_initializer="random_uniform")(inputs)
    return keras.Model(inputs, outputs)


def train_step(model: keras.Model, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Outputs of a training call, gradients of a loss that weights every output differently, and the moving
    statistics after it."""
    x = tf.constant(x)
    weights = tf.constant(np.random.default_rng(1).normal(size=x.shape), x.dtype)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = model(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, "float32") * tf.cast(weights, "float32"))
    bn = model.layers[-1]
    grads = tape.gradient(loss, [x, bn.gamma.value, bn.beta.value])
    return y.numpy(), [g.numpy() for g in grads], [bn.moving_mean.numpy(), bn.moving_variance.numpy()]


@pytest.mark.parametrize("policy, tolerance", [("float32", 1e-4), ("mixed_bfloat16", 2e-2)])
def test_a_fused_training_step_equals_keras_own(policy, tolerance):
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(8, 6, 5, 4)).astype("float32")
    keras.utils.set_random_seed(0)
    plain, fused = built_in(policy, bn_model), built_in(policy, bn_model)
    fused.set_weights(plain.get_weights())
    assert fuse_batch_norm(fused) == 1
    expected, got = train_step(plain, x), train_step(fused, x)
    np.testing.assert_allclose(got[0].astype("float32"), expected[0].astype("float32"), atol=tolerance, rtol=tolerance)
    for g, e in zip(got[1], expected[1], strict=True):
        np.testing.assert_allclose(g.astype("float32"), e.astype("float32"), atol=tolerance, rtol=tolerance)
    for g, e in zip(got[2], expected[2], strict=True):  # moving mean, and the biased variance as Keras keeps it
        np.testing.assert_allclose(g, e, atol=tolerance / 10, rtol=tolerance / 10)
    assert abs(expected[2][1] - 1.0).min() > 0.1  # the moving variance did move from its start (ones)


def test_the_training_step_runs_the_fused_op_and_inference_keras_own():
    model = bn_model()
    fuse_batch_norm(model)
    ops = {training: {op.type for op in tf.function(lambda x, t=training: model(x, training=t)).get_concrete_function(
        tf.TensorSpec((None, 6, 5, 4))).graph.get_operations()} for training in (True, False)}
    assert "FusedBatchNormV3" in ops[True]
    assert "FusedBatchNormV3" not in ops[False]


def test_fusing_twice_changes_nothing_and_the_saved_model_is_plain_keras(tmp_path):
    cfg = load_config().cnn
    model = build_cnn_from(cfg, (28, 28, 1), 10)
    n_bn = sum(isinstance(layer, layers.BatchNormalization) for layer in model.layers)
    assert fuse_batch_norm(model) == n_bn > 0
    calls = [vars(layer)["call"] for layer in model.layers if "call" in vars(layer)]
    compile_model(model, cfg.train, 1)  # fuses again (cfg.train.fused_batch_norm): a no-op
    assert [vars(layer)["call"] for layer in model.layers if "call" in vars(layer)] == calls
    x = np.random.default_rng(0).integers(0, 256, (64, 28, 28, 1), dtype=np.uint8)
    model.fit(x, keras.utils.to_categorical(np.arange(64) % 10, 10), batch_size=32, verbose=0)

    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    assert not [layer.name for layer in loaded.layers if "call" in vars(layer)]
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_off_leaves_keras_own_batch_norm():
    cfg = load_config("cnn.train.fused_batch_norm=false").cnn
    model = build_cnn_from(cfg, (28, 28, 1), 10)
    compile_model(model, cfg.train, 1)
    assert not [layer.name for layer in model.layers if "call" in vars(layer)]
