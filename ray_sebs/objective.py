"""What a run minimizes and reports, batch by batch: the user's side of the per-worker loop.

A run's :class:`Objective` holds two functions of ``(model, batch)``, where ``batch`` is a dict of
tensors (Ray Data's columns, already on the worker's device):

* ``loss(model, batch)`` returns the loss in one of two forms, both exact whatever the worker
  count and accumulation:

  - **per row** (the default form): a tensor of shape ``(rows,)``, one loss per row
    (``reduction="none"``). Every update is the mean over exactly the stage's ``B_s`` rows.
  - **summed with its count**: :class:`Summed` ``(total, count)``, e.g. the cross-entropy summed
    over a batch's target tokens and the number of those tokens. Every update is the sum over the
    whole global batch divided by the global count of that update: the count is all-reduced across
    ranks once per update.

* ``metrics(model, batch)`` returns ``{name: per-row tensor | Summed}``; each metric is
  aggregated exactly over the whole validation set (a per-row metric is a mean over rows, a
  :class:`Summed` one its total over its count). ``loss`` and ``accuracy`` fill the history's
  ``validation_loss`` and ``validation_accuracy``; every metric lands in ``validation_metrics``.
  Without a metrics function a run reports its training loss on the validation set.

The built-in classification path (``features`` and ``label`` columns, the model registry, any
``loss_fn(logits, labels)``) is one :class:`Objective`, made by :func:`classification`.

Imports torch, not Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ray_sebs.errors import ConfigError

Batch = dict[str, torch.Tensor]
"""One batch: Ray Data's columns as tensors, on the worker's device."""


@dataclass(slots=True)
class Summed:
    """A loss or metric given as its sum over a batch and the count it is a mean over.

    For a language model: ``Summed(token_losses[mask].sum(), mask.sum())``. The mean over a global
    batch is the sum of every rank's ``total`` over the sum of every rank's ``count``.
    """

    total: torch.Tensor
    """A scalar: the sum of the loss (or metric) over the batch."""
    count: torch.Tensor | int | float
    """What ``total`` sums over (e.g. target tokens): the mean is ``total / count``."""


class RowSum(Summed):
    """Per-row losses already summed, so ``count`` is the batch's rows: the per-row form, in one
    fused kernel (the built-in cross-entropy; ~7% of a small MLP's update against a separate
    sum)."""

    __slots__ = ()


BatchLossFn = Callable[[nn.Module, Batch], "torch.Tensor | Summed"]
"""``loss(model, batch)``: per-row losses of shape ``(rows,)``, or :class:`Summed`."""
MetricsFn = Callable[[nn.Module, Batch], Mapping[str, "torch.Tensor | Summed"]]
"""``metrics(model, batch)``: ``{name: per-row tensor | Summed}``."""
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""The classification loss ``loss_fn(logits, labels)``: one loss per sample (``reduction="none"``)."""


def cross_entropy_per_sample(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, labels, reduction="none")


@dataclass(frozen=True)
class Objective:
    """The loss a run trains on and the metrics it evaluates, both per batch."""

    loss: BatchLossFn
    """``loss(model, batch)``: per-row losses, or :class:`Summed`; see the module docstring."""
    metrics: MetricsFn | None = None
    """``metrics(model, batch)``; ``None``: the loss, reported as ``loss``."""

    def evaluate(self, model: nn.Module, batch: Batch) -> Mapping[str, torch.Tensor | Summed]:
        if self.metrics is None:
            return {"loss": self.loss(model, batch)}
        return self.metrics(model, batch)


@dataclass(frozen=True)
class _Classification:
    """``loss_fn(model(batch["features"]), batch["label"])``: the built-in path, picklable."""

    loss_fn: LossFn

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor | Summed:
        logits = model(batch["features"])
        if self.loss_fn is cross_entropy_per_sample:
            return RowSum(nn.functional.cross_entropy(logits, batch["label"], reduction="sum"),
                          len(logits))
        return self.loss_fn(logits, batch["label"])

    def metrics(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        logits = model(batch["features"])
        labels = batch["label"]
        return {"loss": self.loss_fn(logits, labels),
                "accuracy": (logits.argmax(dim=1) == labels).float()}


def classification(loss_fn: LossFn = cross_entropy_per_sample) -> Objective:
    """The objective of a classifier over ``features`` with integer ``label``: ``loss_fn`` per
    sample, and validation loss and accuracy."""
    task = _Classification(loss_fn)
    return Objective(loss=task.loss, metrics=task.metrics)


def batch_rows(batch: Batch) -> int:
    """Rows of a batch: the length of its columns (Ray Data gives them all the same)."""
    return len(next(iter(batch.values())))


def slice_rows(batch: Batch, start: int, stop: int) -> Batch:
    return {name: column[start:stop] for name, column in batch.items()}


def sum_and_count(value: Any, rows: int, field: str) -> tuple[torch.Tensor, torch.Tensor | int | float]:
    """``(total, count)`` of a loss or metric in either form; a :class:`ConfigError` naming
    ``field`` for anything else. A mean over the batch is refused rather than guessed: it would
    weight micro-batches of different sizes equally."""
    if isinstance(value, Summed):
        if not isinstance(value.total, torch.Tensor) or value.total.dim() != 0:
            raise ConfigError(field, describe_value(value.total), "is the total of a Summed",
                              "make Summed.total a scalar tensor (the sum over the batch)")
        return value.total, value.count
    if isinstance(value, torch.Tensor) and value.shape == (rows,):
        return value.sum(), rows
    raise ConfigError(field, describe_value(value), f"is not one value per row of a {rows}-row batch",
                      f"return shape ({rows},) (e.g. reduction='none'), or Summed(total, count)")


def describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)}"
    return type(value).__name__
