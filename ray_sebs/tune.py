"""Ray Tune sweeps that compare growth ratios: SEBS against its SSGD baseline, ratio by ratio.

Why a sweep: the paper's claim (DESIGN.md §1) is comparative — SEBS is as accurate as SSGD with
fewer updates — so it is checked by running both schedules at several ratios and seeds and reading
one table. ``ray-sebs tune`` is that sweep; :func:`run_sweep` is its Python API.

How it runs on Ray Train V2. ``Tuner(trainer)`` does not accept a V2 trainer, so every trial is a
Tune *function trainable* (:func:`run_trial`): it loads its (seeded) data, builds a
:class:`~ray_sebs.trainer.SEBSTrainer` and runs the stage driver — one ``TorchTrainer.fit()`` per
segment — in the trial's process. ``TuneReportCallback`` in the Train ``RunConfig`` forwards every
epoch report (the loop's record) to Tune, so Tune's progress and schedulers (ASHA) see each epoch.
The comparison does not read Tune's results: it reads each trial's own history
(``history.json``), which holds every epoch exactly once, also for a trial resumed after an
interruption.

Trials must not wait on each other's workers: :func:`choose_concurrency` caps
``max_concurrent_trials`` at what the cluster holds when every running trial is at its peak worker
count, with CPUs left over for Ray Data.

Layout of ``<storage-path>/<name>/``: Tune's experiment (state and trial folders), ``sweep.json``
(what the sweep is; a resume with different flags is refused), ``runs/<trial>/`` (each trial's
SEBS run: Ray Train checkpoints, ``sebs_run.json``, ``history.json``), and ``comparison.md``,
``comparison.csv``, ``comparison.png``. Running the same command again resumes the sweep through
``Tuner.restore``: finished trials are kept, unfinished and errored ones run again, and each of
those resumes its SEBS run from its last epoch checkpoint.

The comparison (:func:`compare` and the functions above it) is pure Python over history lists;
this module imports neither Ray nor torch at import time.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ray_sebs.errors import ConfigError
from ray_sebs.plan import ClusterConfig, ElasticPlan, build_plan
from ray_sebs.schedule import SCHEDULE_KINDS, ScheduleConfig
from ray_sebs.storage import read_json, write_bytes

if TYPE_CHECKING:
    from ray_sebs.data import DatasetConfig

logger = logging.getLogger(__name__)

History = Sequence[Mapping[str, Any]]
"""One trial's history: one record per epoch, in order (see :mod:`ray_sebs.loop`)."""

DEFAULT_RATIOS: tuple[float, ...] = (1.0, 1.5, 2.0, 4.0)
DEFAULT_KINDS: tuple[str, ...] = ("sebs", "ssgd")
DEFAULT_TARGET_MARGIN = 0.01
"""The default target accuracy is the best SSGD accuracy minus this (one percentage point)."""

TRIAL_DRIVER_CPUS = 0.01
"""CPUs a trial's own process reserves. It only drives the stage loop (it waits on the Train
controller), and Tune refuses a trial that reserves nothing; the workers reserve their own."""

HISTORY_FILE = "history.json"
SWEEP_RECORD = "sweep.json"
RUNS_DIR = "runs"
COMPARISON_FILES = ("comparison.md", "comparison.csv", "comparison.png")
BASELINE_KINDS = ("ssgd", "constant")
"""Kinds the default target is taken from: SSGD, and constant (SSGD with rho = 1)."""


# --------------------------------------------------------------------------------------------
# What the sweep runs


@dataclass(frozen=True, order=True)
class Configuration:
    """One row of the comparison: a schedule and its hyperparameters, over every seed."""

    kind: str
    ratio: float
    optimizer: str = "sgd"
    learning_rate: float = 0.1
    batch_size: int = 16

    @property
    def label(self) -> str:
        """``constant``, ``sebs ρ=2``, ``ssgd ρ=1.5``."""
        return "constant" if self.kind == "constant" else f"{self.kind} ρ={_number(self.ratio)}"

    @property
    def group(self) -> tuple[str, float, int]:
        """Configurations compared with each other (and one target): same optimizer, η₁, B₁."""
        return (self.optimizer, self.learning_rate, self.batch_size)

    @property
    def slug(self) -> str:
        """A file-system-safe name, e.g. ``sebs-rho1.5-sgd-lr0.1-b16``."""
        return (f"{self.kind}-rho{_number(self.ratio)}-{self.optimizer}-lr{_number(self.learning_rate)}"
                f"-b{self.batch_size}")

    def schedule(self, base: ScheduleConfig) -> ScheduleConfig:
        """``base`` (stages, epochs, cap, granularity) with this configuration's schedule."""
        return replace(base, kind=self.kind, growth_ratio=self.ratio,
                       learning_rate=self.learning_rate, initial_batch_size=self.batch_size)


