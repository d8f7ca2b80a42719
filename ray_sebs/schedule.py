"""The stagewise schedules: SEBS, its SSGD baseline and a constant batch. Pure Python.

A run is ``num_stages`` stages of whole epochs. Stage ``s`` (1-based) has a global batch size and a
learning rate given by the schedule kind:

* ``sebs``: ``B_s = round(B_1 * rho**(s-1))``. With ``lr_scaling="linear"`` (the default) the
  learning rate stays ``eta_1``; past ``max_batch_size`` the batch stays at the cap and the
  learning rate is divided by the remaining growth instead (the hybrid of Smith et al., 2018), so
  ``eta_s / B_s`` keeps SSGD's path.
* ``ssgd``: ``B_1`` throughout, ``eta_s = eta_1 / rho**(s-1)`` (the paper's baseline).
* ``constant``: ``B_1`` and ``eta_1`` throughout.
* ``adaptive``: the stages of ``sebs`` (same batches, same learning-rate law, same cap), but when
  each begins is decided during the run from the measured gradient noise scale: stage ``s+1``
  begins at the first epoch boundary where the smoothed ``B_noise >= noise_threshold * rho * B_s``
  and stage ``s`` has run ``min_epochs_per_stage`` epochs (:func:`should_grow`). The run's epoch
  budget is the fixed schedule's, ``sum(epochs_per_stage)`` over ``num_stages`` (so the same flags
  give SEBS and adaptive runs of equal length), and ``num_stages`` is the most stages it may reach.
  ``stage_starts`` holds the decisions so far; the last stage begun runs to the end of the budget.

The learning-rate law of ``sebs`` in general: ``eta_s = eta_1 * (B~_s / B_1)**e / rho**(s-1)``,
where ``B~_s`` is the batch before granularity rounding (``B_1 * rho**(s-1)`` while it grows, the
cap past it) and ``e`` is 1 for ``linear`` and 1/2 for ``sqrt``. So ``linear`` is the rule above,
and ``sqrt`` (for Adam and AdamW) gives ``eta_1 / sqrt(rho)**(s-1)`` while the batch grows (so
``eta_s * sqrt(B~_s)`` stays ``eta_1 * sqrt(B_1)``) and divides the learning rate by ``rho`` per
stage past the cap. Either way ``eta_s / B~_s**e`` follows SSGD's ``eta_s / B_1**e`` at every
stage: ``eta/B`` for SGD, ``eta/sqrt(B)`` for Adam. ``ssgd`` and ``constant`` keep ``B_1``, so the
law does not change them.

Rounding rule: the ideal batch ``B_1 * rho**(s-1)`` is rounded half-up to the nearest multiple of
``batch_granularity`` (never below one granule), then capped at ``max_batch_size`` rounded down
to a multiple of the granularity. Before the cap the SEBS learning rate is exactly ``eta_1``, so
``eta_s / B_s`` equals SSGD's up to that rounding alone (exactly, whenever ``B_1 * rho**(s-1)`` is
a multiple of the granularity); past the cap it is equal by construction.

Updates: every update uses exactly ``B_s`` samples and the last partial batch of each epoch is
dropped (``drop_last``), so a stage makes ``epochs * floor(N / B_s)`` updates and uses
``updates * B_s`` samples.

This module imports neither ray nor torch: the CLI plans a run before any cluster exists.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from ray_sebs.errors import ConfigError, require_int
from ray_sebs.optim import default_lr_scaling

ScheduleKind = Literal["sebs", "ssgd", "constant", "adaptive"]
SCHEDULE_KINDS: tuple[str, ...] = ("sebs", "ssgd", "constant", "adaptive")
GROWING_KINDS: tuple[str, ...] = ("sebs", "adaptive")
"""The kinds whose batch grows by ``rho`` per stage (:func:`stage_batch_and_lr`)."""
RUN_DECIDED_FIELDS: tuple[str, ...] = ("stage_starts",)
"""Fields of :class:`ScheduleConfig` that a run decides as it trains: no flag sets them."""
LrScaling = Literal["linear", "sqrt"]
LR_SCALINGS: tuple[str, ...] = ("linear", "sqrt")
LR_SCALING_EXPONENTS: dict[str, float] = {"linear": 1.0, "sqrt": 0.5}
"""The exponent ``e`` of ``eta_s = eta_1 * (B~_s / B_1)**e / rho**(s-1)``."""


@dataclass(frozen=True)
class ScheduleConfig:
    """A stagewise run, independent of the dataset and the cluster."""

    kind: ScheduleKind = "sebs"
    """``sebs`` grows the batch, ``ssgd`` decays the learning rate, ``constant`` does neither."""

    initial_batch_size: int = 16
    """Global batch size of stage 1 (B_1), summed over all workers."""

    growth_ratio: float = 2.0
    """Growth ratio rho >= 1: SEBS multiplies the batch by it per stage, SSGD divides the learning
    rate by it. 1 gives the constant-batch baseline."""

    num_stages: int = 4
    """Number of stages S."""

    epochs_per_stage: int | tuple[int, ...] = 10
    """Epochs in each stage: one value for every stage, or one value per stage."""

    learning_rate: float = 0.1
    """Learning rate of stage 1 (eta_1)."""

    max_batch_size: int | None = None
    """Cap on the global batch. SEBS stages past it keep the cap and decay the learning rate by the
    remaining growth instead. ``None``: no cap."""

    batch_granularity: int = 1
    """Global batches are rounded to a multiple of this (e.g. the worker count, so that every
    worker takes the same number of samples)."""

    lr_scaling: LrScaling | None = None
    """How SEBS ties the learning rate to the batch: ``linear`` keeps eta/B on SSGD's path (SGD,
    momentum SGD, AdaGrad), ``sqrt`` makes eta go with sqrt(B) (Adam, AdamW). ``None``: by the
    optimizer (:meth:`for_optimizer`); a schedule evaluated with ``None`` uses ``linear``."""

    warmup_updates: int = 0
    """Linear learning-rate warm-up from 0 over the run's first N updates (:func:`warmup_factor`);
    0: none. The stage learning rates are those without warm-up."""

    noise_threshold: float = 1.0
    """``adaptive``: stage ``s+1`` may begin once ``B_noise >= noise_threshold * rho * B_s``; 0
    grows after every ``min_epochs_per_stage`` whatever the noise (:func:`should_grow`)."""

    min_epochs_per_stage: int = 1
    """``adaptive``: epochs every stage runs before the next may begin."""

    stage_starts: tuple[int, ...] = ()
    """``adaptive``: the 0-based first epochs of stages 2, 3, ... decided so far (empty: stage 1
    runs the whole budget). The training loop extends it; a plan built from it is the run so far
    with the last stage begun running to the end of the budget."""

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ConfigError("kind", self.kind, "unknown schedule kind",
                              f"use one of {', '.join(SCHEDULE_KINDS)}")
        require_int("initial_batch_size", self.initial_batch_size, minimum=1,
                     fix="use a global batch of at least 1 sample")
        if isinstance(self.growth_ratio, bool) or not isinstance(self.growth_ratio, int | float) \
                or not math.isfinite(self.growth_ratio) or self.growth_ratio < 1:
            raise ConfigError("growth_ratio", self.growth_ratio, "must be a number >= 1",
                              "use 1 for a constant batch, or e.g. 2 to double it every stage")
        require_int("num_stages", self.num_stages, minimum=1, fix="use at least 1 stage")
        epochs = self.epochs_per_stage
        if isinstance(epochs, Sequence) and not isinstance(epochs, str):
            epochs = tuple(epochs)
            object.__setattr__(self, "epochs_per_stage", epochs)
            if len(epochs) not in (1, self.num_stages):
                raise ConfigError("epochs_per_stage", ",".join(map(str, epochs)),
                                  f"gives {len(epochs)} values for {self.num_stages} stages",
                                  f"give one value, or exactly {self.num_stages} comma-separated")
            for value in epochs:
                require_int("epochs_per_stage", value, minimum=1,
                             fix="every stage needs at least 1 epoch")
        else:
            require_int("epochs_per_stage", epochs, minimum=1,
                         fix="every stage needs at least 1 epoch")
        if isinstance(self.learning_rate, bool) or not isinstance(self.learning_rate, int | float) \
                or not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise ConfigError("learning_rate", self.learning_rate, "must be a positive number",
                              "use e.g. 0.1")
        require_int("batch_granularity", self.batch_granularity, minimum=1,
                     fix="use 1 for no rounding, or the worker count")
        if self.initial_batch_size % self.batch_granularity:
            raise ConfigError("initial_batch_size", self.initial_batch_size,
                              f"is not a multiple of batch_granularity={self.batch_granularity}",
                              "choose a first batch that the granularity divides")
        if self.max_batch_size is not None:
            require_int("max_batch_size", self.max_batch_size, minimum=1,
                         fix="use a positive cap, or none")
            if self.max_batch_size < self.initial_batch_size:
                raise ConfigError("max_batch_size", self.max_batch_size,
                                  f"is below the first batch ({self.initial_batch_size})",
                                  "use a cap >= the initial batch size, or none")
        if self.lr_scaling is not None and self.lr_scaling not in LR_SCALINGS:
            raise ConfigError("lr_scaling", self.lr_scaling, "unknown learning-rate scaling",
                              f"use one of {', '.join(LR_SCALINGS)}, or none to take the "
                              "optimizer's (linear for sgd/momentum/adagrad, sqrt for adam/adamw)")
        require_int("warmup_updates", self.warmup_updates, minimum=0,
                    fix="use 0 for no warm-up, or the number of updates to warm up over")
        if isinstance(self.noise_threshold, bool) \
                or not isinstance(self.noise_threshold, int | float) \
                or not math.isfinite(self.noise_threshold) or self.noise_threshold < 0:
            raise ConfigError("noise_threshold", self.noise_threshold,
                              "must be a finite number >= 0",
                              "use e.g. 1: grow once B_noise reaches the next stage's batch")
        require_int("min_epochs_per_stage", self.min_epochs_per_stage, minimum=1,
                    fix="every stage runs at least 1 epoch")
        self._check_stage_starts()

    def _check_stage_starts(self) -> None:
        starts = self.stage_starts
        if isinstance(starts, Sequence) and not isinstance(starts, str):
            starts = tuple(starts)
            object.__setattr__(self, "stage_starts", starts)
        else:
            raise ConfigError("stage_starts", starts, "must be a sequence of epochs",
                              "give the first epochs of stages 2, 3, ..., or none")
        if not starts:
            return
        text = ",".join(map(str, starts))
        if self.kind != "adaptive":
            raise ConfigError("stage_starts", text, f"decides stage starts of a {self.kind} "
                              "schedule, whose stages have fixed lengths",
                              "use --schedule adaptive, or give no stage starts")
        if len(starts) >= self.num_stages:
            raise ConfigError("stage_starts", text, f"begins {len(starts) + 1} stages of at most "
                              f"{self.num_stages}", "give at most num_stages - 1 starts")
        budget = epoch_budget(self)
        previous = 0
        for start in starts:
            require_int("stage_starts", start, minimum=1, fix="give 0-based epoch numbers")
            if start - previous < self.min_epochs_per_stage or start >= budget:
                raise ConfigError("stage_starts", text,
                                  f"begins a stage at epoch {start}, {start - previous} epochs after "
                                  f"the previous one, in a budget of {budget} epochs",
                                  f"give increasing epochs {self.min_epochs_per_stage} or more apart"
                                  f", below {budget}")
            previous = start

    def epochs_of_stage(self, stage: int) -> int:
        """Epochs in 1-based ``stage``."""
        epochs = self.epochs_per_stage
        if isinstance(epochs, tuple):
            return epochs[0] if len(epochs) == 1 else epochs[stage - 1]
        return epochs

    def baseline(self) -> ScheduleConfig:
        """The SSGD schedule with the same ratio, stages, epochs and first batch."""
        return replace(self, kind="ssgd", stage_starts=())

    def undecided(self) -> ScheduleConfig:
        """This schedule before any adaptive decision: what a run's fingerprint holds."""
        return replace(self, stage_starts=()) if self.stage_starts else self

    @property
    def resolved_lr_scaling(self) -> str:
        """The learning-rate law the schedule is evaluated with: ``lr_scaling``, or ``linear``."""
        return self.lr_scaling or "linear"

    def for_optimizer(self, optimizer_name: str) -> ScheduleConfig:
        """This schedule with ``lr_scaling`` set to ``optimizer_name``'s default when it is
        ``None`` (``linear`` for sgd/momentum/adagrad, ``sqrt`` for adam/adamw); else itself."""
        if self.lr_scaling is not None:
            return self
        return replace(self, lr_scaling=default_lr_scaling(optimizer_name))


