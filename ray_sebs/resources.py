"""Resource arithmetic: CPUs per worker, what the cluster can place, trials at once.

One rule shapes all of it: Ray Data needs CPUs that no training worker holds. A dataset that is
not materialized still has read and map tasks to run; workers holding every CPU starve them and
the run hangs (on a 2-CPU Ray, 2 workers x 1 CPU reading ``ray.data.range(5000)`` never finishes,
while 2 x 0.5 CPU does in seconds). So unless the user sets ``resources_per_worker``, workers are
sized to leave a reserve free, and the cluster checks count that reserve as taken.

On an autoscaling cluster (``RAY_SEBS_AUTOSCALING=1``, set by the KubeRay manifests) the resources
present now say nothing about what the cluster can grow to, so the checks that compare a plan
with them are skipped.

Imports neither Ray nor torch at import time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ray_sebs.errors import ConfigError
from ray_sebs.history import count_noun
from ray_sebs.plan import ClusterConfig, ElasticPlan

AUTOSCALING_ENV = "RAY_SEBS_AUTOSCALING"

MIN_WORKER_CPUS = 0.1
"""The fewest CPUs a sized worker gets, however crowded the cluster."""

TRIAL_DRIVER_CPUS = 0.01
"""CPUs a Tune trial's own process reserves. It only drives the stage loop (it waits on the Train
controller), and Tune refuses a trial that reserves nothing; the workers reserve their own."""


def autoscaling_enabled() -> bool:
    """Whether the cluster grows on demand (``RAY_SEBS_AUTOSCALING=1``)."""
    return os.environ.get(AUTOSCALING_ENV) == "1"


def sized_worker_bundle(cluster: ClusterConfig, peak_workers: int, spare_cpus: float) -> dict[str, float]:
    """The per-worker bundle that puts ``peak_workers`` workers into ``spare_cpus``: at most 1 CPU
    each, at least :data:`MIN_WORKER_CPUS`, rounded down to 0.01; one GPU each with ``use_gpu``."""
    per_worker = min(1.0, max(MIN_WORKER_CPUS, spare_cpus / peak_workers)) if spare_cpus > 0 \
        else MIN_WORKER_CPUS
    bundle = {"CPU": math.floor(per_worker * 100) / 100}
    if cluster.use_gpu:
        bundle["GPU"] = 1.0
    return bundle


def size_worker_resources(cluster: ClusterConfig, peak_workers: int,
                          available: Mapping[str, float]) -> ClusterConfig:
    """Fill in CPUs per worker so that the peak worker group leaves a CPU for Ray Data: unless the
    user set ``resources_per_worker``, each worker gets ``min(1, (cluster CPUs - 1) / peak
    workers)`` CPUs (at least 0.1)."""
    if cluster.resources_per_worker is not None:
        return cluster
    spare = float(available.get("CPU", 0)) - 1
    return replace(cluster, resources_per_worker=sized_worker_bundle(cluster, peak_workers, spare))


def data_cpu_reserve(datasets: Mapping[str, Any]) -> float:
    """CPUs no training worker may take so that Ray Data can still run its tasks: 1, or 0 when
    every dataset is materialized (its blocks are in the object store and need no task)."""
    from ray.data.dataset import MaterializedDataset

    return 0.0 if all(isinstance(ds, MaterializedDataset) for ds in datasets.values()) else 1.0


def free_resources(available: Mapping[str, float], *, reserved_cpus: float = 0.0) -> dict[str, float]:
    """What workers may take: the cluster's resources with ``reserved_cpus`` kept for Ray Data."""
    free = {name: float(amount) for name, amount in available.items()}
    free["CPU"] = free.get("CPU", 0.0) - reserved_cpus
    return free


def check_gpus(cluster: ClusterConfig, available: Mapping[str, float]) -> None:
    """Refuse ``use_gpu`` on a cluster without a GPU, naming ``--use-gpu``: Ray Train would wait
    for GPU workers that can never be placed. Skipped on an autoscaling cluster, which may add
    GPU nodes on demand."""
    if cluster.use_gpu and not autoscaling_enabled() and float(available.get("GPU", 0)) <= 0:
        raise ConfigError("use_gpu", True, "the cluster has no GPUs",
                          "drop --use-gpu to train on CPUs with gloo, or pass --address of a "
                          f"cluster with GPUs (set {AUTOSCALING_ENV}=1 on one that adds GPU nodes "
                          "on demand)")


def check_cluster_can_start(cluster: ClusterConfig, plan: ElasticPlan,
                            available: Mapping[str, float], *, reserved_cpus: float = 0.0) -> None:
    """Fail before any worker starts when even ``min_workers`` workers cannot be placed, keeping
    ``reserved_cpus`` free for Ray Data (:func:`data_cpu_reserve`). Skipped on an autoscaling
    cluster, which starts with fewer resources than it can grow to.

    GPUs follow the same rule as CPUs: ``use_gpu`` on a cluster without a GPU is refused
    (:func:`check_gpus`), and so is a plan whose ``min_workers`` GPU workers do not fit the
    cluster's GPUs; a plan that wants more GPU workers than that, but no more than the cluster
    can place at its minimum, trains on the workers it can place (:func:`worker_capacity`, with
    the warning of :func:`describe_worker_shortage`). That is right for GPUs too: every update
    still uses exactly the stage's global batch, only with more accumulation on fewer devices.
    """
    if autoscaling_enabled():
        return
    check_gpus(cluster, available)
    minimum = min(cluster.min_workers, plan.segments[0].workers)
    free = free_resources(available, reserved_cpus=reserved_cpus)
    for resource, amount in cluster.worker_bundle().items():
        needed = amount * minimum
        have = float(available.get(resource, 0))
        if needed > free.get(resource, 0.0) + 1e-9:
            kept = (f", of which {reserved_cpus:g} must stay free for Ray Data to read the datasets "
                    "(they are not materialized)") \
                if resource == "CPU" and reserved_cpus and needed <= have + 1e-9 else ""
            fits = math.floor(free.get(resource, 0.0) / amount + 1e-9)
            lower = f"lower --min-workers to {fits}" if fits >= 1 else "lower --min-workers"
            raise ConfigError(
                "min_workers", cluster.min_workers,
                f"needs {needed:g} {resource} ({minimum} workers x {amount:g}) but the cluster has "
                f"{have:g}{kept}",
                f"{lower} or --resources-per-worker, or add nodes "
                f"(set {AUTOSCALING_ENV}=1 on an autoscaling cluster)")