def group_label(group: tuple[str, float, int]) -> str:
    optimizer, learning_rate, batch_size = group
    return f"{optimizer}, η₁={_number(learning_rate)}, B₁={batch_size}"


@dataclass(frozen=True)
class TrialSpec:
    """One trial: a configuration with one seed (data split, initialisation, data order)."""

    configuration: Configuration
    seed: int

    @property
    def slug(self) -> str:
        """The trial's SEBS run name (``runs/<slug>``): derived from the config, not from Tune's
        trial id, so that a trial Tune runs again resumes its run instead of starting over."""
        return f"{self.configuration.slug}-seed{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self.configuration), "seed": self.seed, "slug": self.slug}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrialSpec:
        return cls(Configuration(kind=data["kind"], ratio=float(data["ratio"]),
                                 optimizer=data["optimizer"],
                                 learning_rate=float(data["learning_rate"]),
                                 batch_size=int(data["batch_size"])), int(data["seed"]))


@dataclass(frozen=True)
class SweepSpace:
    """The grid: every ratio x schedule kind x optimizer x η₁ x B₁, each with every seed.

    A ratio of 1 makes SEBS and SSGD the same schedule (``constant``), so it runs once, labelled
    ``constant``; ``constant`` in ``kinds`` adds that run whatever the ratios.
    """

    ratios: tuple[float, ...] = DEFAULT_RATIOS
    kinds: tuple[str, ...] = DEFAULT_KINDS
    seeds: tuple[int, ...] = (0, 1, 2)
    optimizers: tuple[str, ...] = ("sgd",)
    learning_rates: tuple[float, ...] = (0.1,)
    batch_sizes: tuple[int, ...] = (16,)

    def __post_init__(self) -> None:
        for name in ("ratios", "kinds", "seeds", "optimizers", "learning_rates", "batch_sizes"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.ratios:
            raise ConfigError("ratios", "", "is empty", "give at least one ratio, e.g. 1,1.5,2,4")
        for ratio in self.ratios:
            if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not math.isfinite(ratio) \
                    or ratio < 1:
                raise ConfigError("ratios", ",".join(map(str, self.ratios)),
                                  f"has {ratio!r}, but every ratio must be a number >= 1",
                                  "use e.g. 1,1.5,2,4 (1 is the constant batch)")
        if not self.kinds or any(kind not in SCHEDULE_KINDS for kind in self.kinds):
            raise ConfigError("kinds", ",".join(self.kinds), "names an unknown schedule kind",
                              f"use a comma list of {', '.join(SCHEDULE_KINDS)}, e.g. sebs,ssgd")
        if not self.seeds or any(isinstance(seed, bool) or not isinstance(seed, int) or seed < 0
                                 for seed in self.seeds) or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("seeds", ",".join(map(str, self.seeds)),
                              "must be distinct non-negative integers, at least one",
                              "use e.g. --seeds 3 for seeds 0, 1, 2")
        from ray_sebs.optim import OPTIMIZERS

        if not self.optimizers or any(name not in OPTIMIZERS for name in self.optimizers):
            raise ConfigError("optimizers", ",".join(self.optimizers), "names an unknown optimizer",
                              f"use a comma list of {', '.join(OPTIMIZERS)}")
        if not self.learning_rates or any(
                isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate)
                or rate <= 0 for rate in self.learning_rates):
            raise ConfigError("learning_rates", ",".join(map(str, self.learning_rates)),
                              "must be positive numbers, at least one", "use e.g. 0.1 or 0.05,0.1,0.2")
        if not self.batch_sizes or any(isinstance(size, bool) or not isinstance(size, int) or size < 1
                                       for size in self.batch_sizes):
            raise ConfigError("batch_sizes", ",".join(map(str, self.batch_sizes)),
                              "must be integers >= 1, at least one", "use e.g. 16 or 16,32")

    def configurations(self) -> list[Configuration]:
        """Every configuration once, in table order: per (optimizer, η₁, B₁), constant first, then
        by ratio, SEBS before SSGD."""
        found: list[Configuration] = []
        for optimizer, learning_rate, batch_size in itertools.product(
                self.optimizers, self.learning_rates, self.batch_sizes):
            group = []
            for ratio, kind in itertools.product(sorted(set(self.ratios)), self.kinds):
                if kind == "constant" or ratio == 1:
                    kind, ratio = "constant", 1.0
                group.append(Configuration(kind, float(ratio), optimizer, float(learning_rate),
                                           int(batch_size)))
            order = {"constant": 0, "sebs": 1, "ssgd": 2}
            for configuration in sorted(set(group), key=lambda c: (order[c.kind], c.ratio)):
                found.append(configuration)
        return found

    def trials(self) -> list[TrialSpec]:
        """Every trial, seed by seed: after the first seed's trials a comparison of every
        configuration exists, should the sweep be stopped there."""
        return [TrialSpec(configuration, seed) for seed in self.seeds
                for configuration in self.configurations()]

    def to_dict(self) -> dict[str, Any]:
        return {name: list(getattr(self, name)) for name in
                ("ratios", "kinds", "seeds", "optimizers", "learning_rates", "batch_sizes")}


