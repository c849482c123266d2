"""The shape of the configuration: types, allowed values and ranges, and no defaults.

Every value lives in `conf/` (composed into `params.yaml`); this module only says what a valid value
is, so that a typo or an out-of-range number fails in one line before any work starts. Constraints
sit in field metadata and are checked by `pipeline.config`, which knows each field's dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING


def setting(*, choices: tuple | None = None, ge=None, gt=None, le=None, lt=None, optional=False) -> Any:
    """A required field with optional constraints, checked in `pipeline.config.check_constraints`."""
    meta = {k: v for k, v in dict(choices=choices, ge=ge, gt=gt, le=le, lt=lt).items() if v is not None}
    return field(default=None if optional else MISSING, metadata=meta)


IDX_FILE_KEYS = ("train_images", "train_labels", "test_images", "test_labels")
PRECISIONS = ("float32", "mixed_bfloat16")  # Keras dtype policies: float32, or bfloat16 compute on float32 weights


@dataclass
class SourceFile:
    """One file of a data set, as stored (uncompressed) in `data/raw/`."""

    name: str = setting()
    sha256: Optional[str] = setting(optional=True)  # of the uncompressed content: same from every mirror
    md5: Optional[str] = setting(optional=True)  # of the official .gz: used where sha256 is not known


@dataclass
class Anchor:
    """A published test accuracy on the data set, that a stage's result is set against."""

    model: str = setting()
    accuracy: float = setting(ge=0.0, le=1.0)


@dataclass
class AugmentConfig:
    """Augmentation layers, active only in training (cnn_aug, finetune); 0 or false turns one off."""

    flip: bool = setting()  # horizontal; also allows flip test-time augmentation (`evaluation.tta`)
    crop_px: int = setting(ge=0, le=8)  # pad-and-crop: shift by up to this many whole pixels (nearest)
    translate: float = setting(ge=0.0, le=0.5)  # bilinear shift by up to this fraction of height and width
    zoom: float = setting(ge=0.0, le=0.5)
    rotation: float = setting(ge=0.0, le=0.5)  # fraction of a full turn
    erasing: float = setting(ge=0.0, le=1.0)  # chance of erasing a random rectangle


@dataclass
class DataConfig:
    name: str = setting()
    format: str = setting(choices=("idx", "image_folder"))
    source: Optional[str] = setting(optional=True)  # a directory (or archive) tried before the mirrors
    mirrors: list[str] = setting()
    files: dict[str, SourceFile] = setting()
    apt_package: Optional[str] = setting(optional=True)
    classes: list[str] = setting()
    image_size: list[int] = setting()
    channels: int = setting(choices=(1, 3))
    val_size: float = setting(gt=0.0, lt=1.0)
    test_size: Optional[float] = setting(gt=0.0, lt=1.0, optional=True)
    limit_train: Optional[int] = setting(ge=10, optional=True)
    limit_test: Optional[int] = setting(ge=10, optional=True)
    on_corrupt: str = setting(choices=("error", "skip"))
    retries: int = setting(ge=1, le=10)
    timeout_s: float = setting(gt=0.0)
    anchors: dict[str, Anchor] = setting()  # stage -> published result to compare with (metrics/report.md)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # the data set's call: which
    # transforms keep a class's meaning (a mirrored digit is not the same digit)


@dataclass
class TrainConfig:
    """How a Keras stage trains: the one fit loop in `pipeline.training` reads this."""

    epochs: int = setting(ge=1)
    min_images: Optional[int] = setting(ge=1, optional=True)  # train on at least this many images: a small data
    # set gets more epochs (enough optimizer steps); null: `epochs` as set
    batch_size: int = setting(ge=1)
    optimizer: str = setting(choices=("adam", "adamw", "sgd"))
    lr: float = setting(gt=0.0, le=1.0)  # the peak, after warm-up
    weight_decay: float = setting(ge=0.0)
    lr_schedule: str = setting(choices=("plateau", "cosine", "constant"))  # cosine: to zero at the last step
    warmup: float = setting(ge=0.0, lt=1.0)  # with lr_schedule cosine: the fraction of the steps rising linearly
    # from lr/25 before the cosine (one-cycle); other schedules have none
    label_smoothing: float = setting(ge=0.0, lt=1.0)
    ema: bool = setting()  # evaluate and keep an exponential moving average of the weights (momentum 0.99)
    precision: str = setting(choices=PRECISIONS)  # mixed: bfloat16 compute, float32 weights
    fused_batch_norm: bool = setting()  # batch norm trained with TensorFlow's fused kernel (pipeline.batch_norm)
    patience: Optional[int] = setting(ge=1, optional=True)  # epochs without a better val_accuracy before stopping;
    # null: never stop early (a schedule that anneals to zero wants its last epochs)
    seeds: list[int] = setting(ge=0)  # []: one fit with the global `seed`; two or more: the final model once per
    # seed (mean and std of val and test accuracy logged), the first seed's model the stage's output


