"""What a sweep runs: the grid of configurations and seeds, each a trial (pure Python).

A configuration is a schedule kind and growth ratio with an optimizer, a first learning rate and
a first batch; configurations that share the last three form a group, compared with each other
against one target. A ratio of 1 makes SEBS and SSGD the same schedule, so it runs once, as
``constant``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from ray_sebs.errors import ConfigError, format_number
from ray_sebs.plan import ClusterConfig, ElasticPlan, widest_plan
from ray_sebs.schedule import SCHEDULE_KINDS, ScheduleConfig

DEFAULT_RATIOS: tuple[float, ...] = (1.0, 1.5, 2.0, 4.0)
DEFAULT_KINDS: tuple[str, ...] = ("sebs", "ssgd")
BASELINE_KINDS = ("ssgd", "constant")
"""Kinds the default target is taken from: SSGD, and constant (SSGD with rho = 1)."""


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
        return "constant" if self.kind == "constant" else f"{self.kind} ρ={format_number(self.ratio)}"

    @property
    def group(self) -> tuple[str, float, int]:
        """Configurations compared with each other (and one target): same optimizer, η₁, B₁."""
        return (self.optimizer, self.learning_rate, self.batch_size)

    @property
    def slug(self) -> str:
        """A file-system-safe name, e.g. ``sebs-rho1.5-sgd-lr0.1-b16``."""
        return (f"{self.kind}-rho{format_number(self.ratio)}-{self.optimizer}"
                f"-lr{format_number(self.learning_rate)}-b{self.batch_size}")

    def schedule(self, base: ScheduleConfig) -> ScheduleConfig:
        """``base`` (stages, epochs, cap, granularity) with this configuration's schedule; its
        ``lr_scaling``, when ``base`` leaves it to the optimizer, is this optimizer's."""
        return replace(base, kind=self.kind, growth_ratio=self.ratio,
                       learning_rate=self.learning_rate,
                       initial_batch_size=self.batch_size).for_optimizer(self.optimizer)


def group_label(group: tuple[str, float, int]) -> str:
    optimizer, learning_rate, batch_size = group
    return f"{optimizer}, η₁={format_number(learning_rate)}, B₁={batch_size}"


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
            order = {"constant": 0, "sebs": 1, "adaptive": 2, "ssgd": 3}
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
    """The elastic plan of every configuration (seeds share a plan): an adaptive one's earliest
    growth, the most workers it can need; a configuration that cannot run on this data raises
    :class:`ConfigError` before any trial starts."""
    return {configuration: widest_plan(configuration.schedule(base), dataset_size, cluster)
            for configuration in space.configurations()}
