"""The elastic plan: how many workers each stage runs on and how each update is split. Pure Python.

Stage ``s`` targets ``W_s = clamp(ceil(B_s / max_micro_batch), min_workers, max_workers)`` workers.
For any live worker count ``W`` (the cluster may give fewer than the target), :func:`decompose`
splits ``B_s`` so that every update is the mean gradient over exactly ``B_s`` samples:

* rank ``w`` contributes ``rank_samples[w]`` samples per update; they differ by at most one when
  ``W`` does not divide ``B_s`` (the first ``B_s % W`` ranks take one more);
* each rank splits its samples into ``accumulation_steps`` micro-batches of at most
  ``max_micro_batch`` rows (sizes again differ by at most one);
* every rank scales its *summed* loss by ``W / B_s``; DDP's all-reduce averages over ``W`` ranks,
  so the resulting gradient is ``(1 / B_s) * sum of per-sample gradients``, however uneven.

Consecutive stages with the same target form a *segment*: one worker group (one
``TorchTrainer.fit()``) trains the whole segment, so a run costs ``len(segments) - 1`` worker-group
restarts. This module imports neither ray nor torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ray_sebs.errors import ConfigError
from ray_sebs.schedule import (
    Schedule,
    ScheduleConfig,
    Stage,
    build_schedule,
    earliest_stage_starts,
    epoch_budget,
)


@dataclass(frozen=True)
class ClusterConfig:
    """The worker bounds and per-worker resources a run may use."""

    min_workers: int = 1
    """Fewest workers any stage runs on; a segment does not start until this many are placed."""

    max_workers: int = 2
    """Most workers any stage runs on, whatever its batch size."""

    max_micro_batch: int = 32
    """Largest micro-batch (rows per forward/backward) one worker can hold in memory."""

    use_gpu: bool = False
    """One GPU per worker and NCCL; ``False`` trains on CPUs with gloo."""

    resources_per_worker: Mapping[str, float] | None = None
    """Ray resources each worker reserves, e.g. ``{"CPU": 0.5}`` or ``{"CPU": 4, "GPU": 1}``.
    ``None``: Ray Train's default (1 CPU, plus 1 GPU with ``use_gpu``)."""

    def __post_init__(self) -> None:
        _require_positive_int("min_workers", self.min_workers, "use at least 1 worker")
        _require_positive_int("max_workers", self.max_workers, "use at least 1 worker")
        if self.min_workers > self.max_workers:
            raise ConfigError("min_workers", self.min_workers,
                              f"is above max_workers={self.max_workers}",
                              "make min workers <= max workers")
        _require_positive_int("max_micro_batch", self.max_micro_batch,
                              "use the largest micro-batch one worker fits, at least 1")
        if self.resources_per_worker is not None:
            resources = dict(self.resources_per_worker)
            for name, amount in resources.items():
                if isinstance(amount, bool) or not isinstance(amount, int | float) \
                        or not math.isfinite(amount) or amount < 0:
                    raise ConfigError("resources_per_worker", resources,
                                      f"resource {name!r} has amount {amount!r}",
                                      "give each resource a non-negative number, e.g. CPU=0.5")
            object.__setattr__(self, "resources_per_worker", resources)
        if self.use_gpu:
            self._check_whole_gpus()

    def _check_whole_gpus(self) -> None:
        """With ``use_gpu`` every worker needs whole GPUs of its own: NCCL refuses two ranks on one
        device (``Duplicate GPU detected``), and only inside ``prepare_model``, after the worker
        group has started (about 80 s in); Ray itself refuses ``GPU=0`` with ``use_gpu``. Without
        ``use_gpu`` a GPU share is just a reservation and gloo trains on the CPUs."""
        resources = self.resources_per_worker or {}
        gpus = resources.get("GPU", 1.0)
        if gpus < 1 or not float(gpus).is_integer():
            raise ConfigError("resources_per_worker", resources,
                              f"gives each worker GPU={gpus:g} with --use-gpu, but NCCL refuses two "
                              "workers on one GPU (Duplicate GPU detected), after the workers start",
                              "give each worker whole GPUs (GPU=1), or drop --use-gpu to train on "
                              "CPUs with gloo")

    def worker_bundle(self) -> dict[str, float]:
        """The resources one worker reserves, with Ray Train's defaults filled in."""
        bundle = dict(self.resources_per_worker or {"CPU": 1.0})
        if self.use_gpu:
            bundle.setdefault("GPU", 1.0)
        return bundle


