"""The per-worker training loop of one segment, top to bottom.

Ray Train runs :func:`train_segment` on every worker of a segment's worker group. It restores the
latest checkpoint (the previous segment's, or this segment's after a resize or a failure), then
trains epoch by epoch until the segment's last epoch. Everything it needs about batch sizes,
learning rates and update counts comes from the :class:`~ray_sebs.plan.ElasticPlan`; the only
thing read from the live cluster is the world size, which picks the plan's decomposition.

One update, on every rank:

1. pull ``rank_samples[rank]`` rows from the Ray Data shard (one batch of the iterator, a dict
   of tensors with every column of the dataset);
2. split them into ``accumulation_steps`` micro-batches of at most ``max_micro_batch`` rows;
3. backward each micro-batch's *summed* loss (:mod:`ray_sebs.objective`), under DDP's
   ``no_sync()`` on all but the last, so gradients are all-reduced once per update. A per-row
   loss is scaled by ``world_size / B``: DDP's average over ranks is then the mean over ``B``
   rows. A loss summed with its own count (e.g. tokens) is scaled by ``world_size``: DDP's
   average is then the global sum, which is divided by the update's global count, all-reduced
   once per update. Dividing the summed gradient equals scaling each backward by
   ``world_size / count`` (backward is linear), without knowing the count before the forward;
4. clip the global gradient norm (the same on every rank: it is taken after the all-reduce) and
   step the optimizer: the gradient is exactly the mean over the stage's ``B`` samples (or over
   the global batch's count).

One update in ``NOISE_SAMPLE_EVERY`` also measures the gradient noise scale (McCandlish et al.
2018, arXiv 1812.06162, Appendix A): the squared norm of the first micro-batch's gradient (local,
under ``no_sync``) and of the whole update's (after the all-reduce) are the two batch sizes its
unbiased estimates of ``|G|^2`` and ``tr(Sigma)`` need. An update of one micro-batch is split into
two halves for it, which changes nothing but the rounding (accumulation is exact); such updates
measure one in ``NOISE_SPLIT_EVERY``, since the split costs about one more update on small models.

Ranks pull whole update batches rather than micro-batches from the iterator so that uneven splits
(``B`` not divisible by the world size, or a rank's share not divisible by the accumulation steps)
need no special case: only micro-batches ever reach the device.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from ray_sebs.console import ProgressSender
from ray_sebs.errors import CheckpointError, InvariantError
from ray_sebs.history import EpochRecord, StageDecision, stage_starts
from ray_sebs.objective import Batch, Objective, RowSum, Summed, batch_rows, slice_rows, sum_and_count
from ray_sebs.optim import OptimizerConfig
from ray_sebs.plan import ElasticPlan, split_evenly
from ray_sebs.report import format_epoch
from ray_sebs.schedule import epoch_budget, should_grow, warmup_factor

logger = logging.getLogger(__name__)
BatchT = TypeVar("BatchT")

CHECKPOINT_FILE = "sebs_state.pt"
NON_FINITE = "non_finite"
"""Key of :func:`train_segment`'s return value when the loss stopped being finite: the arguments of
:class:`~ray_sebs.errors.NonFiniteLossError`, which the driver raises."""
STAGE_DECISIONS = "stage_decisions"
"""Key of :func:`train_segment`'s return value in an adaptive run: every
:class:`~ray_sebs.history.StageDecision` so far, as the checkpoint holds them; the driver re-plans
from them (a stage that needs another worker count ends the segment)."""
EVAL_BATCH_SIZE = 1024
NOISE_SAMPLE_EVERY = 32
"""One update in this many measures the gradient noise when it has several micro-batches: two
gradient norms and a few scalar ops (~100 us on a CPU)."""
NOISE_SPLIT_EVERY = 128
"""One update in this many measures it when the update has one micro-batch, which it splits into
two halves: on a small model that costs about one more update (benchmarks/overhead.py)."""
NOISE_SMOOTHING = 0.5
"""Weight of the previous epochs in the noise scale's moving averages (of ``|G|^2`` and
``tr(Sigma)``, each over an epoch's measurements first)."""
CACHE_LOAD_ROWS = 4096
"""Rows per batch when a cached shard is read in."""


@dataclass
class TrainState:
    """Everything a checkpoint holds besides the tensors: where the run is and what it did."""

    next_epoch: int = 0
    updates: int = 0
    samples: int = 0
    history: list[EpochRecord] = field(default_factory=list)
    noise_averages: tuple[float, float] | None = None
    """Moving averages of the estimates of ``|G|^2`` and ``tr(Sigma)`` (:func:`smooth_noise`)."""
    stage_decisions: list[StageDecision] = field(default_factory=list)
    """The stages an adaptive run began, and why (:func:`decide_next_stage`)."""


