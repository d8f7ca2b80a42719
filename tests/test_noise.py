"""The gradient noise scale the loop measures (:func:`ray_sebs.loop.noise_estimate`), against the
exact |G|^2 and tr(Sigma) of a problem whose per-sample gradients are known. One process, no Ray:
the loop's own ``train_update`` on a bare module (one worker)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from ray_sebs.loop import (
    EpochTally,
    UpdateRule,
    noise_estimate,
    noise_scale,
    smooth_noise,
    train_update,
)
from ray_sebs.objective import Objective, Summed

FEATURES = 3
ROWS = 400


def problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(ROWS, FEATURES, generator=generator)
    targets = features @ torch.tensor([1.0, -2.0, 0.5]) + torch.randn(ROWS, generator=generator)
    weights = torch.tensor([0.3, 0.1, -0.2])
    return features, targets, weights


def exact_noise(features: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> tuple[float, float]:
    """|G|^2 and tr(Sigma) of the per-sample gradients of 0.5 (w.x - y)^2: (w.x - y) x."""
    per_sample = (features @ weights - targets)[:, None] * features
    mean = per_sample.mean(dim=0)
    return float(mean @ mean), float(((per_sample - mean) ** 2).sum(dim=1).mean())


def squared_error(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return 0.5 * (model(batch["features"]).squeeze(1) - batch["target"]) ** 2


def squared_error_summed(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Summed:
    return Summed(squared_error(model, batch).sum(), len(batch["target"]))


@pytest.mark.parametrize(("loss", "batch", "micro_batches"), [
    (squared_error, 16, (16,)),          # one micro-batch: split into halves of 8 to measure
    (squared_error, 24, (12, 12)),       # accumulation: the first micro-batch is the small batch
    (squared_error_summed, 24, (9, 8, 7)),  # the summed form, uneven micro-batches
])
def test_the_estimates_average_to_the_exact_gradient_norm_and_trace(loss, batch, micro_batches):
    features, targets, weights = problem()
    model = torch.nn.Linear(FEATURES, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(weights)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay where |G| is known
    # Every update measures here (the loop measures one in NOISE_SAMPLE_EVERY): the same estimate.
    rule = replace(UpdateRule.for_epoch(1 / batch, 1, micro_batches, torch.device("cpu")), noise_every=1)
    tally = EpochTally(device=torch.device("cpu"), updates_before=0)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3000):
        index = torch.randint(0, ROWS, (batch,), generator=generator)  # with replacement
        train_update(model, optimizer, Objective(loss=loss), {"features": features[index],
                                                              "target": targets[index]}, rule, tally)
    squared, trace, measurements = tally.noise_sums().tolist()
    assert measurements == 3000
    assert tally.steps_per_update[0] == max(2, len(micro_batches))
    assert tally.rows_per_update == [batch] * len(tally.rows_per_update)
    unmeasurable = noise_estimate(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(2.0), torch.tensor(8.0))
    assert unmeasurable.tolist() == [0.0, 0.0, 0.0], "a first micro-batch of no units measures nothing"
    exact_squared, exact_trace = exact_noise(features, targets, weights)
    assert squared / measurements == pytest.approx(exact_squared, rel=0.1)
    assert trace / measurements == pytest.approx(exact_trace, rel=0.1)


def test_smoothing_averages_each_estimate_apart_and_the_scale_is_their_ratio():
    assert smooth_noise(None, [0.0, 0.0, 0.0]) is None
    first = smooth_noise(None, [4.0, 40.0, 2.0])
    assert first == (2.0, 20.0)
    assert smooth_noise(first, [0.0, 0.0, 0.0]) == first, "an epoch without measurements"
    assert smooth_noise(first, [12.0, 0.0, 3.0]) == (3.0, 10.0)
    assert noise_scale(first) == 10.0
    assert math.isnan(noise_scale(None))
    assert math.isnan(noise_scale((-0.5, 3.0))), "|G|^2 not yet positive: no scale"
