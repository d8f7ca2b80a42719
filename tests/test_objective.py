"""The general per-worker API (:mod:`ray_sebs.objective`) on a real local Ray cluster.

A user's ``batch_loss_fn(model, batch)`` over any columns, in both loss forms: per row, and summed
with its own count (tokens). The exactness tests compare one update across workers and
accumulation against the same step taken in one process on the whole batch.
"""

from __future__ import annotations

import copy
import csv
import sys

import numpy as np
import pytest
import ray
import ray.cloudpickle
import torch
from ray.train import FailureConfig, RunConfig

from ray_sebs import ClusterConfig, ConfigError, ScheduleConfig
from ray_sebs.objective import Summed
from ray_sebs.optim import OptimizerConfig
from ray_sebs.report import write_history
from ray_sebs.trainer import SEBSTrainer, load_checkpoint_state

# Workers do not have tests/ on their path: ship this module's functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.usefixtures("ray_cluster")

VOCAB = 11
LENGTH = 7
PAD = -1


def token_rows(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Sequences of 2 to LENGTH tokens, padded: each row has 1 to LENGTH - 1 target tokens, so
    ranks and micro-batches hold uneven token counts."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        length = int(rng.integers(2, LENGTH + 1))
        tokens = np.full(LENGTH, PAD, dtype=np.int64)
        tokens[:length] = rng.integers(0, VOCAB, size=length)
        rows.append({"tokens": tokens})
    return rows


def bigram_model() -> torch.nn.Module:
    torch.manual_seed(99)
    return torch.nn.Sequential(torch.nn.Embedding(VOCAB, 5), torch.nn.Tanh(), torch.nn.Linear(5, VOCAB))


def token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Summed:
    """Next-token cross-entropy summed over the non-pad targets, with their count."""
    inputs, targets = batch["tokens"][:, :-1], batch["tokens"][:, 1:]
    valid = targets != PAD
    logits = model(inputs.clamp(min=0))
    losses = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.clamp(min=0).reshape(-1),
                                               reduction="none")
    return Summed(losses[valid.reshape(-1)].sum(), valid.sum())


def reference_step(rows: list[dict[str, np.ndarray]], lr: float,
                   clip: float | None = None) -> tuple[dict[str, torch.Tensor], float, int]:
    """One SGD step on the mean token loss over the whole batch, in one process, its gradient
    clipped to a global norm of ``clip``."""
    model = bigram_model()
    batch = {"tokens": torch.from_numpy(np.stack([row["tokens"] for row in rows]))}
    summed = token_loss(model, batch)
    loss = summed.total / summed.count
    loss.backward()
    if clip is not None:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        assert norm > 2 * clip, "the clip must bind for the test to mean anything"
    with torch.no_grad():
        for parameter in model.parameters():
            parameter -= lr * parameter.grad
    return copy.deepcopy(model.state_dict()), loss.item(), int(summed.count)


@pytest.mark.parametrize(("batch", "workers", "max_micro", "expected_accumulation", "clip", "warmup"), [
    (10, 2, 3, 2, None, 0),  # two ranks of 5 rows, each as micro-batches 3 + 2, uneven tokens everywhere
    # One rank accumulating 3 + 3 + 3, in a 3-update warm-up: the one update runs at lr / 3.
    (9, 1, 4, 3, None, 3),
    # Clipped: the norm is of the whole update's gradient, after the all-reduce and the division
    # by the global count, so it is the single process's norm. (Clipping hides a wrong gradient
    # scale, hence the unclipped cases above.)
    (10, 2, 3, 2, 0.05, 0),
])
def test_a_token_weighted_update_equals_the_full_batch_mean_over_tokens(
        tmp_path, batch, workers, max_micro, expected_accumulation, clip, warmup):
    rows = token_rows(batch, seed=batch)
    trainer = SEBSTrainer(
        bigram_model, datasets={"train": ray.data.from_items(rows)},
        schedule=ScheduleConfig(initial_batch_size=batch, growth_ratio=1, num_stages=1,
                                epochs_per_stage=1, learning_rate=0.5, warmup_updates=warmup),
        cluster=ClusterConfig(min_workers=workers, max_workers=workers, max_micro_batch=max_micro,
                              resources_per_worker={"CPU": 0.5}),
        optimizer=OptimizerConfig(name="sgd", clip_grad_norm=clip), batch_loss_fn=token_loss,
        run_config=RunConfig(name=f"tokens-{batch}-{workers}", storage_path=str(tmp_path),
                             failure_config=FailureConfig(max_failures=0)))
    result = trainer.fit()
    (record,) = result.history
    assert (record["world_size"], record["accumulation_steps"]) == (workers, expected_accumulation)
    assert record["samples_per_update_min"] == record["samples_per_update_max"] == batch
    expected, expected_loss, tokens = reference_step(rows, lr=0.5 / max(warmup, 1), clip=clip)
    assert record["train_loss_count"] == tokens, "the epoch's loss is a mean over its tokens"
    assert record["train_loss"] == pytest.approx(expected_loss, rel=1e-5)
    trained = load_checkpoint_state(result.checkpoint)["model"]
    initial = bigram_model().state_dict()
    for name, value in expected.items():
        assert not torch.allclose(value, initial[name]), "the update must move every parameter"
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6)