@dataclass(frozen=True)
class SegmentConfig:
    """What :func:`train_segment` gets through ``train_loop_config``."""

    plan: ElasticPlan
    segment_index: int
    model_factory: Callable[[], nn.Module]
    optimizer: OptimizerConfig
    objective: Objective
    seed: int
    has_validation: bool
    precision: str = "fp32"
    """One of :data:`~ray_sebs.optim.PRECISIONS`."""
    cache_data: str = "none"
    """One of :data:`~ray_sebs.data.CACHE_MODES` (:class:`ShardBatches`)."""
    gradient_noise: bool = True
    """Measure the gradient noise scale on sampled updates (:func:`noise_estimate`)."""
    workers: int | None = None
    """Workers the driver asked for: the segment's target, or fewer when the cluster cannot place
    it (the driver has warned about that). ``None``: the target."""
    checkpoint_every_epochs: int | None = 1
    """Checkpoint after this many epochs since the last checkpoint; ``None``: not by count."""
    checkpoint_every_s: float | None = None
    """Checkpoint at the first epoch end this many seconds after the last checkpoint (rank 0's
    clock decides for every rank); ``None``: not by time. The segment's last epoch is always
    checkpointed: the next segment starts from it."""
    report_every_epoch: bool = True
    """Report every epoch's record to Ray Train, for its callbacks (Tune's, the autoscaler
    prefetch); ``False``: report only with a checkpoint. A report is a barrier that waits for the
    controller's next poll; the driver gets every record through :attr:`progress_queue` anyway."""
    progress_queue: Any = None
    """The driver's console queue (:class:`~ray_sebs.console.RunConsole`); ``None``: no console."""


