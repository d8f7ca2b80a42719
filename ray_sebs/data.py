"""Datasets for SEBS runs: which data a run trains on (:class:`DatasetConfig`), what loading it
gives (:class:`PreparedData`), and :func:`load_data`.

Importing this module does not import Ray: the CLI plans runs from these sizes before a cluster
exists. Loading functions import Ray Data when called. The work is split by source:
:mod:`ray_sebs.data_builtin` makes the bundled digits and the synthetic arrays,
:mod:`ray_sebs.data_files` reads and checks a user's Parquet/CSV files, and
:mod:`ray_sebs.data_pipeline` turns either into the training and validation datasets.

:func:`load_data` returns Ray Datasets with exactly two columns, ``features`` (a fixed-shape
float32 tensor of ``num_features`` values per row) and ``label`` (int64), so
``ds.iter_torch_batches(batch_size=n)`` yields ``{"features": (n, num_features) float32,
"label": (n,) int64}``. Every check of a user's file runs here, on the driver, before any training
worker starts; each failure is a :class:`~ray_sebs.errors.ConfigError` that names the column or
value and the fix. The returned datasets are materialized: SEBS iterates them once per epoch, and
re-running the read, the checks and the preprocessors every epoch would dominate small runs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ray_sebs.data_builtin import digits_arrays, synthetic_arrays
from ray_sebs.errors import ConfigError, require_int

if TYPE_CHECKING:
    import ray.data

DIGITS_ROWS = 1797
"""Rows in scikit-learn's bundled digits dataset (8x8 images, 10 classes)."""

DEFAULT_VALIDATION_FRACTION = 0.2
"""Share of the rows held out for validation when no validation data is given."""

DATASET_NAMES: tuple[str, ...] = ("digits", "synthetic")
CACHE_MODES: tuple[str, ...] = ("none", "host", "device")
"""Where a rank's update batches come from (:class:`ray_sebs.loop.ShardBatches`): its Ray Data
shard streamed every epoch, or the shard read once into host memory or onto the device."""
"""Built-in datasets, chosen with :attr:`DatasetConfig.name`."""

DIGITS_INPUT_SHAPE: tuple[int, int, int] = (1, 8, 8)
"""(C, H, W) of one digits image."""

DIGITS_CLASSES = 10
"""Classes of the digits dataset (0-9)."""


def split_sizes(total_rows: int, validation_fraction: float) -> tuple[int, int]:
    """(training rows, validation rows) of a seeded split: validation gets
    ``round(total_rows * validation_fraction)`` rows, training the rest."""
    validation_rows = round(total_rows * validation_fraction)
    return total_rows - validation_rows, validation_rows


