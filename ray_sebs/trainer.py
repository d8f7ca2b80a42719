"""The stage driver: runs an :class:`~ray_sebs.plan.ElasticPlan` as one ``TorchTrainer.fit()`` per
segment.

All segments share one ``RunConfig(name, storage_path)``, so each fit starts from the previous
fit's latest checkpoint through ``ray.train.get_checkpoint()`` (public Ray APIs only). Within a
segment the worker count is elastic between the cluster's minimum and the segment's target; the
loop re-decomposes the global batch for whatever world size it gets.

The driver keeps a small run record (``sebs_run.json`` in the run directory) with the schedule's
fingerprint and the finished segments, so running the same command again after the driver died
resumes where it stopped, and a command whose schedule differs is refused instead of mixing runs.
"""

from __future__ import annotations

import datetime
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import pyarrow.fs
import ray
import ray.train
import torch
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ray_sebs.autoscale import DEFAULT_LEAD_TIME_S, ResourcePrefetchCallback, release_resource_request
from ray_sebs.errors import ConfigError
from ray_sebs.loop import (
    CHECKPOINT_FILE,
    LossFn,
    SegmentConfig,
    cross_entropy_per_sample,
    train_segment,
)
from ray_sebs.optim import OptimizerConfig
from ray_sebs.plan import ClusterConfig, ElasticPlan, build_plan
from ray_sebs.schedule import ScheduleConfig

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)

RUN_RECORD = "sebs_run.json"
DEFAULT_STORAGE_PATH = "./sebs_runs"


@dataclass(frozen=True)
class SEBSResult:
    """What :meth:`SEBSTrainer.fit` returns."""

    plan: ElasticPlan
    history: list[dict[str, Any]]
    """One record per epoch, each exactly once, in order (see :mod:`ray_sebs.loop`)."""
    checkpoint: ray.train.Checkpoint
    """The final checkpoint (model, optimizer, counters, history)."""
    run_dir: str
    """``<storage_path>/<name>``: Ray Train's run directory and ray-sebs's outputs."""
    summary: dict[str, Any] = field(default_factory=dict)
    """Final metrics, totals, wall time, worker-group restarts and their cost."""