def train_segment(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """Train the segment's remaining epochs on this rank.

    Returns ``None``, or ``{NON_FINITE: {...}}`` on every rank when an epoch's loss was NaN or
    infinite: that epoch is not checkpointed and the run stops there. It returns rather than
    raises because a non-finite loss is deterministic: Ray Train would restart the worker group
    from the same checkpoint ``max_failures`` times and fail the same way each time. An adaptive
    run returns ``{STAGE_DECISIONS: [...]}``: the segment ends where a decided stage needs
    another worker count (a stage that keeps the count begins within the segment, no restart).
    """
    config: SegmentConfig = loop_config["segment"]
    plan = config.plan
    context = ray.train.get_context()
    world_size, rank = context.get_world_size(), context.get_world_rank()
    device = ray.train.torch.get_device()
    autocast = precision_context(config.precision, device)
    started_at = time.time()
    # Where a worker group's start-up goes, logged by rank 0 at its first update: on a resize this
    # is the part of the restart that the loop itself (not Ray Train) spends.
    startup = [("start", time.perf_counter())]
    train_batches = ShardBatches(ray.train.get_dataset_shard("train"), config.cache_data, device)
    validation = ray.train.get_dataset_shard("validation") if config.has_validation else None
    startup.append(("dataset shards", time.perf_counter()))

    # Restore before wrapping in DDP so that every rank starts from the same weights. Without a
    # checkpoint, DDP broadcasts rank 0's initialisation, which the seed makes reproducible.
    torch.manual_seed(config.seed)
    model = config.model_factory()
    state = TrainState()
    optimizer_state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            saved = torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location="cpu",
                               weights_only=False)
        load_model_state(model, saved["model"])
        optimizer_state = saved["optimizer"]
        state = TrainState(**saved["state"])
    adaptive = plan.schedule.config.kind == "adaptive"
    if adaptive:
        # The checkpoint's decisions are the run's: a restarted worker group (or a driver that
        # died before it recorded them) may have been given an older calendar.
        plan = plan.with_stage_starts(stage_starts(state.stage_decisions))
    segment = plan.segments[config.segment_index]
    finished = {STAGE_DECISIONS: state.stage_decisions} if adaptive else None
    startup.append(("model and checkpoint", time.perf_counter()))
    if state.next_epoch >= segment.end_epoch:
        return finished  # this segment finished before a driver restart; nothing to redo
    if state.next_epoch < segment.first_epoch:
        raise InvariantError(f"segment {segment.index} starts at epoch {segment.first_epoch} but the "
                             f"latest checkpoint resumes at epoch {state.next_epoch}")

    # A new worker group's first batch waits seconds for Ray Data to start the split (a new
    # coordinator actor): ask for it now, so that it arrives while DDP connects and the optimizer
    # is built (torch's first optimizer imports its compiler stack, seconds too), not after.
    resume_epoch = state.next_epoch
    first_stage = plan.schedule.stage_of_epoch(resume_epoch)
    first_batches = prefetch_first(train_batches.epoch(
        plan.decomposition(first_stage.index, world_size).rank_samples[rank],
        shuffle_seed=epoch_seed(config.seed, resume_epoch, rank)))

    model = ray.train.torch.prepare_model(model)
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    optimizer = config.optimizer.build(model.parameters(), first_stage.learning_rate)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    startup.append(("DDP and optimizer", time.perf_counter()))
    asked = config.workers or segment.workers
    if world_size < asked and rank == 0:
        planned = plan.decomposition(first_stage.index, asked)
        live = plan.decomposition(first_stage.index, world_size)
        logger.warning(
            "segment %d asked for %d workers but %d are running: stage %d trains at %d micro-steps "
            "of <= %d rows instead of %d; the global batch stays exactly %d",
            segment.index, asked, world_size, first_stage.index, live.accumulation_steps,
            live.micro_batch_size, planned.accumulation_steps, first_stage.global_batch_size)

    first_update_at: float | None = None
    progress = ProgressSender(config.progress_queue, rank=rank)
    if world_size < asked:
        progress.warning(f"segment {segment.index} asked for {asked} workers but {world_size} are "
                         f"running; every update still uses exactly the global batch")
    warmup_updates = plan.schedule.config.warmup_updates
    last_checkpoint = time.monotonic()
    epochs_since_checkpoint = 0
    checkpointed_epoch = resume_epoch - 1  # the epoch whose end the latest checkpoint holds

    for epoch in itertools.count(resume_epoch):
        if epoch >= segment.end_epoch:  # the end may move: an adaptive decision ends the segment
            break
        stage = plan.schedule.stage_of_epoch(epoch)
        split = plan.decomposition(stage.index, world_size)
        micro_batches = split.rank_micro_batches(rank)
        for group in optimizer.param_groups:
            group["lr"] = stage.learning_rate
        # Seeding from (seed, epoch, rank) makes a resumed epoch draw what the original would have.
        torch.manual_seed(epoch_seed(config.seed, epoch, rank))

        model.train()
        epoch_started = time.perf_counter()
        data_wait = 0.0
        tally = EpochTally(device=device, updates_before=state.updates)
        rule = UpdateRule.for_epoch(split.loss_scale, world_size, micro_batches, device,
                                    clip_grad_norm=config.optimizer.clip_grad_norm, autocast=autocast)
        if not config.gradient_noise:
            rule = replace(rule, noise_every=None)
        batches = first_batches if epoch == resume_epoch else train_batches.epoch(
            split.rank_samples[rank], shuffle_seed=epoch_seed(config.seed, epoch, rank))
        for update in range(split.updates_per_epoch):
            run_update = state.updates + update + 1
            if run_update <= warmup_updates:  # at the last one the factor is 1: the stage's rate
                for group in optimizer.param_groups:
                    group["lr"] = stage.learning_rate * warmup_factor(run_update, warmup_updates)
            waited_from = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - waited_from
            if first_update_at is None:
                startup.append(("first batch", time.perf_counter()))
            rows = batch_rows(batch)
            if rows != split.rank_samples[rank]:
                raise InvariantError(f"rank {rank} got {rows} rows for an update that needs "
                                     f"{split.rank_samples[rank]}")
            train_update(model, optimizer, config.objective, batch, rule, tally)
            if progress.due():
                progress.send_progress(epoch=epoch, updates_done=update + 1,
                                       updates_total=split.updates_per_epoch,
                                       samples_done=(update + 1) * stage.global_batch_size,
                                       elapsed_s=time.perf_counter() - epoch_started)
            if first_update_at is None:
                first_update_at = time.time()
                startup.append(("first update", time.perf_counter()))
                if rank == 0:
                    phases = ", ".join(f"{name} {end - begin:.2f} s"
                                       for (_, begin), (name, end) in itertools.pairwise(startup))
                    logger.info("segment %d on %d workers: first update %.2f s after the loop started (%s)",
                                segment.index, world_size, startup[-1][1] - startup[0][1], phases)
        train_time = time.perf_counter() - epoch_started

        epoch_updates = split.updates_per_epoch
        rows_per_update = tally.rows_per_update
        # Summing each rank's smallest and largest update bounds every update's global row count.
        totals = all_reduce_sum(torch.stack([
            tally.loss_sum().double(), tally.count_sum(),
            *torch.tensor([sum(rows_per_update), min(rows_per_update, default=0),
                           max(rows_per_update, default=0)], dtype=torch.float64, device=device),
            *tally.noise_sums()]))
        epochs_since_checkpoint += 1
        # Rank 0's clock decides a time-based checkpoint for every rank (reports are collective).
        due_by_time = rank == 0 and config.checkpoint_every_s is not None \
            and time.monotonic() - last_checkpoint >= config.checkpoint_every_s
        bad, due = all_reduce_max(torch.stack([
            tally.first_bad_update(), torch.tensor(int(due_by_time), device=device)])).tolist()
        if bad >= 0:  # the same on every rank: all leave here, before reporting
            return {NON_FINITE: {"stage": stage.index, "update": int(bad),
                                 "global_batch_size": stage.global_batch_size, "epoch": epoch,
                                 "checkpoint_epoch": checkpointed_epoch}}
        epoch_samples = int(totals[2].item())
        if epoch_samples != epoch_updates * stage.global_batch_size:
            raise InvariantError(f"epoch {epoch} used {epoch_samples} samples for {epoch_updates} "
                                 f"updates of {stage.global_batch_size}")
        state.updates += epoch_updates
        state.samples += epoch_samples
        state.noise_averages = smooth_noise(state.noise_averages, totals[5:8].tolist())
        # The noise scale is all-reduced, so every rank takes the same decision.
        decision = decide_next_stage(plan, epoch, noise_scale(state.noise_averages)) \
            if adaptive else None
        if decision is not None:
            state.stage_decisions.append(decision)
            plan = plan.with_stage_starts(stage_starts(state.stage_decisions))
            segment = plan.segments[config.segment_index]  # ends here if the next stage does not fit
            if rank == 0:
                logger.info("stage %d begins at epoch %d: B_noise %.1f >= %.1f (threshold x rho x "
                            "B_s=%d)%s", decision["stage"], decision["epoch"], decision["noise_scale"],
                            decision["threshold_batch_size"], decision["batch_size"],
                            "" if epoch + 1 < segment.end_epoch else
                            f"; segment {segment.index} ends for another worker count")
        checkpoint_now = bool(due) or epoch + 1 == segment.end_epoch or (
            config.checkpoint_every_epochs is not None
            and epochs_since_checkpoint >= config.checkpoint_every_epochs)
        validation_metrics = evaluate(module, validation, config.objective, rank, world_size,
                                      autocast) if validation is not None else {}
        epoch_time = time.perf_counter() - epoch_started
        record = EpochRecord(
            epoch=epoch,
            stage=stage.index,
            segment=segment.index,
            global_batch_size=stage.global_batch_size,
            learning_rate=stage.learning_rate,
            world_size=world_size,
            target_workers=segment.workers,
            micro_batch_size=split.micro_batch_size,
            accumulation_steps=split.accumulation_steps,
            samples_per_update_min=int(totals[3].item()),
            samples_per_update_max=int(totals[4].item()),
            epoch_updates=epoch_updates,
            updates=state.updates,
            samples=state.samples,
            train_loss=float(totals[0].item()) / max(float(totals[1].item()), 1.0),
            train_loss_count=float(totals[1].item()),
            validation_loss=validation_metrics.get("loss", math.nan),
            validation_accuracy=validation_metrics.get("accuracy", math.nan),
            validation_metrics=validation_metrics,
            gradient_noise_scale=noise_scale(state.noise_averages),
            stage_start_noise_scale=next((d["noise_scale"] for d in state.stage_decisions
                                          if d["epoch"] == epoch), math.nan),
            epoch_time_s=epoch_time,
            samples_per_s=epoch_samples / train_time if train_time > 0 else math.nan,
            data_wait_fraction=data_wait / epoch_time if epoch_time > 0 else 0.0,
            segment_started_at=started_at,
            first_update_at=first_update_at,
            ended_at=time.time(),
        )
        state.history.append(record)
        state.next_epoch = epoch + 1
        progress.epoch(record)
        if checkpoint_now or config.report_every_epoch:
            report_epoch(record, state, module, optimizer, rank, checkpoint=checkpoint_now)
        if checkpoint_now:
            last_checkpoint, epochs_since_checkpoint, checkpointed_epoch = time.monotonic(), 0, epoch
    return finished