@dataclass(frozen=True)
class DatasetConfig:
    """Which data a run trains on and how it is prepared."""

    name: str = "digits"
    """Built-in dataset: ``digits`` (scikit-learn's 1,797 8x8 images) or ``synthetic``. Ignored
    when ``path`` is set."""

    path: str | None = None
    """A Parquet or CSV file, or a directory of them, chosen by extension (``.parquet``/``.pq``,
    ``.csv``). Local paths or URIs that pyarrow understands (``s3://``, ``gs://``); on a
    multi-node cluster a local path must exist on every node."""

    feature_columns: tuple[str, ...] | None = None
    """Numeric columns of ``path`` to train on, in this order. ``None``: every column but the
    label."""

    label_column: str = "label"
    """Column of ``path`` holding integer class ids ``0..num_classes-1``."""

    validation_path: str | None = None
    """A separate validation file or directory with the same columns. ``None``: a seeded split of
    the training data (``validation_fraction``)."""

    validation_fraction: float = DEFAULT_VALIDATION_FRACTION
    """Share of the rows held out for validation, in ``[0, 1)``; 0 means no validation set.
    Ignored when ``validation_path`` is set."""

    standardize: bool = True
    """Standardize every feature with Ray Data's ``StandardScaler``, fitted on the training split
    only and applied unchanged to the validation data. ``False`` keeps raw values (as float32)."""

    num_classes: int | None = None
    """Number of classes (model outputs). ``None``: the largest label + 1."""

    synthetic_rows: int = 4096
    """Rows of the ``synthetic`` dataset, before the validation split."""

    synthetic_features: int = 32
    """Features of the flat ``synthetic`` dataset (ignored with ``synthetic_image_shape``)."""

    synthetic_classes: int = 10
    """Classes of the ``synthetic`` dataset, equally frequent."""

    synthetic_difficulty: float = 1.0
    """Noise relative to the class separation of the ``synthetic`` dataset: 0 is noiseless, 1 is
    clearly learnable but not trivial, larger is harder."""

    synthetic_image_shape: tuple[int, int, int] | None = None
    """``(C, H, W)``: make ``synthetic`` image data (class-dependent spatial patterns plus noise)
    for the CNN, with ``C*H*W`` features. ``None``: flat Gaussian-cluster data."""

    seed: int = 0
    """Seeds the synthetic data and the training/validation split."""

    def __post_init__(self) -> None:
        if self.name not in DATASET_NAMES:
            raise ConfigError("dataset_name", self.name, "is not a built-in dataset",
                              f"use one of {', '.join(DATASET_NAMES)}, or give a path")
        for field_name in ("path", "validation_path"):
            value = getattr(self, field_name)
            if value is None:
                continue
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
                object.__setattr__(self, field_name, value)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError("data_path" if field_name == "path" else field_name, value,
                                  "is not a path", "give a Parquet or CSV file or directory")
        if not isinstance(self.label_column, str) or not self.label_column:
            raise ConfigError("label_column", self.label_column, "is not a column name",
                              "give the name of the integer class-label column")
        if self.feature_columns is not None:
            self._check_feature_columns()
        if self.path is None:
            # These only describe a user's file; silently ignoring them would train on other data.
            if self.feature_columns is not None:
                raise ConfigError("feature_columns", ",".join(self.feature_columns),
                                  f"only applies to data read from a path, not to {self.name!r}",
                                  "give the data path too, or leave feature_columns unset")
            if self.validation_path is not None:
                raise ConfigError("validation_path", self.validation_path,
                                  f"only applies to data read from a path, not to {self.name!r}",
                                  "give the data path too, or use validation_fraction")
        fraction = self.validation_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) \
                or not math.isfinite(fraction) or not 0 <= fraction < 1:
            raise ConfigError("validation_fraction", fraction, "must be a number in [0, 1)",
                              "use e.g. 0.2, or 0 for no validation set")
        if not isinstance(self.standardize, bool):
            raise ConfigError("standardize", self.standardize, "must be True or False",
                              "pass a bool")
        if self.num_classes is not None:
            require_int("num_classes", self.num_classes, minimum=2,
                         fix="a classifier needs at least 2 classes; or leave it unset to infer it")
        require_int("synthetic_rows", self.synthetic_rows, minimum=1, fix="use at least 1 row")
        require_int("synthetic_features", self.synthetic_features, minimum=1,
                     fix="use at least 1 feature")
        require_int("synthetic_classes", self.synthetic_classes, minimum=2,
                     fix="use at least 2 classes")
        difficulty = self.synthetic_difficulty
        if isinstance(difficulty, bool) or not isinstance(difficulty, int | float) \
                or not math.isfinite(difficulty) or difficulty < 0:
            raise ConfigError("synthetic_difficulty", difficulty, "must be a number >= 0",
                              "use 1.0 for a learnable default, larger for harder data")
        if self.synthetic_image_shape is not None:
            shape = self.synthetic_image_shape
            if isinstance(shape, str) or not isinstance(shape, Sequence) or len(shape) != 3 \
                    or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in shape):
                raise ConfigError("synthetic_image_shape", shape,
                                  "must be three positive integers (C, H, W)",
                                  "use e.g. 3,32,32 (channels, height, width)")
            object.__setattr__(self, "synthetic_image_shape", tuple(shape))
            # Digits and a user's files have their own shape; ignoring this would train on other data.
            if self.path is not None or self.name != "synthetic":
                source = "data read from a path" if self.path is not None else repr(self.name)
                raise ConfigError("synthetic_image_shape", ",".join(map(str, shape)),
                                  f"only applies to the synthetic dataset, not to {source}",
                                  "use the synthetic dataset (--dataset synthetic), or leave it "
                                  "unset")
        require_int("seed", self.seed, minimum=0, fix="use a non-negative integer seed")
        if self.path is None and self.num_classes is not None:
            classes = DIGITS_CLASSES if self.name == "digits" else self.synthetic_classes
            if self.num_classes < classes:
                raise ConfigError("num_classes", self.num_classes,
                                  f"is below the {classes} classes of {self.name!r}",
                                  f"use at least {classes}, or leave it unset")

    def _check_feature_columns(self) -> None:
        columns = self.feature_columns
        if isinstance(columns, str) or not isinstance(columns, Sequence):
            raise ConfigError("feature_columns", columns, "is not a sequence of column names",
                              "give a tuple of names, e.g. ('x1', 'x2')")
        columns = tuple(columns)
        if not columns:
            raise ConfigError("feature_columns", columns, "is empty",
                              "name at least one feature column, or leave it unset for all")
        for column in columns:
            if not isinstance(column, str) or not column:
                raise ConfigError("feature_columns", column, "is not a column name",
                                  "give column names as strings")
        duplicates = sorted({c for c in columns if columns.count(c) > 1})
        if duplicates:
            raise ConfigError("feature_columns", ",".join(duplicates), "names a column twice",
                              "list each feature column once")
        if self.label_column in columns:
            raise ConfigError("feature_columns", self.label_column,
                              "includes the label column",
                              "leave the label out of the features (or choose another label_column)")
        object.__setattr__(self, "feature_columns", columns)

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """The model's input shape when known without reading data (built-in datasets)."""
        if self.path is not None:
            return None
        if self.name == "digits":
            return DIGITS_INPUT_SHAPE
        if self.synthetic_image_shape is not None:
            return self.synthetic_image_shape
        return (self.synthetic_features,)