def sweep_plans(space: SweepSpace, base: ScheduleConfig, dataset_size: int,
                cluster: ClusterConfig) -> dict[Configuration, ElasticPlan]:
    """The elastic plan of every configuration (seeds share a plan); a configuration that cannot
    run on this data raises :class:`ConfigError` before any trial starts."""
    return {configuration: build_plan(configuration.schedule(base), dataset_size, cluster)
            for configuration in space.configurations()}


# --------------------------------------------------------------------------------------------
# How many trials at once


@dataclass(frozen=True)
class Concurrency:
    """How many trials run at once, with the per-worker bundle every trial uses, and why."""

    max_concurrent_trials: int
    worker_bundle: dict[str, float]
    data_cpus_per_trial: float
    trial_cpus: float
    """CPUs one trial holds at its peak: workers, the Ray Data reserve and its driver."""
    reason: str


def choose_concurrency(cluster_resources: Mapping[str, float], cluster: ClusterConfig,
                       peak_workers: int, num_trials: int, *,
                       data_cpus_per_trial: float | None = None,
                       max_concurrent_trials: int | None = None) -> Concurrency:
    """``floor(cluster CPUs / (peak workers x CPUs per worker + Ray Data reserve + driver))``,
    and as much for GPUs, at least 1 and at most the number of trials.

    Why: every trial grows to its plan's peak worker group; if the running trials' peaks do not
    fit together, a growing trial waits for workers another trial holds, and that trial may be
    waiting too. Ray Data needs CPUs that no worker holds, or reading starves (DESIGN.md §4), so
    each trial also counts a reserve (default ``min(1, CPUs / 2)``). Unless
    ``resources_per_worker`` is set, workers get ``min(1, (CPUs - reserve - driver) / peak)`` CPUs
    (at least 0.1), as ``ray-sebs train`` would size a lone run.
    """
    cpus = float(cluster_resources.get("CPU", 0.0))
    gpus = float(cluster_resources.get("GPU", 0.0))
    check_sweep_options(max_concurrent_trials=max_concurrent_trials,
                        data_cpus_per_trial=data_cpus_per_trial)
    if data_cpus_per_trial is None:
        reserve = min(1.0, cpus / 2) if cpus > 0 else 1.0
    else:
        reserve = float(data_cpus_per_trial)
    if cluster.resources_per_worker is not None:
        bundle = cluster.worker_bundle()
        sizing = "set by --resources-per-worker"
    else:
        spare = cpus - reserve - TRIAL_DRIVER_CPUS
        per_worker = min(1.0, max(0.1, spare / peak_workers)) if spare > 0 else 0.1
        bundle = {"CPU": math.floor(per_worker * 100) / 100}
        if cluster.use_gpu:
            bundle["GPU"] = 1.0
        sizing = "sized so one trial at its peak leaves the reserve free"
    worker_cpus = float(bundle.get("CPU", 0.0))
    trial_cpus = peak_workers * worker_cpus + reserve + TRIAL_DRIVER_CPUS
    by_cpu = math.floor(cpus / trial_cpus + 1e-9) if trial_cpus > 0 else num_trials
    limits = [f"CPU: floor({cpus:g} / ({peak_workers} workers x {worker_cpus:g} + {reserve:g} Ray Data "
              f"+ {TRIAL_DRIVER_CPUS:g} driver)) = {by_cpu}"]
    auto = by_cpu
    worker_gpus = float(bundle.get("GPU", 0.0))
    if worker_gpus > 0:
        by_gpu = math.floor(gpus / (peak_workers * worker_gpus) + 1e-9)
        limits.append(f"GPU: floor({gpus:g} / ({peak_workers} x {worker_gpus:g})) = {by_gpu}")
        auto = min(auto, by_gpu)
    auto = max(1, min(auto, num_trials))
    reason = (f"each trial peaks at {_count(peak_workers, 'worker')} of {_bundle_text(bundle)} ({sizing}); "
              + "; ".join(limits) + f"; {num_trials} trials")
    if max_concurrent_trials is not None:
        chosen = max_concurrent_trials
        reason = f"{chosen} concurrent trials, as asked (the cluster alone would allow {auto}): {reason}"
    else:
        chosen = auto
        reason = f"{chosen} concurrent trial{'s' if chosen > 1 else ''}: {reason}"
        if by_cpu < 1:
            reason += ("; the cluster holds less than one trial at its peak, so trials run one at a "
                       "time and a growing stage may run on fewer workers than planned")
    return Concurrency(max_concurrent_trials=chosen, worker_bundle=bundle, data_cpus_per_trial=reserve,
                       trial_cpus=trial_cpus, reason=reason)


# --------------------------------------------------------------------------------------------
# The comparison: pure functions over each trial's history (one record per epoch, see loop.py)


