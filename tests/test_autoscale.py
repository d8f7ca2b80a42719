"""Nodes ready before the stage needs them: the prefetch decision and the driver's prefetcher.

The plan under test grows 1 -> 2 -> 4 workers over segments of 3, 4 and 5 epochs (epochs 0-2, 3-6,
7-11). The decision and the prefetcher are fed synthetic epoch records, with a stand-in for the
placement group; one small test holds a real placement group on a plain local Ray. The real
autoscaler is in ``tests/test_autoscaler.py``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import replace

import pytest

from ray_sebs.autoscale import (
    DEFAULT_LEAD_TIME_S,
    PlacementGroupReservation,
    ResourcePrefetcher,
    plan_adaptive_prefetch,
    plan_prefetch,
    predict_next_stage,
)
from ray_sebs.errors import ConfigError
from ray_sebs.plan import ClusterConfig, ElasticPlan, Segment, build_plan, widest_plan
from ray_sebs.schedule import ScheduleConfig

BUNDLE = {"CPU": 0.5}


@pytest.fixture(scope="module")
def plan() -> ElasticPlan:
    plan = build_plan(
        ScheduleConfig(initial_batch_size=8, growth_ratio=2, num_stages=3, epochs_per_stage=(3, 4, 5)),
        1000, ClusterConfig(max_workers=4, max_micro_batch=8, resources_per_worker=BUNDLE))
    assert [(s.workers, s.first_epoch, s.end_epoch) for s in plan.segments] == [(1, 0, 3), (2, 3, 7),
                                                                                 (4, 7, 12)]
    return plan


# --------------------------------------------------------------------------------------------
# the decision


def test_requests_come_only_in_the_last_epochs_before_each_growing_boundary(plan: ElasticPlan) -> None:
    # 10 s per epoch and a 15 s lead time: due once at most one epoch is left in the segment.
    requests = {epoch: plan_prefetch(plan, epoch, seconds_per_epoch=10, lead_time_s=15)
                for epoch in range(plan.schedule.total_epochs)}
    due = {epoch: None if request is None else request.bundles for epoch, request in requests.items()}
    # The extra workers only: Ray Train already holds the current segment's.
    one, two = [BUNDLE], [BUNDLE] * 2
    assert due == {0: None, 1: one, 2: one,           # segment 0 (1 worker) -> segment 1 (2 workers)
                   3: None, 4: None, 5: two, 6: two,  # segment 1 -> segment 2 (4 workers)
                   7: None, 8: None, 9: None, 10: None, 11: None}  # last segment: nothing next


def test_the_lead_time_moves_the_request_earlier(plan: ElasticPlan) -> None:
    def first_due(lead_time_s: float) -> list[int]:
        return [epoch for epoch in range(plan.schedule.total_epochs)
                if plan_prefetch(plan, epoch, 60.0, lead_time_s) is not None]

    assert first_due(0) == [2, 6]  # only once the segment's last epoch is done
    assert first_due(120) == [0, 1, 2, 4, 5, 6]  # 2 epochs x 60 s <= 120 s
    assert first_due(DEFAULT_LEAD_TIME_S) == [0, 1, 2, 3, 4, 5, 6]  # a whole segment ahead
    # Fast epochs: everything fits in the lead time, still never from the last segment.
    assert first_due(10**6) == list(range(7))


def test_the_request_says_why(plan: ElasticPlan) -> None:
    request = plan_prefetch(plan, 5, seconds_per_epoch=30.0, lead_time_s=60.0)
    assert request is not None
    assert (request.segment, request.workers, request.current_workers, request.epoch,
            request.epochs_left) == (2, 4, 2, 5, 1)
    assert request.seconds_left == 30.0
    assert request.bundles == [BUNDLE] * 2
    request.bundles[0]["CPU"] = 99  # the bundles are copies, not the plan's own dict
    assert plan.cluster.worker_bundle() == BUNDLE
    assert "segment 2" in request.describe() and "lead time 60s" in request.describe()


def test_never_when_the_next_segment_is_not_larger(plan: ElasticPlan) -> None:
    # SEBS targets never shrink, so build the case by hand: 2 workers, then 1.
    first, second = plan.stages[0], plan.stages[1]
    shrinking = replace(plan, stages=(first, second),
                        segments=(Segment(index=0, workers=2, stages=(first,)),
                                  Segment(index=1, workers=1, stages=(second,))))
    for epoch in range(first.stage.end_epoch):
        assert plan_prefetch(shrinking, epoch, 1.0, 10**6) is None


def test_bad_numbers_are_refused(plan: ElasticPlan) -> None:
    with pytest.raises(ConfigError, match="lead_time_s"):
        plan_prefetch(plan, 0, 1.0, -1)
    with pytest.raises(ConfigError, match="seconds_per_epoch"):
        plan_prefetch(plan, 0, float("nan"), 10)
    with pytest.raises(IndexError):
        plan_prefetch(plan, plan.schedule.total_epochs, 1.0, 10)
    with pytest.raises(ConfigError, match="prefetch_lead_time_s"):
        ResourcePrefetcher(plan, lead_time_s=float("inf"))


# --------------------------------------------------------------------------------------------
# the prefetcher


class FakeReservation:
    """A stand-in for the placement group: placed when the test says the nodes are up, and taken
    over once the test says Ray Train's worker group exists."""

    def __init__(self, log: list[tuple[str, int]], bundles: list[dict[str, float]], name: str) -> None:
        self.log = log
        self.bundles = bundles
        self.name = name
        self.is_placed = False
        self.worker_group_exists = threading.Event()
        log.append(("reserve", len(bundles)))

    def placed(self) -> bool:
        return self.is_placed

    def others(self) -> set[str]:
        return {"segment-0-worker-group"}

    def wait_for_new(self, known: set[str], timeout_s: float) -> None:
        assert known == {"segment-0-worker-group"}
        self.worker_group_exists.wait(timeout_s)

    def remove(self) -> None:
        self.log.append(("remove", len(self.bundles)))


