"""The stage driver: runs an :class:`~ray_sebs.plan.ElasticPlan` as one ``TorchTrainer.fit()`` per
segment.

All segments share one ``RunConfig(name, storage_path)``, so each fit starts from the previous
fit's latest checkpoint through ``ray.train.get_checkpoint()`` (public Ray APIs only). Within a
segment the worker count is elastic between the cluster's minimum and the segment's target; the
loop re-decomposes the global batch for whatever world size it gets.

The driver keeps a small run record (``sebs_run.json`` in the run directory) with the run's
fingerprint (schedule, dataset size, model architecture, optimizer) and the finished segments, so
running the same command again after the driver died resumes where it stopped, and a command whose
fingerprint differs is refused instead of mixing runs.

Faults: a worker that dies is Ray Train's to recover (``FailureConfig.max_failures``; the loop
resumes from the last epoch checkpoint, which Ray registers only once it is fully written). A NaN
or infinite loss is not retried: it is deterministic, so the loop stops every rank with a verdict
in ``Result.return_value`` and the driver raises :class:`~ray_sebs.errors.NonFiniteLossError`.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import ray
import ray.train
import torch
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ray_sebs.autoscale import DEFAULT_LEAD_TIME_S, LEAD_TIME_FIX, ResourcePrefetcher
from ray_sebs.console import RunConsole
from ray_sebs.data import CACHE_MODES
from ray_sebs.errors import (
    CheckpointError,
    ConfigError,
    InvariantError,
    NonFiniteLossError,
    require_int,
    require_seconds,
)
from ray_sebs.history import change_totals, stage_starts, worker_seconds
from ray_sebs.interrupt import ray_usable
from ray_sebs.loop import CHECKPOINT_FILE, NON_FINITE, STAGE_DECISIONS, SegmentConfig, train_segment
from ray_sebs.objective import (
    BatchLossFn,
    LossFn,
    MetricsFn,
    Objective,
    batch_rows,
    classification,
    cross_entropy_per_sample,
    sum_and_count,
)
from ray_sebs.optim import PRECISIONS, OptimizerConfig
from ray_sebs.plan import ClusterConfig, ElasticPlan, build_plan, widest_plan
from ray_sebs.records import read_record, refuse_other_settings, write_record
from ray_sebs.report import TENSORBOARD_DIR, TensorBoardWriter
from ray_sebs.resources import (
    CONTROLLER_POLL_ENV,
    DEFAULT_CHECKPOINT_EVERY_S,
    autoscaling_enabled,
    check_cluster_can_start,
    controller_poll_interval_s,
    data_cpu_reserve,
    describe_worker_shortage,
    size_worker_resources,
    worker_capacity,
)
from ray_sebs.runlock import RunLock
from ray_sebs.schedule import ScheduleConfig
from ray_sebs.storage import exists, local_path, upload_dir

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)

RUN_RECORD = "sebs_run.json"
RAY_CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"
"""Ray Train 2.60's record of a run's registered checkpoints, in the run directory; a run
without it has no checkpoint to resume from."""
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
    """Final metrics, totals, wall time, resizes and recoveries and their cost."""


class SEBSTrainer:
    """Trains a model with SEBS on Ray Train, growing the worker group with the batch.

    Args:
        model_factory: Builds a fresh ``torch.nn.Module`` on each worker; it must be picklable.
        datasets: A ``"train"`` Ray Dataset and optionally a ``"validation"`` one, with any
            columns ``batch_loss_fn`` reads; without it, ``features`` (float array) and ``label``
            (int) for the classification path.
        schedule: The stagewise schedule (SEBS, SSGD, constant or adaptive). An adaptive run
            decides its stage starts as it trains (:func:`~ray_sebs.loop.decide_next_stage`):
            workers are sized for its earliest growth, and ``SEBSResult.plan`` is the plan it
            ran, with ``summary["stage_decisions"]`` saying why each stage began.
        cluster: Worker bounds, micro-batch cap, GPUs and per-worker resources. When
            ``resources_per_worker`` is unset, the CPUs per worker are sized from the cluster so
            that Ray Data always keeps a CPU for reading (:mod:`ray_sebs.resources`). A segment
            whose target the cluster cannot place runs on the workers it can (one warning); a
            ``min_workers`` it cannot place fails before any fit.
        optimizer: An optimizer name or an :class:`OptimizerConfig`.
        loss_fn: The classification path's ``loss_fn(logits, labels)`` returning one loss per
            sample; cross-entropy by default. ray-sebs sums and weights it so each update is the
            mean over exactly B. Not with ``batch_loss_fn``.
        batch_loss_fn: ``batch_loss_fn(model, batch)`` for any model and columns: ``batch`` is a
            dict of tensors on the worker's device; it returns one loss per row, or
            :class:`~ray_sebs.objective.Summed` ``(total, count)`` (e.g. over tokens), and every
            update is the exact mean over the global batch either way
            (:mod:`ray_sebs.objective`). ``None``: the classification path.
        eval_fn: ``eval_fn(model, batch)`` returning ``{name: per-row tensor | Summed}``, each
            aggregated exactly over the validation set; ``loss`` and ``accuracy`` fill the
            history's ``validation_loss`` and ``validation_accuracy``. ``None``: the loss (and, on
            the classification path, the accuracy).
        precision: ``fp32``, or ``bf16``: the forward and the loss under ``torch.autocast`` to
            bfloat16 (on GPUs, and on CPUs where torch supports it); weights, gradients and the
            optimizer stay fp32.
        check_on_driver: Run ``batch_loss_fn`` (with its backward) and ``eval_fn`` once on the
            driver's CPU, on two rows of each dataset, before any worker starts
            (:func:`check_objective`); turn it off for a model that cannot run there (GPU-only
            kernels, or too large for the driver's memory).
        gradient_noise: Measure the gradient noise scale (history ``gradient_noise_scale``) on one
            update in 32, or in 128 where an update of one micro-batch is split into two halves
            for it: a model with batch statistics (BatchNorm) sees a half batch on those updates,
            and a model that counts its forwards sees one more. ``False``: never.
        cache_data: Where each rank's update batches come from (:class:`~ray_sebs.loop.ShardBatches`):
            ``none`` streams its Ray Data shard every epoch (data of any size); ``host`` or
            ``device`` reads the shard once per worker group into host memory or onto the
            worker's device and shuffles it by index each epoch, for shards that fit.
        run_config: Ray's ``RunConfig``: ``name``, ``storage_path`` (shared storage on a multi-node
            cluster), ``failure_config``, ``callbacks``. Its ``checkpoint_config`` is replaced:
            ray-sebs checkpoints at epoch ends, as the next two arguments say.
        seed: Seeds the model initialisation and the data order.
        prefetch_lead_time_s: Hold the next, larger segment's extra workers in a placement group
            from this many seconds before its boundary, so the autoscaler has their nodes up by
            then (:mod:`ray_sebs.autoscale`), on an autoscaling cluster (``RAY_SEBS_AUTOSCALING=1``);
            ``None`` never asks.
        checkpoint_every_epochs: Checkpoint after this many epochs since the last checkpoint;
            ``None``: not by count. A failure retrains at most the epochs since the last one.
        checkpoint_every_s: Checkpoint at the first epoch end this many seconds after the last
            checkpoint; ``None``: not by time. With both ``None`` only segment ends are
            checkpointed, which every run does (the next segment starts from there).
        console: Print one line per epoch and a live progress line within long epochs in this
            process (:mod:`ray_sebs.console`), as ``ray-sebs train`` does. Either way TensorBoard
            scalars are written as each epoch ends (:func:`run_tensorboard`).
        lock: Hold the run directory's lock (:mod:`ray_sebs.runlock`) while fitting, so that a
            second driver with the same name is refused. A sweep's trials pass ``False``: the
            sweep holds the lock of the directory above theirs.
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
        batch_loss_fn: BatchLossFn | None = None,
        eval_fn: MetricsFn | None = None,
        precision: str = "fp32",
        cache_data: str = "none",
        check_on_driver: bool = True,
        gradient_noise: bool = True,
        run_config: RunConfig | None = None,
        seed: int = 0,
        prefetch_lead_time_s: float | None = DEFAULT_LEAD_TIME_S,
        checkpoint_every_epochs: int | None = None,
        checkpoint_every_s: float | None = DEFAULT_CHECKPOINT_EVERY_S,
        console: bool = False,
        lock: bool = True,
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
        self.cluster = cluster or ClusterConfig()
        self.optimizer = optimizer if isinstance(optimizer, OptimizerConfig) \
            else OptimizerConfig(name=optimizer)
        # lr_scaling=None follows the optimizer: sqrt for Adam and AdamW, linear for the others.
        self.schedule = schedule.for_optimizer(self.optimizer.name)
        if self.schedule.stage_starts:
            raise ConfigError("stage_starts", ",".join(map(str, self.schedule.stage_starts)),
                              "is decided by an adaptive run as it trains",
                              "leave it empty; a run of the same name resumes its decisions")
        if loss_fn is not None and batch_loss_fn is not None:
            raise ConfigError("loss_fn", loss_fn, "is given with batch_loss_fn",
                              "give batch_loss_fn(model, batch) alone: it computes the whole loss")
        if precision not in PRECISIONS:
            raise ConfigError("precision", precision, "is not a precision ray-sebs trains at",
                              f"use one of {', '.join(PRECISIONS)}")
        if precision == "bf16" and not (cluster and cluster.use_gpu) \
                and not torch.amp.is_autocast_available("cpu"):
            raise ConfigError("precision", precision, "needs CPU autocast, which this torch lacks",
                              "use fp32, or a torch build with CPU autocast")
        if batch_loss_fn is None:
            objective = classification(loss_fn or cross_entropy_per_sample)
            self.objective = replace(objective, metrics=eval_fn or objective.metrics)
        else:
            self.objective = Objective(loss=batch_loss_fn, metrics=eval_fn)
        if cache_data not in CACHE_MODES:
            raise ConfigError("cache_data", cache_data, "is not a place to cache the data",
                              f"use one of {', '.join(CACHE_MODES)}")
        self.precision = precision
        self.cache_data = cache_data
        self.gradient_noise = gradient_noise
        self.check_on_driver = check_on_driver and (batch_loss_fn is not None or eval_fn is not None)
        self.run_config = run_config or RunConfig()
        self.seed = seed
        if prefetch_lead_time_s is not None:
            require_seconds("prefetch_lead_time_s", prefetch_lead_time_s, fix=LEAD_TIME_FIX)
        self.prefetch_lead_time_s = prefetch_lead_time_s
        if checkpoint_every_epochs is not None:
            require_int("checkpoint_every_epochs", checkpoint_every_epochs, minimum=1,
                        fix="use e.g. 1 to checkpoint every epoch, or leave it unset")
        if checkpoint_every_s is not None:
            require_seconds("checkpoint_every_s", checkpoint_every_s,
                            fix="use e.g. 60, or 0 to checkpoint every epoch")
        self.checkpoint_every_epochs = checkpoint_every_epochs
        self.checkpoint_every_s = checkpoint_every_s
        self.console = console
        self.lock = lock
        self._plan: ElasticPlan | None = None

    def plan(self) -> ElasticPlan:
        """The elastic plan for the training dataset (counts its rows once). An adaptive
        schedule's is the plan before any decision: stage 1 for the whole budget."""
        if self._plan is None:
            self._plan = build_plan(self.schedule, self.datasets["train"].count(), self.cluster)
        return self._plan

    def widest_plan(self) -> ElasticPlan:
        """The plan with the most stages and workers a run of the schedule can reach: the earliest
        growth of an adaptive one (:func:`~ray_sebs.plan.adaptive_plan_range`), else the plan.
        Worker sizes and the cluster check are taken from it."""
        plan = self.plan()
        if plan.schedule.config.kind != "adaptive":
            return plan
        return widest_plan(plan.schedule.config, plan.schedule.dataset_size, plan.cluster)

    def fit(self) -> SEBSResult:
        """Run every segment of the plan; resumes a run of the same name where it stopped."""
        plan, widest = self.plan(), self.widest_plan()
        if self.check_on_driver:
            check_objective(self.model_factory, self.objective, self.datasets)
        resources = ray.cluster_resources()
        cluster = size_worker_resources(plan.cluster, widest.peak_workers, resources)
        data_cpus = data_cpu_reserve(self.datasets)
        check_cluster_can_start(cluster, widest, resources, reserved_cpus=data_cpus)
        plan = replace(plan, cluster=cluster)
        name = self.run_config.name or default_run_name(plan)
        storage_path = absolute_storage_path(self.run_config.storage_path or DEFAULT_STORAGE_PATH)
        run_dir = f"{storage_path.rstrip('/')}/{name}"
        with RunLock(run_dir, name=name) if self.lock else contextlib.nullcontext():
            return self._fit_locked(plan, name, storage_path, run_dir, resources, data_cpus)

    def _fit_locked(self, plan: ElasticPlan, name: str, storage_path: str, run_dir: str,
                    resources: Mapping[str, float], data_cpus: float) -> SEBSResult:
        """:meth:`fit` once the run directory is this driver's."""
        cluster = plan.cluster
        record = load_run_record(run_dir)
        fingerprint = schedule_fingerprint(plan, model_factory=self.model_factory,
                                           optimizer=self.optimizer)
        if record is None:
            # Written before the first worker starts: a driver killed in the first segment leaves
            # checkpoints that only the same command may resume.
            record = {"fingerprint": fingerprint, "segments": {}}
            save_run_record(run_dir, record)
        else:
            refuse_other_settings("run", name, record["fingerprint"], fingerprint)
            check_resume_checkpoint(run_dir)
        adaptive = plan.schedule.config.kind == "adaptive"
        # A resumed adaptive run continues its recorded calendar (the loop catches up with any
        # decision its checkpoint holds beyond the record's).
        plan = plan.with_stage_starts(stage_starts(record.get(STAGE_DECISIONS, []))) \
            if adaptive else plan
        widest = replace(self.widest_plan(), cluster=cluster)
        capacity = worker_capacity(cluster, resources, reserved_cpus=data_cpus)
        shortage = describe_worker_shortage(widest, capacity, resources, reserved_cpus=data_cpus)
        if shortage:
            logger.warning("%s", shortage)
        # Only an autoscaler adds nodes for pending demand; on a fixed cluster it would be noise.
        # An adaptive run's prefetch predicts its boundaries on the earliest growth's stages.
        prefetcher = ResourcePrefetcher(widest if adaptive else plan,
                                        lead_time_s=self.prefetch_lead_time_s, name=name) \
            if self.prefetch_lead_time_s is not None and autoscaling_enabled() else None
        run_config = replace(
            self.run_config, name=name, storage_path=storage_path,
            callbacks=list(self.run_config.callbacks or []),
            failure_config=self.run_config.failure_config or FailureConfig(max_failures=1),
            checkpoint_config=CheckpointConfig(num_to_keep=2))
        logger.info("run %s: %d segments, %d stages, %d updates planned, storage %s", name,
                    len(plan.segments), len(plan.stages), plan.total_updates, run_dir)

        started = time.perf_counter()
        try:
            with run_tensorboard(run_dir) as tensorboard, controller_poll_interval(widest.peak_workers), \
                    RunConsole(print_lines=self.console, on_epoch=(tensorboard.add,) + (
                        (prefetcher.on_epoch,) if prefetcher else ())) as console:
                result, plan = self._fit_segments(plan, run_config, record, run_dir, capacity,
                                                  console.queue, prefetcher)
        finally:
            # Not after an interruption shuts Ray down: the placement group goes with the driver,
            # and a Ray call could wait on the half-closed connection.
            if prefetcher is not None and ray_usable():
                prefetcher.release()
        checkpoint = result.checkpoint if result is not None else latest_recorded_checkpoint(record)
        if checkpoint is None:
            raise InvariantError(f"run {name} finished without a checkpoint in {run_dir}")
        history = load_history(checkpoint)
        epochs = [entry["epoch"] for entry in history]
        if epochs != list(range(plan.schedule.total_epochs)):
            raise InvariantError(f"run {name} ended with epochs {epochs} of "
                                 f"{plan.schedule.total_epochs} in {run_dir}")
        summary = summarize(plan, history, wall_time_s=time.perf_counter() - started)
        if adaptive:
            summary[STAGE_DECISIONS] = record.get(STAGE_DECISIONS, [])
        if prefetcher is not None:  # when it asked, for what, and whether the nodes were up in time
            summary["prefetch_requests"] = [asdict(request) for request in prefetcher.requests]
        return SEBSResult(plan=plan, history=history, checkpoint=checkpoint, run_dir=run_dir,
                          summary=summary)

    def _fit_segments(self, plan: ElasticPlan, run_config: RunConfig, record: dict[str, Any],
                      run_dir: str, capacity: int | None, progress_queue: Any,
                      prefetcher: ResourcePrefetcher | None = None,
                      ) -> tuple[ray.train.Result | None, ElasticPlan]:
        """One ``TorchTrainer.fit()`` per unfinished segment; the last fit's result and the plan
        as it ended. An adaptive run's plan is re-planned from the decisions each fit returns, so
        the next fit is the segment that holds the next epoch. The prefetcher hands the nodes it
        holds to each fit just before it starts."""
        cluster = plan.cluster
        result = None
        finished = finished_epochs(plan, record)
        for segment in plan.segments:
            if segment.end_epoch <= finished:
                logger.info("segment %d already finished; skipping it", segment.index)
        while finished < plan.schedule.total_epochs:
            segment = plan.segment_of_epoch(finished)
            minimum = min(cluster.min_workers, segment.workers)
            # Nodes the prefetch held are there now: ask for the whole target at once. An elastic
            # range would start with what Ray Train's autoscaling coordinator has seen, whose view
            # of the nodes is up to 20 s old, and grow only after its 60 s resize interval.
            if prefetcher is not None and prefetcher.start_segment(segment.index):
                minimum = segment.workers
            # Never ask for more workers than the cluster can ever place: the elastic range starts
            # at once with what it gets, and the plan re-splits every batch for it.
            workers = segment.workers if capacity is None \
                else max(minimum, min(segment.workers, capacity))
            scaling = ScalingConfig(
                num_workers=workers if minimum == workers else (minimum, workers),
                use_gpu=cluster.use_gpu, resources_per_worker=cluster.worker_bundle())
            loop_config = SegmentConfig(
                plan=plan, segment_index=segment.index, model_factory=self.model_factory,
                optimizer=self.optimizer, objective=self.objective, seed=self.seed,
                has_validation="validation" in self.datasets, precision=self.precision,
                cache_data=self.cache_data, gradient_noise=self.gradient_noise,
                workers=workers,
                checkpoint_every_epochs=self.checkpoint_every_epochs,
                checkpoint_every_s=self.checkpoint_every_s, progress_queue=progress_queue,
                report_every_epoch=bool(run_config.callbacks))
            trainer = TorchTrainer(
                train_segment, train_loop_config={"segment": loop_config},
                scaling_config=scaling, run_config=run_config, datasets=self.datasets,
                dataset_config=validation_in_order(self.datasets))
            logger.info("segment %d: stages %s on %s workers", segment.index,
                        [p.stage.index for p in segment.stages], scaling.num_workers)
            segment_started = time.perf_counter()
            result = trainer.fit()
            outcome = result.return_value
            if isinstance(outcome, Mapping) and NON_FINITE in outcome:
                raise NonFiniteLossError(
                    **outcome[NON_FINITE],
                    checkpoint=result.checkpoint.path if result.checkpoint else None)
            if isinstance(outcome, Mapping) and STAGE_DECISIONS in outcome:
                record[STAGE_DECISIONS] = list(outcome[STAGE_DECISIONS])
                plan = plan.with_stage_starts(stage_starts(record[STAGE_DECISIONS]))
                segment = plan.segments[segment.index]  # where the decisions ended it
            record["segments"][str(segment.index)] = {
                "workers": workers, "end_epoch": segment.end_epoch,
                "fit_s": time.perf_counter() - segment_started,
                "checkpoint": result.checkpoint.path if result.checkpoint else None}
            save_run_record(run_dir, record)
            if segment.end_epoch <= finished:
                raise InvariantError(f"segment {segment.index} ended at epoch {segment.end_epoch}, "
                                     f"not after epoch {finished} where it began")
            finished = segment.end_epoch
        return result, plan


