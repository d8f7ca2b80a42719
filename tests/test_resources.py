"""Resource arithmetic that needs no cluster: worker sizing and the controller's poll interval."""

from __future__ import annotations

import os

import pytest

from ray_sebs.plan import ClusterConfig
from ray_sebs.resources import (
    CONTROLLER_POLL_ENV,
    autoscaling_enabled,
    controller_poll_interval_s,
    free_resources,
    size_worker_resources,
    worker_capacity,
)


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
