"""Reliability on a real local Ray cluster: faults survived, bad plans refused, nothing lost.

Worker faults (a worker process killed mid-stage, and at a segment change), a driver killed and
restarted, a cluster too small for the plan, a NaN loss, and checkpoint integrity (a partial
checkpoint directory, a checkpoint of another model). Bad input is ``test_bad_input.py``.

Every ``TorchTrainer.fit()`` costs ~15 s of worker start-up on 2 cores and every worker-group
restart about as much, so scenarios share runs where that stays honest: one faulted run covers a
fault mid-stage, faults in two stages and a fault at the segment change; the driver-restart run
also carries the partial checkpoint and the refused resumes.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import ray
import ray.cloudpickle
import ray.train
import torch
from processes import end_session, registered_epochs, run_in_session
from ray.train import FailureConfig, RunConfig
from toy_problem import make_rows, small_model, to_dataset

from ray_sebs import ClusterConfig, ScheduleConfig
from ray_sebs.cli import main
from ray_sebs.comparison import trial_metrics
from ray_sebs.errors import ConfigError, NonFiniteLossError
from ray_sebs.history import RECOVERY, RESIZE, worker_group_changes
from ray_sebs.loop import CHECKPOINT_FILE, load_model_state
from ray_sebs.models import build_model
from ray_sebs.optim import OptimizerConfig
from ray_sebs.plan import build_plan
from ray_sebs.records import describe_difference
from ray_sebs.resources import check_cluster_can_start, size_worker_resources
from ray_sebs.trainer import (
    RUN_RECORD,
    SEBSTrainer,
    finished_epochs,
    load_checkpoint_state,
    schedule_fingerprint,
)

# Workers do not have tests/ on their path: ship this module's classes by value, and the helper
# from processes.py that KillAt calls on the worker.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
ray.cloudpickle.register_pickle_by_value(sys.modules[registered_epochs.__module__])

RAY_SEBS = Path(sys.executable).with_name("ray-sebs")


class KillAt(torch.nn.Module):
    """Kills its worker process (``os._exit``, as a crash would) at a given training forward of a
    given rank in a worker group of a given size, once per marker file.

    With ``registered``, it first waits until Ray Train has registered the checkpoint of that
    epoch: the controller collects reports when it polls the workers (every 2 s), and a worker
    that dies before then takes its last report with it (see :func:`registered_epochs`).
    """

    def __init__(self, kills: list[tuple[str, int, int, int]], run_dir: str | None = None,
                 registered: int | None = None) -> None:
        super().__init__()
        self.inner = small_model()
        self.kills = kills  # (marker, world size, rank, forward)
        self.run_dir = run_dir
        self.registered = registered
        self.forwards = 0

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.forwards += 1
            context = ray.train.get_context()
            for marker, world_size, rank, forward in self.kills:
                if (context.get_world_size(), context.get_world_rank(), self.forwards) \
                        == (world_size, rank, forward) and not os.path.exists(marker):
                    deadline = time.monotonic() + 60
                    while self.registered is not None and time.monotonic() < deadline \
                            and self.registered not in registered_epochs(Path(self.run_dir)):
                        time.sleep(0.1)
                    open(marker, "w").close()
                    os._exit(1)
        return self.inner(features)


class NaNFrom(torch.nn.Module):
    """Returns NaN logits from a given training forward on; logs each first NaN to a file."""

    def __init__(self, at_forward: int, log: str) -> None:
        super().__init__()
        self.inner = small_model()
        self.at_forward = at_forward
        self.log = log
        self.forwards = 0

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.inner(features)
        if self.training:
            self.forwards += 1
            if self.forwards == self.at_forward:
                with open(self.log, "a") as handle:
                    handle.write(f"{os.getpid()}\n")
            if self.forwards >= self.at_forward:
                logits = logits * float("nan")
        return logits


def fit(tmp_path: Any, name: str, train: ray.data.Dataset, schedule: ScheduleConfig,
        cluster: ClusterConfig, model_factory: Any = small_model,
        validation: ray.data.Dataset | None = None, max_failures: int = 1):
    datasets = {"train": train} | ({"validation": validation} if validation is not None else {})
    # Every epoch checkpointed: the faults below resume from the epoch before them. No gradient
    # noise measurement: it splits sampled updates into two forwards, and the faults here are
    # placed by counting forwards (one per update).
    trainer = SEBSTrainer(model_factory, datasets=datasets, schedule=schedule, cluster=cluster,
                          run_config=RunConfig(name=name, storage_path=str(tmp_path),
                                               failure_config=FailureConfig(max_failures=max_failures)),
                          checkpoint_every_epochs=1, gradient_noise=False)
    return trainer.fit()


def one_error_line(stderr: str) -> str:
    """The CLI's error: exactly one line, no traceback."""
    lines = [line for line in stderr.splitlines() if line.startswith("ray-sebs train:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------
# 1. Worker faults


@pytest.mark.timeout(400)
def test_killed_workers_mid_stage_and_at_the_segment_change_match_an_uninterrupted_run(
        tmp_path, ray_cluster):
    # Stage 1 (batch 8, 2 epochs) on 1 worker; stages 2 and 3 (batch 16, 32) on 2 workers.
    train_rows, validation_rows = make_rows(96), make_rows(30, seed=9)
    schedule = ScheduleConfig(initial_batch_size=8, growth_ratio=2, num_stages=3,
                              epochs_per_stage=(2, 1, 1), learning_rate=0.2)
    cluster = ClusterConfig(min_workers=1, max_workers=2, max_micro_batch=8)
    reference = fit(tmp_path, "reference", to_dataset(*train_rows), schedule, cluster,
                    validation=to_dataset(*validation_rows))
    assert [segment.workers for segment in reference.plan.segments] == [1, 2]
    assert [record["world_size"] for record in reference.history] == [1, 1, 2, 2]

    mid_stage, segment_change = str(tmp_path / "killed-mid-stage"), str(tmp_path / "killed-at-change")
    kills = [
        # stage 1, epoch 1, update 5 of 12 (one forward per update), once the epoch-0 checkpoint
        # is registered
        (mid_stage, 1, 0, 12 + 5),
        # stage 2, first epoch of the new 2-worker group, rank 1, just after its first update
        (segment_change, 2, 1, 2),
    ]
    run_dir = str(tmp_path / "faulted")
    faulted = fit(tmp_path, "faulted", to_dataset(*train_rows), schedule, cluster,
                  model_factory=lambda: KillAt(kills, run_dir=run_dir, registered=0),
                  validation=to_dataset(*validation_rows), max_failures=2)
    assert os.path.exists(mid_stage) and os.path.exists(segment_change), "a worker was never killed"

    history = faulted.history
    assert [record["epoch"] for record in history] == [0, 1, 2, 3], "each epoch exactly once"
    # Resumed, not retrained: epoch 1 was trained by a worker group started after epoch 0 ended
    # (a restart from scratch would train both in one group), epoch 2 by the group started after
    # the kill at the segment change.
    assert history[1]["segment_started_at"] > history[0]["ended_at"]
    assert history[2]["segment_started_at"] > os.path.getmtime(segment_change)
    for got, want in zip(history, reference.history, strict=True):
        for key in ("stage", "global_batch_size", "epoch_updates", "updates", "samples",
                    "samples_per_update_min", "samples_per_update_max"):
            assert got[key] == want[key], (key, got, want)
        assert got["samples_per_update_min"] == got["samples_per_update_max"] \
            == got["global_batch_size"]
    assert history[-1]["updates"] == faulted.plan.total_updates
    assert history[-1]["samples"] == faulted.plan.total_samples
    # One definition of a worker-group change everywhere: the kill mid-stage is a recovery (a new
    # group within segment 0); the group that died at the segment change is part of the planned
    # resize into segment 1. The summary, the plan and the sweep's comparison agree.
    summary = faulted.summary
    assert (summary["resizes"], summary["recoveries"]) == (1, 1) == (faulted.plan.resizes, 1)
    assert summary["recovery_time_s"] > 0 and summary["resize_time_s"] > 0
    metrics = trial_metrics(history, target=0.0)
    assert (metrics.resizes, metrics.recoveries) == (summary["resizes"], summary["recoveries"])
    assert [change.kind for change in worker_group_changes(history)] == [RECOVERY, RESIZE]
    assert (reference.summary["resizes"], reference.summary["recoveries"]) == (1, 0)

    # The loop seeds every epoch from (seed, epoch, rank), the local shuffle too, and a restart
    # rebuilds the same split of the same materialized blocks, so a resumed run repeats the
    # uninterrupted one. Observed: bit-identical. The tolerance allows only for a restarted group
    # that came back with another world size (same samples per update, other summation order).
    trained = load_checkpoint_state(faulted.checkpoint)["model"]
    expected = load_checkpoint_state(reference.checkpoint)["model"]
    for name, value in expected.items():
        torch.testing.assert_close(trained[f"inner.{name}"], value, rtol=1e-4, atol=1e-5)
    for got, want in zip(history, reference.history, strict=True):
        assert got["validation_accuracy"] == pytest.approx(want["validation_accuracy"], abs=0.01)
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)


# ---------------------------------------------------------------------------------------------
# 2. Driver restart, 6. checkpoint integrity


def registered_states(run_dir: Path) -> list[dict[str, Any]]:
    """Train states of the checkpoints Ray Train has registered (named in its snapshot)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return []
    names = snapshot.read_text()
    states = []
    for directory in run_dir.glob("checkpoint_*"):
        if directory.name in names and (directory / CHECKPOINT_FILE).exists():
            try:
                states.append(torch.load(directory / CHECKPOINT_FILE, weights_only=False)["state"])
            except Exception:  # being deleted (num_to_keep) while read
                continue
    return states


def epochs_printed(output: str) -> set[int]:
    return {int(match) for match in re.findall(r"epoch +(\d+) +stage", output)}


@pytest.mark.timeout(600)
def test_a_killed_driver_resumes_without_retraining_and_a_changed_command_is_refused(
        tmp_path, ray_cluster):
    storage = tmp_path / "runs"
    run_dir = storage / "driver"
    # 160 rows: 128 to train. Stage 1 (batch 8) on 1 worker; stages 2 and 3 (16, 32) on 2.
    flags = ["--dataset", "synthetic", "--synthetic-rows", "160", "--batch-size", "8", "--ratio", "2",
             "--stages", "3", "--epochs-per-stage", "1,1,3", "--max-micro-batch", "8",
             "--max-workers", "2", "--storage-path", str(storage), "--name", "driver",
             "--checkpoint-every", "1"]  # the kill waits for a mid-segment checkpoint
    command = [str(RAY_SEBS), "train", *flags, "--num-cpus", "2"]
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    plan = build_plan(ScheduleConfig(initial_batch_size=8, growth_ratio=2, num_stages=3,
                                     epochs_per_stage=(1, 1, 3)), 128,
                      ClusterConfig(max_workers=2, max_micro_batch=8))
    assert [segment.workers for segment in plan.segments] == [1, 2]

    # The driver is its own process with its own local Ray; kill it (SIGKILL, no clean-up) once
    # Ray Train has registered the checkpoint of stage 2, in the middle of segment 1.
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as log:
        driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not any(state["next_epoch"] >= 2 for state in registered_states(run_dir)):
            assert driver.poll() is None, first_log.read_text()[-3000:]
            assert time.monotonic() < deadline, "stage 2 never finished"
            time.sleep(0.2)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        # The driver's local Ray outlives it for a moment (its actors finish what they were
        # doing, and may still register a checkpoint): end everything in the driver's session.
        end_session(driver.pid)
    stopped_at = time.time()
    record = json.loads((run_dir / RUN_RECORD).read_text())
    assert set(record["segments"]) == {"0"}, "segment 0 finished, segment 1 did not"
    survived = max(registered_states(run_dir), key=lambda state: state["next_epoch"])
    assert survived["next_epoch"] < plan.schedule.total_epochs

    # A checkpoint killed mid-write: a directory that sorts after every real one, its state file
    # cut in half. Ray Train registers a checkpoint only once it is fully written, so it must
    # never be resumed from (loading it would fail).
    latest = max(path for path in run_dir.glob("checkpoint_*") if path.is_dir())
    partial = run_dir / "checkpoint_2099-01-01_00-00-00.000000"
    partial.mkdir()
    whole = (latest / CHECKPOINT_FILE).read_bytes()
    (partial / CHECKPOINT_FILE).write_bytes(whole[:len(whole) // 2])

    rerun = run_in_session(command, env=env, cwd=tmp_path, timeout=300)
    output, errors = rerun.stdout, rerun.stderr
    assert rerun.returncode == 0, output[-3000:] + errors[-3000:]
    history = json.loads((run_dir / "history.json").read_text())
    assert [entry["epoch"] for entry in history] == list(range(plan.schedule.total_epochs))
    # Finished epochs were not retrained: their records are the ones written before the kill
    # (same timestamps, losses, counters), and the second driver printed only the later epochs.
    done = survived["next_epoch"]
    # Compared as JSON: a record holds NaN (no validation metric, no noise scale yet), and
    # NaN != NaN would fail a dict comparison of equal records.
    assert json.dumps(history[:done]) == json.dumps(survived["history"])
    assert all(entry["segment_started_at"] > stopped_at for entry in history[done:])
    printed = epochs_printed(output + errors)
    assert done in printed and printed <= set(range(done, len(history))), printed
    assert history[-1]["updates"] == plan.total_updates
    assert history[-1]["samples"] == plan.total_samples
    assert all(entry["samples_per_update_min"] == entry["samples_per_update_max"]
               == entry["global_batch_size"] for entry in history)
    assert partial.exists()
    assert set(json.loads((run_dir / RUN_RECORD).read_text())["segments"]) == {"0", "1"}

    # The same --name with a schedule that differs, or another model: refused before any worker
    # starts, one line naming --name and what differs.
    for changed, expected in [(["--ratio", "3"], "growth_ratio 2.0 -> 3.0"),
                              (["--model", "logreg"], "model architecture")]:
        stderr = run_cli(flags + changed)
        line = one_error_line(stderr)
        assert line.startswith("ray-sebs train: error: --name='driver': names an existing run")
        assert expected in line and "another --name" in line, line
    assert json.loads((run_dir / "history.json").read_text()) == history


def run_cli(argv: list[str]) -> str:
    """``ray-sebs train`` in this process (on the module's cluster); its stderr, after exit 2."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert main(["train", *argv]) == 2
    return stderr.getvalue()


def test_finished_segments_are_judged_by_epochs_when_a_resume_changes_the_worker_bounds():
    # First run: 4 stages on up to 8 workers, one segment per stage; the driver died after
    # segment 1 (stages 1-2). Resumed with --max-workers 2, stages 2-4 form segment 1: by its
    # number it would count as finished and stages 3-4 would never train.
    schedule = ScheduleConfig(initial_batch_size=8, growth_ratio=2, num_stages=4, epochs_per_stage=1)
    first = build_plan(schedule, 256, ClusterConfig(max_workers=8, max_micro_batch=8))
    resumed = build_plan(schedule, 256, ClusterConfig(max_workers=2, max_micro_batch=8))
    assert [s.end_epoch for s in first.segments] == [1, 2, 3, 4]
    assert [s.end_epoch for s in resumed.segments] == [1, 4]
    record = {"segments": {str(s.index): {"end_epoch": s.end_epoch, "checkpoint": f"/c{s.index}"}
                           for s in first.segments[:2]}}
    done = finished_epochs(resumed, record)
    assert [s.index for s in resumed.segments if s.end_epoch > done] == [1]
    # A record written before end_epoch was kept names segments of the same plan.
    assert finished_epochs(first, {"segments": {"0": {}, "1": {}}}) == 2


def test_a_recorded_fingerprint_without_model_or_optimizer_still_resumes():
    schedule = ScheduleConfig(initial_batch_size=8, growth_ratio=2, num_stages=2, epochs_per_stage=1)
    plan = build_plan(schedule, 64, ClusterConfig())
    new = schedule_fingerprint(plan, model_factory=small_model, optimizer=OptimizerConfig("momentum"))
    assert new["model"] == {"0.weight": [8, 6], "0.bias": [8], "2.weight": [3, 8], "2.bias": [3]}
    old = {"schedule": new["schedule"], "dataset_size": 64}
    assert describe_difference(old, new) == ""
    assert describe_difference(new, {**new, "optimizer": {**new["optimizer"], "name": "sgd"}}) \
        == "optimizer.name 'momentum' -> 'sgd'"


def test_a_checkpoint_of_another_model_fails_to_load_with_the_fix():
    checkpoint = build_model("mlp", (64,), 10).state_dict()
    with pytest.raises(RuntimeError, match=r"does not fit this model \(a different --model") as info:
        load_model_state(build_model("logreg", (64,), 10), checkpoint)
    assert "another --name" in str(info.value)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# 3. Resource shortage


@pytest.mark.timeout(300)
def test_more_workers_than_the_cluster_has_trains_on_fewer_with_the_global_batch_exact(
        tmp_path, ray_cluster, capsys, caplog):
    # Batch 16 at 4 rows per micro-batch plans 4 workers of 1 CPU; the cluster has 2 CPUs.
    flags = ["--dataset", "synthetic", "--synthetic-rows", "160", "--batch-size", "16", "--ratio", "1",
             "--stages", "1", "--epochs-per-stage", "1", "--max-micro-batch", "4",
             "--resources-per-worker", "CPU=1", "--storage-path", str(tmp_path)]
    with caplog.at_level(logging.WARNING, logger="ray_sebs"):
        assert main(["train", *flags, "--min-workers", "1", "--max-workers", "4", "--name", "short"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("ray_sebs")
                and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "wants up to 4 workers but the cluster can place 2 (2 CPU; 1 CPU per worker)" in warnings[0]
    assert "4x1 x 4 workers -> 4x2 x 2" in warnings[0]
    (record,) = json.loads((tmp_path / "short" / "history.json").read_text())
    assert record["target_workers"] == 4
    assert record["world_size"] <= 2
    assert record["accumulation_steps"] == 16 // 4 // record["world_size"]
    assert record["samples_per_update_min"] == record["samples_per_update_max"] == 16
    capsys.readouterr()

    # A minimum the cluster can never meet fails before any worker starts, naming the resource.
    assert main(["train", *flags, "--min-workers", "3", "--max-workers", "4", "--name", "never"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == ("ray-sebs train: error: --min-workers=3: needs 3 CPU (3 workers x 1) but the "
                    "cluster has 2; lower --min-workers to 2 or --resources-per-worker, or add nodes "
                    "(set RAY_SEBS_AUTOSCALING=1 on an autoscaling cluster)")
    assert not (tmp_path / "never").exists()


@pytest.mark.timeout(300)
def test_workers_never_take_the_cpu_that_ray_data_needs(tmp_path, ray_cluster, caplog):
    # A lazy dataset still runs Ray Data tasks while training. Two workers of 1 CPU each on this
    # 2-CPU cluster hang (nothing left to run them); ray-sebs keeps a CPU free and trains on one.
    features, labels = make_rows(64)
    lazy = to_dataset(features, labels).map_batches(lambda batch: batch)
    schedule = ScheduleConfig(initial_batch_size=16, growth_ratio=1, num_stages=1, epochs_per_stage=1)
    cluster = ClusterConfig(min_workers=1, max_workers=2, max_micro_batch=8,
                            resources_per_worker={"CPU": 1})
    with caplog.at_level(logging.WARNING, logger="ray_sebs"):
        result = fit(tmp_path, "lazy", lazy, schedule, cluster)
    (record,) = result.history
    assert (record["target_workers"], record["world_size"], record["accumulation_steps"]) == (2, 1, 2)
    assert record["samples_per_update_min"] == record["samples_per_update_max"] == 16
    (warning,) = [r.getMessage() for r in caplog.records if r.name.startswith("ray_sebs")]
    assert "can place 1 (2 CPU; 1 CPU per worker, 1 CPU kept for Ray Data)" in warning

    # With a minimum of 2 such workers it is refused up front instead of hanging.
    strict = ClusterConfig(min_workers=2, max_workers=2, max_micro_batch=8,
                           resources_per_worker={"CPU": 1})
    plan = build_plan(schedule, 64, strict)
    with pytest.raises(ConfigError, match="must stay free for Ray Data"):
        check_cluster_can_start(strict, plan, ray.cluster_resources(), reserved_cpus=1.0)
    # The default per-worker CPUs leave Ray Data its CPU by themselves.
    sized = size_worker_resources(ClusterConfig(max_workers=2), 2, ray.cluster_resources())
    assert sized.worker_bundle() == {"CPU": 0.5}


# ---------------------------------------------------------------------------------------------
# 4. Numerical faults


@pytest.mark.timeout(300)
def test_a_nan_loss_stops_without_retries_and_keeps_the_last_good_checkpoint(tmp_path, ray_cluster):
    features, labels = make_rows(64)
    schedule = ScheduleConfig(initial_batch_size=8, growth_ratio=1, num_stages=1, epochs_per_stage=2)
    cluster = ClusterConfig(min_workers=1, max_workers=1, max_micro_batch=8)
    log = str(tmp_path / "nan.log")
    # 8 updates per epoch: update 11 is the third of epoch 1.
    with pytest.raises(NonFiniteLossError) as info:
        fit(tmp_path, "nan", to_dataset(features, labels), schedule, cluster,
            model_factory=lambda: NaNFrom(at_forward=11, log=log), max_failures=2)
    error = info.value
    assert (error.stage, error.update, error.epoch, error.global_batch_size) == (1, 11, 1, 8)
    assert str(error).startswith("non-finite training loss at stage 1, update 11 (epoch 1, global "
                                 "batch 8); the last good checkpoint (end of epoch 0) is ")
    # Not retried although max_failures=2 would allow it: one worker group produced the NaN.
    assert len(Path(log).read_text().splitlines()) == 1

    state = load_checkpoint_state(ray.train.Checkpoint(error.checkpoint))
    assert state["state"]["next_epoch"] == 1
    assert [entry["epoch"] for entry in state["state"]["history"]] == [0]
    assert all(torch.isfinite(value).all() for value in state["model"].values())
    load_model_state(NaNFrom(at_forward=1, log=log), state["model"])
    assert json.loads((tmp_path / "nan" / RUN_RECORD).read_text())["segments"] == {}


@pytest.mark.timeout(300)
def test_a_nan_loss_from_the_cli_is_one_line_and_a_non_zero_exit(tmp_path, ray_cluster, capsys):
    # A learning rate of 1e30 overflows the weights within the first updates.
    code = main(["train", "--dataset", "synthetic", "--synthetic-rows", "80", "--batch-size", "8",
                 "--ratio", "1", "--stages", "1", "--epochs-per-stage", "1", "--max-workers", "1",
                 "--lr", "1e30", "--storage-path", str(tmp_path), "--name", "diverge"])
    assert code == 1
    line = one_error_line(capsys.readouterr().err)
    assert re.fullmatch(r"ray-sebs train: failed: non-finite training loss at stage 1, update \d+ "
                        r"\(epoch 0, global batch 8\); no checkpoint was written before it\. Lower "
                        r"--lr, check the data for extreme values, or use a smaller --ratio", line), line
