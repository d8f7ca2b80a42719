"""Datasets: digits, synthetic, a user's CSV/Parquet, the seeded split, the scaler and every check.

One local Ray per module (``ray_cluster`` in conftest.py); every dataset is tiny.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from ray_sebs import data_pipeline
from ray_sebs.data import (
    DEFAULT_VALIDATION_FRACTION,
    DIGITS_ROWS,
    DatasetConfig,
    PreparedData,
    check_min_rows,
    load_data,
    split_sizes,
    synthetic_arrays,
)
from ray_sebs.errors import ConfigError

pytestmark = pytest.mark.usefixtures("ray_cluster")


def arrays(dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of a whole (small) dataset, in its block order."""
    batch = dataset.take_batch(batch_size=dataset.count(), batch_format="numpy")
    assert set(batch) == {"features", "label"}
    return batch["features"], batch["label"]


def sorted_rows(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    table = np.column_stack([features, labels])
    return table[np.lexsort(table.T[::-1])]


def raises_config_error(load: Callable[[], object], field: str, *fragments: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load()
    error = caught.value
    assert error.field == field, str(error)
    for fragment in fragments:
        assert fragment in str(error), str(error)
    return error


@pytest.fixture(scope="module")
def digits() -> PreparedData:
    return load_data(DatasetConfig())


# ---------------------------------------------------------------------------------------------
# Config and import


def test_import_does_not_load_ray_or_torch() -> None:
    code = ("import sys, ray_sebs.data; "
            "bad = [m for m in ('ray', 'torch') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(("kwargs", "field", "fragment"), [
    ({"name": "mnist"}, "dataset_name", "mnist"),
    ({"validation_fraction": 1.0}, "validation_fraction", "1.0"),
    ({"validation_fraction": -0.1}, "validation_fraction", "-0.1"),
    ({"path": "x.csv", "feature_columns": "a,b"}, "feature_columns", "a,b"),
    ({"path": "x.csv", "feature_columns": ()}, "feature_columns", "()"),
    ({"path": "x.csv", "feature_columns": ("a", "a")}, "feature_columns", "a"),
    ({"path": "x.csv", "feature_columns": ("a", "y"), "label_column": "y"}, "feature_columns", "y"),
    ({"feature_columns": ("a",)}, "feature_columns", "a"),
    ({"validation_path": "v.csv"}, "validation_path", "v.csv"),
    ({"label_column": ""}, "label_column", "''"),
    ({"num_classes": 1}, "num_classes", "1"),
    ({"num_classes": 5}, "num_classes", "5"),
    ({"name": "synthetic", "synthetic_classes": 4, "num_classes": 3}, "num_classes", "3"),
    ({"synthetic_rows": 0}, "synthetic_rows", "0"),
    ({"synthetic_classes": 1}, "synthetic_classes", "1"),
    ({"synthetic_difficulty": float("nan")}, "synthetic_difficulty", "nan"),
    ({"name": "synthetic", "synthetic_image_shape": (3, 32)}, "synthetic_image_shape", "(3, 32)"),
    ({"name": "synthetic", "synthetic_image_shape": (3, 0, 8)}, "synthetic_image_shape", "(3, 0, 8)"),
    ({"synthetic_image_shape": (3, 8, 8)}, "synthetic_image_shape", "not to 'digits'"),
    ({"path": "x.csv", "synthetic_image_shape": (3, 8, 8)}, "synthetic_image_shape",
     "not to data read from a path"),
    ({"seed": -1}, "seed", "-1"),
    ({"standardize": "yes"}, "standardize", "yes"),
])
def test_config_rejects(kwargs: dict[str, Any], field: str, fragment: str) -> None:
    raises_config_error(lambda: DatasetConfig(**kwargs), field, fragment)


def test_config_normalizes_sequences() -> None:
    config = DatasetConfig(path="x.csv", feature_columns=["a", "b"])  # type: ignore[arg-type]
    assert config.feature_columns == ("a", "b")
    config = DatasetConfig(name="synthetic", synthetic_image_shape=[1, 8, 8])  # type: ignore[arg-type]
    assert config.synthetic_image_shape == (1, 8, 8)
    assert DatasetConfig().input_shape == (1, 8, 8)
    assert DatasetConfig(name="synthetic").input_shape == (32,)


def test_synthetic_arrays_are_seeded() -> None:
    config = DatasetConfig(name="synthetic", synthetic_rows=100, synthetic_features=5)
    first, second = synthetic_arrays(config), synthetic_arrays(config)
    other = synthetic_arrays(DatasetConfig(name="synthetic", synthetic_rows=100,
                                           synthetic_features=5, seed=1))
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[0], other[0])
    assert first[0].shape == (100, 5)
    assert np.bincount(first[1]).tolist() == [10] * 10


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_shape_rows_and_batches(digits: PreparedData) -> None:
    train_rows, validation_rows = split_sizes(DIGITS_ROWS, DEFAULT_VALIDATION_FRACTION)
    assert (digits.train_rows, digits.validation_rows) == (train_rows, validation_rows) == (1438, 359)
    assert digits.train.count() == train_rows
    assert digits.validation is not None and digits.validation.count() == validation_rows
    assert (digits.num_features, digits.num_classes, digits.input_shape) == (64, 10, (1, 8, 8))
    assert digits.train.columns() == ["features", "label"]
    import torch

    batch = next(iter(digits.train.iter_torch_batches(batch_size=16)))
    assert set(batch) == {"features", "label"}
    assert batch["features"].dtype == torch.float32 and batch["features"].shape == (16, 64)
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (16,)