class Cluster:
    """Records what the prefetcher holds and hands back, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []
        self.held: list[FakeReservation] = []

    def reserve(self, bundles: list[dict[str, float]], name: str) -> FakeReservation:
        self.held.append(FakeReservation(self.log, bundles, name))
        return self.held[-1]


def prefetcher_for(plan: ElasticPlan, lead_time_s: float) -> tuple[ResourcePrefetcher, Cluster]:
    cluster = Cluster()
    return ResourcePrefetcher(plan, lead_time_s=lead_time_s, reserve=cluster.reserve,
                              name="run"), cluster


def epoch(prefetcher: ResourcePrefetcher, index: int, seconds: float) -> None:
    prefetcher.on_epoch({"epoch": index, "epoch_time_s": seconds, "world_size": 1})


def test_holds_each_next_segment_once_ahead_of_the_boundary(plan: ElasticPlan) -> None:
    prefetcher, cluster = prefetcher_for(plan, lead_time_s=15)
    for segment in plan.segments:  # what the driver does around each fit
        prefetcher.start_segment(segment.index)
        for index in range(segment.first_epoch, segment.end_epoch):
            epoch(prefetcher, index, 10.0)
    prefetcher.release()
    # Segment 1's extra worker after epoch 1, handed back as segment 1 starts; segment 2's two
    # extra workers after epoch 5, handed back as segment 2 starts.
    assert cluster.log == [("reserve", 1), ("remove", 1), ("reserve", 2), ("remove", 2)]
    assert [(r.segment, r.epoch) for r in prefetcher.requests] == [(1, 1), (2, 5)]
    assert [held.name for held in cluster.held] == ["run-prefetch-segment-1", "run-prefetch-segment-2"]
    assert all(r.requested_at > 0 and r.placed is False for r in prefetcher.requests)


def test_placed_nodes_are_held_until_ray_train_asks_for_them(plan: ElasticPlan) -> None:
    prefetcher, cluster = prefetcher_for(plan, lead_time_s=10**6)
    assert prefetcher.start_segment(0) is False  # nothing held
    epoch(prefetcher, 0, 1.0)
    cluster.held[0].is_placed = True
    assert prefetcher.start_segment(1) is True
    assert prefetcher.requests[0].placed is True
    time.sleep(0.2)
    assert cluster.log == [("reserve", 1)]  # still held: no worker group yet
    cluster.held[0].worker_group_exists.set()
    deadline = time.monotonic() + 5
    while len(cluster.log) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cluster.log == [("reserve", 1), ("remove", 1)]
    prefetcher.release()  # nothing left to hand back
    assert cluster.log == [("reserve", 1), ("remove", 1)]


def test_unplaced_nodes_are_handed_back_before_the_fit(plan: ElasticPlan) -> None:
    prefetcher, cluster = prefetcher_for(plan, lead_time_s=10**6)
    prefetcher.start_segment(1)
    epoch(prefetcher, 3, 1.0)
    # Pending next to Ray Train's own group, it would be counted twice.
    assert prefetcher.start_segment(2) is False
    assert cluster.log == [("reserve", 2), ("remove", 2)]
    assert prefetcher.requests[0].placed is False


def test_a_late_group_says_so_on_the_console(plan: ElasticPlan, caplog) -> None:
    prefetcher, _ = prefetcher_for(plan, lead_time_s=10**6)
    with caplog.at_level(logging.WARNING, logger="ray_sebs.autoscale"):
        prefetcher.start_segment(0)
        epoch(prefetcher, 0, 1.0)
        prefetcher.start_segment(1)
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("resource prefetch: holding 1 more worker bundles")
    assert "were not there" in lines[1] and "--prefetch-lead-time" in lines[1]


def test_never_asks_twice_even_when_epochs_are_reported_again(plan: ElasticPlan) -> None:
    prefetcher, cluster = prefetcher_for(plan, lead_time_s=15)
    for index in (0, 1, 1, 2, 1, 2):  # a worker-group restart replays epochs 1-2
        epoch(prefetcher, index, 10.0)
    assert cluster.log == [("reserve", 1)]


def test_late_records_of_the_previous_segment_are_ignored(plan: ElasticPlan) -> None:
    prefetcher, cluster = prefetcher_for(plan, lead_time_s=10**6)
    prefetcher.start_segment(1)
    epoch(prefetcher, 2, 1.0)  # segment 0's last record, arriving after segment 1 started
    assert cluster.log == []
    epoch(prefetcher, 3, 1.0)
    assert [r.segment for r in prefetcher.requests] == [2]


def test_averages_the_segments_epoch_times(plan: ElasticPlan) -> None:
    prefetcher, cluster = prefetcher_for(plan, lead_time_s=100)
    prefetcher.start_segment(1)
    # Segment 1 has epochs 3-6. After epoch 5 one epoch is left: at the last epoch's 20 s it would
    # be due, but the mean over the segment, (300 + 20 + 20) / 3 = 113 s, is above the 100 s lead
    # time, so the request waits for epoch 6 (nothing left).
    for index, seconds in [(3, 300.0), (4, 20.0), (5, 20.0)]:
        epoch(prefetcher, index, seconds)
    assert cluster.log == []
    epoch(prefetcher, 6, 20.0)
    assert cluster.log == [("reserve", 2)]
    assert prefetcher.requests[0].seconds_left == 0


def test_ignores_records_it_cannot_read(plan: ElasticPlan) -> None:
    prefetcher, cluster = prefetcher_for(plan, lead_time_s=10**6)
    prefetcher.on_epoch({"validation_accuracy": 0.9})
    epoch(prefetcher, 0, float("nan"))
    epoch(prefetcher, 0, -1.0)
    epoch(prefetcher, "zero", 1.0)  # type: ignore[arg-type]
    epoch(prefetcher, 99, 1.0)  # past the plan
    assert cluster.log == []
    epoch(prefetcher, 0, 1.0)
    assert cluster.log == [("reserve", 1)]


def test_release_hands_back_what_is_held_once(plan: ElasticPlan) -> None:
    prefetcher, cluster = prefetcher_for(plan, lead_time_s=10**6)
    prefetcher.release()  # nothing held: nothing to do
    epoch(prefetcher, 0, 1.0)
    prefetcher.release()
    prefetcher.release()
    assert cluster.log == [("reserve", 1), ("remove", 1)]


def test_the_lead_time_is_checked_where_it_is_given() -> None:
    from ray_sebs.trainer import SEBSTrainer

    with pytest.raises(ConfigError, match="prefetch_lead_time_s=-1"):
        SEBSTrainer(lambda: None, datasets={"train": None}, schedule=ScheduleConfig(),  # type: ignore
                    prefetch_lead_time_s=-1)


@pytest.mark.ray
def test_a_real_placement_group_is_held_and_removed(ray_cluster: None) -> None:
    """The default reservation on a plain local Ray: a bundle that fits is placed at once."""
    from ray.util import placement_group_table
    from ray.util.placement_group import placement_group, remove_placement_group

    held = PlacementGroupReservation([{"CPU": 0.01}], "ray-sebs-test-prefetch")
    assert held.group.wait(timeout_seconds=60)
    assert held.placed()
    known = held.others()
    other = placement_group([{"CPU": 0.01}] * 2)  # what Ray Train's worker group looks like
    try:
        held.wait_for_new(known, timeout_s=30)
        assert held.others() - known == {other.id.hex()}
        unrelated = placement_group([{"CPU": 0.02}])
        assert unrelated.id.hex() not in held.others()
        remove_placement_group(unrelated)
    finally:
        remove_placement_group(other)
    held.remove()
    assert placement_group_table(held.group)["state"] == "REMOVED"


# --------------------------------------------------------------------------------------------
# an adaptive run: the boundary predicted from the trend of B_noise


@pytest.fixture(scope="module")
def adaptive_plan() -> ElasticPlan:
    """The earliest growth of an adaptive run whose stages want 1, 2 and 4 workers (B = 8, 16,
    32), each after at least 2 epochs, in a budget of 12 epochs."""
    config = ScheduleConfig(kind="adaptive", initial_batch_size=8, growth_ratio=2, num_stages=3,
                            epochs_per_stage=4, min_epochs_per_stage=2, noise_threshold=1.0)
    plan = widest_plan(config, 1000, ClusterConfig(max_workers=4, max_micro_batch=8,
                                                   resources_per_worker=BUNDLE))
    assert [(s.workers, s.first_epoch) for s in plan.segments] == [(1, 0), (2, 2), (4, 4)]
    return plan


def test_the_trend_of_the_noise_scale_predicts_the_boundary(adaptive_plan: ElasticPlan) -> None:
    # Stage 1 (B=8) grows once B_noise >= 1 x 2 x 8 = 16.
    rising = [(0, 4.0), (1, 8.0), (2, 12.0)]  # +4 an epoch: 16 at the end of epoch 3
    assert predict_next_stage(rising, 0, 8, adaptive_plan) == 4
    assert predict_next_stage(rising[:2], 0, 8, adaptive_plan) == 4
    assert predict_next_stage(rising[:1], 0, 8, adaptive_plan) is None, "one point: no trend"
    assert predict_next_stage([(0, 20.0)], 0, 8, adaptive_plan) == 2, "passes, after the minimum"
    assert predict_next_stage([(0, 5.0), (1, 20.0), (2, 30.0)], 0, 8, adaptive_plan) == 3
    assert predict_next_stage([(0, 12.0), (1, 8.0), (2, 4.0)], 0, 8, adaptive_plan) is None
    assert predict_next_stage([(0, 12.0), (1, 12.0)], 0, 8, adaptive_plan) is None, "flat"
    assert predict_next_stage([(0, 1.0), (1, 1.1)], 0, 8, adaptive_plan) is None, "past the budget"
    assert predict_next_stage([(0, math.nan), (1, 4.0), (2, 8.0)], 0, 8, adaptive_plan) == 5
    zero = replace(adaptive_plan, schedule=replace(
        adaptive_plan.schedule, config=replace(adaptive_plan.schedule.config, noise_threshold=0)))
    assert predict_next_stage([(0, math.nan)], 0, 8, zero) == 2, "threshold 0: the minimum"


def test_an_adaptive_request_is_made_when_the_predicted_boundary_is_within_the_lead_time(
        adaptive_plan: ElasticPlan) -> None:
    rising = [(0, 4.0), (1, 8.0), (2, 12.0)]  # boundary predicted at epoch 4
    assert plan_adaptive_prefetch(adaptive_plan, 1, rising[:2], 0, 10.0, lead_time_s=15) is None
    request = plan_adaptive_prefetch(adaptive_plan, 1, rising, 0, 10.0, lead_time_s=15)
    assert request is not None
    assert (request.segment, request.workers, request.current_workers, request.epochs_left) \
        == (1, 2, 1, 1)
    assert request.bundles == [BUNDLE]
    early = plan_adaptive_prefetch(adaptive_plan, 1, rising[:2], 0, 10.0, lead_time_s=25)
    assert early is not None and early.epochs_left == 2
    assert plan_adaptive_prefetch(adaptive_plan, 3, rising, 0, 10.0, lead_time_s=10**6) is None, \
        "no stage after the last"


def test_the_prefetcher_follows_an_adaptive_runs_stages(adaptive_plan: ElasticPlan) -> None:
    prefetcher, cluster = prefetcher_for(adaptive_plan, lead_time_s=15)
    prefetcher.start_segment(0)
    for index, noise in enumerate([4.0, 8.0, 12.0]):
        prefetcher.on_epoch({"epoch": index, "epoch_time_s": 10.0, "segment": 0, "stage": 1,
                             "gradient_noise_scale": noise})
    assert [(r.segment, r.epoch) for r in prefetcher.requests] == [(1, 2)]
    prefetcher.start_segment(1)  # the run grew at epoch 4: stage 2 (B=16), threshold 32
    for index, noise in zip(range(4, 7), [10.0, 20.0, 30.0], strict=True):
        prefetcher.on_epoch({"epoch": index, "epoch_time_s": 10.0, "segment": 1, "stage": 2,
                             "gradient_noise_scale": noise})
    assert [(r.segment, r.epoch, r.workers) for r in prefetcher.requests] == [(1, 2, 2), (2, 6, 4)]
    prefetcher.release()
    assert cluster.log == [("reserve", 1), ("remove", 1), ("reserve", 2), ("remove", 2)]