def epoch_clock(history: History) -> list[float]:
    """Wall seconds from the start of the first epoch to the end of each epoch.

    Includes everything between epochs (checkpoints, worker-group restarts at growing stages),
    which is the cost SEBS pays for changing the worker count; excludes the first worker group's
    start-up and data loading, the same for every configuration. A trial resumed after the sweep
    was stopped also counts the time it was stopped.
    """
    if not history:
        return []
    start = history[0]["ended_at"] - history[0]["epoch_time_s"]
    return [record["ended_at"] - start for record in history]


def worker_group_restarts(history: History) -> int:
    """Worker groups started after the first: growing stages, and restarts after a failure."""
    return sum(1 for previous, current in itertools.pairwise(history)
               if current["segment_started_at"] != previous["segment_started_at"])


def first_reaching(history: History, target: float) -> int | None:
    """Index of the first epoch whose validation accuracy is at least ``target``."""
    for index, record in enumerate(history):
        accuracy = record["validation_accuracy"]
        if accuracy is not None and not math.isnan(accuracy) and accuracy >= target:
            return index
    return None


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
    restarts: int
    updates_to_target: int | None
    time_to_target_s: float | None


def trial_metrics(history: History, target: float) -> TrialMetrics:
    if not history:
        raise ValueError("a trial with no epochs has no metrics")
    clock = epoch_clock(history)
    reached = first_reaching(history, target)
    last = history[-1]
    return TrialMetrics(
        epochs=len(history), final_accuracy=float(last["validation_accuracy"]),
        updates=int(last["updates"]), samples=int(last["samples"]), wall_time_s=clock[-1],
        worker_seconds=sum(record["world_size"] * record["epoch_time_s"] for record in history),
        restarts=worker_group_restarts(history),
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
    restarts: float | None
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
        _check_target(target_accuracy)
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
            restarts=statistics.fmean(m.restarts for m in metrics) if metrics else None,
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


# --------------------------------------------------------------------------------------------
# Writing the comparison

CSV_COLUMNS = (
    "configuration", "kind", "ratio", "optimizer", "learning_rate", "batch_size", "seeds",
    "unfinished_seeds", "final_accuracy_mean", "final_accuracy_std", "updates", "samples",
    "wall_time_s_mean", "wall_time_s_std", "worker_seconds_mean", "worker_seconds_std",
    "restarts_mean", "target_accuracy", "seeds_reaching_target", "updates_to_target_mean",
    "time_to_target_s_mean", "fewest_updates_to_target", "least_time_to_target",
)


def comparison_csv(comparison: Comparison) -> str:
    """One row per configuration; an empty cell where there is no number (see ComparisonRow)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in comparison.rows:
        c = row.configuration
        writer.writerow([
            c.label, c.kind, _number(c.ratio), c.optimizer, _number(c.learning_rate), c.batch_size,
            len(row.seeds), len(row.unfinished),
            *_pair_cells(row.accuracy), _cell(row.updates), _cell(row.samples),
            *_pair_cells(row.wall_time_s), *_pair_cells(row.worker_seconds), _cell(row.restarts),
            _cell(row.target), row.seeds_reaching_target, _cell(row.updates_to_target),
            _cell(row.time_to_target_s), row.fewest_updates, row.least_time,
        ])
    return buffer.getvalue()


MARKDOWN_HEADER = ("configuration", "seeds", "final val acc", "updates", "samples", "wall time (s)",
                   "worker-s", "restarts", "updates to target", "time to target (s)")


def comparison_markdown(comparison: Comparison, *, title: str = "Growth-ratio comparison",
                        notes: Sequence[str] = ()) -> str:
    """The table a user reads: one section per (optimizer, η₁, B₁) group."""
    lines = [f"## {title}", ""]
    lines += [*notes, ""] if notes else []
    for group in comparison.groups():
        rows = [row for row in comparison.rows if row.configuration.group == group]
        target = comparison.targets.get(group)
        lines.append(f"**{group_label(group)}** — target accuracy "
                     + (f"{target.accuracy:.4f} ({target.source})" if target else "none (no trial finished)"))
        lines.append("")
        lines.append("| " + " | ".join(MARKDOWN_HEADER) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(MARKDOWN_HEADER) - 1)) + "|")
        for row in rows:
            lines.append("| " + " | ".join(_markdown_cells(row)) + " |")
        lines.append("")
    lines += [
        "Means over seeds (± sample standard deviation). *wall time*: from the first epoch's start to "
        "the last epoch's end, worker-group restarts included; *worker-s*: Σ live workers × epoch "
        "seconds; *restarts*: worker groups started after the first. *to target*: mean updates and "
        "wall time at the first epoch whose mean validation accuracy over seeds reaches the target "
        "(*not reached (k/n seeds did)*: the mean never does, k seeds alone do). **bold**: fewest "
        "updates / least wall time to the target in its group.",
    ]
    return "\n".join(lines) + "\n"


def _markdown_cells(row: ComparisonRow) -> list[str]:
    seeds = str(len(row.seeds)) + (f" (+{len(row.unfinished)} unfinished)" if row.unfinished else "")
    if row.accuracy is None:
        return [row.configuration.label, seeds, "no finished trial", *(["-"] * (len(MARKDOWN_HEADER) - 3))]
    if row.updates_to_target is not None and row.time_to_target_s is not None:
        updates = _count_text(row.updates_to_target)
        seconds = f"{row.time_to_target_s:.1f}"
        if row.fewest_updates:
            updates = f"**{updates}** (fewest)"
        if row.least_time:
            seconds = f"**{seconds}** (least)"
    else:
        updates = seconds = f"not reached ({row.seeds_reaching_target}/{len(row.seeds)} seeds did)"
    assert row.updates is not None and row.samples is not None and row.worker_seconds is not None
    return [
        row.configuration.label, seeds, _pm(row.accuracy, ".4f"), _count_text(row.updates),
        _count_text(row.samples), _pm(row.wall_time_s, ".1f"), f"{row.worker_seconds[0]:.1f}",
        f"{row.restarts:g}", updates, seconds,
    ]


def plot_comparison(comparison: Comparison, histories: Mapping[Configuration, Sequence[History]],
                    path: str) -> None:
    """Validation accuracy against updates and against wall time, one curve per configuration
    (mean over its finished seeds), one row of plots per group, the target dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = comparison.groups()
    figure, axes = plt.subplots(len(groups), 2, figsize=(12, 4.2 * len(groups)), squeeze=False)
    ratios = sorted({row.configuration.ratio for row in comparison.rows})
    colours = plt.get_cmap("viridis")
    styles = {"sebs": "-", "ssgd": "--", "constant": ":"}
    markers = {"sebs": "o", "ssgd": "s", "constant": "^"}
    for (by_updates, by_time), group in zip(axes, groups, strict=True):
        for row in comparison.rows:
            configuration = row.configuration
            if configuration.group != group or not histories.get(configuration):
                continue
            updates, seconds, accuracy = mean_curve(histories[configuration])
            colour = colours(ratios.index(configuration.ratio) / max(1, len(ratios) - 1) * 0.85)
            for axis, xs in ((by_updates, updates), (by_time, seconds)):
                axis.plot(xs, accuracy, styles[configuration.kind], color=colour,
                          marker=markers[configuration.kind], markersize=3, markerfacecolor="none",
                          linewidth=1.2, label=configuration.label)
        target = comparison.targets.get(group)
        for axis, xlabel in ((by_updates, "updates"), (by_time, "wall time (s)")):
            if target is not None:
                axis.axhline(target.accuracy, color="grey", linestyle="-.", linewidth=0.8,
                             label=f"target {target.accuracy:.3f}")
            axis.set_xlabel(xlabel)
            axis.set_ylabel("validation accuracy")
            axis.set_title(group_label(group), fontsize=9)
            axis.grid(alpha=0.3)
        by_updates.legend(fontsize=7, loc="lower right")
    figure.suptitle("Validation accuracy by growth ratio (mean over seeds): SEBS solid (o), SSGD dashed "
                    "(s), constant dotted (^)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_comparison(comparison: Comparison,
                     histories: Mapping[Configuration, Sequence[History]],
                     directory: str, *, notes: Sequence[str] = ()) -> dict[str, str]:
    """``comparison.md``, ``comparison.csv`` and ``comparison.png`` in ``directory`` (a local path
    or a URI pyarrow reaches)."""
    import tempfile

    paths = {name.rsplit(".", 1)[1]: f"{directory.rstrip('/')}/{name}" for name in COMPARISON_FILES}
    write_bytes(paths["md"], comparison_markdown(comparison, notes=notes).encode())
    write_bytes(paths["csv"], comparison_csv(comparison).encode())
    with tempfile.TemporaryDirectory() as scratch:
        local = os.path.join(scratch, "comparison.png")
        plot_comparison(comparison, histories, local)
        with open(local, "rb") as handle:
            write_bytes(paths["png"], handle.read())
    return paths


# --------------------------------------------------------------------------------------------
# Running the sweep on Ray


@dataclass(frozen=True)
class SweepSettings:
    """What every trial shares; shipped to the trials with ``tune.with_parameters``."""

    schedule: ScheduleConfig
    """Stages, epochs per stage, batch cap and granularity; each configuration sets the rest."""
    cluster: ClusterConfig
    """Worker bounds, with the per-worker bundle fixed by :func:`choose_concurrency`."""
    dataset: DatasetConfig
    """The data; each trial loads it with its own seed (split, as ``ray-sebs train --seed``)."""
    model: str
    runs_dir: str
    """``<experiment>/runs``: trial ``t``'s SEBS run is ``runs/<t.slug>``."""
    max_failures: int = 1
    """Worker-group failures each trial recovers from (Ray Train's ``FailureConfig``)."""
    prefetch_lead_time_s: float | None = None
    """Autoscaler prefetch (:mod:`ray_sebs.autoscale`); only with one trial at a time, since a
    resource request is one target for the whole cluster and concurrent trials would overwrite
    each other's."""


def seeded_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int) -> Any:
    """``build_model`` after seeding torch: seeds of a sweep start from reproducible weights, and
    the configurations of one seed all start from the same ones."""
    import torch

    from ray_sebs.models import build_model

    torch.manual_seed(seed)
    return build_model(name, input_shape, num_classes)


