"""The examples in ``examples/``: their data and transforms without Ray, and each one's ``--tiny``
run end to end on a real local Ray (byte_gpt's grows from one worker to two).

The examples are scripts, not a package: each is loaded from its file and registered to be
pickled by value, so Ray's workers get its model and loss functions without importing it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import ray
import ray.cloudpickle
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str) -> ModuleType:
    module_name = f"example_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    ray.cloudpickle.register_pickle_by_value(module)
    return module


byte_gpt = load_example("byte_gpt")
augmented_cnn = load_example("augmented_cnn")


# ---- Without Ray ----------------------------------------------------------------------------

def test_byte_rows_pad_each_file_tail_and_make_every_byte_after_the_first_a_target_once():
    files = [bytes(range(1, 11)), b"ab"]  # 10 bytes, then 2
    rows = byte_gpt.byte_rows(files, context=4)
    pad = byte_gpt.PAD
    assert rows.tolist() == [[1, 2, 3, 4, 5], [5, 6, 7, 8, 9], [9, 10, pad, pad, pad],
                             [97, 98, pad, pad, pad]]
    assert byte_gpt.target_count(rows) == (10 - 1) + (2 - 1)


def test_stdlib_sources_split_by_file_deterministically():
    train, validation = byte_gpt.stdlib_sources(60_000)
    again = byte_gpt.stdlib_sources(60_000)
    assert (train, validation) == again
    assert train and validation
    assert sum(map(len, train)) + sum(map(len, validation)) == 60_000
    assert not set(train) & set(validation)


def test_the_summed_loss_is_the_mean_over_real_targets_whatever_the_split():
    """Summing (total, count) over two uneven micro-batches gives the mean per target byte of
    the whole batch, which a mean of per-row means would not."""
    torch.manual_seed(0)
    model = byte_gpt.ByteGPT(context=8, d_model=16, layers=1, heads=2)
    rows = torch.from_numpy(byte_gpt.byte_rows([bytes(range(40, 60)), b"xyz"], context=8))
    whole = byte_gpt.next_byte_loss(model, {"tokens": rows})
    parts = [byte_gpt.next_byte_loss(model, {"tokens": rows[:1]}),
             byte_gpt.next_byte_loss(model, {"tokens": rows[1:]})]
    assert int(whole.count) == byte_gpt.target_count(rows.numpy()) == 19 + 2
    torch.testing.assert_close(sum(p.total for p in parts) / sum(p.count for p in parts),
                               whole.total / whole.count)
    logits = model(rows[:, :-1])
    real = rows[:, 1:] != byte_gpt.PAD
    per_target = torch.nn.functional.cross_entropy(logits[real], rows[:, 1:][real])
    torch.testing.assert_close(whole.total / whole.count, per_target)
    metrics = byte_gpt.next_byte_metrics(model, {"tokens": rows})
    assert set(metrics) == {"loss", "accuracy"}
    assert 0 <= float(metrics["accuracy"].total) <= float(metrics["accuracy"].count) == 21


def test_random_crop_and_flip_shifts_by_at_most_the_padding_and_keeps_shapes():
    image = np.zeros((1, 64))
    image[0, 3 * 8 + 4] = 16.0  # one bright pixel at (3, 4)
    batch = {"features": np.repeat(image, 200, axis=0), "label": np.arange(200)}
    out = augmented_cnn.random_crop_and_flip(batch, pad=1, flip_probability=0.5)
    assert out["features"].shape == (200, 64) and out["features"].dtype == np.float32
    assert out["label"].tolist() == list(range(200))
    positions = {divmod(int(np.argmax(row)), 8) for row in out["features"]}
    assert all(row.max() == 1.0 for row in out["features"])  # scaled, never cropped away
    shifted = {(r, c) for r in (2, 3, 4) for c in (3, 4, 5)}
    mirrored = {(r, 7 - c) for r, c in shifted}
    assert positions <= shifted | mirrored
    assert positions & shifted and positions & mirrored  # both flips were drawn
    unflipped = augmented_cnn.random_crop_and_flip(batch, pad=0, flip_probability=0.0)
    np.testing.assert_array_equal(unflipped["features"], batch["features"] / 16.0)


# ---- The --tiny runs on a real local Ray ----------------------------------------------------

def check_history(result, world_sizes: list[int]) -> list[dict]:
    """What every example must show: exact batches, the plan's updates, the planned workers."""
    history = result.history
    assert [r["epoch"] for r in history] == list(range(len(history)))
    for record in history:
        assert record["samples_per_update_min"] == record["samples_per_update_max"] \
            == record["global_batch_size"]
        assert math.isfinite(record["train_loss"])
        assert all(math.isfinite(value) for value in record["validation_metrics"].values())
    assert sum(r["epoch_updates"] for r in history) == history[-1]["updates"] == result.plan.total_updates
    assert [r["world_size"] for r in history] == world_sizes
    assert history[1]["global_batch_size"] == 2 * history[0]["global_batch_size"]
    for name in ("history.json", "history.csv", "curves.png"):
        assert os.path.getsize(os.path.join(result.run_dir, name)) > 0
    with open(os.path.join(result.run_dir, "history.json")) as file:
        assert len(json.load(file)) == len(history)
    return history


@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
def test_byte_gpt_tiny_counts_every_target_byte_and_learns(tmp_path, capsys):
    # bf16 here (the CPU default is fp32), so the autocast path runs under test too.
    outcome = byte_gpt.main(["--tiny", "--precision", "bf16", "--storage-path", str(tmp_path),
                             "--name", "byte-gpt"])
    history = check_history(outcome["result"], world_sizes=[1, 2])
    # Every epoch uses every row (the rows are a multiple of the last batch), so the loss's
    # count, all-reduced per update and summed per epoch, is the training set's target bytes.
    for record in history:
        assert record["train_loss_count"] == outcome["train_targets"]
        assert set(record["validation_metrics"]) == {"loss", "accuracy"}
    # Uniform over 256 bytes is ln 256 = 5.55 nats; the model does better and keeps improving.
    assert history[-1]["validation_loss"] < history[0]["validation_loss"] < math.log(256)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    printed = capsys.readouterr().out
    assert "every update used exactly B_s rows: yes" in printed
    assert f"the training set holds {outcome['train_targets']:,}" in printed
    assert "perplexity" in printed and "curves.png" in printed


@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
def test_augmented_cnn_tiny_trains_on_augmented_digits(tmp_path, capsys):
    outcome = augmented_cnn.main(["--tiny", "--flip-probability", "0.5", "--storage-path", str(tmp_path),
                                  "--name", "cnn"])
    # One worker group (the growth to two workers is byte_gpt's test): B_s 32, then 64.
    history = check_history(outcome["result"], world_sizes=[1, 1])
    for record in history:
        # Per-row losses: the count is the rows the epoch's updates used.
        assert record["train_loss_count"] == record["epoch_updates"] * record["global_batch_size"]
        assert 0 <= record["validation_accuracy"] <= 1
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert "every update used exactly B_s images: yes" in capsys.readouterr().out