class TwoInputs(torch.nn.Module):
    """A model of two input columns: an image-like array and a side vector."""

    def __init__(self) -> None:
        super().__init__()
        self.image = torch.nn.Linear(4, 6)
        self.side = torch.nn.Linear(2, 6)
        self.head = torch.nn.Linear(6, 1)

    def forward(self, image: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.image(image.flatten(1)) + self.side(side))
        return self.head(hidden).squeeze(1)


def two_input_rows(count: int, seed: int) -> list[dict[str, np.ndarray | float]]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        image = rng.normal(size=(2, 2)).astype(np.float32)
        side = rng.normal(size=2).astype(np.float32)
        rows.append({"image": image, "side": side,
                     "target": np.float32(image.sum() - 2 * side[0] + 0.5 * side[1])})
    return rows


def squared_error(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (model(batch["image"], batch["side"]) - batch["target"]) ** 2


def regression_metrics(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    error = model(batch["image"], batch["side"]) - batch["target"]
    return {"loss": error**2, "mae": error.abs()}


def test_a_two_input_model_grows_with_its_own_loss_metrics_and_cached_data(tmp_path):
    run_config = RunConfig(name="two-inputs", storage_path=str(tmp_path),
                           failure_config=FailureConfig(max_failures=0))
    trainer = SEBSTrainer(
        TwoInputs,
        datasets={"train": ray.data.from_items(two_input_rows(96, seed=1)),
                  "validation": ray.data.from_items(two_input_rows(30, seed=2))},
        schedule=ScheduleConfig(initial_batch_size=8, growth_ratio=2, num_stages=2,
                                epochs_per_stage=2, learning_rate=0.02),
        cluster=ClusterConfig(min_workers=1, max_workers=2, max_micro_batch=8,
                              resources_per_worker={"CPU": 0.5}),
        optimizer=OptimizerConfig(name="adamw", weight_decay=0.01), batch_loss_fn=squared_error,
        eval_fn=regression_metrics, precision="bf16", cache_data="host", run_config=run_config)
    result = trainer.fit()
    history = result.history
    assert [record["world_size"] for record in history] == [1, 1, 2, 2]
    # AdamW follows the square-root law by default: the batch doubles, the rate goes down by √2.
    assert [record["learning_rate"] for record in history] == pytest.approx([0.02, 0.02, 0.02 / 2**0.5,
                                                                             0.02 / 2**0.5])
    for record in history:
        assert record["samples_per_update_min"] == record["samples_per_update_max"] \
            == record["global_batch_size"]
        assert record["train_loss_count"] == record["epoch_updates"] * record["global_batch_size"]
        assert set(record["validation_metrics"]) == {"loss", "mae"}
        assert record["validation_loss"] == record["validation_metrics"]["loss"]
        assert np.isnan(record["validation_accuracy"]), "no accuracy metric was given"
    assert history[-1]["validation_loss"] < history[0]["validation_loss"]
    assert history[-1]["updates"] == result.plan.total_updates
    paths = write_history(history, result.run_dir)
    with open(paths["csv"]) as file:
        columns = next(csv.reader(file))
    assert "validation_mae" in columns and "validation_metrics" not in columns


def mean_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return squared_error(model, batch).mean()


def reads_a_missing_column(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (model(batch["image"], batch["extra"]) - batch["target"]) ** 2


@pytest.mark.parametrize(("loss", "message"), [
    (mean_loss, "batch_loss_fn='tensor of shape ()': is not one value per row of a 2-row batch; "
                "return shape (2,)"),
    (reads_a_missing_column, "fails on 2 rows of the train dataset (columns image, side, target): "
                             "KeyError: 'extra'"),
])
def test_a_loss_the_loop_cannot_weight_is_refused_before_any_worker_starts(tmp_path, loss, message):
    trainer = SEBSTrainer(
        TwoInputs, datasets={"train": ray.data.from_items(two_input_rows(16, seed=3))},
        schedule=ScheduleConfig(initial_batch_size=8, growth_ratio=1, num_stages=1, epochs_per_stage=1),
        batch_loss_fn=loss, run_config=RunConfig(name="refused", storage_path=str(tmp_path)))
    with pytest.raises(ConfigError) as error:
        trainer.fit()
    assert message in str(error.value)
    assert not (tmp_path / "refused").exists(), "refused before the run directory was made"