class SEBSTrainer:
    """Trains a model with SEBS on Ray Train, growing the worker group with the batch.

    Args:
        model_factory: Builds a fresh ``torch.nn.Module`` on each worker; it must be picklable.
        datasets: Ray Datasets with columns ``features`` (float array) and ``label`` (int): a
            ``"train"`` dataset and optionally a ``"validation"`` one.
        schedule: The stagewise schedule (SEBS, SSGD or constant).
        cluster: Worker bounds, micro-batch cap, GPUs and per-worker resources. When
            ``resources_per_worker`` is unset, the CPUs per worker are sized from the cluster so
            that Ray Data always keeps a CPU for reading (see :func:`size_worker_resources`).
        optimizer: An optimizer name or an :class:`OptimizerConfig`.
        loss_fn: ``loss_fn(logits, labels)`` returning one loss per sample; cross-entropy by
            default. ray-sebs sums and weights it so each update is the mean over exactly B.
        run_config: Ray's ``RunConfig``: ``name``, ``storage_path`` (shared storage on a multi-node
            cluster), ``failure_config``, ``callbacks``. Its ``checkpoint_config`` is replaced:
            ray-sebs checkpoints every epoch.
        seed: Seeds the model initialisation and the data order.
        prefetch_lead_time_s: Ask the autoscaler for the next, larger segment's workers this many
            seconds before its boundary (:mod:`ray_sebs.autoscale`); ``None`` never asks.
    """

    def __init__(
        self,
        model_factory: Callable[[], torch.nn.Module],
        *,
        datasets: Mapping[str, ray.data.Dataset],
        schedule: ScheduleConfig,
        cluster: ClusterConfig | None = None,
        optimizer: str | OptimizerConfig = "sgd",
        loss_fn: LossFn | None = None,
        run_config: RunConfig | None = None,
        seed: int = 0,
        prefetch_lead_time_s: float | None = DEFAULT_LEAD_TIME_S,
    ) -> None:
        if "train" not in datasets:
            raise ConfigError("datasets", sorted(datasets), "has no 'train' dataset",
                              "pass datasets={'train': ..., 'validation': ...}")
        unknown = set(datasets) - {"train", "validation"}
        if unknown:
            raise ConfigError("datasets", sorted(datasets), f"has unknown names {sorted(unknown)}",
                              "use only 'train' and 'validation'")
        self.model_factory = model_factory
        self.datasets = dict(datasets)
        self.schedule = schedule
        self.cluster = cluster or ClusterConfig()
        self.optimizer = optimizer if isinstance(optimizer, OptimizerConfig) \
            else OptimizerConfig(name=optimizer)
        self.loss_fn = loss_fn or cross_entropy_per_sample
        self.run_config = run_config or RunConfig()
        self.seed = seed
        self.prefetch_lead_time_s = prefetch_lead_time_s
        self._plan: ElasticPlan | None = None

    def plan(self) -> ElasticPlan:
        """The elastic plan for the training dataset (counts its rows once)."""
        if self._plan is None:
            self._plan = build_plan(self.schedule, self.datasets["train"].count(), self.cluster)
        return self._plan

    def fit(self) -> SEBSResult:
        """Run every segment of the plan; resumes a run of the same name where it stopped."""
        plan = self.plan()
        cluster = size_worker_resources(plan.cluster, plan.peak_workers, ray.cluster_resources())
        check_cluster_can_start(cluster, plan, ray.cluster_resources())
        plan = replace(plan, cluster=cluster)
        name = self.run_config.name or default_run_name(plan)
        storage_path = absolute_storage_path(self.run_config.storage_path or DEFAULT_STORAGE_PATH)
        run_dir = f"{storage_path.rstrip('/')}/{name}"
        record = load_run_record(run_dir)
        fingerprint = schedule_fingerprint(plan)
        if record is None:
            record = {"fingerprint": fingerprint, "segments": {}}
        elif record["fingerprint"] != fingerprint:
            raise ConfigError(
                "name", name, "names an existing run whose schedule differs: "
                + describe_difference(record["fingerprint"], fingerprint),
                "use the original flags to resume it, or another --name for a new run")
        callbacks = list(self.run_config.callbacks or [])
        if self.prefetch_lead_time_s is not None:
            callbacks.append(ResourcePrefetchCallback(plan, lead_time_s=self.prefetch_lead_time_s))
        run_config = replace(
            self.run_config, name=name, storage_path=storage_path, callbacks=callbacks,
            failure_config=self.run_config.failure_config or FailureConfig(max_failures=1),
            checkpoint_config=CheckpointConfig(num_to_keep=2))
        logger.info("run %s: %d segments, %d stages, %d updates planned, storage %s", name,
                    len(plan.segments), len(plan.stages), plan.total_updates, run_dir)

        started = time.perf_counter()
        try:
            result = self._fit_segments(plan, run_config, record, run_dir)
        finally:
            if self.prefetch_lead_time_s is not None:
                release_resource_request()
        checkpoint = result.checkpoint if result is not None else latest_recorded_checkpoint(record)
        if checkpoint is None:
            raise RuntimeError(f"run {name} finished without a checkpoint in {run_dir}")
        history = load_history(checkpoint)
        summary = summarize(plan, history, wall_time_s=time.perf_counter() - started)
        return SEBSResult(plan=plan, history=history, checkpoint=checkpoint, run_dir=run_dir,
                          summary=summary)

    def _fit_segments(self, plan: ElasticPlan, run_config: RunConfig, record: dict[str, Any],
                      run_dir: str) -> ray.train.Result | None:
        """One ``TorchTrainer.fit()`` per unfinished segment; the last fit's result."""
        cluster = plan.cluster
        result = None
        for segment in plan.segments:
            if str(segment.index) in record["segments"]:
                logger.info("segment %d already finished; skipping it", segment.index)
                continue
            minimum = min(cluster.min_workers, segment.workers)
            scaling = ScalingConfig(
                num_workers=segment.workers if minimum == segment.workers else (minimum, segment.workers),
                use_gpu=cluster.use_gpu, resources_per_worker=cluster.worker_bundle())
            loop_config = SegmentConfig(
                plan=plan, segment_index=segment.index, model_factory=self.model_factory,
                optimizer=self.optimizer, loss_fn=self.loss_fn, seed=self.seed,
                has_validation="validation" in self.datasets)
            trainer = TorchTrainer(
                train_segment, train_loop_config={"segment": loop_config},
                scaling_config=scaling, run_config=run_config, datasets=self.datasets,
                dataset_config=validation_in_order(self.datasets))
            logger.info("segment %d: stages %s on %s workers", segment.index,
                        [p.stage.index for p in segment.stages], scaling.num_workers)
            segment_started = time.perf_counter()
            result = trainer.fit()
            record["segments"][str(segment.index)] = {
                "workers": segment.workers, "fit_s": time.perf_counter() - segment_started,
                "checkpoint": result.checkpoint.path if result.checkpoint else None}
            save_run_record(run_dir, record)
        return result


