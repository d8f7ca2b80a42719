"""Every benchmark at its ``--smoke`` size, so the scripts cannot rot.

The two without Ray run as the command users type (a subprocess). The five Ray ones run in this
process on the module's shared local Ray (one start instead of five), each with at most one small
``fit()`` per variant it compares. Figures are not checked, only that each script runs end to end
and prints its table and verdict.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_script(name: str, *args: str) -> str:
    process = subprocess.run([sys.executable, str(BENCHMARKS / name), "--smoke", *args],
                             capture_output=True, text=True, timeout=300,
                             env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert process.returncode == 0, process.stderr[-3000:]
    return process.stdout


def load(name: str) -> ModuleType:
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_overhead_smoke() -> None:
    output = run_script("overhead.py")
    assert "ray-sebs us/update" in output
    assert "mlp" in output and "cnn" in output
    assert "worst ratio" in output
    assert " NO |" not in output  # both variants computed the same update


def test_scaling_model_smoke() -> None:
    output = run_script("scaling_model.py")
    assert "compute meas" in output  # the 1- and 2-worker validation ran
    assert "SEBS rho=2, W growing" in output
    assert "rho minimising time" in output


@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
def test_sebs_vs_ssgd_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    assert load("sebs_vs_ssgd").main(["--smoke"]) == 0
    output = capsys.readouterr().out
    assert "sebs:linear: updates / SSGD's" in output
    assert "final val acc" in output


@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
def test_schedules_lm_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    # One worker (passed on to byte_gpt): no resize, so three tiny fits take seconds.
    assert load("schedules_lm").main(["--smoke", "--max-workers", "1"]) == 0
    output = capsys.readouterr().out
    assert "target: validation loss <=" in output and "(SSGD's mean final validation loss)" in output
    assert "updates to target" in output and "sebs rho=2" in output
    assert "target: adaptive t=1 reaches the target with no more updates than the best fixed SEBS arm:" \
        in output


@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
def test_restart_cost_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    assert load("restart_cost").main(["--smoke"]) == 0
    output = capsys.readouterr().out
    assert "ray-sebs restart 1->2" in output
    assert "zero restarts where the worker count does not change: yes" in output
    assert "train fn start -> first update" in output


@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
def test_ingest_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    assert load("ingest").main(["--smoke"]) == 0
    output = capsys.readouterr().out
    assert "loop (epoch_batches)" in output
    assert "in-memory slices" in output
    assert "data wait over all epochs" in output


@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
def test_gpu_throughput_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    # --device cpu: the same code path as on a GPU, which this machine does not have.
    assert load("gpu_throughput").main(["--smoke"]) == 0
    output = capsys.readouterr().out
    assert "bare on-device samples/s" in output and "bare copy samples/s" in output
    # Both levers in one ray-sebs run: bf16 from a device cache, a row per batch.
    assert "|     8 |      bf16 |       device |" in output
    assert "|    16 |      bf16 |       device |" in output


@pytest.mark.ray
def test_vs_handwritten_smoke() -> None:
    # Fresh processes with their own local Ray (what the script compares), not the module's.
    output = run_script("vs_handwritten.py")
    assert "ray-sebs train --max-workers 1" in output
    assert "handwritten, checkpoint every epoch" in output
    assert "ratio of medians" in output