def decide_next_stage(plan: ElasticPlan, epoch: int, noise: float) -> StageDecision | None:
    """The adaptive rule at the end of 0-based ``epoch`` (:func:`~ray_sebs.schedule.should_grow`):
    the decision to begin the next stage at ``epoch + 1``, or ``None``. Only the last stage begun
    can grow, only while candidate stages are left and the budget has an epoch for the next one."""
    config = plan.schedule.config
    stage = plan.schedule.stage_of_epoch(epoch)
    if stage.index != len(plan.stages) or stage.index >= config.num_stages \
            or epoch + 1 >= epoch_budget(config):
        return None
    if not should_grow(noise, stage.global_batch_size, config.growth_ratio, config.noise_threshold,
                       epoch + 1 - stage.first_epoch, config.min_epochs_per_stage):
        return None
    return StageDecision(stage=stage.index + 1, epoch=epoch + 1, noise_scale=noise,
                         batch_size=stage.global_batch_size,
                         threshold_batch_size=config.noise_threshold * config.growth_ratio
                         * stage.global_batch_size)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one rank's epoch: data order and torch RNG, the same again after a resume."""
    return seed * 100_003 + epoch * 1009 + rank


def prefetch_first(batches: Iterator[BatchT]) -> Iterator[BatchT]:
    """``batches``, whose first item is requested now, in a background thread."""
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="first-batch")
    first = executor.submit(next, batches, None)
    executor.shutdown(wait=False)  # the thread ends with its one task

    def chained() -> Iterator[BatchT]:
        item = first.result()
        if item is not None:
            yield item
            yield from batches

    return chained()