def run_trial(config: dict[str, Any], settings: SweepSettings) -> None:
    """The Tune function trainable: one full elastic SEBS run, every epoch reported to Tune."""
    import functools

    from ray.train import FailureConfig, RunConfig
    from ray.tune.integration.ray_train import TuneReportCallback

    from ray_sebs.data import load_data
    from ray_sebs.optim import OptimizerConfig
    from ray_sebs.trainer import SEBSTrainer

    spec = TrialSpec.from_dict(config["trial"])
    configuration = spec.configuration
    data = load_data(replace(settings.dataset, seed=spec.seed))
    datasets = {"train": data.train}
    if data.validation is not None:
        datasets["validation"] = data.validation
    trainer = SEBSTrainer(
        functools.partial(seeded_model, settings.model, data.input_shape, data.num_classes, spec.seed),
        datasets=datasets, schedule=configuration.schedule(settings.schedule), cluster=settings.cluster,
        optimizer=OptimizerConfig(name=configuration.optimizer),
        run_config=RunConfig(name=spec.slug, storage_path=settings.runs_dir,
                             failure_config=FailureConfig(max_failures=settings.max_failures),
                             callbacks=[TuneReportCallback()]),
        seed=spec.seed, prefetch_lead_time_s=settings.prefetch_lead_time_s)
    result = trainer.fit()
    write_bytes(f"{result.run_dir}/{HISTORY_FILE}", json.dumps(result.history, indent=1).encode())


