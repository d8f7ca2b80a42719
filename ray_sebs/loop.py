"""The per-worker training loop of one segment, top to bottom.

Ray Train runs :func:`train_segment` on every worker of a segment's worker group. It restores the
latest checkpoint (the previous segment's, or this segment's after a resize or a failure), then
trains epoch by epoch until the segment's last epoch. Everything it needs about batch sizes,
learning rates and update counts comes from the :class:`~ray_sebs.plan.ElasticPlan`; the only
thing read from the live cluster is the world size, which picks the plan's decomposition.

One update, on every rank:

1. pull ``rank_samples[rank]`` rows from the Ray Data shard (one batch of the iterator);
2. split them into ``accumulation_steps`` micro-batches of at most ``max_micro_batch`` rows;
3. backward the *summed* per-sample loss times ``world_size / B`` on each micro-batch, under
   DDP's ``no_sync()`` on all but the last, so gradients are all-reduced once per update;
4. step the optimizer: the gradient is exactly the mean over the stage's ``B`` samples.

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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from ray_sebs.console import ProgressSender
from ray_sebs.errors import CheckpointError, InvariantError
from ray_sebs.history import EpochRecord
from ray_sebs.optim import OptimizerConfig
from ray_sebs.plan import ElasticPlan
from ray_sebs.report import format_epoch

logger = logging.getLogger(__name__)
BatchT = TypeVar("BatchT")

CHECKPOINT_FILE = "sebs_state.pt"
NON_FINITE = "non_finite"
"""Key of :func:`train_segment`'s return value when the loss stopped being finite: the arguments of
:class:`~ray_sebs.errors.NonFiniteLossError`, which the driver raises."""
EVAL_BATCH_SIZE = 1024

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss_fn(logits, labels)`` returns one loss per sample (``reduction="none"``)."""


def cross_entropy_per_sample(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, labels, reduction="none")


