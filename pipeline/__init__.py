"""Image-classification pipeline: DVC stages, Hydra config, keras-tuner search, MLflow tracking."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter hides the stage logs
os.environ.setdefault("MPLBACKEND", "Agg")  # figures are written to files; there is no display
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # the pipeline reports usage to no one
