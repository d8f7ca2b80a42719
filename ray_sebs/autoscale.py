"""Nodes ready before the stage needs them: hold the next segment's extra workers early.

A segment that needs more workers starts a new worker group (one ``TorchTrainer.fit()``), and
only then does Ray Train ask for them; on KubeRay a GPU node takes minutes to arrive, so the run
would wait at every growing boundary. So while the current segment trains, once the time it has
left (epochs left x its mean seconds per epoch) drops to the lead time, the driver creates a
placement group of the bundles the next segment needs beyond the current one's. The pending group
is demand the autoscaler acts on, the nodes come up while the current segment still trains, and
the group keeps them busy, so the idle timeout cannot take them back before the boundary. When
the next segment's ``fit()`` has created its worker group, the driver removes the held group and
Ray Train places its workers on the freed nodes; the held group also goes when the run ends or
fails, and with the driver if it dies (a placement group shares its creator's fate).

Why not ``ray.autoscaler.sdk.request_resources``: it sets one resource target for the whole
cluster, last writer wins, and in Ray 2.60 every Train run starts Ray Data's
``AutoscalingCoordinator`` actor (detached), which sends its own merged target every 20 s and on
every change (``ray/data/_internal/cluster_autoscaler/default_autoscaling_coordinator.py``,
``_AutoscalingCoordinatorActor._tick`` and ``_merge_and_send_requests``), so another caller's
request lasts seconds. Entering the coordinator as a requester of its own would not do either:
requesters add up, so the next segment's bundles would be asked for twice once its ``fit()``
registers them, and its API is private.

An adaptive run's boundaries are decided as it trains, from the gradient noise scale; there the
boundary is predicted from the trend of the stage's B_noise (:func:`predict_next_stage`) and the
request is made once the predicted boundary is within the lead time
(:func:`plan_adaptive_prefetch`).

:func:`plan_prefetch` is the pure decision; :class:`ResourcePrefetcher` applies it in the driver,
fed each epoch's record as the driver's console receives it (:class:`~ray_sebs.console.RunConsole`
``on_epoch``). Imports neither Ray nor torch at import time.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from ray_sebs.errors import require_seconds
from ray_sebs.plan import ElasticPlan
from ray_sebs.schedule import should_grow

logger = logging.getLogger(__name__)

DEFAULT_LEAD_TIME_S = 300.0
"""Seconds before a growing boundary to ask for the next segment's nodes: about what a cloud takes
to provision a GPU node and pull a multi-GB image onto it (``cluster/README.md``)."""

TREND_EPOCHS = 3
"""Epochs of the current stage whose B_noise the adaptive prefetch fits a line through."""

LEAD_TIME_FIX = "use e.g. 300 (five minutes): at least a node's launch plus its image pull"


@dataclass(frozen=True)
class PrefetchRequest:
    """Why and what to hold: the next segment's extra bundles, and the numbers behind it."""

    segment: int
    """0-based index of the segment the bundles are for."""
    workers: int
    """The segment's workers."""
    current_workers: int
    """The workers of the segment that is training: Ray Train already holds theirs."""
    bundles: list[dict[str, float]]
    """One per extra worker: ``workers - current_workers`` of them."""
    epoch: int
    """The epoch (0-based) after which the request was decided."""
    epochs_left: int
    """Epochs of the current segment still to train."""
    seconds_left: float
    lead_time_s: float
    requested_at: float = 0.0
    """Wall-clock time (``time.time()``) the placement group was created; 0 until then."""
    placed: bool | None = None
    """Whether the nodes were there (the group placed) when it was handed back; ``None`` before."""

    def describe(self) -> str:
        return (f"holding {len(self.bundles)} more worker bundles {self.bundles[0]} for segment "
                f"{self.segment} ({self.current_workers} -> {self.workers} workers) after epoch "
                f"{self.epoch}: {self.epochs_left} epochs (~{self.seconds_left:.0f}s) left in the "
                f"current segment <= lead time {self.lead_time_s:.0f}s")