def summed_loss(loss_fn: LossFn, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``loss_fn(logits, labels).sum()``; for the default cross-entropy, its fused sum (one kernel
    fewer forward and backward: about 7% of an update of a small MLP)."""
    if loss_fn is cross_entropy_per_sample:
        return nn.functional.cross_entropy(logits, labels, reduction="sum")
    return loss_fn(logits, labels).sum()


@dataclass
class TrainState:
    """Everything a checkpoint holds besides the tensors: where the run is and what it did."""

    next_epoch: int = 0
    updates: int = 0
    samples: int = 0
    history: list[EpochRecord] = field(default_factory=list)


@dataclass(frozen=True)
class SegmentConfig:
    """What :func:`train_segment` gets through ``train_loop_config``."""

    plan: ElasticPlan
    segment_index: int
    model_factory: Callable[[], nn.Module]
    optimizer: OptimizerConfig
    loss_fn: LossFn
    seed: int
    has_validation: bool
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
    from the same checkpoint ``max_failures`` times and fail the same way each time.
    """
    config: SegmentConfig = loop_config["segment"]
    plan = config.plan
    segment = plan.segments[config.segment_index]
    context = ray.train.get_context()
    world_size, rank = context.get_world_size(), context.get_world_rank()
    device = ray.train.torch.get_device()
    started_at = time.time()
    # Where a worker group's start-up goes, logged by rank 0 at its first update: on a resize this
    # is the part of the restart that the loop itself (not Ray Train) spends.
    startup = [("start", time.perf_counter())]
    train_shard = ray.train.get_dataset_shard("train")
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
    startup.append(("model and checkpoint", time.perf_counter()))
    if state.next_epoch >= segment.end_epoch:
        return None  # this segment finished before a driver restart; nothing to redo
    if state.next_epoch < segment.first_epoch:
        raise InvariantError(f"segment {segment.index} starts at epoch {segment.first_epoch} but the "
                             f"latest checkpoint resumes at epoch {state.next_epoch}")

    # A new worker group's first batch waits seconds for Ray Data to start the split (a new
    # coordinator actor): ask for it now, so that it arrives while DDP connects and the optimizer
    # is built (torch's first optimizer imports its compiler stack, seconds too), not after.
    resume_epoch = state.next_epoch
    first_stage = plan.schedule.stage_of_epoch(resume_epoch)
    first_batches = prefetch_first(epoch_batches(
        train_shard, plan.decomposition(first_stage.index, world_size).rank_samples[rank],
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
    last_checkpoint = time.monotonic()
    epochs_since_checkpoint = 0
    checkpointed_epoch = resume_epoch - 1  # the epoch whose end the latest checkpoint holds

    for epoch in range(resume_epoch, segment.end_epoch):
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
        loss_scale = torch.tensor(split.loss_scale, device=device)
        batches = first_batches if epoch == resume_epoch else epoch_batches(
            train_shard, split.rank_samples[rank], shuffle_seed=epoch_seed(config.seed, epoch, rank))
        for update in range(split.updates_per_epoch):
            waited_from = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - waited_from
            if first_update_at is None:
                startup.append(("first batch", time.perf_counter()))
            features, labels = batch["features"], batch["label"]
            if len(labels) != split.rank_samples[rank]:
                raise InvariantError(f"rank {rank} got {len(labels)} rows for an update that needs "
                                     f"{split.rank_samples[rank]}")
            train_update(model, optimizer, config.loss_fn, features, labels, micro_batches,
                         loss_scale, tally)
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
        totals = all_reduce_sum(torch.tensor(
            [tally.loss_sum().item(), sum(rows_per_update), min(rows_per_update, default=0),
             max(rows_per_update, default=0)], dtype=torch.float64, device=device))
        epochs_since_checkpoint += 1
        # Rank 0's clock decides a time-based checkpoint for every rank (reports are collective).
        due_by_time = rank == 0 and config.checkpoint_every_s is not None \
            and time.monotonic() - last_checkpoint >= config.checkpoint_every_s
        bad, due = all_reduce_max(torch.stack([
            tally.first_bad_update(), torch.tensor(int(due_by_time), device=device)])).tolist()
        checkpoint_now = bool(due) or epoch + 1 == segment.end_epoch or (
            config.checkpoint_every_epochs is not None
            and epochs_since_checkpoint >= config.checkpoint_every_epochs)
        if bad >= 0:  # the same on every rank: all leave here, before reporting
            return {NON_FINITE: {"stage": stage.index, "update": int(bad),
                                 "global_batch_size": stage.global_batch_size, "epoch": epoch,
                                 "checkpoint_epoch": checkpointed_epoch}}
        epoch_samples = int(totals[1].item())
        if epoch_samples != epoch_updates * stage.global_batch_size:
            raise InvariantError(f"epoch {epoch} used {epoch_samples} samples for {epoch_updates} "
                                 f"updates of {stage.global_batch_size}")
        state.updates += epoch_updates
        state.samples += epoch_samples
        validation_loss, validation_accuracy = (
            evaluate(module, validation, config.loss_fn, device, rank, world_size)
            if validation is not None else (math.nan, math.nan))
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
            samples_per_update_min=int(totals[2].item()),
            samples_per_update_max=int(totals[3].item()),
            epoch_updates=epoch_updates,
            updates=state.updates,
            samples=state.samples,
            train_loss=float(totals[0].item()) / max(epoch_samples, 1),
            validation_loss=validation_loss,
            validation_accuracy=validation_accuracy,
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
    rows_per_update: list[int] = field(default_factory=list)
    """Rows each update used on this rank: counted, not assumed (the invariant's evidence)."""

    def loss_sum(self) -> torch.Tensor:
        if not self.step_losses:
            return torch.zeros((), device=self.device)
        return torch.stack(self.step_losses).sum()

    def first_bad_update(self) -> torch.Tensor:
        """Run-wide number (1-based) of the first update whose loss was not finite; -1 if none."""
        if not self.rows_per_update:
            return torch.full((), -1, dtype=torch.long, device=self.device)
        # Every update of an epoch has the same number of micro-steps.
        per_update = torch.stack(self.step_losses).view(len(self.rows_per_update), -1).sum(dim=1)
        bad = ~torch.isfinite(per_update)
        first = self.updates_before + 1 + bad.int().argmax()  # argmax: the first maximum
        return torch.where(bad.any(), first, -1)


def train_update(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn,
                 features: torch.Tensor, labels: torch.Tensor, micro_batches: Sequence[int],
                 loss_scale: torch.Tensor, tally: EpochTally) -> None:
    """Steps 2-4 of one update on this rank: micro-batches, weighted backward, one optimizer step.

    ``micro_batches`` are the sizes of this rank's micro-batches and ``loss_scale`` the factor on
    their summed loss (:class:`~ray_sebs.plan.BatchDecomposition`), a scalar tensor on the device
    made once per epoch (making it per update costs ~5% of a small MLP's update). A DDP ``model``
    all-reduces only on the last micro-batch; a bare module (one worker) never does.
    """
    no_sync = model.no_sync if isinstance(model, nn.parallel.DistributedDataParallel) \
        else contextlib.nullcontext
    offset = rows = 0
    for step, size in enumerate(micro_batches):
        sync = step == len(micro_batches) - 1
        whole = size == len(labels)  # one micro-batch: no slicing
        micro_features = features if whole else features[offset:offset + size]
        micro_labels = labels if whole else labels[offset:offset + size]
        with contextlib.nullcontext() if sync else no_sync():
            step_loss = summed_loss(loss_fn, model(micro_features), micro_labels)
            # The gradient of loss_scale * step_loss, without a multiply node in the graph.
            step_loss.backward(loss_scale)
        tally.step_losses.append(step_loss.detach())
        offset += size
        rows += len(micro_labels)
    tally.rows_per_update.append(rows)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


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
                              "samples": state.samples, "history": state.history}},
                   os.path.join(directory, CHECKPOINT_FILE))
        ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(directory))


def evaluate(module: nn.Module, validation: Any, loss_fn: LossFn, device: torch.device,
             rank: int, world_size: int) -> tuple[float, float]:
    """Loss and accuracy over the whole validation set, each rank taking every W-th batch.

    The validation dataset is not split between workers and is read in a fixed order, so the
    round-robin covers every row exactly once; the sums are all-reduced.
    """
    module.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, rows
    with torch.no_grad():
        for index, batch in enumerate(validation.iter_torch_batches(batch_size=EVAL_BATCH_SIZE)):
            if index % world_size != rank:
                continue
            logits = module(batch["features"])
            sums[0] += loss_fn(logits, batch["label"]).sum().double()
            sums[1] += (logits.argmax(dim=1) == batch["label"]).sum().double()
            sums[2] += len(batch["label"])
    sums = all_reduce_sum(sums)
    rows = sums[2].item()
    return (sums[0].item() / rows, sums[1].item() / rows) if rows else (math.nan, math.nan)


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