def check_objective(model_factory: Callable[[], torch.nn.Module], objective: Objective,
                    datasets: Mapping[str, ray.data.Dataset], rows: int = 2) -> None:
    """Run the loss, its backward and the metrics once, on the driver's CPU, on the first
    ``rows`` rows of each dataset, before any worker starts: a missing column, a loss of the wrong
    shape or a function that fails is one :class:`ConfigError` here rather than a worker failure
    that Ray retries."""
    model = model_factory()
    checks = [("train", "batch_loss_fn", objective.loss)]
    if "validation" in datasets:
        checks.append(("validation", "eval_fn" if objective.metrics else "batch_loss_fn",
                       objective.evaluate))
    for dataset_name, field_name, function in checks:
        batch = next(iter(datasets[dataset_name].iter_torch_batches(batch_size=rows)))
        count = batch_rows(batch)
        try:
            output = function(model, batch)
            if dataset_name == "train":
                total, _ = sum_and_count(output, count, field_name)
                total.backward()
            else:
                for metric, value in output.items():
                    sum_and_count(value, count, f"eval_fn[{metric!r}]")
        except ConfigError:
            raise
        except Exception as error:  # the user's code: any error, reported in one line
            detail = next((line for line in str(error).splitlines() if line.strip()), "")
            raise ConfigError(
                field_name, getattr(function, "__qualname__", repr(function)),
                f"fails on {count} rows of the {dataset_name} dataset (columns "
                f"{', '.join(batch)}): {type(error).__name__}: {detail}",
                "fix the function, or give the dataset the columns it reads") from None