@dataclass(frozen=True)
class PreparedData:
    """Training and validation data, checked and preprocessed, ready for Ray Train."""

    train: ray.data.Dataset
    """Training rows: columns ``features`` (float32, ``num_features`` per row) and ``label``
    (int64). Materialized."""

    validation: ray.data.Dataset | None
    """Validation rows with the same columns and the scaler fitted on ``train``; ``None`` when
    there is no validation data."""

    train_rows: int
    """Rows of ``train``."""

    validation_rows: int
    """Rows of ``validation`` (0 without one)."""

    num_features: int
    """Length of each ``features`` row."""

    num_classes: int
    """Number of classes; every label is in ``[0, num_classes)``."""

    input_shape: tuple[int, ...]
    """Shape of one example: ``(num_features,)``, or ``(C, H, W)`` for image data (digits:
    ``(1, 8, 8)``). ``features`` holds it flattened."""


def load_data(config: DatasetConfig) -> PreparedData:
    """Load, check, split and standardize the data that ``config`` describes.

    Needs a running Ray (``ray.init``). Raises :class:`ConfigError` for missing or unreadable
    files and for any column that cannot be trained on, before training starts.
    """
    if config.path is not None:
        from ray_sebs.data_files import load_files

        return load_files(config)
    from ray_sebs.data_pipeline import load_arrays

    if config.name == "digits":
        features, labels = digits_arrays()
        input_shape: tuple[int, ...] = DIGITS_INPUT_SHAPE
        num_classes = config.num_classes or DIGITS_CLASSES
    else:
        features, labels = synthetic_arrays(config)
        input_shape = config.input_shape or (features.shape[1],)
        num_classes = config.num_classes or config.synthetic_classes
    return load_arrays(config, features, labels, input_shape, num_classes)


def check_min_rows(data: PreparedData, global_batch_size: int) -> None:
    """Refuse a dataset that cannot fill one global batch: every epoch would make no update."""
    require_int("global_batch_size", global_batch_size, minimum=1,
                 fix="use a global batch of at least 1 sample")
    if data.train_rows < global_batch_size:
        raise ConfigError("dataset", data.train_rows,
                          f"has {data.train_rows} training rows, fewer than one global batch of "
                          f"{global_batch_size}, so no epoch would make an update",
                          f"use a batch size of at most {data.train_rows}, or more data "
                          "(or a smaller validation fraction)")
