"""Model builders: plain functions of their hyperparameters, knowing nothing of keras-tuner or files.

Every Keras model takes raw uint8 images (N, H, W, C) and returns class probabilities, so a saved
model needs no preprocessing outside it. Code here is backend-agnostic (`keras.ops`, no `tf.`).
"""