def validation_in_order(datasets: Mapping[str, Any]) -> DataConfig:
    """Split only ``train``; every rank reads all of ``validation`` in one fixed order."""
    if "validation" not in datasets:
        return DataConfig(datasets_to_split=["train"])
    from ray.data import ExecutionOptions

    return DataConfig(datasets_to_split=["train"],
                      execution_options={"validation": ExecutionOptions(preserve_order=True)})


@contextlib.contextmanager
def controller_poll_interval(peak_workers: int) -> Iterator[None]:
    """Set Ray Train's controller poll interval for the fits inside (Ray hands the driver's value to
    every controller it starts, wherever it runs); a value the user set is kept."""
    if CONTROLLER_POLL_ENV in os.environ:
        yield
        return
    os.environ[CONTROLLER_POLL_ENV] = f"{controller_poll_interval_s(peak_workers):g}"
    try:
        yield
    finally:
        os.environ.pop(CONTROLLER_POLL_ENV, None)


@contextlib.contextmanager
def run_tensorboard(run_dir: str) -> Iterator[TensorBoardWriter]:
    """A TensorBoard writer whose event files end up in ``<run_dir>/tensorboard``.

    On local disk (a path or a ``file://`` URI) they are written there as each epoch ends, so
    ``tensorboard --logdir`` follows a live run. tensorboardX does not reach other storage
    (``s3://``, ``gs://``, ...) by itself: there the events are written to a local temporary
    directory and uploaded through :mod:`ray_sebs.storage` when the run ends, also when it fails,
    so those runs have TensorBoard files after the run, not during it.
    """
    local = local_path(run_dir)
    if local is not None:
        writer = TensorBoardWriter(os.path.join(local, TENSORBOARD_DIR))
        try:
            yield writer
        finally:
            writer.close()
        return
    with tempfile.TemporaryDirectory(prefix="ray-sebs-tensorboard-") as scratch:
        writer = TensorBoardWriter(scratch)
        try:
            yield writer
        finally:
            writer.close()
            destination = f"{run_dir.rstrip('/')}/{TENSORBOARD_DIR}"
            try:
                upload_dir(scratch, destination)
            except OSError as error:  # the run's own outcome matters more than its scalars
                logger.warning("TensorBoard scalars could not be uploaded to %s: %s", destination, error)