def test_digits_scaler_fitted_on_training_split_only(digits: PreparedData) -> None:
    raw = load_data(DatasetConfig(standardize=False))
    raw_train, _ = arrays(raw.train)
    raw_validation, raw_labels = arrays(raw.validation)
    train, train_labels = arrays(digits.train)
    validation, validation_labels = arrays(digits.validation)
    # Same seed, same split: the raw and the standardized data hold the same rows.
    np.testing.assert_array_equal(validation_labels, raw_labels)
    assert raw_train.dtype == np.float32 and raw_train.max() == 16.0
    assert np.isfinite(train).all() and np.isfinite(validation).all()
    mean = raw_train.astype(np.float64).mean(axis=0)
    std = raw_train.astype(np.float64).std(axis=0)
    constant = std < 1e-8
    assert constant.any(), "digits has constant (all-zero) pixels"
    np.testing.assert_allclose(train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(train.std(axis=0), np.where(constant, 0, 1), atol=1e-4)
    expected = (raw_validation - mean) / np.where(constant, 1, std)
    np.testing.assert_allclose(validation, expected, rtol=1e-4, atol=1e-4)
    # Fitted on training rows only: the validation columns are not centred exactly.
    assert np.abs(validation.mean(axis=0)).max() > 1e-2
    assert len(train_labels) == 1438


def test_digits_split_is_seeded(digits: PreparedData) -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    label_of = {row.tobytes(): label for row, label in
                zip(bunch.data.astype(np.float32), bunch.target, strict=True)}
    seeded = load_data(DatasetConfig(standardize=False, validation_fraction=0.25, seed=1))
    assert (seeded.train_rows, seeded.validation_rows) == split_sizes(DIGITS_ROWS, 0.25)
    train, train_labels = arrays(seeded.train)
    validation, validation_labels = arrays(seeded.validation)
    # Every row is a digits row with its own label; together they are the whole dataset.
    for features, labels in ((train, train_labels), (validation, validation_labels)):
        assert [label_of[row.tobytes()] for row in features] == labels.tolist()
    assert len({row.tobytes() for row in np.vstack([train, validation])}) == len(label_of)
    _, seed0_labels = arrays(digits.validation)
    assert not np.array_equal(validation_labels[:359], seed0_labels)


def test_check_min_rows(digits: PreparedData) -> None:
    check_min_rows(digits, 1438)
    raises_config_error(lambda: check_min_rows(digits, 2048), "dataset", "1438", "2048")


# ---------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_is_learnable_and_split_exactly() -> None:
    from sklearn.linear_model import LogisticRegression

    prepared = load_data(DatasetConfig(name="synthetic", synthetic_rows=1000, validation_fraction=0.3))
    assert (prepared.train_rows, prepared.validation_rows) == (700, 300)
    assert (prepared.num_features, prepared.num_classes, prepared.input_shape) == (32, 10, (32,))
    train, train_labels = arrays(prepared.train)
    validation, validation_labels = arrays(prepared.validation)
    accuracy = LogisticRegression(max_iter=300).fit(train, train_labels).score(validation,
                                                                               validation_labels)
    assert accuracy > 0.6, accuracy  # chance is 0.1


def test_synthetic_images_and_wide_scaler() -> None:
    config = DatasetConfig(name="synthetic", synthetic_rows=300, synthetic_classes=4,
                           synthetic_image_shape=(3, 12, 12))
    prepared = load_data(config)
    assert prepared.input_shape == (3, 12, 12)
    assert prepared.num_features == 3 * 12 * 12 > data_pipeline.SCALER_COLUMN_LIMIT
    assert (prepared.train_rows, prepared.validation_rows, prepared.num_classes) == (240, 60, 4)
    train, _ = arrays(prepared.train)
    assert train.shape == (240, 432) and train.dtype == np.float32
    np.testing.assert_allclose(train.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(train.std(axis=0), 1, atol=1e-3)


def test_wide_scaler_matches_standard_scaler(monkeypatch: pytest.MonkeyPatch) -> None:
    # A constant column checks the std-below-epsilon rule of both paths.
    config = DatasetConfig(name="synthetic", synthetic_rows=200, synthetic_features=6)
    narrow = load_data(config)
    monkeypatch.setattr(data_pipeline, "SCALER_COLUMN_LIMIT", 0)
    wide = load_data(config)
    for left, right in ((narrow.train, wide.train), (narrow.validation, wide.validation)):
        left_features, left_labels = arrays(left)
        right_features, right_labels = arrays(right)
        np.testing.assert_array_equal(left_labels, right_labels)
        np.testing.assert_allclose(left_features, right_features, rtol=1e-5, atol=1e-5)


def test_no_validation_set() -> None:
    prepared = load_data(DatasetConfig(name="synthetic", synthetic_rows=64, validation_fraction=0))
    assert prepared.validation is None
    assert (prepared.train_rows, prepared.validation_rows) == (64, 0)


# ---------------------------------------------------------------------------------------------
# A user's CSV and Parquet files


def table(rows: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "a": rng.normal(size=rows),
        "b": rng.integers(0, 100, size=rows),
        "name": [f"row{i}" for i in range(rows)],
        "y": np.arange(rows) % 3,
        "c": rng.normal(size=rows) * 1000,
    })


def test_csv_named_columns(tmp_path: Path) -> None:
    frame = table()
    path = tmp_path / "data.csv"
    frame.to_csv(path, index=False)
    config = DatasetConfig(path=str(path), feature_columns=("b", "a"), label_column="y",
                           standardize=False, validation_fraction=0.25)
    prepared = load_data(config)
    assert (prepared.train_rows, prepared.validation_rows) == (30, 10)
    assert (prepared.num_features, prepared.num_classes, prepared.input_shape) == (2, 3, (2,))
    parts = [arrays(prepared.train), arrays(prepared.validation)]
    features = np.vstack([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    assert features.dtype == np.float32 and labels.dtype == np.int64
    # Raw values, in the order the feature columns were named; no row lost or duplicated.
    expected = frame[["b", "a"]].to_numpy(np.float32)
    np.testing.assert_allclose(sorted_rows(features, labels),
                               sorted_rows(expected, frame["y"].to_numpy()), rtol=1e-6)
    # The same seed gives the same split.
    again = load_data(config)
    np.testing.assert_array_equal(sorted_rows(*arrays(again.validation)),
                                  sorted_rows(*parts[1]))


def test_parquet_defaults_directory_and_validation_file(tmp_path: Path) -> None:
    frame = table(rows=30).drop(columns="name").rename(columns={"y": "label"})
    frame["label"] = frame["label"].astype(float)  # integral floats are fine labels
    directory = tmp_path / "train"
    directory.mkdir()
    frame.iloc[:12].to_parquet(directory / "part-0.parquet")
    frame.iloc[12:].to_parquet(directory / "part-1.parquet")
    (directory / "_SUCCESS").write_text("")
    validation = table(rows=9, seed=1).drop(columns="name").rename(columns={"y": "label"})
    validation.to_csv(tmp_path / "validation.csv", index=False)
    prepared = load_data(DatasetConfig(path=str(directory), validation_path=str(tmp_path / "validation.csv"),
                                       num_classes=4))
    # Every column but the label, in file order; the validation file is used whole.
    assert (prepared.train_rows, prepared.validation_rows) == (30, 9)
    assert (prepared.num_features, prepared.num_classes) == (3, 4)
    train, labels = arrays(prepared.train)
    assert labels.dtype == np.int64 and sorted(labels.tolist()) == sorted(frame["label"].astype(int))
    np.testing.assert_allclose(train.mean(axis=0), 0, atol=1e-5)
    # Validation is scaled with the training statistics, not its own.
    columns = ["a", "b", "c"]
    mean, std = frame[columns].mean().to_numpy(), frame[columns].std(ddof=0).to_numpy()
    expected = (validation[columns].to_numpy() - mean) / std
    np.testing.assert_allclose(sorted_rows(*arrays(prepared.validation)),
                               sorted_rows(expected, validation["label"].to_numpy()),
                               rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Every check of a user's data names the field and the value


# Most checks read CSV: Ray 2.60's Parquet reader starts footer-reader actors on every read, which
# costs seconds on a 2-core machine, and the checks run on the same table whatever the format.
def write(tmp_path: Path, frame: pd.DataFrame, name: str = "data.csv") -> str:
    path = tmp_path / name
    if name.endswith(".csv"):
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    return str(path)


def test_missing_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.parquet")
    raises_config_error(lambda: load_data(DatasetConfig(path=missing)), "data_path", missing,
                        "does not exist")


def test_unknown_file_type(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("a,b\n1,2\n")
    raises_config_error(lambda: load_data(DatasetConfig(path=str(path))), "data_path", str(path))
    empty_directory = tmp_path / "empty"
    empty_directory.mkdir()
    raises_config_error(lambda: load_data(DatasetConfig(path=str(empty_directory))), "data_path",
                        str(empty_directory), "no .parquet")


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet at all" * 10)
    raises_config_error(lambda: load_data(DatasetConfig(path=str(path))), "data_path", str(path),
                        "could not be read as Parquet")


def test_empty_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    raises_config_error(lambda: load_data(DatasetConfig(path=str(empty))), "dataset", str(empty),
                        "empty")
    header_only = tmp_path / "header.csv"
    header_only.write_text("a,b,label\n")
    raises_config_error(lambda: load_data(DatasetConfig(path=str(header_only))), "dataset",
                        str(header_only), "no rows")


def test_missing_label_column_lists_columns(tmp_path: Path) -> None:
    path = write(tmp_path, table())
    raises_config_error(lambda: load_data(DatasetConfig(path=path, label_column="target")),
                        "label_column", "target", "a, b, name, y, c")


def test_missing_feature_column(tmp_path: Path) -> None:
    path = write(tmp_path, table())
    raises_config_error(
        lambda: load_data(DatasetConfig(path=path, label_column="y", feature_columns=("a", "zz"))),
        "feature_columns", "zz", "a, b, name, y, c")


def test_non_numeric_feature(tmp_path: Path) -> None:
    path = write(tmp_path, table())
    # Default features are every column but the label, which includes the text column.
    raises_config_error(lambda: load_data(DatasetConfig(path=path, label_column="y")),
                        "feature_columns", "name", "string")


@pytest.mark.parametrize(("bad", "shown", "name"), [
    (np.nan, "nan", "data.parquet"),  # a CSV reader turns "nan" into null
    (-np.inf, "-inf", "data.csv"),
    (None, "null", "data.csv"),
])
def test_non_finite_feature(tmp_path: Path, bad: float | None, shown: str, name: str) -> None:
    frame = table().drop(columns="name")
    frame["c"] = frame["c"].astype(object)
    frame.loc[7, "c"] = bad
    frame["c"] = frame["c"].astype(float)
    path = write(tmp_path, frame, name)
    raises_config_error(lambda: load_data(DatasetConfig(path=path, label_column="y")),
                        "feature_columns", "'c'", shown)


@pytest.mark.parametrize(("labels", "num_classes", "fragments"), [
    ([0, 1, -1, 2], None, ("negative label -1",)),
    ([0, 1, 2.5, 2], None, ("non-integer label 2.5",)),
    ([0, 1, float("nan"), 2], None, ("missing",)),  # CSV reads an empty cell as null
    ([0, 1, 2, 2], 2, ("label 2", "num_classes=2")),
    (["x", "y", "x", "y"], None, ("string",)),
])
def test_bad_labels(tmp_path: Path, labels: list[Any], num_classes: int | None,
                    fragments: tuple[str, ...]) -> None:
    path = write(tmp_path, pd.DataFrame({"a": [0.1, 0.2, 0.3, 0.4], "label": labels}))
    raises_config_error(lambda: load_data(DatasetConfig(path=path, num_classes=num_classes)),
                        "label_column", "'label'", *fragments)


def test_validation_file_is_checked_too(tmp_path: Path) -> None:
    path = write(tmp_path, table().drop(columns="name"))
    validation = write(tmp_path, table().drop(columns=["name", "c"]), "validation.csv")
    raises_config_error(
        lambda: load_data(DatasetConfig(path=path, label_column="y", validation_path=validation)),
        "feature_columns", "'c'", "validation data", validation)
