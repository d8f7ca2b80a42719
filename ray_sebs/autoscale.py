"""Nodes ready before the stage needs them: ask the autoscaler for the next segment's workers early.

A segment that needs more workers starts a new worker group (one ``TorchTrainer.fit()``). Its
placement group is what normally makes the autoscaler add nodes, and on KubeRay a GPU node takes
minutes to arrive: the run would wait at every growing boundary. So while the current segment
trains, once the time it has left (epochs left x seconds per epoch) drops to the lead time, the
driver asks for the next segment's bundles with ``ray.autoscaler.sdk.request_resources``. The
request is a target for the whole cluster (it replaces the previous one, it does not add to what
is in use), so asking for the next segment's ``W`` bundles while the current ``W' < W`` workers
run adds ``W - W'`` workers' worth of nodes. When the run ends, :func:`release_resource_request`
withdraws the request so idle nodes can go.

:func:`plan_prefetch` is the pure decision; :class:`ResourcePrefetchCallback` applies it from a Ray
Train V2 ``UserCallback`` on every report (the controller runs it; the training loop reports
``epoch``, the 0-based global epoch that just finished, and ``epoch_time_s``, its wall seconds).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray.train import UserCallback

from ray_sebs.errors import ConfigError
from ray_sebs.plan import ElasticPlan

logger = logging.getLogger(__name__)

DEFAULT_LEAD_TIME_S = 300.0
"""Seconds before a growing boundary to ask for the next segment's nodes: about what a cloud takes
to provision a GPU node and pull a multi-GB image onto it."""

RequestFn = Callable[..., Any]
"""``request_resources(bundles=[...])`` or a stand-in with the same keyword."""


@dataclass(frozen=True)
class PrefetchRequest:
    """Why and what to request: the next segment's bundles, and the numbers behind the decision."""

    segment: int
    """0-based index of the segment the bundles are for."""
    workers: int
    bundles: list[dict[str, float]]
    epoch: int
    """The epoch (0-based) after which the request was decided."""
    epochs_left: int
    """Epochs of the current segment still to train."""
    seconds_left: float
    lead_time_s: float

    def describe(self) -> str:
        return (f"requesting {self.workers} worker bundles {self.bundles[0]} for segment "
                f"{self.segment} after epoch {self.epoch}: {self.epochs_left} epochs "
                f"(~{self.seconds_left:.0f}s) left in the current segment <= lead time "
                f"{self.lead_time_s:.0f}s")


def plan_prefetch(plan: ElasticPlan, epoch_just_finished: int, seconds_per_epoch: float,
                  lead_time_s: float) -> PrefetchRequest | None:
    """The request to make after ``epoch_just_finished``, or ``None``.

    A request is due when the segment that epoch belongs to has at most ``lead_time_s`` seconds of
    training left and the next segment needs more workers than it; the bundles are the next
    segment's (``[plan.cluster.worker_bundle()] * next.workers``). Never for the last segment, and
    never for a next segment that is not larger (its nodes are already there).
    """
    _require_seconds("lead_time_s", lead_time_s)
    _require_seconds("seconds_per_epoch", seconds_per_epoch)
    current = plan.segment_of_epoch(epoch_just_finished)
    if current.index + 1 >= len(plan.segments):
        return None
    upcoming = plan.segments[current.index + 1]
    if upcoming.workers <= current.workers:
        return None
    epochs_left = current.end_epoch - (epoch_just_finished + 1)
    seconds_left = epochs_left * seconds_per_epoch
    if seconds_left > lead_time_s:
        return None
    bundle = plan.cluster.worker_bundle()
    return PrefetchRequest(segment=upcoming.index, workers=upcoming.workers,
                           bundles=[dict(bundle) for _ in range(upcoming.workers)],
                           epoch=epoch_just_finished, epochs_left=epochs_left,
                           seconds_left=seconds_left, lead_time_s=lead_time_s)


def release_resource_request(request_fn: RequestFn | None = None) -> None:
    """Withdraw the standing request (``bundles=[]``) so the autoscaler may remove idle nodes.

    Call it when the run ends, failed or not; the request otherwise outlives the run and keeps the
    nodes of its largest segment.
    """
    (request_fn or _default_request_fn())(bundles=[])


class ResourcePrefetchCallback(UserCallback):
    """Requests the next segment's workers ``lead_time_s`` before the segment boundary.

    Runs on the Ray Train controller. Each ``fit()`` (segment) gets its own copy, so "at most once"
    holds per upcoming segment within a fit, across worker-group restarts too. Seconds per epoch
    are the mean of this segment's reported ``epoch_time_s`` (one odd epoch does not swing the
    decision). After the run's last epoch it releases the request itself; the driver should still
    call :func:`release_resource_request` when a run fails.
    """

    def __init__(self, plan: ElasticPlan, lead_time_s: float = DEFAULT_LEAD_TIME_S,
                 request_fn: RequestFn | None = None) -> None:
        _require_seconds("lead_time_s", lead_time_s)
        self.plan = plan
        self.lead_time_s = float(lead_time_s)
        self.request_fn = request_fn
        self.requests: list[PrefetchRequest] = []
        self._epoch_times: dict[int, list[float]] = {}
        self._released = False

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                     checkpoint: Any) -> None:
        report = next((m for m in metrics if "epoch" in m and "epoch_time_s" in m), None)
        if report is None:
            return
        try:
            epoch = int(report["epoch"])
            epoch_time = float(report["epoch_time_s"])
            segment = self.plan.segment_of_epoch(epoch)
        except (TypeError, ValueError, IndexError) as error:
            logger.warning("resource prefetch: ignoring report %r (%s)", report, error)
            return
        if not math.isfinite(epoch_time) or epoch_time < 0:
            logger.warning("resource prefetch: ignoring epoch_time_s=%r of epoch %d", epoch_time, epoch)
            return
        times = self._epoch_times.setdefault(segment.index, [])
        times.append(epoch_time)
        seconds_per_epoch = sum(times) / len(times)
        if epoch + 1 >= self.plan.schedule.total_epochs:
            if not self._released:
                self._released = True
                logger.info("resource prefetch: last epoch %d done, releasing the resource request",
                            epoch)
                release_resource_request(self.request_fn)
            return
        request = plan_prefetch(self.plan, epoch, seconds_per_epoch, self.lead_time_s)
        if request is None or any(made.segment == request.segment for made in self.requests):
            return
        logger.info("resource prefetch: %s (%.1fs per epoch over %d epochs)", request.describe(),
                    seconds_per_epoch, len(times))
        (self.request_fn or _default_request_fn())(bundles=request.bundles)
        self.requests.append(request)


def _default_request_fn() -> RequestFn:
    from ray.autoscaler.sdk import request_resources

    return request_resources


def _require_seconds(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value < 0:
        raise ConfigError(name, value, "must be a finite number of seconds >= 0",
                          "use e.g. 300 (five minutes)")