def plan_prefetch(plan: ElasticPlan, epoch_just_finished: int, seconds_per_epoch: float,
                  lead_time_s: float) -> PrefetchRequest | None:
    """The request to make after ``epoch_just_finished``, or ``None``.

    A request is due when the segment that epoch belongs to has at most ``lead_time_s`` seconds of
    training left and the next segment needs more workers than it; the bundles are the extra
    workers' (``plan.cluster.worker_bundle()`` each). Never for the last segment, and never for a
    next segment that is not larger (its nodes are already there).
    """
    require_seconds("lead_time_s", lead_time_s, fix=LEAD_TIME_FIX)
    require_seconds("seconds_per_epoch", seconds_per_epoch, fix="report the epoch's wall seconds")
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
                           current_workers=current.workers,
                           bundles=[dict(bundle) for _ in range(upcoming.workers - current.workers)],
                           epoch=epoch_just_finished, epochs_left=epochs_left,
                           seconds_left=seconds_left, lead_time_s=lead_time_s)


def predict_next_stage(noise_by_epoch: Sequence[tuple[int, float]], stage_first_epoch: int,
                       batch_size: int, plan: ElasticPlan) -> int | None:
    """The 0-based epoch at which an adaptive run is predicted to begin the stage after the
    current one (first epoch ``stage_first_epoch``, batch ``batch_size``), from the stage's
    smoothed B_noise so far, ``(epoch, B_noise)`` in order; ``None`` when the trend never reaches
    the threshold within the budget.

    The boundary is no earlier than the stage's minimum epochs. Where the last B_noise already
    passes the rule (:func:`~ray_sebs.schedule.should_grow`), that is the boundary; otherwise a
    least-squares line through the last :data:`TREND_EPOCHS` finite values is extended to
    ``noise_threshold * rho * B_s``; a flat or falling trend predicts no growth.
    """
    config = plan.schedule.config
    budget = plan.schedule.total_epochs
    earliest = stage_first_epoch + config.min_epochs_per_stage
    last_epoch = noise_by_epoch[-1][0] if noise_by_epoch else stage_first_epoch - 1
    points = [(epoch, noise) for epoch, noise in noise_by_epoch if math.isfinite(noise)]
    # The rule without its minimum: does the last value already pass (threshold 0 always does)?
    if should_grow(points[-1][1] if points else math.nan, batch_size, config.growth_ratio,
                   config.noise_threshold, epochs_in_stage=1, min_epochs=1):
        boundary = max(earliest, last_epoch + 1)
        return boundary if boundary < budget else None
    points = points[-TREND_EPOCHS:]
    if len(points) < 2:
        return None
    mean_epoch = sum(epoch for epoch, _ in points) / len(points)
    mean_noise = sum(noise for _, noise in points) / len(points)
    spread = sum((epoch - mean_epoch) ** 2 for epoch, _ in points)
    slope = sum((epoch - mean_epoch) * (noise - mean_noise) for epoch, noise in points) / spread
    if slope <= 0:
        return None
    target = config.noise_threshold * config.growth_ratio * batch_size
    crossing = mean_epoch + (target - mean_noise) / slope  # the epoch whose end reaches it
    boundary = max(earliest, math.ceil(crossing) + 1, last_epoch + 1)
    return boundary if boundary < budget else None


def plan_adaptive_prefetch(plan: ElasticPlan, stage: int, noise_by_epoch: Sequence[tuple[int, float]],
                           stage_first_epoch: int, seconds_per_epoch: float,
                           lead_time_s: float) -> PrefetchRequest | None:
    """:func:`plan_prefetch` for an adaptive run after the last epoch of ``noise_by_epoch``, in
    1-based ``stage`` (begun at ``stage_first_epoch``): due when the next candidate stage needs
    more workers and its predicted boundary (:func:`predict_next_stage`) is within the lead time.
    ``plan`` is the earliest growth (:func:`~ray_sebs.plan.widest_plan`): every candidate stage's
    workers and segment number, whenever it begins."""
    require_seconds("lead_time_s", lead_time_s, fix=LEAD_TIME_FIX)
    require_seconds("seconds_per_epoch", seconds_per_epoch, fix="report the epoch's wall seconds")
    if not noise_by_epoch or stage + 1 > len(plan.stages):
        return None
    current, upcoming = plan.stage_plan(stage), plan.stage_plan(stage + 1)
    if upcoming.target_workers <= current.target_workers:
        return None
    boundary = predict_next_stage(noise_by_epoch, stage_first_epoch,
                                  current.stage.global_batch_size, plan)
    if boundary is None:
        return None
    epoch = noise_by_epoch[-1][0]
    epochs_left = boundary - (epoch + 1)
    seconds_left = epochs_left * seconds_per_epoch
    if seconds_left > lead_time_s:
        return None
    bundle = plan.cluster.worker_bundle()
    extra = upcoming.target_workers - current.target_workers
    return PrefetchRequest(
        segment=plan.segment_of_epoch(upcoming.stage.first_epoch).index,
        workers=upcoming.target_workers, current_workers=current.target_workers,
        bundles=[dict(bundle) for _ in range(extra)], epoch=epoch, epochs_left=epochs_left,
        seconds_left=seconds_left, lead_time_s=lead_time_s)


