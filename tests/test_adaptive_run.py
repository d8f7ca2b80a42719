"""The adaptive schedule on a real local Ray cluster (CPU workers, gloo, fractional CPUs).

Noise threshold 0 makes every stage begin after ``min_epochs_per_stage`` epochs (the earliest
plan), so the stage boundaries are known in advance; a huge threshold never grows. Each
``TorchTrainer.fit()`` costs ~15 s of start-up on 2 cores: the growing run has two.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import pytest
import ray
import ray.cloudpickle
import torch
import torch.distributed as dist
from ray.train import FailureConfig, RunConfig
from toy_problem import make_rows, small_model, to_dataset

from ray_sebs import ClusterConfig, ScheduleConfig
from ray_sebs.history import every_update_exact
from ray_sebs.plan import adaptive_plan_range
from ray_sebs.trainer import RUN_RECORD, SEBSTrainer

# Workers do not have tests/ on their path: ship this module's classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.usefixtures("ray_cluster")

ROWS = 64
# Stage 1 (B=4) fits one worker's micro-batch; stage 2 (B=8) needs 2 workers; stage 3 (B=16)
# wants 4, capped at 2: one worker-group change (1 -> 2), and stage 3 begins within segment 1.
CLUSTER = ClusterConfig(min_workers=1, max_workers=2, max_micro_batch=4,
                        resources_per_worker={"CPU": 0.5})


def adaptive(threshold: float) -> ScheduleConfig:
    return ScheduleConfig(kind="adaptive", initial_batch_size=4, growth_ratio=2.0, num_stages=3,
                          epochs_per_stage=1, learning_rate=0.1, noise_threshold=threshold,
                          min_epochs_per_stage=1)


class FailOnTwoWorkers(torch.nn.Module):
    """The toy model, which raises at its first training forward in a group of two workers, once
    per run (a marker file remembers): the driver's fit fails after the 1-worker segment."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.inner = small_model()
        self.marker = marker

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.training and dist.is_initialized() and dist.get_world_size() == 2 \
                and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            raise RuntimeError("stopped before the second segment")
        return self.inner(features)


def trainer(tmp_path: Any, name: str, schedule: ScheduleConfig,
            model_factory: Any = small_model) -> SEBSTrainer:
    features, labels = make_rows(ROWS)
    return SEBSTrainer(model_factory, datasets={"train": to_dataset(features, labels)},
                       schedule=schedule, cluster=CLUSTER, prefetch_lead_time_s=None,
                       checkpoint_every_epochs=1,
                       run_config=RunConfig(name=name, storage_path=str(tmp_path),
                                            failure_config=FailureConfig(max_failures=0)))


def test_threshold_zero_grows_at_every_epoch_and_restarts_workers_only_for_a_new_count(tmp_path):
    result = trainer(tmp_path, "grow", adaptive(0.0)).fit()
    history = result.history
    assert [r["epoch"] for r in history] == [0, 1, 2]
    assert [r["stage"] for r in history] == [1, 2, 3]
    assert [r["global_batch_size"] for r in history] == [4, 8, 16]
    assert [r["segment"] for r in history] == [0, 1, 1]
    assert [r["world_size"] for r in history] == [1, 2, 2]
    # Stage 3 kept the worker count: same worker group as stage 2, no restart.
    assert history[1]["segment_started_at"] == history[2]["segment_started_at"]
    assert history[0]["segment_started_at"] != history[1]["segment_started_at"]
    assert result.summary["resizes"] == 1 and result.summary["recoveries"] == 0
    assert every_update_exact(history)
    # The realized plan is the earliest growth, and the run made exactly its updates and samples.
    earliest, _ = adaptive_plan_range(adaptive(0.0), ROWS, CLUSTER)
    assert [p.stage.first_epoch for p in result.plan.stages] == [0, 1, 2]
    assert result.plan.total_updates == earliest.total_updates == history[-1]["updates"] \
        == sum(r["epoch_updates"] for r in history) == ROWS // 4 + ROWS // 8 + ROWS // 16
    assert history[-1]["samples"] == result.plan.total_samples == 3 * ROWS
    # Why each stage began: the noise scale at the end of the epoch before, against B_s.
    decisions = result.summary["stage_decisions"]
    assert [(d["stage"], d["epoch"], d["batch_size"]) for d in decisions] == [(2, 1, 4), (3, 2, 8)]
    for decision in decisions:
        before = history[decision["epoch"] - 1]["gradient_noise_scale"]
        assert decision["noise_scale"] == before or (math.isnan(before)
                                                      and math.isnan(decision["noise_scale"]))
        assert decision["threshold_batch_size"] == 0.0
    assert math.isnan(history[0]["stage_start_noise_scale"])
    for record, decision in zip(history[1:], decisions, strict=True):
        assert record["stage_start_noise_scale"] == decision["noise_scale"] \
            or math.isnan(decision["noise_scale"])
    with open(os.path.join(result.run_dir, RUN_RECORD)) as handle:
        record = json.load(handle)
    assert [d["epoch"] for d in record["stage_decisions"]] == [1, 2]
    assert {s: e["end_epoch"] for s, e in record["segments"].items()} == {"0": 1, "1": 3}

    # The same command again: the recorded schedule is finished, nothing is retrained.
    again = trainer(tmp_path, "grow", adaptive(0.0)).fit()
    assert [r["ended_at"] for r in again.history] == [r["ended_at"] for r in history]
    assert [p.stage.first_epoch for p in again.plan.stages] == [0, 1, 2]


def test_a_huge_threshold_never_grows(tmp_path):
    result = trainer(tmp_path, "flat", adaptive(1e12)).fit()
    history = result.history
    assert [r["stage"] for r in history] == [1, 1, 1]
    assert [r["world_size"] for r in history] == [1, 1, 1]
    assert result.summary["stage_decisions"] == []
    assert result.plan.total_updates == 3 * (ROWS // 4) == history[-1]["updates"]
    assert every_update_exact(history)
    assert all(math.isnan(r["stage_start_noise_scale"]) for r in history)


def test_a_run_stopped_after_a_decision_resumes_with_the_recorded_schedule(tmp_path):
    marker = str(tmp_path / "failed")
    stopped = trainer(tmp_path, "resume", adaptive(0.0),
                      lambda: FailOnTwoWorkers(marker))
    with pytest.raises(ray.train.TrainingFailedError):
        stopped.fit()
    with open(os.path.join(tmp_path, "resume", RUN_RECORD)) as handle:
        record = json.load(handle)
    assert [(d["stage"], d["epoch"]) for d in record["stage_decisions"]] == [(2, 1)]
    assert {s: e["end_epoch"] for s, e in record["segments"].items()} == {"0": 1}

    # The driver starts again: segment 1 (2 workers) from epoch 1, not segment 0 again.
    result = trainer(tmp_path, "resume", adaptive(0.0), lambda: FailOnTwoWorkers(marker)).fit()
    history = result.history
    assert [r["epoch"] for r in history] == [0, 1, 2]
    assert [(r["stage"], r["world_size"]) for r in history] == [(1, 1), (2, 2), (3, 2)]
    assert [(d["stage"], d["epoch"]) for d in result.summary["stage_decisions"]] == [(2, 1), (3, 2)]
    assert history[-1]["updates"] == result.plan.total_updates
    assert every_update_exact(history)
    with open(os.path.join(tmp_path, "resume", RUN_RECORD)) as handle:
        assert json.load(handle)["segments"]["0"] == record["segments"]["0"], "segment 0 ran once"
