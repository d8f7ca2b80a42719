"""A user's Parquet/CSV files: find them, read them once, check every column and value, and
hand them to :mod:`ray_sebs.data_pipeline` under fixed column names.

:func:`resolve_source` checks a path without Ray, so the CLI refuses a missing, empty or
unreadable file before it starts a cluster; the rest needs a running Ray.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ray_sebs.data import PreparedData, split_sizes
from ray_sebs.data_pipeline import LABEL, internal_feature_names, preprocess, with_loading_settings
from ray_sebs.errors import ConfigError, format_number, root_cause_line

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    import ray.data

    from ray_sebs.data import DatasetConfig

# Ray Data path of a user's file, by extension. ".pq" is a common Parquet spelling.
_FORMATS_BY_EXTENSION: dict[str, str] = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class Source:
    """A checked file or directory: what the user typed, what Ray reads, and its format."""

    given: str
    resolved: str
    file_format: str
    field: str
    role: str


@dataclass(frozen=True)
class _Health:
    """What the pass over checked data reports for later use."""

    rows: int
    label_max: float


def load_files(config: DatasetConfig) -> PreparedData:
    """``config.path`` (and ``config.validation_path``) read, checked and preprocessed."""
    assert config.path is not None
    source = resolve_source(config.path, "data_path", "data")
    raw = _read(source)
    feature_columns = _check_columns(raw, source, config.feature_columns, config.label_column)
    health = _check_values(raw, source, feature_columns, config.label_column, config.num_classes)
    names = internal_feature_names(len(feature_columns))
    data = _canonical(raw, feature_columns, config.label_column, names)
    label_max = health.label_max
    if config.validation_path is not None:
        validation_source = resolve_source(config.validation_path, "validation_path",
                                            "validation data")
        validation_raw = _read(validation_source)
        _check_columns(validation_raw, validation_source, feature_columns, config.label_column)
        validation_health = _check_values(validation_raw, validation_source, feature_columns,
                                          config.label_column, config.num_classes)
        label_max = max(label_max, validation_health.label_max)
        train: ray.data.Dataset = data
        validation: ray.data.Dataset | None = _canonical(validation_raw, feature_columns,
                                                          config.label_column, names)
        train_rows, validation_rows = health.rows, validation_health.rows
    else:
        train_rows, validation_rows = split_sizes(health.rows, config.validation_fraction)
        if train_rows < 1:
            raise ConfigError("validation_fraction", config.validation_fraction,
                              f"leaves no training rows out of {health.rows}",
                              "use a smaller validation fraction or more rows")
        if validation_rows:
            shuffled = with_loading_settings(data).random_shuffle(seed=config.seed)
            train, validation = with_loading_settings(shuffled).split_at_indices([train_rows])
        else:
            train, validation = data, None
    num_classes = config.num_classes or int(label_max) + 1
    if num_classes < 2:
        raise ConfigError("label_column", config.label_column,
                          f"has a single class (every label is 0) in {source.given}",
                          "train on data with at least two classes, or set num_classes")
    train, validation = preprocess(train, validation, names, config.standardize)
    return PreparedData(train=train, validation=validation, train_rows=train_rows,
                        validation_rows=validation_rows, num_features=len(feature_columns),
                        num_classes=num_classes, input_shape=(len(feature_columns),))


def _file_format(name: str) -> str | None:
    return _FORMATS_BY_EXTENSION.get(os.path.splitext(name)[1].lower())


def resolve_source(path: str, field: str, role: str) -> Source:
    """Check that ``path`` exists, is readable and holds Parquet or CSV files, without Ray."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    filesystem: pafs.FileSystem
    if "://" in path:
        try:
            filesystem, inner = pafs.FileSystem.from_uri(path)
        except (pa.ArrowException, OSError, ValueError) as error:
            raise ConfigError(field, path, f"cannot be accessed ({root_cause_line(error)})",
                              "check the URI and the credentials for it") from None
        resolved = path
    else:
        filesystem = pafs.LocalFileSystem()
        inner = resolved = os.path.abspath(os.path.expanduser(path))
    try:
        info = filesystem.get_file_info(inner)
    except (pa.ArrowException, OSError) as error:
        raise ConfigError(field, path, f"cannot be accessed ({root_cause_line(error)})",
                          "check the path and its permissions") from None
    empty_field = "dataset" if field == "data_path" else field
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(field, path, "does not exist", f"give an existing Parquet or CSV file "
                          f"or directory for the {role}")
    if info.type == pafs.FileType.File:
        file_format = _file_format(info.base_name)
        if file_format is None:
            raise ConfigError(field, path, "is not a Parquet or CSV file (judged by its extension)",
                              "use a .parquet, .pq or .csv file, or a directory of them")
        sizes = [info.size]
        files = [inner]
    elif info.type == pafs.FileType.Directory:
        try:
            entries = filesystem.get_file_info(pafs.FileSelector(inner, recursive=True))
        except (pa.ArrowException, OSError) as error:
            raise ConfigError(field, path, f"cannot be listed ({root_cause_line(error)})",
                              "check the directory's permissions") from None
        # Hidden and marker files (.crc, _SUCCESS, _metadata) are skipped by the readers too.
        data_files = [e for e in entries if e.type == pafs.FileType.File
                      and not e.base_name.startswith((".", "_")) and _file_format(e.base_name)]
        formats = {_FORMATS_BY_EXTENSION[os.path.splitext(e.base_name)[1].lower()]
                   for e in data_files}
        if not formats:
            raise ConfigError(field, path, "contains no .parquet, .pq or .csv files",
                              f"point the {role} at a directory of Parquet or CSV files")
        if len(formats) > 1:
            raise ConfigError(field, path, "mixes Parquet and CSV files",
                              "keep one format per directory")
        file_format = formats.pop()
        sizes = [e.size for e in data_files]
        files = [e.path for e in data_files]
    else:
        raise ConfigError(field, path, "is neither a file nor a directory",
                          "give a Parquet or CSV file or directory")
    if all(size == 0 for size in sizes):
        raise ConfigError(empty_field, path, f"is empty (0 bytes): the {role} has no rows",
                          f"point the {role} at a file with rows")
    if isinstance(filesystem, pafs.LocalFileSystem):
        unreadable = [f for f in files if not os.access(f, os.R_OK)]
        if unreadable:
            raise ConfigError(field, path, f"is not readable ({unreadable[0]}: permission denied)",
                              "fix the file permissions")
    return Source(given=path, resolved=resolved, file_format=file_format, field=field, role=role)