def epoch_batches(shard: Any, rows: int, shuffle_seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of update batches of ``rows`` rows from this rank's Ray Data shard.

    Step 1 of an update. Each call is a new pass over the shard; the last partial batch is dropped
    and rows are shuffled locally within a buffer of a few updates.
    """
    return iter(shard.iter_torch_batches(
        batch_size=rows, drop_last=True, local_shuffle_buffer_size=max(4 * rows, 1024),
        local_shuffle_seed=shuffle_seed))


def precision_context(precision: str, device: torch.device) -> Callable[[], AbstractContextManager[Any]]:
    """A context manager factory for the forward and the loss at ``precision``."""
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


@dataclass(frozen=True)
class UpdateRule:
    """How this rank makes every update of an epoch; built once per epoch, since tensors made per
    update cost ~5% of a small MLP's update."""

    micro_batches: tuple[int, ...]
    """Sizes of this rank's micro-batches (:meth:`~ray_sebs.plan.BatchDecomposition.rank_micro_batches`)."""
    row_scale: torch.Tensor
    """``world_size / B`` on the device: the factor on a summed per-row loss."""
    global_batch_size: torch.Tensor
    """``B`` on the device: the rows of every update (the large batch of the noise estimate)."""
    world_scale: torch.Tensor
    """``world_size`` on the device: the factor on a loss summed with its own count."""
    clip_grad_norm: float | None = None
    autocast: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext
    noise_every: int | None = NOISE_SAMPLE_EVERY
    """Measure the gradient noise on one update in this many; ``None``: never (benchmarks)."""

    @classmethod
    def for_epoch(cls, loss_scale: float, world_size: int, micro_batches: tuple[int, ...],
                  device: torch.device, *, clip_grad_norm: float | None = None,
                  autocast: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
                  ) -> UpdateRule:
        global_batch_size = round(world_size / loss_scale)
        return cls(micro_batches=micro_batches, row_scale=torch.tensor(loss_scale, device=device),
                   global_batch_size=torch.tensor(float(global_batch_size), device=device),
                   world_scale=torch.tensor(float(world_size), device=device),
                   clip_grad_norm=clip_grad_norm, autocast=autocast,
                   noise_every=NOISE_SAMPLE_EVERY if len(micro_batches) > 1 else NOISE_SPLIT_EVERY)


class ShardBatches:
    """One rank's update batches, epoch after epoch, from its Ray Data shard.

    ``none`` (the default) streams every epoch from the shard (:func:`epoch_batches`): for data
    of any size. ``host`` and ``device`` read the shard once per worker group into tensors in
    host memory or on the worker's device, then draw each epoch's batches by a seeded random
    permutation: indexing tensors in memory delivers rows ~20x faster than the shard iterator
    (``benchmarks/ingest.py``), for a shard that fits. A cached rank keeps the rows the split gave
    it for the whole worker group, shuffled within them each epoch (streaming re-splits each
    epoch); every update still takes exactly its rows from every rank.
    """

    def __init__(self, shard: Any, cache: str, device: torch.device) -> None:
        self.shard = shard
        self.cache = cache
        self.device = device
        self.columns: Batch | None = None

    def epoch(self, rows: int, shuffle_seed: int) -> Iterator[Batch]:
        if self.cache == "none":
            return epoch_batches(self.shard, rows, shuffle_seed)
        return self.cached_epoch(rows, shuffle_seed)

    def cached_epoch(self, rows: int, shuffle_seed: int) -> Iterator[Batch]:
        columns = self.cached_columns()
        where = next(iter(columns.values())).device
        order = torch.randperm(batch_rows(columns), device=where,
                               generator=torch.Generator(device=where).manual_seed(shuffle_seed))
        for start in range(0, len(order) - rows + 1, rows):
            index = order[start:start + rows]
            batch = {name: column[index] for name, column in columns.items()}
            if where != self.device:
                batch = {name: column.to(self.device, non_blocking=True)
                         for name, column in batch.items()}
            yield batch

    def cached_columns(self) -> Batch:
        """The whole shard as tensors, read on first use (in the first batch's thread)."""
        if self.columns is None:
            target = self.device if self.cache == "device" else torch.device("cpu")
            parts: dict[str, list[torch.Tensor]] = {}
            for batch in self.shard.iter_torch_batches(batch_size=CACHE_LOAD_ROWS, device=target):
                for name, column in batch.items():
                    parts.setdefault(name, []).append(column)
            self.columns = {name: torch.cat(columns) for name, columns in parts.items()}
            if target.type == "cpu" and self.device.type == "cuda":
                # Pinned pages make the per-update copy asynchronous (non_blocking above).
                self.columns = {name: column.pin_memory() for name, column in self.columns.items()}
            if not self.columns:
                raise InvariantError("the rank's shard of the training data is empty")
        return self.columns


NoiseMeasurement = tuple[list[torch.Tensor], torch.Tensor, "torch.Tensor | int | float",
                         list[torch.Tensor], torch.Tensor]
"""One measuring update: the per-parameter L2 norms of its first micro-batch's gradient (local,
so ``scale`` x the sum of its per-unit gradients), that ``scale``, the micro-batch's units (rows,
or a summed loss's count), the per-parameter norms of the whole update's mean gradient and its
global units."""


@dataclass
class EpochTally:
    """One rank's record of an epoch's updates, summed once at the end of the epoch.

    Updates only append (no host sync, no kernel launch per update: on small models a handful of
    scalar ops per update cost more than 10% of the step).
    """

    device: torch.device
    updates_before: int
    """Updates the run made before this epoch."""
    step_losses: list[torch.Tensor] = field(default_factory=list)
    """The summed loss of every micro-step, in order, as device scalars."""
    step_counts: list[torch.Tensor | int | float] = field(default_factory=list)
    """What each micro-step's loss sums over: its rows, or the count of a :class:`Summed` loss."""
    rows_per_update: list[int] = field(default_factory=list)
    """Rows each update used on this rank: counted, not assumed (the invariant's evidence)."""
    steps_per_update: list[int] = field(default_factory=list)
    """Micro-steps of each update (one more on an update split to measure the noise)."""
    noise_measurements: list[NoiseMeasurement] = field(default_factory=list)
    """What each measuring update saw, kept raw: turned into estimates once per epoch
    (:func:`noise_estimate`), since every op per measurement is paid on the update's critical path."""

    def noise_sums(self) -> torch.Tensor:
        """``[sum |G|^2, sum tr(Sigma), measurements]`` of the epoch on this rank, float64."""
        if not self.noise_measurements:
            return torch.zeros(3, dtype=torch.float64, device=self.device)
        columns = list(zip(*self.noise_measurements, strict=True))
        small_norms, big_norms = columns[0], columns[3]
        small_scale, small_units, big_units = (count_tensors(list(columns[index]), self.device)
                                               for index in (1, 2, 4))
        # The small batch's gradient is still scale x its per-unit sum: make it a mean.
        small_norm_sq = squared_norms(small_norms, self.device) / (small_scale * small_units) ** 2
        return noise_estimate(small_norm_sq, small_units, squared_norms(big_norms, self.device),
                              big_units).sum(dim=0)

    def loss_sum(self) -> torch.Tensor:
        if not self.step_losses:
            return torch.zeros((), device=self.device)
        return torch.stack(self.step_losses).sum()

    def count_sum(self) -> torch.Tensor:
        """The epoch's count on this rank, a float64 device scalar."""
        return count_tensor(self.step_counts, self.device)

    def first_bad_update(self) -> torch.Tensor:
        """Run-wide number (1-based) of the first update whose loss was not finite; -1 if none."""
        if not self.rows_per_update:
            return torch.full((), -1, dtype=torch.long, device=self.device)
        update_of_step = torch.repeat_interleave(
            torch.arange(len(self.steps_per_update), device=self.device),
            torch.tensor(self.steps_per_update, device=self.device))
        per_update = torch.zeros(len(self.steps_per_update), device=self.device).index_add_(
            0, update_of_step, torch.stack(self.step_losses).float())
        bad = ~torch.isfinite(per_update)
        first = self.updates_before + 1 + bad.int().argmax()  # argmax: the first maximum
        return torch.where(bad.any(), first, -1)


def count_tensor(counts: list[torch.Tensor | int | float], device: torch.device) -> torch.Tensor:
    """The sum of ``counts`` (numbers and device tensors) as a float64 scalar on ``device``."""
    numbers = sum(count for count in counts if not isinstance(count, torch.Tensor))
    tensors = [count.double().reshape(()) for count in counts if isinstance(count, torch.Tensor)]
    total = torch.tensor(float(numbers), dtype=torch.float64, device=device)
    return total + torch.stack(tensors).sum() if tensors else total


def count_tensors(counts: list[torch.Tensor | int | float], device: torch.device) -> torch.Tensor:
    """``counts`` (numbers and device scalars) as one float64 vector on ``device``."""
    return torch.stack([count.to(device, torch.float64).reshape(()) if isinstance(count, torch.Tensor)
                        else torch.tensor(float(count), dtype=torch.float64, device=device)
                        for count in counts])


def train_update(model: nn.Module, optimizer: torch.optim.Optimizer, objective: Objective,
                 batch: Batch, rule: UpdateRule, tally: EpochTally) -> None:
    """Steps 2-4 of one update on this rank: micro-batches, weighted backward, one optimizer step.

    A DDP ``model`` all-reduces only on the last micro-batch; a bare module (one worker) never
    does. Every micro-step of an update must return the same loss form. One update in
    ``rule.noise_every`` also measures the gradient noise (:func:`noise_estimate`).
    """
    no_sync = model.no_sync if isinstance(model, nn.parallel.DistributedDataParallel) \
        else contextlib.nullcontext
    micro_batches = rule.micro_batches
    measuring = rule.noise_every is not None \
        and len(tally.rows_per_update) % rule.noise_every == 0 and sum(micro_batches) >= 2
    if measuring and len(micro_batches) == 1:
        micro_batches = split_evenly(micro_batches[0], 2)  # the first half is the small batch
    offset = rows = 0
    batch_size = batch_rows(batch)
    per_row: bool | None = None
    small: tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | int | float] | None = None
    update_counts: list[torch.Tensor | int | float] = []
    for step, size in enumerate(micro_batches):
        sync = step == len(micro_batches) - 1
        micro_batch = batch if size == batch_size else slice_rows(batch, offset, offset + size)
        with contextlib.nullcontext() if sync else no_sync():
            with rule.autocast():
                output = objective.loss(model, micro_batch)
            step_loss, count = sum_and_count(output, size, "batch_loss_fn")
            step_per_row = isinstance(output, RowSum) or not isinstance(output, Summed)
            if per_row is not None and step_per_row != per_row:
                raise InvariantError("batch_loss_fn returned per-row losses for one micro-batch "
                                     "and Summed for another; return one form")
            per_row = step_per_row
            scale = rule.row_scale if per_row else rule.world_scale
            # The gradient of scale * step_loss, without a multiply node in the graph.
            step_loss.backward(scale)
        tally.step_losses.append(step_loss.detach())
        tally.step_counts.append(count if per_row or not isinstance(count, torch.Tensor)
                                 else count.detach())
        update_counts.append(tally.step_counts[-1])
        if measuring and step == 0:  # still local (no_sync): the small batch's gradient
            small = (gradient_norms(model), scale, tally.step_counts[-1])
        offset += size
        rows += size
    global_units = rule.global_batch_size
    if not per_row:
        # The gradient is now the sum over the global batch; divide it by the global count.
        global_units = all_reduce_sum(count_tensor(update_counts, rule.world_scale.device))
        divisor = global_units.clamp(min=1.0)
        for parameter in model.parameters():
            if parameter.grad is not None:
                parameter.grad.div_(divisor.to(parameter.grad.dtype))
    if small is not None:
        tally.noise_measurements.append((*small, gradient_norms(model), global_units))
    if rule.clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), rule.clip_grad_norm)
    tally.rows_per_update.append(rows)
    tally.steps_per_update.append(len(micro_batches))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def gradient_norms(model: nn.Module) -> list[torch.Tensor]:
    """The L2 norm of each parameter's gradient, device scalars (no host sync).

    One fused kernel per device and dtype (``torch._foreach_norm``, the op behind
    ``clip_grad_norm_`` and the foreach optimizers): ``get_total_norm``'s grouping and
    stacking in Python cost twice as much on a small model, on every measuring update.
    """
    return list(torch._foreach_norm(
        [parameter.grad for parameter in model.parameters() if parameter.grad is not None]))