def trial_name(trial: Any) -> str:
    return str(trial.config["trial"]["slug"])


def trial_dirname(trial: Any) -> str:
    return f"{trial.config['trial']['slug']}_{trial.trial_id}"


@dataclass(frozen=True)
class SweepResult:
    """What :func:`run_sweep` returns."""

    experiment_dir: str
    comparison: Comparison
    histories: dict[str, list[dict[str, Any]]]
    """Trial slug -> its history (empty when the trial never reported)."""
    paths: dict[str, str]
    """``md``, ``csv``, ``png`` -> where the comparison was written."""
    concurrency: Concurrency
    failed: list[str] = field(default_factory=list)
    """Trials that failed or did not run to the end (a rerun with the same name retries them)."""
    stopped: list[str] = field(default_factory=list)
    """Trials ASHA stopped early (not failures)."""
    resumed: bool = False


def sweep_fingerprint(space: SweepSpace, schedule: ScheduleConfig, dataset: DatasetConfig, model: str,
                      dataset_size: int | None = None) -> dict[str, Any]:
    """What must not change when a sweep is resumed: Tune cannot change a restored grid.
    ``dataset_size`` ``None`` leaves it out (a check before the data is loaded)."""
    base = asdict(schedule)
    for swept in ("kind", "growth_ratio", "learning_rate", "initial_batch_size"):
        base.pop(swept)
    data = {key: value for key, value in asdict(dataset).items() if key != "seed"}
    document = {"space": space.to_dict(), "schedule": base, "dataset": data, "model": model}
    if dataset_size is not None:
        document["dataset_size"] = dataset_size
    # Through JSON, so that it compares equal to the recorded copy (tuples become lists).
    return json.loads(json.dumps(document))


def check_same_sweep(experiment_dir: str, name: str, fingerprint: Mapping[str, Any]) -> bool:
    """Refuse to resume a sweep under ``name`` whose recorded settings differ from
    ``fingerprint`` (only its keys are compared); ``True`` when a sweep is recorded there."""
    recorded = read_json(f"{experiment_dir}/{SWEEP_RECORD}")
    if recorded is None:
        return False
    recorded = {key: value for key, value in recorded.items() if key in fingerprint}
    if recorded != fingerprint:
        raise ConfigError("name", name, "names an existing sweep with other settings: "
                          + _describe_difference(recorded, fingerprint),
                          "use the original flags to resume it, or another --name for a new sweep")
    return True