@dataclass(frozen=True)
class Stage:
    """One stage of a schedule applied to a dataset of known size."""

    index: int
    """1-based stage number."""
    first_epoch: int
    """0-based index of the stage's first epoch in the whole run."""
    epochs: int
    """Epochs in this stage."""
    global_batch_size: int
    """Samples per optimizer update, summed over all workers."""
    learning_rate: float
    """Learning rate for every update of this stage."""
    updates_per_epoch: int
    """``floor(dataset_size / global_batch_size)``: the last partial batch is dropped."""

    @property
    def updates(self) -> int:
        """Optimizer updates (= all-reduce rounds in data-parallel training) in this stage."""
        return self.epochs * self.updates_per_epoch

    @property
    def samples(self) -> int:
        """Samples used by this stage's updates."""
        return self.updates * self.global_batch_size

    @property
    def end_epoch(self) -> int:
        """0-based index of the first epoch after this stage."""
        return self.first_epoch + self.epochs


@dataclass(frozen=True)
class Schedule:
    """A :class:`ScheduleConfig` evaluated for a dataset size: the stages and the run's totals."""

    config: ScheduleConfig
    dataset_size: int
    stages: tuple[Stage, ...] = field(repr=False)

    @property
    def total_epochs(self) -> int:
        return sum(stage.epochs for stage in self.stages)

    @property
    def total_updates(self) -> int:
        return sum(stage.updates for stage in self.stages)

    @property
    def total_samples(self) -> int:
        return sum(stage.samples for stage in self.stages)

    def stage_of_epoch(self, epoch: int) -> Stage:
        """The stage that contains 0-based ``epoch``."""
        for stage in self.stages:
            if stage.first_epoch <= epoch < stage.end_epoch:
                return stage
        raise IndexError(f"epoch {epoch} is outside the run's {self.total_epochs} epochs")


