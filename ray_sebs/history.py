"""A run's history, one record per epoch, and everything derived from it.

The training loop writes one :class:`EpochRecord` per finished epoch into the checkpoint; the
driver, the Tune comparison, the reports and the benchmarks only read them through the functions
here, so "wall time", "worker-seconds" and "a worker-group change" mean one thing everywhere.

Two kinds of worker-group change, named as Ray Train's controller names its states (``RESIZING``
and ``RESTARTING``):

* a **resize** is planned: the first epoch of a new segment (a stage boundary where the worker
  target changes) runs on a new worker group;
* a **recovery** is not: a new worker group within a segment, after a worker or node failure, an
  elastic shrink, or a driver restart.

Each costs the seconds from the end of the previous group's last epoch to the new group's first
update. A failure in the first epoch of a new segment, before it finished an epoch, shows as part
of that segment's resize (no record tells the attempts apart).

Pure Python: no Ray, no torch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict


class EpochRecord(TypedDict):
    """What one epoch did, as the loop reports it (all ranks' counts summed)."""

    epoch: int
    """0-based epoch of the run."""
    stage: int
    """1-based stage of the schedule."""
    segment: int
    """0-based segment of the plan (consecutive stages with one worker target)."""
    global_batch_size: int
    """B_s: samples in every update of the stage, over all workers."""
    learning_rate: float
    world_size: int
    """Workers that trained the epoch."""
    target_workers: int
    """Workers the plan wanted for the segment."""
    micro_batch_size: int
    accumulation_steps: int
    samples_per_update_min: int
    """Fewest samples any update of the epoch used, counted over all ranks: equals B_s."""
    samples_per_update_max: int
    """Most samples any update used: equals B_s too (the invariant's evidence)."""
    epoch_updates: int
    updates: int
    """Updates of the run so far, this epoch included."""
    samples: int
    """Samples of the run so far."""
    train_loss: float
    """Mean training loss over the epoch: per row, or per unit of a summed loss's count."""
    train_loss_count: float
    """What :attr:`train_loss` is a mean over: the epoch's rows, or the sum of the counts of a
    loss summed with its count (e.g. target tokens)."""
    validation_loss: float
    """The validation metric ``loss``; NaN without a validation dataset."""
    validation_accuracy: float
    """The validation metric ``accuracy``; NaN without one (or without a validation dataset)."""
    validation_metrics: dict[str, float]
    """Every validation metric, exact over the whole validation set; empty without one."""
    gradient_noise_scale: float
    """B_noise = tr(Sigma) / |G|^2 (McCandlish et al. 2018), in rows (or a summed loss's count
    units), from moving averages of both over the run's measuring updates
    (:func:`ray_sebs.loop.noise_estimate`): a global batch well below it wastes no samples, one
    above it does. NaN until |G|^2 is measurably positive."""
    stage_start_noise_scale: float
    """On the first epoch of a stage that an adaptive run began: the smoothed B_noise that began it
    (at the end of the epoch before, against that stage's B_s; :class:`StageDecision`). NaN on
    every other epoch and in the fixed schedules."""
    epoch_time_s: float
    """Seconds from the epoch's first batch request to the end of its evaluation."""
    samples_per_s: float
    data_wait_fraction: float
    """Share of the epoch spent waiting for the next batch."""
    segment_started_at: float
    """Unix time the epoch's worker group started the loop: a new value means a new group."""
    first_update_at: float | None
    """Unix time of the group's first update."""
    ended_at: float
    """Unix time the epoch ended."""


class StageDecision(TypedDict):
    """Why an adaptive run began a stage: kept in the checkpoint and the run record, in order."""

    stage: int
    """1-based stage that began."""
    epoch: int
    """0-based first epoch of that stage."""
    noise_scale: float
    """The smoothed B_noise at the end of the epoch before."""
    batch_size: int
    """B_s of the stage that ended."""
    threshold_batch_size: float
    """``noise_threshold * rho * B_s``: what B_noise reached."""


def stage_starts(decisions: Sequence[Mapping[str, Any]]) -> tuple[int, ...]:
    """The first epochs of stages 2, 3, ... that ``decisions`` began, for
    :attr:`~ray_sebs.schedule.ScheduleConfig.stage_starts`."""
    return tuple(int(decision["epoch"]) for decision in decisions)


HISTORY_COLUMNS: tuple[str, ...] = tuple(EpochRecord.__annotations__)
"""The record's fields in order."""
METRICS_FIELD = "validation_metrics"
"""The record's one field that is a mapping: ``history.csv`` spreads it over
``validation_<name>`` columns (:func:`flat_record`)."""


def flat_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` with every validation metric as its own ``validation_<name>`` field."""
    flat = {name: value for name, value in record.items() if name != METRICS_FIELD}
    for name, value in (record.get(METRICS_FIELD) or {}).items():
        flat.setdefault(f"validation_{name}", value)
    return flat

History = Sequence[Mapping[str, Any]]
"""One run's records, one per epoch, in order."""

RESIZE = "resize"
RECOVERY = "recovery"


@dataclass(frozen=True)
class WorkerGroupChange:
    """A new worker group between two epochs."""

    kind: str
    """:data:`RESIZE` (planned, a new segment) or :data:`RECOVERY` (within a segment)."""
    epoch: int
    """The new group's first epoch."""
    workers_before: int
    workers_after: int
    previous_ended_at: float
    """Unix time the old group's last epoch ended."""
    first_update_at: float
    """Unix time of the new group's first update."""

    @property
    def cost_s(self) -> float:
        """Seconds without training: teardown, start-up, process group, data split, restore."""
        return self.first_update_at - self.previous_ended_at


def worker_group_changes(history: History) -> list[WorkerGroupChange]:
    """Every worker group after the first, in order, as a resize or a recovery."""
    changes = []
    for previous, current in itertools.pairwise(history):
        if current["segment_started_at"] == previous["segment_started_at"]:
            continue
        first_update = current.get("first_update_at") or current["segment_started_at"]
        changes.append(WorkerGroupChange(
            kind=RESIZE if current["segment"] != previous["segment"] else RECOVERY,
            epoch=int(current["epoch"]), workers_before=int(previous["world_size"]),
            workers_after=int(current["world_size"]), previous_ended_at=previous["ended_at"],
            first_update_at=first_update))
    return changes


@dataclass(frozen=True)
class ChangeTotals:
    """Resizes and recoveries of a history: how many, and what they cost."""

    resize_times_s: tuple[float, ...]
    recovery_times_s: tuple[float, ...]

    @property
    def resizes(self) -> int:
        return len(self.resize_times_s)

    @property
    def recoveries(self) -> int:
        return len(self.recovery_times_s)

    @property
    def resize_time_s(self) -> float:
        return sum(self.resize_times_s)

    @property
    def recovery_time_s(self) -> float:
        return sum(self.recovery_times_s)

    def describe(self) -> str:
        """``1 resize (12.3 s), 0 recoveries``: the words every summary uses."""
        return (f"{count_noun(self.resizes, 'resize')} ({self.resize_time_s:.1f} s), "
                f"{count_noun(self.recoveries, 'recovery', 'recoveries')}"
                + (f" ({self.recovery_time_s:.1f} s)" if self.recoveries else ""))


def change_totals(history: History) -> ChangeTotals:
    changes = worker_group_changes(history)
    return ChangeTotals(
        resize_times_s=tuple(c.cost_s for c in changes if c.kind == RESIZE),
        recovery_times_s=tuple(c.cost_s for c in changes if c.kind == RECOVERY))


def epoch_clock(history: History) -> list[float]:
    """Wall seconds from the start of the first epoch to the end of each epoch.

    Includes everything between epochs (checkpoints, resizes, recoveries), which is the cost SEBS
    pays for changing the worker count; excludes the first worker group's start-up and data
    loading, the same for every configuration. A run resumed after its driver stopped also counts
    the time it was stopped.
    """
    if not history:
        return []
    start = clock_origin(history)
    return [record["ended_at"] - start for record in history]


def clock_origin(history: History) -> float:
    """Unix time of the first epoch's start: zero on the clock of :func:`epoch_clock`."""
    return history[0]["ended_at"] - history[0]["epoch_time_s"]


def worker_seconds(history: History) -> float:
    """Σ over epochs of live workers x epoch seconds: what the epochs occupied."""
    return sum(record["world_size"] * record["epoch_time_s"] for record in history)


def first_reaching(history: History, target: float, metric: str = "accuracy",
                   lower_is_better: bool = False) -> int | None:
    """Index of the first epoch whose validation ``metric`` is at least ``target`` (at most, with
    ``lower_is_better``, e.g. ``metric="loss"``)."""
    for index, record in enumerate(history):
        value = record.get(f"validation_{metric}")
        if value is None:
            value = (record.get(METRICS_FIELD) or {}).get(metric)
        if value is None or math.isnan(value):
            continue
        if (value <= target) if lower_is_better else (value >= target):
            return index
    return None


def count_noun(number: int, noun: str, plural: str | None = None) -> str:
    """``1 resize``, ``2 resizes``, ``0 recoveries``."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"


def every_update_exact(history: History) -> bool:
    """Whether every update of every epoch used exactly its stage's global batch: the loop's
    counted fewest and most samples per update both equal ``global_batch_size``."""
    return all(record["samples_per_update_min"] == record["samples_per_update_max"]
               == record["global_batch_size"] for record in history)
