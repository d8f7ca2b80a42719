"""Resource arithmetic that needs no cluster: worker sizing and the controller's poll interval."""

from __future__ import annotations

import os

import pytest

from ray_sebs.errors import ConfigError
from ray_sebs.plan import ClusterConfig, build_plan
from ray_sebs.resources import (
    CONTROLLER_POLL_ENV,
    autoscaling_enabled,
    check_cluster_can_start,
    check_gpus,
    controller_poll_interval_s,
    describe_worker_shortage,
    free_resources,
    size_worker_resources,
    worker_capacity,
)
from ray_sebs.schedule import ScheduleConfig


def test_the_poll_is_fast_for_small_groups_and_bounded_in_rpcs_for_large_ones():
    assert controller_poll_interval_s(1) == controller_poll_interval_s(100) == 0.1
    # 512 workers: 0.512 s, i.e. 1,000 worker polls a second at the controller.
    assert controller_poll_interval_s(512) == pytest.approx(0.512)
    assert 512 / controller_poll_interval_s(512) == pytest.approx(1000)
    assert controller_poll_interval_s(100_000) == 2.0  # never slower than Ray's default


def test_the_poll_interval_is_set_for_the_fits_only_and_a_users_value_wins(monkeypatch):
    from ray_sebs.trainer import controller_poll_interval

    monkeypatch.delenv(CONTROLLER_POLL_ENV, raising=False)
    with controller_poll_interval(2):
        assert os.environ[CONTROLLER_POLL_ENV] == "0.1"
    assert CONTROLLER_POLL_ENV not in os.environ
    monkeypatch.setenv(CONTROLLER_POLL_ENV, "1.5")
    with controller_poll_interval(2):
        assert os.environ[CONTROLLER_POLL_ENV] == "1.5"
    assert os.environ[CONTROLLER_POLL_ENV] == "1.5"


def test_workers_leave_a_cpu_for_ray_data(monkeypatch):
    monkeypatch.delenv("RAY_SEBS_AUTOSCALING", raising=False)
    sized = size_worker_resources(ClusterConfig(max_workers=2), 2, {"CPU": 2})
    assert sized.worker_bundle() == {"CPU": 0.5}
    assert free_resources({"CPU": 2, "GPU": 1}, reserved_cpus=1) == {"CPU": 1, "GPU": 1}
    assert worker_capacity(sized, {"CPU": 2}, reserved_cpus=1) == 2
    monkeypatch.setenv("RAY_SEBS_AUTOSCALING", "1")
    assert autoscaling_enabled() and worker_capacity(sized, {"CPU": 2}) is None


# The GPU checks take the cluster's resources as a mapping (what ray.cluster_resources() returns):
# no Ray and no GPU needed, a GPU cluster is only a number here.
GPU_SCHEDULE = ScheduleConfig(initial_batch_size=64, growth_ratio=2, num_stages=3, epochs_per_stage=1)


def gpu_plan(min_workers: int, max_workers: int):
    cluster = ClusterConfig(min_workers=min_workers, max_workers=max_workers, max_micro_batch=32,
                            use_gpu=True, resources_per_worker={"CPU": 1, "GPU": 1})
    return cluster, build_plan(GPU_SCHEDULE, 10_000, cluster)


def test_use_gpu_on_a_cluster_without_gpus_is_refused_naming_the_flag(monkeypatch):
    monkeypatch.delenv("RAY_SEBS_AUTOSCALING", raising=False)
    cluster, plan = gpu_plan(1, 4)
    for available in ({"CPU": 8}, {"CPU": 8, "GPU": 0}):
        with pytest.raises(ConfigError) as info:
            check_cluster_can_start(cluster, plan, available)
        assert info.value.field == "use_gpu"
        assert "no GPUs" in str(info.value) and "drop --use-gpu" in str(info.value)
    check_gpus(ClusterConfig(), {"CPU": 8})  # CPU workers need no GPU
    check_gpus(cluster, {"CPU": 8, "GPU": 1})
    monkeypatch.setenv("RAY_SEBS_AUTOSCALING", "1")  # an autoscaler may add GPU nodes
    check_gpus(cluster, {"CPU": 8})
    check_cluster_can_start(cluster, plan, {"CPU": 8})


def test_more_gpu_workers_than_gpus_refused_below_min_workers_else_shrunk(monkeypatch):
    monkeypatch.delenv("RAY_SEBS_AUTOSCALING", raising=False)
    available = {"CPU": 16, "GPU": 2}
    cluster, plan = gpu_plan(3, 4)
    with pytest.raises(ConfigError) as info:
        check_cluster_can_start(cluster, plan, available)
    assert info.value.field == "min_workers" and info.value.value == 3
    assert "needs 3 GPU" in str(info.value) and "has 2" in str(info.value)
    assert "lower --min-workers to 2" in str(info.value)
    # min_workers fit: the run trains on the 2 GPUs with more accumulation, and says so once.
    cluster, plan = gpu_plan(1, 4)
    assert plan.peak_workers == 4
    check_cluster_can_start(cluster, plan, available)
    assert worker_capacity(cluster, available) == 2
    warning = describe_worker_shortage(plan, 2, available)
    assert warning is not None and "can place 2" in warning and "2 GPU" in warning
    assert describe_worker_shortage(plan, worker_capacity(cluster, {"CPU": 16, "GPU": 4}),
                                    {"CPU": 16, "GPU": 4}) is None