def _read(source: Source) -> ray.data.Dataset:
    """Read and materialize the files once: the checks, the split and the scaler all reuse it."""
    import ray.data

    try:
        if source.file_format == "parquet":
            dataset = ray.data.read_parquet(source.resolved, file_extensions=["parquet", "pq"])
        else:
            dataset = ray.data.read_csv(source.resolved, file_extensions=["csv"])
        dataset = with_loading_settings(dataset).materialize()
    except ConfigError:
        raise
    except Exception as error:
        kind = "Parquet" if source.file_format == "parquet" else "CSV"
        raise ConfigError(source.field, source.given, f"could not be read as {kind} "
                          f"({root_cause_line(error)})", f"check that it is a valid {kind} file") from None
    if dataset.count() == 0:
        raise ConfigError("dataset" if source.field == "data_path" else source.field, source.given,
                          f"has no rows: the {source.role} is empty",
                          f"point the {source.role} at a file with rows")
    return dataset


def _check_columns(dataset: ray.data.Dataset, source: Source,
                   feature_columns: tuple[str, ...] | None, label_column: str) -> tuple[str, ...]:
    """Check the label and feature columns exist and are numeric; return the feature columns."""
    import pyarrow as pa

    schema = dataset.schema()
    assert schema is not None
    types = dict(zip(schema.names, schema.types, strict=True))
    available = ", ".join(schema.names)
    where = f"the {source.role} {source.given}"
    if label_column not in types:
        raise ConfigError("label_column", label_column, f"is not a column of {where}; its columns "
                          f"are: {available}", "set the label column to one of these")
    if feature_columns is None:
        feature_columns = tuple(name for name in schema.names if name != label_column)
        if not feature_columns:
            raise ConfigError("feature_columns", (), f"{where} has no column besides the label "
                              f"{label_column!r}", "add feature columns to the data")
    missing = [name for name in feature_columns if name not in types]
    if missing:
        raise ConfigError("feature_columns", missing[0] if len(missing) == 1 else tuple(missing),
                          f"{'is not a column' if len(missing) == 1 else 'are not columns'} of "
                          f"{where}; its columns are: {available}",
                          "list only existing columns as features")
    for name in feature_columns:
        column_type = types[name]
        if not isinstance(column_type, pa.DataType) or not (
                pa.types.is_integer(column_type) or pa.types.is_floating(column_type)
                or pa.types.is_boolean(column_type)):
            raise ConfigError("feature_columns", name, f"has non-numeric type {column_type} in "
                              f"{where}; features must be numbers",
                              "encode it as numbers or leave it out of the feature columns")
    label_type = types[label_column]
    if not isinstance(label_type, pa.DataType) or not (
            pa.types.is_integer(label_type) or pa.types.is_floating(label_type)):
        raise ConfigError("label_column", label_column, f"has type {label_type} in {where}; labels "
                          "must be integer class ids 0..num_classes-1",
                          "encode the classes as integers 0, 1, 2, ...")
    return feature_columns