def squared_norms(per_parameter: tuple[list[torch.Tensor], ...], device: torch.device) -> torch.Tensor:
    """The squared global L2 norm of each set of per-parameter norms, a float64 vector."""
    return torch.stack([torch.stack(norms).to(device, torch.float64).square().sum()
                        for norms in per_parameter])


def noise_estimate(small_norm_sq: torch.Tensor, small_batch: torch.Tensor, big_norm_sq: torch.Tensor,
                   big_batch: torch.Tensor) -> torch.Tensor:
    """``[|G|^2, tr(Sigma), 1]`` (along the last dimension) from the squared norms of two mean
    gradients of one update, over ``small_batch`` and ``big_batch`` units (rows, or a summed loss's
    count): McCandlish et al. 2018, Appendix A, from ``E|G_B|^2 = |G|^2 + tr(Sigma) / B``. Each
    is unbiased; their ratio, the noise scale, is taken only after averaging
    (:func:`smooth_noise`). Zeros (no measurement) where the two batches do not differ, e.g. a
    first micro-batch of padding only. Elementwise: one call turns an epoch's measurements into
    estimates, on the device."""
    valid = (small_batch > 0) & (big_batch > small_batch)
    squared = (big_batch * big_norm_sq - small_batch * small_norm_sq) / (big_batch - small_batch)
    trace = (small_norm_sq - big_norm_sq) / (1 / small_batch - 1 / big_batch)
    estimate = torch.stack([squared, trace, torch.ones_like(squared)], dim=-1)
    return torch.where(valid[..., None], torch.nan_to_num(estimate), torch.zeros_like(estimate))