def default_run_name(plan: ElasticPlan) -> str:
    config = plan.schedule.config
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{config.kind}-rho{config.growth_ratio:g}-b{config.initial_batch_size}-{stamp}"


def absolute_storage_path(storage_path: str) -> str:
    """Ray Train wants an absolute local path or a URI."""
    if "://" in storage_path:
        return storage_path
    return os.path.abspath(os.path.expanduser(storage_path))


def schedule_fingerprint(plan: ElasticPlan, *, model_factory: Callable[[], torch.nn.Module] | None = None,
                         optimizer: OptimizerConfig | None = None) -> dict[str, Any]:
    """What must not change when a run is resumed: the schedule and the dataset size, and (when
    given) the model's architecture and the optimizer, whose saved state a different one cannot
    load."""
    document = plan.to_dict()
    fingerprint: dict[str, Any] = {"schedule": document["schedule"],
                                   "dataset_size": document["dataset_size"]}
    if model_factory is not None:
        shapes = model_shapes(model_factory)
        if shapes is not None:
            fingerprint["model"] = shapes
    if optimizer is not None:
        fingerprint["optimizer"] = asdict(optimizer)
    return fingerprint


def model_shapes(model_factory: Callable[[], torch.nn.Module]) -> dict[str, list[int]] | None:
    """Name and shape of every tensor of the model's state, built on the meta device (no memory,
    no weights); None when the factory cannot build there."""
    try:
        with torch.device("meta"):
            model = model_factory()
        return {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    except Exception as error:  # any factory may be given; the check is then skipped
        logger.debug("model architecture not fingerprinted: %s", error)
        return None


def load_run_record(run_dir: str) -> dict[str, Any] | None:
    return read_record(f"{run_dir}/{RUN_RECORD}")


def save_run_record(run_dir: str, record: Mapping[str, Any]) -> None:
    write_record(f"{run_dir}/{RUN_RECORD}", record)


def finished_epochs(plan: ElasticPlan, record: Mapping[str, Any]) -> int:
    """Epochs that the run record says finished segments covered (0 for a new run).

    Judged by epochs, not by segment numbers: a resumed run with other worker bounds splits the
    same schedule into other segments. Records without ``end_epoch`` (older ray-sebs) name
    segments of the same plan.
    """
    ends = [0]
    for index, entry in record["segments"].items():
        if "end_epoch" in entry:
            ends.append(int(entry["end_epoch"]))
        elif int(index) < len(plan.segments):
            ends.append(plan.segments[int(index)].end_epoch)
    return max(ends)


def latest_recorded_checkpoint(record: Mapping[str, Any]) -> ray.train.Checkpoint | None:
    # The segment that ended last (segment numbers differ between plans with other worker bounds).
    finished = sorted(record["segments"].items(),
                      key=lambda item: (item[1].get("end_epoch", -1), int(item[0])))
    if not finished or finished[-1][1]["checkpoint"] is None:
        return None
    return ray.train.Checkpoint(finished[-1][1]["checkpoint"])


def load_checkpoint_state(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    """The tensors and counters of a ray-sebs checkpoint; :class:`CheckpointError` naming the
    file when it cannot be read (cut short, missing, not a ray-sebs checkpoint)."""
    path = f"{checkpoint.path.rstrip('/')}/{CHECKPOINT_FILE}"
    try:
        with checkpoint.as_directory() as directory:
            state = torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location="cpu",
                               weights_only=False)
        if not isinstance(state, dict) or "state" not in state:
            raise ValueError("it holds no ray-sebs training state")
    except Exception as error:  # torch.load raises RuntimeError, EOFError, UnpicklingError, ...
        detail = next((line.strip() for line in str(error).splitlines() if line.strip()),
                      type(error).__name__)
        raise CheckpointError(
            f"the checkpoint file {path} cannot be read ({detail}); restore it, or start a new run "
            "with another --name") from None
    return state


def check_resume_checkpoint(run_dir: str) -> None:
    """Read the checkpoint that Ray Train will resume this run from before any worker starts.

    Ray Train's next ``fit()`` hands every worker the newest checkpoint its checkpoint manager
    registered (``ray.train.Result.from_path`` names the same one). A file there that cannot be
    loaded (storage that lost or cut it) would fail in every worker, be retried as a worker
    failure until ``max_failures`` is spent, and end in a torch traceback; here it is one
    :class:`CheckpointError` naming the file. The driver checks, not the loop, because the
    driver can stop the run before Ray retries anything. It fails rather than falls back to an
    older checkpoint: which checkpoint the workers get is Ray Train's choice, with no public way
    to pass another. Only a resumed run is checked (once per :meth:`SEBSTrainer.fit`), so a new
    run never reads a checkpoint in the driver.
    """
    if not exists(f"{run_dir}/{RAY_CHECKPOINT_SNAPSHOT}"):
        return
    checkpoint = ray.train.Result.from_path(run_dir).checkpoint
    if checkpoint is not None:
        load_checkpoint_state(checkpoint)


def load_history(checkpoint: ray.train.Checkpoint) -> list[dict[str, Any]]:
    return load_checkpoint_state(checkpoint)["state"]["history"]


def summarize(plan: ElasticPlan, history: list[dict[str, Any]], wall_time_s: float) -> dict[str, Any]:
    """Totals of a finished run, with what its resizes and recoveries cost (:mod:`ray_sebs.history`)."""
    changes = change_totals(history)
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
        "resizes": changes.resizes,
        "planned_resizes": plan.resizes,
        "resize_time_s": changes.resize_time_s,
        "resize_times_s": list(changes.resize_times_s),
        "recoveries": changes.recoveries,
        "recovery_time_s": changes.recovery_time_s,
        "recovery_times_s": list(changes.recovery_times_s),
        "worker_seconds": worker_seconds(history),
        "peak_workers": max((r["world_size"] for r in history), default=0),
        "plan": asdict(plan.cluster) | {"peak_workers": plan.peak_workers},
    }
