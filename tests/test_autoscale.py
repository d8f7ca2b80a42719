"""Nodes ready before the stage needs them: the prefetch decision and the Train callback.

The plan under test grows 1 -> 2 -> 4 workers over segments of 3, 4 and 5 epochs (epochs 0-2, 3-6,
7-11). The decision and the callback are fed synthetic epoch reports; one small test checks that
the real ``ray.autoscaler.sdk.request_resources`` accepts the calls on a plain local Ray.
"""

from __future__ import annotations

import inspect
import pickle
from dataclasses import replace
from typing import Any

import pytest
from ray.train import UserCallback

from ray_sebs.autoscale import (
    DEFAULT_LEAD_TIME_S,
    ResourcePrefetchCallback,
    plan_prefetch,
    release_resource_request,
)
from ray_sebs.errors import ConfigError
from ray_sebs.plan import ClusterConfig, ElasticPlan, Segment, build_plan
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


class Recorder:
    """A stand-in for ``request_resources`` that remembers every call."""

    def __init__(self) -> None:
        self.calls: list[list[dict[str, float]]] = []

    def __call__(self, *, bundles: list[dict[str, float]]) -> None:
        self.calls.append(bundles)


def report(callback: ResourcePrefetchCallback, epoch: int, epoch_time_s: float, workers: int = 2,
           **extra: Any) -> None:
    """What the Train controller does after every ``ray.train.report``: one dict per worker."""
    metrics = [{"epoch": epoch, "epoch_time_s": epoch_time_s, **extra} for _ in range(workers)]
    callback.after_report(run_context=None, metrics=metrics, checkpoint=None)


# --------------------------------------------------------------------------------------------
# the decision


def test_requests_come_only_in_the_last_epochs_before_each_growing_boundary(plan: ElasticPlan) -> None:
    # 10 s per epoch and a 15 s lead time: due once at most one epoch is left in the segment.
    requests = {epoch: plan_prefetch(plan, epoch, seconds_per_epoch=10, lead_time_s=15)
                for epoch in range(plan.schedule.total_epochs)}
    due = {epoch: None if request is None else request.bundles for epoch, request in requests.items()}
    two, four = [BUNDLE] * 2, [BUNDLE] * 4
    assert due == {0: None, 1: two, 2: two,           # segment 0 (1 worker) -> segment 1 (2 workers)
                   3: None, 4: None, 5: four, 6: four,  # segment 1 -> segment 2 (4 workers)
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
    assert (request.segment, request.workers, request.epoch, request.epochs_left) == (2, 4, 5, 1)
    assert request.seconds_left == 30.0
    assert request.bundles == [BUNDLE] * 4
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
    with pytest.raises(ConfigError, match="lead_time_s"):
        ResourcePrefetchCallback(plan, lead_time_s=float("inf"))


# --------------------------------------------------------------------------------------------
# the callback


def test_callback_requests_each_next_segment_once_ahead_of_the_boundary(plan: ElasticPlan) -> None:
    recorder = Recorder()
    callback = ResourcePrefetchCallback(plan, lead_time_s=15, request_fn=recorder)
    made: list[tuple[int, int]] = []
    for epoch in range(plan.schedule.total_epochs):
        report(callback, epoch, 10.0)
        made.append((epoch, len(recorder.calls)))
    # Segment 1's 2 bundles after epoch 1, segment 2's 4 after epoch 5, the release after epoch 11.
    assert recorder.calls == [[BUNDLE] * 2, [BUNDLE] * 4, []]
    assert [count for _, count in made] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3]
    assert [(r.segment, r.epoch) for r in callback.requests] == [(1, 1), (2, 5)]


def test_callback_never_asks_twice_even_when_epochs_are_reported_again(plan: ElasticPlan) -> None:
    recorder = Recorder()
    callback = ResourcePrefetchCallback(plan, lead_time_s=15, request_fn=recorder)
    for epoch in (0, 1, 1, 2, 1, 2):  # a worker-group restart replays epochs 1-2
        report(callback, epoch, 10.0)
    assert recorder.calls == [[BUNDLE] * 2]


def test_callback_averages_the_segments_epoch_times(plan: ElasticPlan) -> None:
    recorder = Recorder()
    callback = ResourcePrefetchCallback(plan, lead_time_s=100, request_fn=recorder)
    # Segment 1 has epochs 3-6. After epoch 5 one epoch is left: at the last epoch's 20 s it would
    # be due, but the mean over the segment, (300 + 20 + 20) / 3 = 113 s, is above the 100 s lead
    # time, so the request waits for epoch 6 (nothing left).
    for epoch, seconds in [(3, 300.0), (4, 20.0), (5, 20.0)]:
        report(callback, epoch, seconds)
    assert recorder.calls == []
    report(callback, 6, 20.0)
    assert recorder.calls == [[BUNDLE] * 4]
    assert callback.requests[0].seconds_left == 0


def test_callback_ignores_reports_it_cannot_read(plan: ElasticPlan) -> None:
    recorder = Recorder()
    callback = ResourcePrefetchCallback(plan, lead_time_s=10**6, request_fn=recorder)
    callback.after_report(run_context=None, metrics=[{"validation_accuracy": 0.9}], checkpoint=None)
    callback.after_report(run_context=None, metrics=[], checkpoint=None)
    report(callback, 0, float("nan"))
    report(callback, 0, -1.0)
    report(callback, "zero", 1.0)  # type: ignore[arg-type]
    report(callback, 99, 1.0)  # past the plan
    assert recorder.calls == []
    report(callback, 0, 1.0)
    assert recorder.calls == [[BUNDLE] * 2]


def test_callback_is_a_train_v2_user_callback(plan: ElasticPlan) -> None:
    from ray.train import RunConfig

    callback = ResourcePrefetchCallback(plan)
    assert isinstance(callback, UserCallback)
    assert list(inspect.signature(callback.after_report).parameters) \
        == list(inspect.signature(UserCallback.after_report).parameters)[1:]
    RunConfig(callbacks=[callback])  # V2 accepts only UserCallback instances
    copy = pickle.loads(pickle.dumps(callback))  # it travels to the Train controller
    assert copy.plan == plan and copy.lead_time_s == DEFAULT_LEAD_TIME_S


def test_release_withdraws_the_request() -> None:
    recorder = Recorder()
    release_resource_request(recorder)
    assert recorder.calls == [[]]


@pytest.mark.ray
def test_request_resources_works_on_a_plain_local_ray(ray_cluster: None, plan: ElasticPlan) -> None:
    """The default request function is the real SDK call, made on a cluster without an autoscaler."""
    callback = ResourcePrefetchCallback(plan, lead_time_s=10**6)
    for epoch in range(plan.schedule.total_epochs):
        report(callback, epoch, 1.0)
    assert [r.segment for r in callback.requests] == [1, 2]
    release_resource_request()