def validation_in_order(datasets: Mapping[str, Any]) -> DataConfig:
    """Split only ``train``; every rank reads all of ``validation`` in one fixed order."""
    if "validation" not in datasets:
        return DataConfig(datasets_to_split=["train"])
    from ray.data import ExecutionOptions

    return DataConfig(datasets_to_split=["train"],
                      execution_options={"validation": ExecutionOptions(preserve_order=True)})


def size_worker_resources(cluster: ClusterConfig, peak_workers: int,
                          available: Mapping[str, float]) -> ClusterConfig:
    """Fill in CPUs per worker so that the peak worker group leaves a CPU for Ray Data.

    Workers that take every CPU starve Ray Data's read tasks and the run hangs (DESIGN.md §4), so
    unless the user set ``resources_per_worker``, each worker gets
    ``min(1, (cluster CPUs - 1) / peak workers)`` CPUs (at least 0.1).
    """
    if cluster.resources_per_worker is not None:
        return cluster
    cpus = float(available.get("CPU", 0))
    per_worker = min(1.0, max(0.1, (cpus - 1) / peak_workers)) if cpus > 1 else 0.1
    bundle = {"CPU": math.floor(per_worker * 100) / 100}
    if cluster.use_gpu:
        bundle["GPU"] = 1.0
    return replace(cluster, resources_per_worker=bundle)


def check_cluster_can_start(cluster: ClusterConfig, plan: ElasticPlan,
                            available: Mapping[str, float]) -> None:
    """Fail before any worker starts when even ``min_workers`` workers cannot be placed.

    Skipped when ``RAY_SEBS_AUTOSCALING=1``: an autoscaling cluster (KubeRay) starts with fewer
    resources than it can grow to.
    """
    if os.environ.get("RAY_SEBS_AUTOSCALING") == "1":
        return
    minimum = min(cluster.min_workers, plan.segments[0].workers)
    for resource, amount in cluster.worker_bundle().items():
        needed = amount * minimum
        if needed > float(available.get(resource, 0)) + 1e-9:
            raise ConfigError(
                "min_workers", cluster.min_workers,
                f"needs {needed:g} {resource} ({minimum} workers x {amount:g}) but the cluster has "
                f"{float(available.get(resource, 0)):g}",
                "lower --min-workers or --resources-per-worker, or add nodes "
                "(set RAY_SEBS_AUTOSCALING=1 on an autoscaling cluster)")


def default_run_name(plan: ElasticPlan) -> str:
    config = plan.schedule.config
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{config.kind}-rho{config.growth_ratio:g}-b{config.initial_batch_size}-{stamp}"


def absolute_storage_path(storage_path: str) -> str:
    """Ray Train wants an absolute local path or a URI."""
    if "://" in storage_path:
        return storage_path
    return os.path.abspath(os.path.expanduser(storage_path))