def run_sweep(
    *,
    space: SweepSpace,
    schedule: ScheduleConfig,
    cluster: ClusterConfig,
    dataset: DatasetConfig,
    dataset_size: int,
    model: str = "mlp",
    name: str,
    storage_path: str,
    target_accuracy: float | None = None,
    max_concurrent_trials: int | None = None,
    data_cpus_per_trial: float | None = None,
    max_failures: int = 1,
    asha: bool = False,
    asha_grace_epochs: int | None = None,
    log: Callable[[str], None] = print,
) -> SweepResult:
    """Run (or resume) the sweep on the connected Ray cluster and write the comparison.

    ``dataset_size`` is the training rows of ``dataset`` (the split's size does not depend on
    the seed); every configuration is planned with it before any trial starts. With ``asha``,
    ASHA stops trials whose validation accuracy trails at an epoch milestone (first milestone:
    ``asha_grace_epochs``, default the first stage's epochs); stopped trials appear as unfinished.
    """
    import ray
    from ray import tune

    from ray_sebs.trainer import absolute_storage_path, check_cluster_can_start

    check_sweep_options(target_accuracy=target_accuracy, max_concurrent_trials=max_concurrent_trials,
                        data_cpus_per_trial=data_cpus_per_trial, asha_grace_epochs=asha_grace_epochs)
    plans = sweep_plans(space, schedule, dataset_size, cluster)
    specs = space.trials()
    peak = max(plan.peak_workers for plan in plans.values())
    resources = ray.cluster_resources()
    concurrency = choose_concurrency(resources, cluster, peak, len(specs),
                                     data_cpus_per_trial=data_cpus_per_trial,
                                     max_concurrent_trials=max_concurrent_trials)
    sized = replace(cluster, resources_per_worker=concurrency.worker_bundle)
    for configuration in plans:
        plans[configuration] = replace(plans[configuration], cluster=sized)
        check_cluster_can_start(sized, plans[configuration], resources)
    log(f"concurrency: {concurrency.reason}")
    logger.info("concurrency: %s", concurrency.reason)

    storage = absolute_storage_path(storage_path)
    experiment_dir = f"{storage.rstrip('/')}/{name}"
    fingerprint = sweep_fingerprint(space, schedule, dataset, model, dataset_size)
    if not check_same_sweep(experiment_dir, name, fingerprint):
        write_bytes(f"{experiment_dir}/{SWEEP_RECORD}", json.dumps(fingerprint, indent=2).encode())

    settings = SweepSettings(
        schedule=schedule, cluster=sized, dataset=dataset, model=model,
        runs_dir=f"{experiment_dir}/{RUNS_DIR}", max_failures=max_failures,
        prefetch_lead_time_s=None if concurrency.max_concurrent_trials > 1 else _default_lead_time())
    trainable = tune.with_resources(tune.with_parameters(run_trial, settings=settings),
                                    {"CPU": TRIAL_DRIVER_CPUS})
    resumed = tune.Tuner.can_restore(experiment_dir)
    if resumed:
        log(f"resuming the sweep in {experiment_dir}: finished trials are kept, the others run")
        tuner = tune.Tuner.restore(experiment_dir, trainable, resume_unfinished=True,
                                   restart_errored=True)
    else:
        scheduler = None
        if asha:
            from ray.tune.schedulers import ASHAScheduler

            first_stage = schedule.epochs_of_stage(1)
            total = sum(schedule.epochs_of_stage(s) for s in range(1, schedule.num_stages + 1))
            # time_attr "epoch" (0-based, global) stays right for a trial that resumes mid-run;
            # max_t past the last epoch so ASHA never stops a trial while it writes its history.
            scheduler = ASHAScheduler(time_attr="epoch", metric="validation_accuracy", mode="max",
                                      max_t=total + 1, grace_period=asha_grace_epochs or first_stage,
                                      reduction_factor=2)
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([spec.to_dict() for spec in specs])},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency.max_concurrent_trials,
                                        scheduler=scheduler, trial_name_creator=trial_name,
                                        trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(name=name, storage_path=storage,
                                      failure_config=tune.FailureConfig(max_failures=1), verbose=1))
    results = tuner.fit()

    reported: dict[str, list[dict[str, Any]]] = {}
    errors: dict[str, str] = {}
    for result in results:
        slug = result.config["trial"]["slug"] if result.config else None
        if slug is None:
            continue
        if result.error is not None:
            errors[slug] = _first_line(result.error)
        frame = result.metrics_dataframe
        if frame is not None and "epoch" in frame:
            records = frame.drop_duplicates("epoch", keep="last").sort_values("epoch")
            reported[slug] = records.to_dict("records")
    histories: dict[str, list[dict[str, Any]]] = {}
    failed, stopped = [], []
    for spec in specs:
        history = read_json(f"{settings.runs_dir}/{spec.slug}/{HISTORY_FILE}")
        if history is None:
            # Not finished: keep what it reported to Tune (the table counts it as unfinished).
            history = reported.get(spec.slug, [])
            if asha and history and spec.slug not in errors:
                stopped.append(f"{spec.slug}: stopped by ASHA after epoch {history[-1]['epoch']}")
            else:
                failed.append(f"{spec.slug}: {errors.get(spec.slug, 'did not finish')}")
        histories[spec.slug] = history
    trials = [(spec, histories[spec.slug]) for spec in specs]
    planned = {configuration: plan.schedule.total_epochs for configuration, plan in plans.items()}
    comparison = compare(trials, planned_epochs=planned, target_accuracy=target_accuracy,
                         configurations=space.configurations())
    finished = {row.configuration: [histories[TrialSpec(row.configuration, seed).slug] for seed in row.seeds]
                for row in comparison.rows}
    notes = [f"Sweep `{name}`: {len(space.configurations())} configurations x "
             f"{_count(len(space.seeds), 'seed')} ({', '.join(map(str, space.seeds))}), "
             f"{_count(len(specs), 'trial')}; "
             f"{schedule.num_stages} stages x {_epochs_text(schedule)} epochs, {dataset_size:,} training "
             f"rows, model {model}.",
             f"Concurrency: {concurrency.reason}."]
    if failed:
        notes.append(f"Unfinished trials: {'; '.join(failed)}.")
    if stopped:
        notes.append(f"Stopped early: {'; '.join(stopped)}.")
    paths = write_comparison(comparison, finished, experiment_dir, notes=notes)
    return SweepResult(experiment_dir=experiment_dir, comparison=comparison, histories=histories,
                       paths=paths, concurrency=concurrency, failed=failed, stopped=stopped,
                       resumed=resumed)