def smooth_noise(previous: tuple[float, float] | None, sums: list[float]) -> tuple[float, float] | None:
    """The moving averages of ``|G|^2`` and ``tr(Sigma)`` after an epoch whose all-reduced
    ``[sum |G|^2, sum tr(Sigma), measurements]`` are ``sums``: each averaged over the epoch, then
    over epochs with weight :data:`NOISE_SMOOTHING` on the past (numerator and denominator apart,
    as the paper advises: a ratio of noisy estimates is biased)."""
    squared, trace, measurements = sums
    if not measurements:
        return previous
    current = (squared / measurements, trace / measurements)
    if previous is None:
        return current
    return tuple(NOISE_SMOOTHING * old + (1 - NOISE_SMOOTHING) * new  # type: ignore[return-value]
                 for old, new in zip(previous, current, strict=True))


def noise_scale(averages: tuple[float, float] | None) -> float:
    """``B_noise = tr(Sigma) / |G|^2``; NaN before any measurement or while ``|G|^2`` is not yet
    measurably positive (the noise swamps the gradient: any batch size is "small")."""
    if averages is None or not averages[0] > 0:
        return math.nan
    return averages[1] / averages[0]


def report_epoch(record: EpochRecord, state: TrainState, module: nn.Module,
                 optimizer: torch.optim.Optimizer, rank: int, *, checkpoint: bool = True) -> None:
    """Report the epoch on every rank (a barrier); only rank 0 writes the checkpoint, when due.

    The history travels in the checkpoint, so an epoch trained after the last checkpoint is
    trained again after a failure and recorded once.
    """
    if rank != 0 or not checkpoint:
        ray.train.report(record, checkpoint=None)
        return
    # A logger, not print: Ray Train 2.60 tees a worker's print to stdout and to its logger, so
    # each printed line reached the driver's console twice. Its worker root logger is at INFO.
    logger.info("%s", format_epoch(record))
    with tempfile.TemporaryDirectory() as directory:
        torch.save({"model": module.state_dict(), "optimizer": optimizer.state_dict(),
                    "state": {"next_epoch": state.next_epoch, "updates": state.updates,
                              "samples": state.samples, "history": state.history,
                              "noise_averages": state.noise_averages,
                              "stage_decisions": state.stage_decisions}},
                   os.path.join(directory, CHECKPOINT_FILE))
        ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(directory))