def schedule_fingerprint(plan: ElasticPlan) -> dict[str, Any]:
    """What must not change when a run is resumed: the schedule and the dataset size."""
    document = plan.to_dict()
    return {"schedule": document["schedule"], "dataset_size": document["dataset_size"]}


def describe_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    changes = []
    for key in ("schedule", "dataset_size"):
        if isinstance(old.get(key), dict):
            changes += [f"{name} {old[key].get(name)!r} -> {value!r}"
                        for name, value in new[key].items() if old[key].get(name) != value]
        elif old.get(key) != new.get(key):
            changes.append(f"{key} {old.get(key)!r} -> {new.get(key)!r}")
    return ", ".join(changes)


def _filesystem(run_dir: str) -> tuple[pyarrow.fs.FileSystem, str]:
    return pyarrow.fs.FileSystem.from_uri(run_dir if "://" in run_dir else os.path.abspath(run_dir))


def load_run_record(run_dir: str) -> dict[str, Any] | None:
    filesystem, path = _filesystem(run_dir)
    record_path = f"{path}/{RUN_RECORD}"
    if filesystem.get_file_info(record_path).type == pyarrow.fs.FileType.NotFound:
        return None
    with filesystem.open_input_stream(record_path) as stream:
        return json.loads(stream.read().decode())


def save_run_record(run_dir: str, record: Mapping[str, Any]) -> None:
    """Write the run record atomically where the filesystem allows (write, then move)."""
    filesystem, path = _filesystem(run_dir)
    filesystem.create_dir(path, recursive=True)
    with filesystem.open_output_stream(f"{path}/{RUN_RECORD}.tmp") as stream:
        stream.write(json.dumps(record, indent=2).encode())
    filesystem.move(f"{path}/{RUN_RECORD}.tmp", f"{path}/{RUN_RECORD}")


def latest_recorded_checkpoint(record: Mapping[str, Any]) -> ray.train.Checkpoint | None:
    finished = sorted(record["segments"].items(), key=lambda item: int(item[0]))
    if not finished or finished[-1][1]["checkpoint"] is None:
        return None
    return ray.train.Checkpoint(finished[-1][1]["checkpoint"])


def load_checkpoint_state(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    """The tensors and counters of a ray-sebs checkpoint."""
    with checkpoint.as_directory() as directory:
        return torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location="cpu",
                          weights_only=False)


def load_history(checkpoint: ray.train.Checkpoint) -> list[dict[str, Any]]:
    return load_checkpoint_state(checkpoint)["state"]["history"]


def summarize(plan: ElasticPlan, history: list[dict[str, Any]], wall_time_s: float) -> dict[str, Any]:
    """Totals of a finished run, including what its worker-group restarts cost.

    A restart's cost is the time from the last epoch of a segment ending to the first update of
    the next segment (worker group teardown and start, process group, dataset split, restore).
    """
    restart_costs = []
    for previous, current in itertools.pairwise(history):
        if current["segment"] != previous["segment"] and current["first_update_at"]:
            restart_costs.append(current["first_update_at"] - previous["ended_at"])
    last = history[-1] if history else {}
    return {
        "epochs": len(history),
        "updates": last.get("updates", 0),
        "planned_updates": plan.total_updates,
        "samples": last.get("samples", 0),
        "final_train_loss": last.get("train_loss"),
        "final_validation_loss": last.get("validation_loss"),
        "final_validation_accuracy": last.get("validation_accuracy"),
        "wall_time_s": wall_time_s,
        "worker_group_restarts": len(restart_costs),
        "restart_time_s": sum(restart_costs),
        "restart_times_s": restart_costs,
        "worker_seconds": sum(r["world_size"] * r["epoch_time_s"] for r in history),
        "peak_workers": max((r["world_size"] for r in history), default=0),
        "plan": asdict(plan.cluster) | {"peak_workers": plan.peak_workers},
    }