def ideal_batch_size(config: ScheduleConfig, stage: int) -> float:
    """``B_1 * rho**(s-1)`` for SEBS (and adaptive), ``B_1`` otherwise: the batch before rounding
    and capping."""
    if config.kind not in GROWING_KINDS:
        return float(config.initial_batch_size)
    return config.initial_batch_size * config.growth_ratio ** (stage - 1)


def stage_batch_and_lr(config: ScheduleConfig, stage: int) -> tuple[int, float]:
    """Global batch size and learning rate of 1-based ``stage`` (see the module's rules)."""
    granularity = config.batch_granularity
    if config.kind == "ssgd":
        return config.initial_batch_size, config.learning_rate / config.growth_ratio ** (stage - 1)
    if config.kind == "constant":
        return config.initial_batch_size, config.learning_rate
    ideal = ideal_batch_size(config, stage)
    batch = granularity * max(1, math.floor(ideal / granularity + 0.5))
    if config.max_batch_size is not None:
        cap = granularity * (config.max_batch_size // granularity)
        if batch > cap:
            # Hybrid: the batch stops growing and the learning rate takes the rest of the growth.
            return cap, sebs_learning_rate(config, stage, cap)
    return batch, sebs_learning_rate(config, stage, ideal)


def sebs_learning_rate(config: ScheduleConfig, stage: int, batch: float) -> float:
    """``eta_1 * (batch / B_1)**e / rho**(s-1)`` for SEBS's 1-based ``stage``, ``batch`` the
    stage's batch before rounding (the ideal one while it grows, the cap past it).

    Since the ideal batch is ``B_1 * rho**(s-1)``, this is ``eta_1 * (batch / ideal)**e /
    sqrt(rho)**(s-1)`` for ``sqrt``, and ``eta_1 * batch / ideal`` for ``linear``: exactly
    ``eta_1`` while the batch grows.
    """
    ideal = ideal_batch_size(config, stage)
    if config.resolved_lr_scaling == "linear":
        return config.learning_rate if batch == ideal else config.learning_rate * batch / ideal
    exponent = LR_SCALING_EXPONENTS[config.resolved_lr_scaling]
    return (config.learning_rate * (batch / ideal) ** exponent
            / config.growth_ratio ** ((stage - 1) * (1 - exponent)))


def warmup_factor(update_number: int, warmup_updates: int) -> float:
    """The factor on the stage learning rate of the run's 1-based update ``update_number``:
    ``min(1, u / warmup_updates)``, a linear warm-up from 0; 1 when ``warmup_updates`` is 0."""
    require_int("update_number", update_number, minimum=1,
                fix="count the run's updates from 1")
    require_int("warmup_updates", warmup_updates, minimum=0,
                fix="use 0 for no warm-up, or the number of updates to warm up over")
    if warmup_updates == 0 or update_number >= warmup_updates:
        return 1.0
    return update_number / warmup_updates


def epoch_budget(config: ScheduleConfig) -> int:
    """Epochs of the whole run: the sum of ``epochs_per_stage`` over ``num_stages`` (for
    ``adaptive`` too, whose stages share this budget however the run divides it)."""
    return sum(config.epochs_of_stage(stage) for stage in range(1, config.num_stages + 1))


def stage_lengths(config: ScheduleConfig) -> tuple[int, ...]:
    """Epochs of each stage the schedule runs: ``epochs_per_stage`` for the fixed kinds; for
    ``adaptive`` the stages begun at ``stage_starts``, the last running to the end of the budget."""
    if config.kind != "adaptive":
        return tuple(config.epochs_of_stage(stage) for stage in range(1, config.num_stages + 1))
    bounds = (0, *config.stage_starts, epoch_budget(config))
    return tuple(end - start for start, end in itertools.pairwise(bounds))


def should_grow(noise_scale: float, batch_size: int, growth_ratio: float, threshold: float,
                epochs_in_stage: int, min_epochs: int) -> bool:
    """The adaptive rule at an epoch boundary: begin the next stage when the stage has run
    ``min_epochs`` epochs and the smoothed gradient noise scale has reached ``threshold`` times
    the next batch, ``rho * B_s`` (McCandlish et al. 2018: a batch below B_noise wastes few
    samples). A NaN noise scale (not measured yet, or ``|G|^2`` not measurably positive) never
    grows, unless ``threshold`` is 0: that asks nothing of the noise scale (whose estimate may be
    NaN or below 0 on a few measurements), so every stage runs ``min_epochs`` epochs, the earliest
    growth of :func:`earliest_stage_starts`. Past ``max_batch_size`` the next stage keeps the
    batch and divides the learning rate by ``rho``, which lowers the SGD noise ``eta / B`` as a
    batch of ``rho * B_s`` would."""
    if epochs_in_stage < min_epochs:
        return False
    if threshold == 0:
        return True
    return not math.isnan(noise_scale) and noise_scale >= threshold * growth_ratio * batch_size


def earliest_stage_starts(config: ScheduleConfig) -> tuple[int, ...]:
    """``adaptive``'s earliest growth: every stage runs ``min_epochs_per_stage`` epochs, as many
    stages as the budget reaches, the last taking the rest."""
    budget, step = epoch_budget(config), config.min_epochs_per_stage
    return tuple(range(step, budget, step))[:config.num_stages - 1]


def build_schedule(config: ScheduleConfig, dataset_size: int) -> Schedule:
    """Evaluate ``config`` on a dataset of ``dataset_size`` samples.

    Raises :class:`ConfigError` when a stage's batch is larger than the dataset (it would make no
    update at all).
    """
    require_int("dataset_size", dataset_size, minimum=1, fix="the dataset needs at least 1 row")
    stages = []
    first_epoch = 0
    for index, epochs in enumerate(stage_lengths(config), start=1):
        batch, learning_rate = stage_batch_and_lr(config, index)
        if batch > dataset_size:
            raise ConfigError(
                "dataset_size", dataset_size,
                f"is smaller than stage {index}'s global batch of {batch}",
                "use more data, a smaller initial batch, fewer stages or a max batch size",
            )
        stages.append(Stage(index=index, first_epoch=first_epoch, epochs=epochs,
                            global_batch_size=batch, learning_rate=learning_rate,
                            updates_per_epoch=dataset_size // batch))
        first_epoch += epochs
    return Schedule(config=config, dataset_size=dataset_size, stages=tuple(stages))