def evaluate(module: nn.Module, validation: Any, objective: Objective, rank: int, world_size: int,
             autocast: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
             ) -> dict[str, float]:
    """Every metric over the whole validation set, each rank taking every W-th batch.

    The validation dataset is not split between workers and is read in a fixed order, so the
    round-robin covers every row exactly once. Each metric is summed with its count on each rank
    and the sums are combined across ranks (gathered as numbers: a rank that drew no batch does
    not know the metrics' names), so every metric is exact, whatever its form.
    """
    module.eval()
    sums: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for index, batch in enumerate(validation.iter_torch_batches(batch_size=EVAL_BATCH_SIZE)):
            if index % world_size != rank:
                continue
            with autocast():
                metrics = objective.evaluate(module, batch)
            rows = batch_rows(batch)
            for name, value in metrics.items():
                total, count = sum_and_count(value, rows, f"eval_fn[{name!r}]")
                pair = [total.double(), count_tensor([count], total.device)]
                sums[name] = [a + b for a, b in zip(sums[name], pair, strict=True)] \
                    if name in sums else pair
    local = {name: (total.item(), count.item()) for name, (total, count) in sums.items()}
    return combine_metric_sums(gather_objects(local, world_size))


def gather_objects(value: Any, world_size: int) -> list[Any]:
    """``value`` from every rank, in rank order (just ``[value]`` outside a process group)."""
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered


def combine_metric_sums(per_rank: list[Mapping[str, tuple[float, float]]]) -> dict[str, float]:
    """Each metric's total over its count, summed over ranks; NaN for a zero count."""
    totals: dict[str, list[float]] = {}
    for sums in per_rank:
        for name, (total, count) in sums.items():
            pair = totals.setdefault(name, [0.0, 0.0])
            pair[0] += total
            pair[1] += count
    return {name: total / count if count else math.nan
            for name, (total, count) in sorted(totals.items())}


def load_model_state(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load weights, turning an architecture mismatch into an error that says what to do."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        raise CheckpointError(
            "the checkpoint does not fit this model (a different --model or data shape?): "
            f"{str(error).splitlines()[0]}; start a new run with another --name") from None


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor
