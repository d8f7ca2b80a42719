"""The comparison of a sweep: pure arithmetic over each trial's history (no Ray, no torch).

Per configuration (a schedule and its hyperparameters) over its finished seeds: final accuracy,
updates, samples, wall time, worker-seconds, resizes and recoveries, and the updates and wall time
to a target accuracy, which by default is the best SSGD mean final accuracy of the group minus one
point. :mod:`ray_sebs.comparison_report` writes it as Markdown, CSV and PNG.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from ray_sebs.errors import ConfigError
from ray_sebs.history import History, change_totals, epoch_clock, first_reaching, worker_seconds
from ray_sebs.sweep_space import BASELINE_KINDS, Configuration, TrialSpec

DEFAULT_TARGET_MARGIN = 0.01
"""The default target accuracy is the best SSGD accuracy minus this (one percentage point)."""


@dataclass(frozen=True)
class TrialMetrics:
    """One trial's totals, read off its history."""

    epochs: int
    final_accuracy: float
    updates: int
    samples: int
    wall_time_s: float
    worker_seconds: float
    """Σ over epochs of live workers x epoch seconds."""
    resizes: int
    """Planned worker-group changes (:mod:`ray_sebs.history`)."""
    recoveries: int
    """Worker groups started after a failure."""
    updates_to_target: int | None
    time_to_target_s: float | None