def worker_capacity(cluster: ClusterConfig, available: Mapping[str, float], *,
                    reserved_cpus: float = 0.0) -> int | None:
    """Workers of ``cluster.worker_bundle()`` the cluster can place at once, keeping
    ``reserved_cpus`` free; ``None`` when there is no fixed limit (an autoscaling cluster, or
    workers that reserve nothing).

    Ray Train's elastic range ``(min, max)`` starts at once with the workers it can place and then
    watches for more every ``elastic_resize_monitor_interval_s``; on a fixed cluster more never
    come, so the driver asks for at most this many and says so once.
    """
    if autoscaling_enabled():
        return None
    free = free_resources(available, reserved_cpus=reserved_cpus)
    counts = [max(0, math.floor(free.get(resource, 0.0) / amount + 1e-9))
              for resource, amount in cluster.worker_bundle().items() if amount > 0]
    return min(counts) if counts else None


def describe_worker_shortage(plan: ElasticPlan, capacity: int | None, available: Mapping[str, float],
                             *, reserved_cpus: float = 0.0) -> str | None:
    """The one warning for a plan that wants more workers than the cluster can place, or None."""
    if capacity is None or capacity >= plan.peak_workers:
        return None
    bundle = plan.cluster.worker_bundle()
    have = ", ".join(f"{float(available.get(name, 0)):g} {name}" for name in bundle)
    each = ", ".join(f"{amount:g} {name}" for name, amount in bundle.items())
    kept = f", {reserved_cpus:g} CPU kept for Ray Data" if reserved_cpus else ""
    live = max(capacity, min(plan.cluster.min_workers, plan.peak_workers))
    stages = []
    for stage_plan in plan.stages:
        if stage_plan.target_workers <= live:
            continue
        split = plan.decomposition(stage_plan.stage.index, live)
        stages.append(f"stage {stage_plan.stage.index} (batch {stage_plan.stage.global_batch_size}) "
                      f"{stage_plan.decomposition.describe()} x {stage_plan.target_workers} workers -> "
                      f"{split.describe()} x {live}")
    return (f"the plan wants up to {plan.peak_workers} workers but the cluster can place {capacity} "
            f"({have}; {each} per worker{kept}); training with {live}: " + "; ".join(stages)
            + " (micro-batch x accumulation; every update still uses exactly the global batch)")


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
    waiting too. Each trial also counts a Ray Data reserve (default ``min(1, CPUs / 2)``). Unless
    ``resources_per_worker`` is set, workers get ``min(1, (CPUs - reserve - driver) / peak)`` CPUs
    (at least 0.1), as ``ray-sebs train`` would size a lone run. The options are checked by
    :func:`ray_sebs.sweep.check_sweep_options` before.
    """
    cpus = float(cluster_resources.get("CPU", 0.0))
    gpus = float(cluster_resources.get("GPU", 0.0))
    if data_cpus_per_trial is None:
        reserve = min(1.0, cpus / 2) if cpus > 0 else 1.0
    else:
        reserve = float(data_cpus_per_trial)
    if cluster.resources_per_worker is not None:
        bundle = cluster.worker_bundle()
        sizing = "set by --resources-per-worker"
    else:
        bundle = sized_worker_bundle(cluster, peak_workers, cpus - reserve - TRIAL_DRIVER_CPUS)
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
    bundle_text = ", ".join(f"{amount:g} {name}" for name, amount in bundle.items())
    reason = (f"each trial peaks at {count_noun(peak_workers, 'worker')} of {bundle_text} ({sizing}); "
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


CONTROLLER_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
"""Ray Train's controller polls its workers this often (default 2 s). A worker's report waits in
a queue of one until the next poll collects it, so with the default every report after the first
idles up to 2 s, and so does the end of every worker group."""

FASTEST_POLL_S = 0.1
CONTROLLER_POLLS_PER_S = 1000.0
"""Worker polls per second the controller may make: each poll is one RPC per worker."""


def controller_poll_interval_s(peak_workers: int) -> float:
    """The poll interval ray-sebs sets for its controllers: :data:`FASTEST_POLL_S` (0.1 s), or
    slower for large groups so the controller makes at most :data:`CONTROLLER_POLLS_PER_S` worker
    RPCs a second (0.51 s at 512 workers), never slower than Ray's own 2 s."""
    return min(2.0, max(FASTEST_POLL_S, peak_workers / CONTROLLER_POLLS_PER_S))


DEFAULT_CHECKPOINT_EVERY_S = 60.0
"""By default a run checkpoints at the first epoch end a minute after its last checkpoint, and at
every segment end: a failure retrains at most about a minute. Checkpointing every epoch instead
costs a state dict written and a report registered per epoch, which for small epochs (digits:
0.2 s) is more than the epoch itself (benchmarks/RESULTS.md)."""
