"""Shared fixtures: one real local Ray cluster per test module.

The machine has 2 cores, so Ray starts with an explicit ``num_cpus=2`` and tests size workers
with fractional CPUs. Token authentication is switched off explicitly: a head started while
``~/.ray/auth_token`` exists would otherwise come up with token auth on (Ray 2.60's token mode); the job
submission tests turn it on deliberately for their own head.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Keep Ray Train's and Ray Data's consoles quiet in test output.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