def trial_metrics(history: History, target: float) -> TrialMetrics:
    if not history:
        raise ValueError("a trial with no epochs has no metrics")
    clock = epoch_clock(history)
    changes = change_totals(history)
    reached = first_reaching(history, target)
    last = history[-1]
    return TrialMetrics(
        epochs=len(history), final_accuracy=float(last["validation_accuracy"]),
        updates=int(last["updates"]), samples=int(last["samples"]), wall_time_s=clock[-1],
        worker_seconds=worker_seconds(history), resizes=changes.resizes, recoveries=changes.recoveries,
        updates_to_target=None if reached is None else int(history[reached]["updates"]),
        time_to_target_s=None if reached is None else clock[reached])


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the deviation of one value is 0."""
    if not values:
        raise ValueError("no values")
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class Target:
    accuracy: float
    source: str
    """Why this value: the flag, or which baseline it came from."""


def default_targets(final_accuracy: Mapping[Configuration, float],
                    margin: float = DEFAULT_TARGET_MARGIN) -> dict[tuple[str, float, int], Target]:
    """Per group: the best SSGD (or constant) mean final accuracy minus ``margin``; a group
    without a baseline uses its best configuration instead."""
    targets = {}
    for group in dict.fromkeys(configuration.group for configuration in final_accuracy):
        members = {c: a for c, a in final_accuracy.items() if c.group == group and not math.isnan(a)}
        baselines = {c: a for c, a in members.items() if c.kind in BASELINE_KINDS} or members
        if not baselines:
            continue
        best = max(baselines, key=lambda c: (baselines[c], -c.ratio))
        kind = "SSGD" if best.kind in BASELINE_KINDS else "overall (no SSGD run)"
        targets[group] = Target(baselines[best] - margin,
                                f"best {kind} mean final accuracy ({best.label}, "
                                f"{baselines[best]:.4f}) minus {margin * 100:g} point")
    return targets


@dataclass(frozen=True)
class ComparisonRow:
    """One configuration over its seeds. Means over the finished trials; ``None`` where no trial
    finished (or, for the target columns, where the mean accuracy never reaches the target)."""

    configuration: Configuration
    seeds: tuple[int, ...]
    """Seeds whose trial finished every planned epoch."""
    unfinished: tuple[int, ...]
    """Seeds whose trial failed, was stopped early or never ran."""
    accuracy: tuple[float, float] | None
    updates: float | None
    samples: float | None
    wall_time_s: tuple[float, float] | None
    worker_seconds: tuple[float, float] | None
    resizes: float | None
    recoveries: float | None
    target: float | None
    seeds_reaching_target: int
    """Finished seeds whose own accuracy reaches the target at some epoch."""
    updates_to_target: float | None
    """Mean updates at the first epoch whose mean accuracy over seeds reaches the target."""
    time_to_target_s: float | None
    """Mean wall seconds at that epoch."""
    fewest_updates: bool = False
    """Reaches the target with the fewest updates of its group (ties all marked)."""
    least_time: bool = False
    """Reaches the target in the least wall time of its group (ties all marked)."""

    @property
    def reaches_target(self) -> bool:
        return self.updates_to_target is not None


@dataclass(frozen=True)
class Comparison:
    rows: list[ComparisonRow]
    targets: dict[tuple[str, float, int], Target]

    def groups(self) -> list[tuple[str, float, int]]:
        return list(dict.fromkeys(row.configuration.group for row in self.rows))


TrialHistory = tuple[TrialSpec, History]
"""A trial and its history (one record per epoch; empty if it never reported)."""


def compare(trials: Sequence[TrialHistory], *, planned_epochs: Mapping[Configuration, int] | None = None,
            target_accuracy: float | None = None,
            configurations: Sequence[Configuration] | None = None) -> Comparison:
    """The comparison table from the trials' histories.

    A trial counts as finished when its history has ``planned_epochs[configuration]`` epochs (or
    any epoch, without a plan). ``target_accuracy`` applies to every group; ``None`` takes
    :func:`default_targets`. A configuration reaches the target at the first epoch where its
    mean validation accuracy over finished seeds (:func:`mean_curve`) does; its updates and time
    to target are the mean updates and wall seconds at that epoch. The mean curve, rather than
    every seed: the default target comes from a mean accuracy, so the best baseline always reaches
    it, and one seed with a harder split does not hide a configuration. Rows follow
    ``configurations`` (default: the order the trials first name them).
    """
    if target_accuracy is not None:
        check_target_accuracy(target_accuracy)
    order = list(configurations) if configurations is not None \
        else list(dict.fromkeys(spec.configuration for spec, _ in trials))
    finished: dict[Configuration, list[tuple[int, History]]] = {c: [] for c in order}
    unfinished: dict[Configuration, list[int]] = {c: [] for c in order}
    for spec, history in trials:
        configuration = spec.configuration
        if configuration not in finished:
            finished[configuration], unfinished[configuration] = [], []
            order.append(configuration)
        wanted = planned_epochs.get(configuration) if planned_epochs else None
        complete = bool(history) and (wanted is None or len(history) == wanted)
        if complete:
            finished[configuration].append((spec.seed, history))
        else:
            unfinished[configuration].append(spec.seed)
    final = {c: (mean_std([float(h[-1]["validation_accuracy"]) for _, h in finished[c]])[0]
                 if finished[c] else math.nan) for c in order}
    if target_accuracy is not None:
        targets = {c.group: Target(target_accuracy, "--target-accuracy") for c in order}
    else:
        targets = default_targets(final)
    rows = []
    for configuration in order:
        target = targets.get(configuration.group)
        runs = sorted(finished[configuration], key=lambda item: item[0])
        metrics = [trial_metrics(history, target.accuracy if target else math.inf) for _, history in runs]
        seeds_reaching = sum(1 for m in metrics if m.updates_to_target is not None)
        curve_updates, curve_seconds, curve_accuracy = mean_curve([history for _, history in runs])
        reached = first_reaching([{"validation_accuracy": a} for a in curve_accuracy],
                                 target.accuracy if target else math.inf)
        rows.append(ComparisonRow(
            configuration=configuration, seeds=tuple(seed for seed, _ in runs),
            unfinished=tuple(sorted(unfinished[configuration])),
            accuracy=mean_std([m.final_accuracy for m in metrics]) if metrics else None,
            updates=statistics.fmean(m.updates for m in metrics) if metrics else None,
            samples=statistics.fmean(m.samples for m in metrics) if metrics else None,
            wall_time_s=mean_std([m.wall_time_s for m in metrics]) if metrics else None,
            worker_seconds=mean_std([m.worker_seconds for m in metrics]) if metrics else None,
            resizes=statistics.fmean(m.resizes for m in metrics) if metrics else None,
            recoveries=statistics.fmean(m.recoveries for m in metrics) if metrics else None,
            target=target.accuracy if target else None, seeds_reaching_target=seeds_reaching,
            updates_to_target=None if reached is None else curve_updates[reached],
            time_to_target_s=None if reached is None else curve_seconds[reached]))
    return Comparison(rows=mark_best(rows), targets=targets)


def mark_best(rows: Sequence[ComparisonRow]) -> list[ComparisonRow]:
    """Mark, per group, the rows that reach the target with the fewest updates and in the least
    wall time (every row within 1e-9 of the best is marked)."""
    marked = list(rows)
    for group in dict.fromkeys(row.configuration.group for row in rows):
        members = {i: (row.updates_to_target, row.time_to_target_s) for i, row in enumerate(rows)
                   if row.configuration.group == group and row.updates_to_target is not None
                   and row.time_to_target_s is not None}
        if not members:
            continue
        fewest = min(updates for updates, _ in members.values())
        least = min(seconds for _, seconds in members.values())
        for i, (updates, seconds) in members.items():
            marked[i] = replace(marked[i],
                                fewest_updates=math.isclose(updates, fewest, rel_tol=1e-9, abs_tol=1e-9),
                                least_time=math.isclose(seconds, least, rel_tol=1e-9, abs_tol=1e-9))
    return marked


def mean_curve(histories: Sequence[History]) -> tuple[list[float], list[float], list[float]]:
    """(updates, wall seconds, validation accuracy) per epoch, each the mean over ``histories``
    (seeds of one configuration share the plan, so their epochs line up)."""
    epochs = min((len(history) for history in histories), default=0)
    clocks = [epoch_clock(history) for history in histories]
    updates = [statistics.fmean(h[i]["updates"] for h in histories) for i in range(epochs)]
    seconds = [statistics.fmean(clock[i] for clock in clocks) for i in range(epochs)]
    accuracy = [statistics.fmean(h[i]["validation_accuracy"] for h in histories) for i in range(epochs)]
    return updates, seconds, accuracy


def check_target_accuracy(target: float) -> None:
    if isinstance(target, bool) or not isinstance(target, int | float) or not math.isfinite(target) \
            or not 0 <= target <= 1:
        raise ConfigError("target_accuracy", target, "must be an accuracy between 0 and 1",
                          "use e.g. 0.95, or leave it unset for the best SSGD accuracy minus 1 point")