HANDOVER_POLL_S = 0.1
"""How often, while a fit starts, the driver looks for Ray Train's worker group: the moment it
exists, the held group is removed (the autoscaler may see both for about this long)."""

HANDOVER_TIMEOUT_S = 600.0
"""Hand back what is held after this long even if no worker group asked for it."""


class Reservation(Protocol):
    """What :class:`ResourcePrefetcher` holds: a placement group, or a stand-in in tests."""

    def placed(self) -> bool: ...

    def others(self) -> set[str]:
        """Every other group of the same bundles now (a snapshot before the fit starts)."""
        ...

    def wait_for_new(self, known: set[str], timeout_s: float) -> None:
        """Block until a group of the same bundles that is not in ``known`` exists, or
        ``timeout_s`` passes."""
        ...

    def remove(self) -> None: ...


ReserveFn = Callable[[list[dict[str, float]], str], Reservation]
"""``reserve(bundles, name)``: start holding ``bundles`` (:class:`PlacementGroupReservation`)."""


class PlacementGroupReservation:
    """A ``PACK`` placement group of the bundles: pending until the autoscaler's nodes arrive."""

    def __init__(self, bundles: list[dict[str, float]], name: str) -> None:
        from ray.util.placement_group import placement_group

        self.bundle = dict(bundles[0])
        self.group = placement_group(bundles, strategy="PACK", name=name)

    def placed(self) -> bool:
        from ray.util import placement_group_table

        # The table, not ``group.wait(0)``: a zero timeout can expire before the answer arrives
        # and say False for a placed group (it did so once in four benchmark runs).
        return placement_group_table(self.group)["state"] == "CREATED"

    def others(self) -> set[str]:
        from ray.util import placement_group_table

        # Ray Train's worker group is an unnamed group of one worker bundle per worker.
        return {group_id for group_id, info in placement_group_table().items()
                if group_id != self.group.id.hex() and info["state"] != "REMOVED"
                and info["bundles"] and all(bundle == self.bundle
                                            for bundle in info["bundles"].values())}

    def wait_for_new(self, known: set[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.others() - known and time.monotonic() < deadline:
            time.sleep(HANDOVER_POLL_S)

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(self.group)


@dataclass
class ResourcePrefetcher:
    """Holds the next, larger segment's extra workers from ``lead_time_s`` before its boundary.

    The driver calls :meth:`start_segment` before each segment's ``fit()`` and :meth:`release`
    when the run ends, failed or not; :meth:`on_epoch` gets every epoch record (it runs in the
    console's thread, hence the lock). Records of an earlier segment that arrive late are ignored,
    and each segment is asked for at most once, across worker-group restarts too. Seconds per
    epoch are the mean of the segment's ``epoch_time_s`` so far: one odd epoch does not swing the
    decision. For an adaptive run ``plan`` is its earliest growth and each request waits for the
    trend of B_noise to predict the boundary (:func:`plan_adaptive_prefetch`); the current stage's
    first epoch is the first one reported in it (after a resume mid-stage: the first one since,
    which predicts the minimum epochs later than they end, never earlier).

    The hand-over: removed before the fit, the group would leave its nodes idle until the new
    Train controller registers its own request, and an idle timeout shorter than that start (the
    test cluster's 6 s on a loaded machine) takes them back. So a placed group is kept until Ray
    Train's worker group for the segment exists (a new group of the same bundles), then removed
    at once; that group is pending demand, which the autoscaler keeps nodes for.
    """

    plan: ElasticPlan
    lead_time_s: float = DEFAULT_LEAD_TIME_S
    reserve: ReserveFn = PlacementGroupReservation
    name: str = "ray-sebs"
    """Names the placement groups (``<name>-prefetch-segment-<i>``) in ``ray status`` and the
    dashboard."""
    handover_timeout_s: float = HANDOVER_TIMEOUT_S
    requests: list[PrefetchRequest] = field(default_factory=list)
    """Every request made, in order, with when it was made and whether it was placed in time."""
    _segment: int = field(default=0, init=False)
    _epoch_times: list[float] = field(default_factory=list, init=False)
    _held: Reservation | None = field(default=None, init=False)
    _stage_noise: list[tuple[int, float]] = field(default_factory=list, init=False)
    """``(epoch, B_noise)`` of the current stage's epochs (adaptive runs)."""
    _stage: int | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        require_seconds("prefetch_lead_time_s", self.lead_time_s, fix=LEAD_TIME_FIX)

    def start_segment(self, index: int) -> bool:
        """Segment ``index``'s ``fit()`` starts next. True when the nodes held for it are there:
        the group stays until Ray Train's worker group asks for them. Anything else held (not
        placed, or for another segment) is removed now: a pending group next to Ray Train's would
        be counted twice by the autoscaler."""
        with self._lock:
            self._segment = index
            self._epoch_times = []
            held = self._held
            if held is None:
                return False
            placed = held.placed()
            request = self.requests[-1] = replace(self.requests[-1], placed=placed)
            if not placed or request.segment != index:
                self._remove_locked()
                if not placed:
                    logger.warning(
                        "resource prefetch: the nodes for segment %d were not there %.0fs after the "
                        "request; a longer --prefetch-lead-time would have them ready",
                        request.segment, time.time() - request.requested_at)
                return False
            known = held.others()
        threading.Thread(target=self._hand_over, args=(held, known), daemon=True,
                         name="ray-sebs-prefetch-handover").start()
        return True

    def _hand_over(self, held: Reservation, known: set[str]) -> None:
        try:
            held.wait_for_new(known, self.handover_timeout_s)
        except Exception as error:  # Ray going away under the run: release() still removes it
            logger.debug("resource prefetch: hand-over stopped (%s)", error)
            return
        with self._lock:
            if self._held is held:
                self._remove_locked()

    def on_epoch(self, record: Mapping[str, Any]) -> None:
        """An epoch record (``epoch``, ``epoch_time_s``) as the driver receives it."""
        adaptive = self.plan.schedule.config.kind == "adaptive"
        try:
            epoch = int(record["epoch"])
            epoch_time = float(record["epoch_time_s"])
            # An adaptive run's own plan moves with its decisions; its records name the segment.
            segment = int(record["segment"]) if adaptive else self.plan.segment_of_epoch(epoch).index
            stage = int(record["stage"]) if adaptive else 0
            noise = float(record["gradient_noise_scale"]) if adaptive else math.nan
        except (KeyError, TypeError, ValueError, IndexError) as error:
            logger.debug("resource prefetch: ignoring record (%s)", error)
            return
        if not math.isfinite(epoch_time) or epoch_time < 0:
            return
        with self._lock:
            if segment != self._segment:  # a late record of the segment before
                return
            self._epoch_times.append(epoch_time)
            seconds_per_epoch = sum(self._epoch_times) / len(self._epoch_times)
            if not adaptive:
                request = plan_prefetch(self.plan, epoch, seconds_per_epoch, self.lead_time_s)
            else:
                if stage != self._stage:
                    self._stage, self._stage_noise = stage, []
                self._stage_noise.append((epoch, noise))
                request = plan_adaptive_prefetch(self.plan, stage, self._stage_noise,
                                                 self._stage_noise[0][0], seconds_per_epoch,
                                                 self.lead_time_s)
            if request is None or self._held is not None \
                    or any(made.segment == request.segment for made in self.requests):
                return
            # One line on the driver's console: the CLI shows ray-sebs's warnings, not its info.
            logger.warning("resource prefetch: %s (%.1fs per epoch over %d epochs)",
                           request.describe(), seconds_per_epoch, len(self._epoch_times))
            self._held = self.reserve(request.bundles,
                                      f"{self.name}-prefetch-segment-{request.segment}")
            self.requests.append(replace(request, requested_at=time.time()))

    def release(self) -> None:
        """Stop holding anything (the run ended or failed); idle nodes may then go."""
        with self._lock:
            if self._held is not None:
                if self.requests[-1].placed is None:
                    self.requests[-1] = replace(self.requests[-1], placed=self._held.placed())
                self._remove_locked()

    def _remove_locked(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.remove()