def _check_values(dataset: ray.data.Dataset, source: Source, feature_columns: tuple[str, ...],
                  label_column: str, num_classes: int | None) -> _Health:
    """One Ray Data pass over every block: missing/non-finite values, label range and integrality."""
    stats = dataset.map_batches(_block_health, batch_format="pyarrow", batch_size=None,
                                zero_copy_batch=True,
                                fn_kwargs={"features": feature_columns, "label": label_column})
    frame = stats.to_pandas()
    where = f"the {source.role} {source.given}"
    for index, name in enumerate(feature_columns):
        bad = int(frame[f"feature_{index}_bad"].sum())
        if bad:
            example = _first_example(frame, f"feature_{index}_example")
            raise ConfigError("feature_columns", name, f"has {bad} missing or non-finite value(s) "
                              f"(e.g. {example}) in {where}",
                              "fill or drop those rows, or leave the column out of the features")
    bad = int(frame["label_bad"].sum())
    if bad:
        raise ConfigError("label_column", label_column, f"has {bad} missing or non-finite "
                          f"label(s) (e.g. {_first_example(frame, 'label_example')}) in {where}",
                          "drop those rows or give every row a class id")
    if int(frame["label_fractional"].sum()):
        example = _first_example(frame, "label_fractional_example")
        raise ConfigError("label_column", label_column, f"has non-integer label {example} in "
                          f"{where}; labels must be integer class ids 0..num_classes-1",
                          "encode the classes as integers 0, 1, 2, ...")
    label_min, label_max = float(frame["label_min"].min()), float(frame["label_max"].max())
    if label_min < 0:
        raise ConfigError("label_column", label_column, f"has negative label {format_number(label_min)} "
                          f"in {where}; labels must be class ids 0..num_classes-1",
                          "renumber the classes from 0")
    if num_classes is not None and label_max >= num_classes:
        raise ConfigError("label_column", label_column, f"has label {format_number(label_max)} in "
                          f"{where}, but num_classes={num_classes} allows only 0..{num_classes - 1}",
                          f"set num_classes to at least {format_number(label_max + 1)}, or leave it unset "
                          "to infer it")
    return _Health(rows=int(frame["rows"].sum()), label_max=label_max)


def _block_health(table: pa.Table, *, features: tuple[str, ...], label: str) -> dict[str, list[Any]]:
    """Counts and first examples of bad values in one block (runs in a Ray Data task)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    stats: dict[str, list[Any]] = {"rows": [table.num_rows]}
    for index, name in enumerate(features):
        count, example = _non_finite(table.column(name))
        stats[f"feature_{index}_bad"] = [count]
        stats[f"feature_{index}_example"] = [example]
    column = table.column(label)
    count, example = _non_finite(column)
    stats["label_bad"], stats["label_example"] = [count], [example]
    if pa.types.is_floating(column.type):
        finite = pc.filter(column, pc.is_finite(column))
        fractional = pc.filter(finite, pc.not_equal(finite, pc.floor(finite)))
        stats["label_fractional"] = [len(fractional)]
        stats["label_fractional_example"] = [format_number(fractional[0].as_py()) if len(fractional)
                                             else ""]
    else:
        finite = column.drop_null()
        stats["label_fractional"], stats["label_fractional_example"] = [0], [""]
    bounds = pc.min_max(finite)
    low, high = bounds["min"].as_py(), bounds["max"].as_py()
    stats["label_min"] = [math.inf if low is None else float(low)]
    stats["label_max"] = [-math.inf if high is None else float(high)]
    return stats


def _non_finite(column: pa.ChunkedArray) -> tuple[int, str]:
    """(count of null, NaN and infinite values, the first of them as text)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    nulls = column.null_count
    if not pa.types.is_floating(column.type):
        return nulls, "null" if nulls else ""
    bad = pc.filter(column, pc.invert(pc.is_finite(column)))
    example = "null" if nulls else (format_number(bad[0].as_py()) if len(bad) else "")
    return nulls + len(bad), example


def _canonical(dataset: ray.data.Dataset, feature_columns: tuple[str, ...], label_column: str,
               names: list[str]) -> ray.data.Dataset:
    """Keep the feature and label columns under internal names, as float64 and int64."""
    return dataset.map_batches(_canonical_block, batch_format="pyarrow", batch_size=None,
                               zero_copy_batch=True,
                               fn_kwargs={"features": feature_columns, "label": label_column,
                                          "names": names})


def _canonical_block(table: pa.Table, *, features: tuple[str, ...], label: str,
                     names: list[str]) -> pa.Table:
    import pyarrow as pa

    columns = [table.column(name).cast(pa.float64()) for name in features]
    # The checks ran first: labels are finite, integral and >= 0, so this cast is exact.
    columns.append(table.column(label).cast(pa.int64()))
    return pa.table(columns, names=[*names, LABEL])


def _first_example(frame: pd.DataFrame, column: str) -> str:
    return next((value for value in frame[column] if value), "?")
