"""The prefetch on the real autoscaler: Ray's fake multi-node provider starts real raylets.

One growing run (1 -> 2 workers) whose second worker fits only on a node that does not exist when
it starts (:mod:`tests.autoscaling_cluster`). The prefetch must hold that node before the stage
boundary, the 2-worker segment must start on 2 workers, and after the run the placement group is
gone and the idle node is scaled down.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.autoscaling_cluster import AutoscalingCluster, growing_run

pytestmark = [pytest.mark.ray, pytest.mark.autoscaler]


@pytest.fixture(scope="module")
def cluster() -> Iterator[AutoscalingCluster]:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    cluster = AutoscalingCluster(idle_timeout_s=6)
    try:
        ray.init(address=cluster.start(), log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_prefetch_brings_the_node_up_before_the_growing_boundary(cluster, tmp_path, monkeypatch):
    import ray
    from ray.util import placement_group_table

    monkeypatch.setenv("RAY_SEBS_AUTOSCALING", "1")
    assert cluster.alive_nodes() == 1
    # A lead time longer than the run: the request is due after the first epoch, and the other
    # three (32 updates of >= 0.25 s each) leave the node ~24 s to come up (it takes ~10 s here).
    result = growing_run(str(tmp_path), "prefetch", lead_time_s=10**4, epochs=(4, 1), delay_s=0.25)
    history = result.history
    assert [r["epoch"] for r in history] == list(range(5))
    assert [r["world_size"] for r in history] == [1, 1, 1, 1, 2]
    assert history[-1]["updates"] == result.plan.total_updates
    assert history[-1]["samples"] == result.plan.total_samples

    requests = result.summary["prefetch_requests"]
    assert [(r["segment"], r["epoch"], len(r["bundles"])) for r in requests] == [(1, 0, 1)]
    boundary = history[3]["ended_at"]  # the last epoch of the 1-worker segment
    assert requests[0]["requested_at"] < boundary
    assert requests[0]["placed"], "the node was not up at the boundary"

    # Released: the group is removed, nothing holds the node, and the autoscaler takes it back.
    groups = [g for g in placement_group_table().values() if "-prefetch-segment-" in g["name"]]
    assert groups and all(g["state"] == "REMOVED" for g in groups)
    cluster.wait_for_nodes(1, timeout_s=90)
    log = cluster.autoscaler_log()
    # One node all run long: the segment ran on the node the prefetch brought up (the hand-over
    # left it no idle moment for the 6 s idle timeout), and it went once the run ended.
    assert log.count("Adding 1 node(s) of type ray.worker.slot") == 1
    assert "Removing 1 nodes of type ray.worker.slot (idle)" in log
    assert ray.is_initialized()