@dataclass
class SearchConfig:
    """A keras-tuner search over the stage's settings (see pipeline.tuning); the best values are then trained."""

    enabled: bool = setting()
    space: dict[str, Any] = setting()  # {setting: {int|float|choice: ..., step, log, when}}, checked by tuning


@dataclass
class BaselineConfig:
    C: float = setting(gt=0.0)  # inverse regularisation strength
    max_iter: int = setting(ge=1)
    solver: str = setting(choices=("lbfgs", "saga", "newton-cg", "sag"))


@dataclass
class CnnConfig:
    """A convolutional network (`pipeline.models.cnn`): plain conv blocks with max pooling and a flattened dense
    head, or residual blocks that halve the resolution, global average pooling and a linear head."""

    arch: str = setting(choices=("plain", "resnet"))
    blocks: int = setting(ge=1, le=5)  # each halves the resolution (max pooling, or a strided first conv)
    filters: int = setting(ge=1)  # of the first block; doubled in each later block
    convs_per_block: int = setting(ge=1, le=4)
    kernel_size: int = setting(choices=(3, 5, 7))
    batch_norm: bool = setting()
    dropout: float = setting(ge=0.0, lt=1.0)  # plain: after each block and the dense layer; resnet: before the head
    dense_units: int = setting(ge=0)  # a hidden dense layer before the classifier; 0: none
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)


@dataclass
class CnnAugConfig:
    """The cnn architecture (section `cnn`) trained with the data set's augmentation (`data.augment`)."""

    init: str = setting(choices=("scratch", "cnn"))  # cnn: continue from the cnn stage's trained model
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class TransferConfig:
    """A pretrained backbone, frozen, cut at a layer, with a new head trained on its features."""

    backbone: str = setting(choices=("vgg16", "resnet50", "mobilenet_v2", "efficientnet_b0"))
    weights: Optional[str] = setting(choices=("hed", "imagenet"), optional=True)  # hed: vgg16 only; null: random
    image_size: int = setting(ge=32)  # images are resized to this square size
    cut: Optional[str] = setting(optional=True)  # the backbone layer whose output are the features; null: last
    pooling: str = setting(choices=("avg", "flatten"))
    head_units: int = setting(ge=1)
    dropout: float = setting(ge=0.0, lt=1.0)
    trunk_precision: str = setting(choices=PRECISIONS)  # the frozen trunk's, computing the features once
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)


@dataclass
class FinetuneConfig:
    """The transfer model with its top backbone blocks unfrozen, trained end to end at a low learning rate."""

    unfreeze_blocks: int = setting(ge=1)
    augment: bool = setting()  # train with the data set's transforms (`data.augment`)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)


@dataclass
class TunerConfig:
    kind: str = setting(choices=("random", "bayesian", "hyperband"))
    objective: str = setting(choices=("val_accuracy", "val_loss"))  # on the validation split, never the test split
    max_trials: int = setting(ge=1)  # random and bayesian; hyperband's count follows from epochs and factor
    epochs: int = setting(ge=1)  # per trial (hyperband: the most any trial gets)
    executions_per_trial: int = setting(ge=1)  # models trained per candidate, scores averaged
    patience: int = setting(ge=1)  # a trial stops after this many epochs without a better objective
    subset: Optional[int] = setting(ge=10, optional=True)  # training images per trial (stratified); null: all
    subset_mode: str = setting(choices=("fixed", "growing"))  # fixed: every trial epoch on the same `subset`;
    # growing: each epoch on the next `subset` images of one shuffled order of the whole training split
    hyperband_factor: int = setting(ge=2)
    workers: int = setting(ge=0)  # processes that run the trials, the stage serving them as chief; 0: the stage itself


@dataclass
class EvaluationConfig:
    """How every Keras stage scores its final model (the validation split for choices, the test split once)."""

    tta: bool = setting()  # also score with the horizontal flip averaged in, for models trained with flips
    # (`data.augment.flip`): logged as `*_tta` metrics beside the plain ones, which stay the stage's headline


@dataclass
class TrackingConfig:
    uri: Optional[str] = setting(optional=True)  # null: SQLite store under the main repository's mlruns/
    experiment: Optional[str] = setting(optional=True)  # null: the data set's name
    ui_host: str = setting()  # where `make ui` listens (a local store only): loopback unless told otherwise
    ui_port: int = setting(ge=1, le=65535)
    system_metrics: bool = setting()  # MLflow's system metrics (CPU, memory, ...) on every stage run
    system_metrics_interval_s: float = setting(ge=1.0)  # seconds between two samples
    reproduce_tolerance: float = setting(ge=0.0, le=1.0)  # `make reproduce`: |accuracy difference| allowed


@dataclass
class Config:
    seed: int = setting(ge=0)
    profile: str = setting(choices=("smoke", "cpu", "gpu"))
    keep_cpus_awake: bool = setting()  # an idle-priority spinner per CPU while a stage runs (pipeline.awake)
    data: DataConfig = field(default_factory=DataConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    cnn: CnnConfig = field(default_factory=CnnConfig)
    cnn_aug: CnnAugConfig = field(default_factory=CnnAugConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    tuner: TunerConfig = field(default_factory=TunerConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