# --------------------------------------------------------------------------------------------
# Small helpers


def check_sweep_options(*, target_accuracy: float | None = None, max_concurrent_trials: int | None = None,
                        data_cpus_per_trial: float | None = None,
                        asha_grace_epochs: int | None = None) -> None:
    """Refuse bad sweep options before Ray starts (each a :class:`ConfigError` naming the option)."""
    if target_accuracy is not None:
        _check_target(target_accuracy)
    if max_concurrent_trials is not None and (isinstance(max_concurrent_trials, bool) or not isinstance(
            max_concurrent_trials, int) or max_concurrent_trials < 1):
        raise ConfigError("max_concurrent_trials", max_concurrent_trials, "must be an integer >= 1",
                          "leave it unset to size it from the cluster")
    if data_cpus_per_trial is not None and (
            isinstance(data_cpus_per_trial, bool) or not isinstance(data_cpus_per_trial, int | float)
            or not math.isfinite(data_cpus_per_trial) or data_cpus_per_trial < 0):
        raise ConfigError("data_cpus_per_trial", data_cpus_per_trial, "must be a number >= 0",
                          "use e.g. 1 (CPUs left free for Ray Data's reads per trial)")
    if asha_grace_epochs is not None and (isinstance(asha_grace_epochs, bool) or not isinstance(
            asha_grace_epochs, int) or asha_grace_epochs < 1):
        raise ConfigError("asha_grace_epochs", asha_grace_epochs, "must be an integer >= 1",
                          "use e.g. the first stage's epochs")


def _check_target(target: float) -> None:
    if isinstance(target, bool) or not isinstance(target, int | float) or not math.isfinite(target) \
            or not 0 <= target <= 1:
        raise ConfigError("target_accuracy", target, "must be an accuracy between 0 and 1",
                          "use e.g. 0.95, or leave it unset for the best SSGD accuracy minus 1 point")


def _default_lead_time() -> float:
    from ray_sebs.autoscale import DEFAULT_LEAD_TIME_S

    return DEFAULT_LEAD_TIME_S


def _describe_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    changes = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            changes += [f"{key}.{name} {before.get(name)!r} -> {after.get(name)!r}"
                        for name in sorted(set(before) | set(after)) if before.get(name) != after.get(name)]
        elif before != after:
            changes.append(f"{key} {before!r} -> {after!r}")
    return ", ".join(changes)


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _epochs_text(schedule: ScheduleConfig) -> str:
    epochs = [schedule.epochs_of_stage(s) for s in range(1, schedule.num_stages + 1)]
    return str(epochs[0]) if len(set(epochs)) == 1 else ",".join(map(str, epochs))


def _count_text(value: float) -> str:
    """A mean of counts: ``1,450``, or ``16.5`` when the seeds differ."""
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _bundle_text(bundle: Mapping[str, float]) -> str:
    return ", ".join(f"{amount:g} {name}" for name, amount in bundle.items())


def _number(value: float) -> str:
    """``2`` for 2.0, ``1.5`` for 1.5."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def _cell(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else repr(value)


def _pair_cells(value: tuple[float, float] | None) -> tuple[str, str]:
    return ("", "") if value is None else (_cell(value[0]), _cell(value[1]))


def _pm(value: tuple[float, float] | None, spec: str) -> str:
    if value is None:
        return "-"
    return f"{value[0]:{spec}} ± {value[1]:{spec}}"


def parse_list(text: str, convert: Callable[[str], Any]) -> tuple[Any, ...]:
    """``"1,1.5,2"`` -> ``(1.0, 1.5, 2.0)`` with ``convert``; empty parts are ignored."""
    return tuple(convert(part.strip()) for part in text.split(",") if part.strip())