@dataclass(frozen=True)
class BatchDecomposition:
    """How ``world_size`` live workers take one update of ``global_batch_size`` samples."""

    global_batch_size: int
    world_size: int
    accumulation_steps: int
    """Micro-steps per update; DDP all-reduces only on the last one."""
    rank_samples: tuple[int, ...]
    """Samples rank ``w`` contributes to each update; they sum to ``global_batch_size``."""
    updates_per_epoch: int
    """Updates every rank makes per epoch: ``floor(N / B)``, fewer only when an uneven split leaves
    the largest rank short of rows in its ``floor(N / W)``-row shard."""

    @property
    def micro_batch_size(self) -> int:
        """Largest micro-batch any rank runs."""
        return -(-self.rank_samples[0] // self.accumulation_steps)  # rank 0 holds the most

    @property
    def is_even(self) -> bool:
        """Every micro-batch of every rank has the same size."""
        return self.global_batch_size % (self.world_size * self.accumulation_steps) == 0

    @property
    def loss_scale(self) -> float:
        """Factor on each rank's *summed* loss that makes DDP's average the mean over B samples."""
        return self.world_size / self.global_batch_size

    def rank_micro_batches(self, rank: int) -> tuple[int, ...]:
        """Sizes of ``rank``'s micro-batches within one update.

        Every rank runs the same number of micro-steps. With ``max_micro_batch == 1`` and an uneven
        split, a rank with one sample fewer runs an empty last micro-step: it still joins the
        all-reduce (the loop handles a 0-row micro-batch; its gradient contribution is zero).
        """
        return split_evenly(self.rank_samples[rank], self.accumulation_steps)

    def describe(self) -> str:
        """``micro x accumulation`` with the uneven case spelled out."""
        if self.is_even:
            return f"{self.micro_batch_size}x{self.accumulation_steps}"
        return f"<={self.micro_batch_size}x{self.accumulation_steps} (uneven)"


def split_evenly(total: int, parts: int) -> tuple[int, ...]:
    """``total`` split into ``parts`` integers that differ by at most one, larger ones first."""
    base, extra = divmod(total, parts)
    return tuple(base + 1 if index < extra else base for index in range(parts))


def decompose(global_batch_size: int, world_size: int, max_micro_batch: int,
              dataset_size: int) -> BatchDecomposition:
    """Split one update of ``global_batch_size`` samples over ``world_size`` live workers."""
    _require_positive_int("world_size", world_size, "use at least 1 worker")
    _require_positive_int("max_micro_batch", max_micro_batch, "use at least 1")
    if world_size > global_batch_size:
        raise ConfigError("world_size", world_size,
                          f"exceeds the global batch of {global_batch_size}, leaving a worker "
                          "without samples", "use at most as many workers as the smallest batch")
    rank_samples = split_evenly(global_batch_size, world_size)
    accumulation_steps = math.ceil(rank_samples[0] / max_micro_batch)
    rows_per_rank = dataset_size // world_size  # Ray Data's streaming_split(equal=True)
    updates_per_epoch = min(dataset_size // global_batch_size, rows_per_rank // rank_samples[0])
    return BatchDecomposition(global_batch_size=global_batch_size, world_size=world_size,
                              accumulation_steps=accumulation_steps, rank_samples=rank_samples,
                              updates_per_epoch=updates_per_epoch)


def target_workers(global_batch_size: int, cluster: ClusterConfig) -> int:
    """``clamp(ceil(B / max_micro_batch), min_workers, max_workers)``."""
    wanted = math.ceil(global_batch_size / cluster.max_micro_batch)
    return min(max(wanted, cluster.min_workers), cluster.max_workers)


@dataclass(frozen=True)
class StagePlan:
    """A stage with its target worker count and the decomposition at that count."""

    stage: Stage
    target_workers: int
    decomposition: BatchDecomposition

    @property
    def updates(self) -> int:
        """Updates at the target worker count (the schedule's, unless an uneven split is short)."""
        return self.stage.epochs * self.decomposition.updates_per_epoch

    @property
    def samples(self) -> int:
        return self.updates * self.stage.global_batch_size


@dataclass(frozen=True)
class Segment:
    """Consecutive stages that share a worker target: one worker group, one ``fit()``."""

    index: int
    """0-based segment number."""
    workers: int
    stages: tuple[StagePlan, ...]

    @property
    def first_epoch(self) -> int:
        return self.stages[0].stage.first_epoch

    @property
    def end_epoch(self) -> int:
        return self.stages[-1].stage.end_epoch


@dataclass(frozen=True)
class ElasticPlan:
    """The schedule of a run laid out on a cluster."""

    schedule: Schedule
    cluster: ClusterConfig
    stages: tuple[StagePlan, ...] = field(repr=False)
    segments: tuple[Segment, ...] = field(repr=False)

    @property
    def peak_workers(self) -> int:
        return max(stage.target_workers for stage in self.stages)

    @property
    def resizes(self) -> int:
        """Planned worker-group changes: one between segments (a change of worker count)."""
        return len(self.segments) - 1

    @property
    def total_updates(self) -> int:
        return sum(stage.updates for stage in self.stages)

    @property
    def allreduce_rounds(self) -> int:
        """Gradient all-reduce rounds: one per update (accumulation never syncs)."""
        return self.total_updates

    @property
    def total_samples(self) -> int:
        return sum(stage.samples for stage in self.stages)

    def stage_plan(self, stage_index: int) -> StagePlan:
        """The plan of 1-based ``stage_index``."""
        return self.stages[stage_index - 1]

    def segment_of_epoch(self, epoch: int) -> Segment:
        for segment in self.segments:
            if segment.first_epoch <= epoch < segment.end_epoch:
                return segment
        raise IndexError(f"epoch {epoch} is outside the run's {self.schedule.total_epochs} epochs")

    def decomposition(self, stage_index: int, world_size: int) -> BatchDecomposition:
        """The split of ``stage_index``'s batch over ``world_size`` live workers."""
        stage = self.stage_plan(stage_index).stage
        return decompose(stage.global_batch_size, world_size, self.cluster.max_micro_batch,
                         self.schedule.dataset_size)

    def with_stage_starts(self, stage_starts: tuple[int, ...]) -> ElasticPlan:
        """The plan of the same run (same cluster) after the adaptive decisions ``stage_starts``:
        candidate stage ``s`` has the same batch, workers and layout whenever it begins, so only
        the epoch boundaries move, and segment numbers keep their meaning."""
        config = replace(self.schedule.config, stage_starts=tuple(stage_starts))
        return build_plan(config, self.schedule.dataset_size, self.cluster)

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data (what ``ray-sebs plan --json`` writes)."""
        config = self.schedule.config
        adaptive = {} if config.kind != "adaptive" else {
            "adaptive": {"noise_threshold": config.noise_threshold,
                         "min_epochs_per_stage": config.min_epochs_per_stage,
                         "epoch_budget": epoch_budget(config)}}
        return {
            "schedule": {
                "kind": config.kind,
                "initial_batch_size": config.initial_batch_size,
                "growth_ratio": config.growth_ratio,
                "num_stages": config.num_stages,
                "epochs_per_stage": [config.epochs_of_stage(s)
                                     for s in range(1, config.num_stages + 1)],
                "learning_rate": config.learning_rate,
                "max_batch_size": config.max_batch_size,
                "batch_granularity": config.batch_granularity,
                "lr_scaling": config.resolved_lr_scaling,
                "warmup_updates": config.warmup_updates,
                # Only for adaptive: the fingerprint of a fixed schedule's run stays as it was.
                **adaptive,
            },
            **({"stage_starts": list(config.stage_starts)} if adaptive else {}),
            "dataset_size": self.schedule.dataset_size,
            "cluster": {
                "min_workers": self.cluster.min_workers,
                "max_workers": self.cluster.max_workers,
                "max_micro_batch": self.cluster.max_micro_batch,
                "use_gpu": self.cluster.use_gpu,
                "resources_per_worker": self.cluster.worker_bundle(),
            },
            "stages": [
                {
                    "stage": plan.stage.index,
                    "first_epoch": plan.stage.first_epoch,
                    "epochs": plan.stage.epochs,
                    "global_batch_size": plan.stage.global_batch_size,
                    "learning_rate": plan.stage.learning_rate,
                    "workers": plan.target_workers,
                    "micro_batch_size": plan.decomposition.micro_batch_size,
                    "accumulation_steps": plan.decomposition.accumulation_steps,
                    "rank_samples": list(plan.decomposition.rank_samples),
                    "updates_per_epoch": plan.decomposition.updates_per_epoch,
                    "updates": plan.updates,
                    "allreduce_rounds": plan.updates,
                    "samples": plan.samples,
                    "segment": self.segment_of_epoch(plan.stage.first_epoch).index,
                }
                for plan in self.stages
            ],
            "segments": [
                {"segment": segment.index, "workers": segment.workers,
                 "stages": [plan.stage.index for plan in segment.stages],
                 "first_epoch": segment.first_epoch, "end_epoch": segment.end_epoch}
                for segment in self.segments
            ],
            "totals": {
                "epochs": self.schedule.total_epochs,
                "updates": self.total_updates,
                "allreduce_rounds": self.allreduce_rounds,
                "samples": self.total_samples,
                "peak_workers": self.peak_workers,
                "resizes": self.resizes,
            },
        }


def build_plan(schedule_config: ScheduleConfig, dataset_size: int,
               cluster: ClusterConfig) -> ElasticPlan:
    """Lay ``schedule_config`` on ``cluster`` for a dataset of ``dataset_size`` samples."""
    schedule = build_schedule(schedule_config, dataset_size)
    if cluster.min_workers > schedule.stages[0].global_batch_size:
        raise ConfigError("min_workers", cluster.min_workers,
                          f"exceeds the first global batch ({schedule.stages[0].global_batch_size}),"
                          " leaving a worker without samples",
                          "use at most as many workers as the initial batch size")
    stage_plans = []
    for stage in schedule.stages:
        workers = target_workers(stage.global_batch_size, cluster)
        stage_plans.append(StagePlan(
            stage=stage, target_workers=workers,
            decomposition=decompose(stage.global_batch_size, workers, cluster.max_micro_batch,
                                    dataset_size)))
    segments: list[Segment] = []
    for plan in stage_plans:
        if segments and segments[-1].workers == plan.target_workers:
            last = segments[-1]
            segments[-1] = Segment(index=last.index, workers=last.workers,
                                   stages=(*last.stages, plan))
        else:
            segments.append(Segment(index=len(segments), workers=plan.target_workers,
                                    stages=(plan,)))
    return ElasticPlan(schedule=schedule, cluster=cluster, stages=tuple(stage_plans),
                       segments=tuple(segments))


def adaptive_plan_range(schedule_config: ScheduleConfig, dataset_size: int,
                        cluster: ClusterConfig) -> tuple[ElasticPlan, ElasticPlan]:
    """The earliest and the latest growth of an ``adaptive`` schedule: every stage after
    ``min_epochs_per_stage`` epochs (as many stages as the budget reaches, the most workers and
    the fewest updates any run of it can have), and stage 1 for the whole budget (never grows)."""
    if schedule_config.kind != "adaptive":
        raise ConfigError("kind", schedule_config.kind, "has no range of plans",
                          "use the adaptive schedule, or build_plan for a fixed one")
    undecided = schedule_config.undecided()
    earliest = build_plan(replace(undecided, stage_starts=earliest_stage_starts(undecided)),
                          dataset_size, cluster)
    return earliest, build_plan(undecided, dataset_size, cluster)


def widest_plan(schedule_config: ScheduleConfig, dataset_size: int,
                cluster: ClusterConfig) -> ElasticPlan:
    """The plan with the most stages and workers a run of the schedule can reach, which sizes
    workers and clusters: the earliest growth of an adaptive schedule, else its one plan."""
    if schedule_config.kind == "adaptive":
        return adaptive_plan_range(schedule_config, dataset_size, cluster)[0]
    return build_plan(schedule_config, dataset_size, cluster)


def _require_positive_int(name: str, value: object, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(name, value, "must be an integer >= 1", fix)
