"""Bad input, as a table: every case is refused with one message that names what is wrong, the
value and the fix, before any training worker starts; the CLI exits non-zero without a traceback.

Four ways in: the Python API (a :class:`ConfigError`), ``ray_sebs.cli.main`` in this process,
a real ``ray-sebs`` process, and the job entrypoint ``python jobs/train_sebs.py``. Most cases fail
before Ray starts; the ones about a file's columns and values need Ray Data to read it and run on
the module's local cluster.

A "micro-batch cap too small for the model" has one meaning here: ``--max-micro-batch`` below 1.
No model in :mod:`ray_sebs.models` needs a minimum micro-batch (there is no batch normalization,
and a micro-batch of 1 row, or 0 rows on an uneven split, trains correctly), so any cap >= 1 is
accepted; a small one only costs more accumulation steps.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_sebs import ClusterConfig, ScheduleConfig
from ray_sebs.cli import main
from ray_sebs.data import DatasetConfig, load_data
from ray_sebs.errors import ConfigError
from ray_sebs.models import build_model, check_model
from ray_sebs.optim import OptimizerConfig
from ray_sebs.trainer import SEBSTrainer

REPO = Path(__file__).resolve().parents[1]
RAY_SEBS = Path(sys.executable).with_name("ray-sebs")


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """Tiny data files, good and bad, in ``tmp_path``."""
    rng = np.random.default_rng(0)
    good = pd.DataFrame({"a": rng.normal(size=40), "b": rng.normal(size=40),
                         "label": np.arange(40) % 3})
    good.to_csv(tmp_path / "good.csv", index=False)
    good.assign(c=["x"] * 40).to_csv(tmp_path / "strings.csv", index=False)
    good.assign(a=good["a"].where(good.index != 7)).to_csv(tmp_path / "nan.csv", index=False)
    good.assign(label=good["label"].replace(2, 3)).to_csv(tmp_path / "label3.csv", index=False)
    good.assign(label=good["label"] - 1).to_csv(tmp_path / "negative.csv", index=False)
    good.head(10).to_csv(tmp_path / "tiny.csv", index=False)
    (tmp_path / "header.csv").write_text("a,b,label\n")
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "bad.parquet").write_bytes(b"this is not a parquet file")
    (tmp_path / "notes.txt").write_text("a,b,label\n1,2,0\n")
    (tmp_path / "nodata").mkdir()
    (tmp_path / "nodata" / "README").write_text("no data here")
    (tmp_path / "mixed").mkdir()
    good.to_csv(tmp_path / "mixed" / "part-0.csv", index=False)
    pq.write_table(pa.Table.from_pandas(good), tmp_path / "mixed" / "part-1.parquet")
    (tmp_path / "afile").write_text("a file, not a directory")
    return tmp_path


def one_error_line(stderr: str, prefix: str = "ray-sebs train: error: ") -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("ray-sebs train:")]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(prefix), lines[0]
    assert "Traceback" not in stderr
    return lines[0]


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    try:
        code = main(["train", *argv])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    captured = capsys.readouterr()
    assert code == 2, captured
    assert "Traceback" not in captured.out
    return one_error_line(captured.err)


def fill(text: str, directory: Path) -> str:
    return text.replace("{d}", str(directory))


def expand(argv: list[str], directory: Path) -> list[str]:
    return [fill(part, directory) for part in argv]


# ---------------------------------------------------------------------------------------------
# The CLI, before Ray starts: (flags, what the one line must say). "{d}" is the files directory.

BEFORE_RAY = [
    pytest.param(["--ratio", "0.5"], "--ratio=0.5: must be a number >= 1; use 1 for a constant batch",
                 id="ratio-below-1"),
    pytest.param(["--batch-size", "0"], "--batch-size=0: must be >= 1", id="batch-size-0"),
    pytest.param(["--batch-size", "abc"], "argument --batch-size: invalid int value: 'abc'",
                 id="batch-size-not-a-number"),
    pytest.param(["--stages", "4", "--epochs-per-stage", "5,5"],
                 "--epochs-per-stage='5,5': gives 2 values for 4 stages; give one value, or exactly 4",
                 id="epochs-per-stage-count"),
    pytest.param(["--lr", "nan"], "--lr=nan: must be a positive number; use e.g. 0.1", id="lr-nan"),
    pytest.param(["--max-batch-size", "4"], "--max-batch-size=4: is below the first batch (16)",
                 id="cap-below-first-batch"),
    pytest.param(["--batch-granularity", "3"],
                 "--batch-size=16: is not a multiple of batch_granularity=3", id="granularity"),
    pytest.param(["--min-workers", "3", "--max-workers", "2"],
                 "--min-workers=3: is above max_workers=2; make min workers <= max workers",
                 id="min-above-max-workers"),
    pytest.param(["--max-micro-batch", "0"],
                 "--max-micro-batch=0: must be an integer >= 1; use the largest micro-batch one "
                 "worker fits, at least 1", id="micro-batch-cap-0"),
    pytest.param(["--resources-per-worker", "CPU=-1"],
                 "--resources-per-worker={'CPU': -1.0}: resource 'CPU' has amount -1.0",
                 id="negative-resource"),
    pytest.param(["--use-gpu", "--resources-per-worker", "CPU=1,GPU=0.5"],
                 "--resources-per-worker={'CPU': 1.0, 'GPU': 0.5}: gives each worker GPU=0.5 with "
                 "--use-gpu, but NCCL refuses two workers on one GPU", id="fractional-gpu-nccl"),
    pytest.param(["--optimizer", "lion"], "argument --optimizer: invalid choice: 'lion' (choose from",
                 id="unknown-optimizer"),
    pytest.param(["--model", "resnet"],
                 "--model='resnet': is not a known model; use one of logreg, mlp, cnn",
                 id="unknown-model"),
    pytest.param(["--model", "cnn", "--dataset", "synthetic"],
                 "--model='cnn': needs image input (C, H, W) with H and W >= 4, but the data has "
                 "input shape (32,)", id="cnn-on-flat-data"),
    pytest.param(["--dataset", "synthetic", "--image-shape", "3,32"],
                 "--image-shape=(3, 32): must be three positive integers (C, H, W); use e.g. 3,32,32",
                 id="image-shape-two-values"),
    pytest.param(["--dataset", "synthetic", "--image-shape", "3,0,8"],
                 "--image-shape=(3, 0, 8): must be three positive integers", id="image-shape-zero"),
    pytest.param(["--dataset", "synthetic", "--image-shape", "3,a,8"],
                 "argument --image-shape: '3,a,8' is not an integer or a comma list",
                 id="image-shape-not-integers"),
    pytest.param(["--image-shape", "3,8,8"],
                 "--image-shape='3,8,8': only applies to the synthetic dataset, not to 'digits'; use "
                 "the synthetic dataset (--dataset synthetic)", id="image-shape-on-digits"),
    pytest.param(["--dataset", "synthetic", "--image-shape", "3,2,2", "--model", "cnn"],
                 "--model='cnn': needs image input (C, H, W) with H and W >= 4, but the data has "
                 "input shape (3, 2, 2)", id="image-shape-too-small-for-cnn"),
    pytest.param(["--data", "{d}/missing.csv"],
                 "--data='{d}/missing.csv': does not exist; give an existing Parquet or CSV file",
                 id="data-missing"),
    pytest.param(["--data", "{d}/nodata"],
                 "--data='{d}/nodata': contains no .parquet, .pq or .csv files", id="data-dir-empty"),
    pytest.param(["--data", "{d}/empty.csv"], "--data='{d}/empty.csv': is empty (0 bytes)",
                 id="data-0-bytes"),
    pytest.param(["--data", "{d}/notes.txt"],
                 "--data='{d}/notes.txt': is not a Parquet or CSV file", id="data-wrong-format"),
    pytest.param(["--data", "{d}/mixed"], "--data='{d}/mixed': mixes Parquet and CSV files",
                 id="data-mixed-formats"),
    pytest.param(["--data", "{d}/good.csv", "--validation-data", "{d}/missing.parquet"],
                 "--validation-data='{d}/missing.parquet': does not exist", id="validation-missing"),
    pytest.param(["--validation-fraction", "1.5"],
                 "--validation-fraction=1.5: must be a number in [0, 1)", id="validation-fraction"),
    pytest.param(["--num-classes", "1"], "--num-classes=1: must be >= 2", id="one-class"),
    pytest.param(["--feature-columns", "a,b"],
                 "--feature-columns='a,b': only applies to data read from a path",
                 id="feature-columns-without-data"),
    pytest.param(["--seed", "-1"], "--seed=-1: must be >= 0", id="negative-seed"),
    pytest.param(["--max-failures", "-2"], "--max-failures=-2: must be >= 0, or -1 for no limit",
                 id="max-failures"),
    pytest.param(["--num-cpus", "0"], "--num-cpus=0: must be >= 1", id="num-cpus-0"),
    pytest.param(["--prefetch-lead-time", "-1"],
                 "--prefetch-lead-time=-1.0: must be a finite number of seconds >= 0",
                 id="prefetch-lead-time"),
    pytest.param(["--storage-path", "{d}/afile/runs"],
                 "--storage-path='{d}/afile/runs': is not writable (Not a directory); pass a "
                 "writable directory", id="storage-not-writable"),
    pytest.param(["--address", "127.0.0.1:1"],
                 "--address='127.0.0.1:1': no Ray cluster answers there (Connection refused); "
                 "start one with `ray start --head`", id="address-without-cluster"),
]


@pytest.mark.parametrize(("argv", "expected"), BEFORE_RAY)
def test_cli_refuses_before_ray_starts(argv, expected, files, capsys):
    import ray

    started = ray.is_initialized()
    # A writable storage path first: a case's own --storage-path comes later and wins.
    line = run_main(["--storage-path", str(files / "runs"), *expand(argv, files)], capsys)
    assert fill(expected, files) in line, line
    assert ray.is_initialized() == started, "Ray started for a check that does not need it"


# ---------------------------------------------------------------------------------------------
# The CLI, on data Ray Data has to read (the module's local cluster).

ON_DATA = [
    pytest.param(["--data", "{d}/good.csv", "--label-column", "y"],
                 "--label-column='y': is not a column of the data {d}/good.csv; its columns are: a, "
                 "b, label", id="label-column-missing"),
    pytest.param(["--data", "{d}/good.csv", "--feature-columns", "a,zz"],
                 "--feature-columns='zz': is not a column of the data", id="feature-column-missing"),
    pytest.param(["--data", "{d}/strings.csv"],
                 "--feature-columns='c': has non-numeric type string", id="non-numeric-feature"),
    pytest.param(["--data", "{d}/nan.csv"],
                 "--feature-columns='a': has 1 missing or non-finite value(s) (e.g. null)",
                 id="nan-feature"),
    pytest.param(["--data", "{d}/label3.csv", "--num-classes", "3"],
                 "--label-column='label': has label 3 in the data {d}/label3.csv, but num_classes=3 "
                 "allows only 0..2", id="label-above-classes"),
    pytest.param(["--data", "{d}/negative.csv"], "--label-column='label': has negative label -1",
                 id="negative-label"),
    pytest.param(["--data", "{d}/header.csv"],
                 "--data='{d}/header.csv': has no rows: the data is empty", id="header-only"),
    pytest.param(["--data", "{d}/tiny.csv"],
                 "--batch-size=16: is more than the 8 training rows of the data, so no epoch would "
                 "make an update; use a batch size of at most 8", id="smaller-than-one-batch"),
    pytest.param(["--data", "{d}/bad.parquet"],
                 "--data='{d}/bad.parquet': could not be read as Parquet", id="unreadable-parquet"),
    pytest.param(["--data", "{d}/good.csv", "--stages", "1", "--min-workers", "32", "--max-workers", "32"],
                 "--min-workers=32: exceeds the first global batch (16)", id="more-workers-than-batch"),
    pytest.param(["--data", "{d}/good.csv", "--stages", "3"],
                 "--data='{d}/good.csv': has 32 training rows, smaller than stage 3's global batch of "
                 "64; use more data", id="data-smaller-than-a-later-batch"),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("argv", "expected"), ON_DATA)
def test_cli_refuses_bad_data_before_any_worker_starts(argv, expected, files, capsys, ray_cluster):
    line = run_main(["--storage-path", str(files / "runs"), *expand(argv, files)], capsys)
    assert fill(expected, files) in line, line
    # Refused before the trainer started: it would have made the run's directory first.
    assert not any((files / "runs").iterdir())


@pytest.mark.timeout(120)
def test_use_gpu_on_a_cluster_without_gpus_is_one_line_in_seconds(files, capsys, ray_cluster):
    # The module's local Ray has no GPU (this machine has none): the real case, nothing mocked.
    import ray

    assert ray.cluster_resources().get("GPU", 0) == 0
    started = time.perf_counter()
    line = run_main(["--storage-path", str(files / "runs"), "--use-gpu", "--stages", "1",
                     "--epochs-per-stage", "1"], capsys)
    assert time.perf_counter() - started < 30  # no worker group started (NCCL would take ~80 s)
    assert line == ("ray-sebs train: error: --use-gpu=True: the cluster has no GPUs; drop --use-gpu "
                    "to train on CPUs with gloo, or pass --address of a cluster with GPUs (set "
                    "RAY_SEBS_AUTOSCALING=1 on one that adds GPU nodes on demand)")
    assert not any((files / "runs").iterdir())


@pytest.mark.timeout(300)
def test_synthetic_images_train_the_cnn_from_the_cli(files, capsys, ray_cluster):
    # The good side of --image-shape: `--dataset synthetic --model cnn` is refused on flat data
    # (BEFORE_RAY), and trains once the data is image-shaped.
    code = main(["train", "--storage-path", str(files / "runs"), "--name", "cnn", "--dataset",
                 "synthetic", "--synthetic-rows", "64", "--image-shape", "3,8,8", "--model", "cnn",
                 "--batch-size", "8", "--stages", "1", "--epochs-per-stage", "1", "--max-workers", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "final validation accuracy" in captured.out
    assert (files / "runs" / "cnn" / "history.json").exists()


# ---------------------------------------------------------------------------------------------
# The Python API: each call raises ConfigError naming the field, the value and the fix.

API: list[tuple[str, Callable[[Path], object], str]] = [
    ("ratio", lambda d: ScheduleConfig(growth_ratio=0.5), "growth_ratio=0.5: must be a number >= 1"),
    ("epochs", lambda d: ScheduleConfig(num_stages=2, epochs_per_stage=(1, 0)),
     "epochs_per_stage=0: must be >= 1"),
    ("micro-batch-cap", lambda d: ClusterConfig(max_micro_batch=0), "max_micro_batch=0: must be an integer"),
    ("optimizer", lambda d: OptimizerConfig(name="lion"), "optimizer='lion': unknown optimizer; use one of"),
    ("trainer-optimizer", lambda d: SEBSTrainer(lambda: None, datasets={"train": None},
                                                schedule=ScheduleConfig(), optimizer="lion"),
     "optimizer='lion'"),
    ("no-train-dataset", lambda d: SEBSTrainer(lambda: None, datasets={"valid": None},
                                               schedule=ScheduleConfig()),
     "datasets=['valid']: has no 'train' dataset; pass datasets={'train': ..., 'validation': ...}"),
    ("model", lambda d: build_model("transformer", (64,), 10), "model='transformer': is not a known model"),
    ("cnn-input", lambda d: check_model("cnn", (6,)), "model='cnn': needs image input"),
    ("data-missing", lambda d: load_data(DatasetConfig(path=str(d / "missing.csv"))),
     "data_path='{d}/missing.csv': does not exist"),
    ("validation-fraction", lambda d: DatasetConfig(validation_fraction=1.0),
     "validation_fraction=1.0: must be a number in [0, 1)"),
]


@pytest.mark.parametrize(("case", "call", "expected"), API, ids=[case for case, _, _ in API])
def test_python_api_raises_config_error(case, call, expected, files):
    with pytest.raises(ConfigError) as info:
        call(files)
    message = str(info.value)
    assert fill(expected, files) in message, message
    assert "; " in message and "\n" not in message  # problem; fix -- on one line


# ---------------------------------------------------------------------------------------------
# Real processes: the installed `ray-sebs` and the job entrypoint.

PROCESSES = [
    pytest.param([str(RAY_SEBS), "train", "--ratio", "0.5"], "--ratio=0.5: must be a number >= 1",
                 id="ray-sebs-ratio"),
    pytest.param([str(RAY_SEBS), "train", "--address", "127.0.0.1:1"],
                 "--address='127.0.0.1:1': no Ray cluster answers there", id="ray-sebs-no-cluster"),
    pytest.param([str(RAY_SEBS), "train", "--data", "{d}/missing.csv"],
                 "--data='{d}/missing.csv': does not exist", id="ray-sebs-data-missing"),
    pytest.param([sys.executable, str(REPO / "jobs" / "train_sebs.py"), "--model", "resnet"],
                 "--model='resnet': is not a known model", id="job-unknown-model"),
    pytest.param([sys.executable, str(REPO / "jobs" / "train_sebs.py"), "--storage-path",
                  "{d}/afile/runs"], "--storage-path='{d}/afile/runs': is not writable",
                 id="job-storage-not-writable"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("command", "expected"), PROCESSES)
def test_processes_exit_2_with_one_line(command, expected, files):
    started = time.monotonic()
    done = subprocess.run(expand(command, files), capture_output=True, text=True, timeout=90,
                          cwd=files, env=os.environ | {"RAY_ADDRESS": ""})
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == ""
    line = one_error_line(done.stderr)
    assert done.stderr.strip() == line
    assert fill(expected, files) in line, line
    assert time.monotonic() - started < 60, "bad input must fail fast"
