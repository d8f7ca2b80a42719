"""The elastic SEBS loop on a real local Ray cluster (CPU workers, gloo).

Every run here is tiny: each ``TorchTrainer.fit()`` costs ~15 s of worker start-up on 2 cores, so
the tests use one or two segments of one or two epochs each.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from typing import Any

import numpy as np
import pytest
import ray
import ray.cloudpickle
import torch
from ray.train import FailureConfig, RunConfig
from toy_problem import make_rows, small_model, to_dataset

from ray_sebs import ClusterConfig, ScheduleConfig
from ray_sebs.trainer import SEBSTrainer, load_checkpoint_state

# Workers do not have tests/ on their path: ship this module's classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.usefixtures("ray_cluster")


class FailOnce(torch.nn.Module):
    """Kills its worker process (``os._exit``, not an exception) at a given training forward,
    once per run: a marker file remembers that it already did. It first waits ``delay_s``, so
    that the controller (polling every 0.1 s under ray-sebs) has registered the last report."""

    def __init__(self, marker: str, at_forward: int, delay_s: float = 0.0) -> None:
        super().__init__()
        self.inner = small_model()
        self.marker = marker
        self.at_forward = at_forward
        self.delay_s = delay_s
        self.forwards = 0

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.forwards += 1
            if self.forwards == self.at_forward and not os.path.exists(self.marker):
                time.sleep(self.delay_s)
                open(self.marker, "w").close()
                os._exit(1)
        return self.inner(features)


def fit(tmp_path: Any, name: str, features: np.ndarray, labels: np.ndarray,
        schedule: ScheduleConfig, cluster: ClusterConfig, model_factory: Any = small_model,
        validation: tuple[np.ndarray, np.ndarray] | None = None, **kwargs: Any):
    datasets = {"train": to_dataset(features, labels)}
    if validation is not None:
        datasets["validation"] = to_dataset(*validation)
    trainer = SEBSTrainer(model_factory, datasets=datasets, schedule=schedule, cluster=cluster,
                          run_config=RunConfig(name=name, storage_path=str(tmp_path),
                                               failure_config=FailureConfig(max_failures=1)),
                          **kwargs)
    return trainer.fit()


def full_batch_step(features: np.ndarray, labels: np.ndarray, lr: float) -> dict[str, torch.Tensor]:
    """One SGD step on the mean loss over all rows, in one process: the reference update."""
    model = small_model()
    loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(features)),
                                             torch.from_numpy(labels))
    loss.backward()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter -= lr * parameter.grad
    return copy.deepcopy(model.state_dict())


@pytest.mark.parametrize(
    ("batch", "workers", "max_micro", "expected_accumulation"),
    [
        (8, 2, 4, 1),   # two workers, one micro-step each
        (8, 1, 4, 2),   # one worker accumulating two micro-batches
        (7, 1, 3, 3),   # uneven micro-batches 3+2+2 on one worker
        (10, 2, 4, 2),  # two workers, each 5 rows as uneven micro-batches 3+2
    ],
)
def test_one_update_equals_the_full_batch_mean_gradient_step(tmp_path, batch, workers, max_micro,
                                                            expected_accumulation):
    # A dataset of exactly B rows: one update, whatever way Ray Data splits it between workers.
    features, labels = make_rows(batch, seed=batch)
    result = fit(tmp_path, f"exact-{batch}-{workers}", features, labels,
                 ScheduleConfig(initial_batch_size=batch, growth_ratio=1, num_stages=1,
                                epochs_per_stage=1, learning_rate=0.5),
                 ClusterConfig(min_workers=workers, max_workers=workers, max_micro_batch=max_micro))
    (record,) = result.history
    assert record["world_size"] == workers
    assert record["accumulation_steps"] == expected_accumulation
    assert record["epoch_updates"] == 1
    assert record["samples_per_update_min"] == record["samples_per_update_max"] == batch
    trained = load_checkpoint_state(result.checkpoint)["model"]
    expected = full_batch_step(features, labels, lr=0.5)
    initial = small_model().state_dict()
    for name, value in expected.items():
        assert not torch.allclose(value, initial[name]), "the update must move every parameter"
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6)


def test_growing_run_changes_world_size_at_the_stage_boundary(tmp_path):
    features, labels = make_rows(96)
    schedule = ScheduleConfig(initial_batch_size=8, growth_ratio=2, num_stages=2, epochs_per_stage=1,
                              learning_rate=0.2)
    cluster = ClusterConfig(min_workers=1, max_workers=2, max_micro_batch=8)
    result = fit(tmp_path, "grow", features, labels, schedule, cluster,
                 validation=make_rows(20, seed=9))
    plan = result.plan
    assert [segment.workers for segment in plan.segments] == [1, 2]
    history = result.history
    assert [record["epoch"] for record in history] == [0, 1]
    assert [record["world_size"] for record in history] == [1, 2]
    assert [record["global_batch_size"] for record in history] == [8, 16]
    for record in history:
        assert record["samples_per_update_min"] == record["samples_per_update_max"] \
            == record["global_batch_size"]
        assert 0.0 <= record["validation_accuracy"] <= 1.0
        assert 0.0 <= record["data_wait_fraction"] <= 1.0
    assert history[-1]["updates"] == plan.total_updates == 96 // 8 + 96 // 16
    assert history[-1]["samples"] == plan.total_samples
    assert (result.summary["resizes"], result.summary["recoveries"]) == (1, 0)
    assert result.summary["resize_time_s"] > 0


def test_a_killed_worker_resumes_from_the_last_checkpoint_with_counters_intact(tmp_path):
    features, labels = make_rows(64)
    schedule = ScheduleConfig(initial_batch_size=8, growth_ratio=1, num_stages=1, epochs_per_stage=4)
    cluster = ClusterConfig(min_workers=1, max_workers=1, max_micro_batch=8)
    marker = str(tmp_path / "killed")
    # 8 updates per epoch, a checkpoint every 2 epochs (ends of epochs 1 and 3): forward 28 is in
    # the fourth epoch (epoch 3), so epoch 2, never checkpointed, is trained again; 0 and 1 not.
    result = fit(tmp_path, "fault", features, labels, schedule, cluster,
                 model_factory=lambda: FailOnce(marker, at_forward=28, delay_s=1.0),
                 # One forward per update: no noise measurement splitting sampled updates.
                 checkpoint_every_epochs=2, gradient_noise=False)
    assert os.path.exists(marker), "the worker was never killed"
    history = result.history
    assert [record["epoch"] for record in history] == [0, 1, 2, 3], "each epoch exactly once"
    first_group = history[0]["segment_started_at"]
    assert history[1]["segment_started_at"] == first_group, "epochs 0-1 came from the checkpoint"
    assert history[2]["segment_started_at"] == history[3]["segment_started_at"] != first_group
    assert history[2]["segment_started_at"] > history[1]["ended_at"]
    assert history[-1]["updates"] == 4 * (64 // 8)
    assert history[-1]["samples"] == 4 * 64
    assert (result.summary["resizes"], result.summary["recoveries"]) == (0, 1)


@pytest.mark.parametrize("kind", ["ssgd", "constant"])
def test_baseline_schedules_run_end_to_end(tmp_path, kind):
    features, labels = make_rows(64)
    schedule = ScheduleConfig(kind=kind, initial_batch_size=8, growth_ratio=2, num_stages=2,
                              epochs_per_stage=1, learning_rate=0.2)
    result = fit(tmp_path, kind, features, labels, schedule,
                 ClusterConfig(min_workers=1, max_workers=2, max_micro_batch=8))
    assert [record["global_batch_size"] for record in result.history] == [8, 8]
    expected_lr = [0.2, 0.1] if kind == "ssgd" else [0.2, 0.2]
    assert [record["learning_rate"] for record in result.history] == pytest.approx(expected_lr)
    assert (result.summary["resizes"], result.summary["recoveries"]) == (0, 0)
    assert result.history[-1]["updates"] == 2 * (64 // 8)
