"""Writing a run's outputs: history (JSON, CSV), curves (PNG), TensorBoard scalars, stage table."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from ray_sebs.history import HISTORY_COLUMNS


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Right-aligned plain-text columns under a dashed rule."""
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True))
             for line in (header, *rows)]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_epoch(record: dict[str, Any]) -> str:
    """One progress line per epoch."""
    accuracy = record["validation_accuracy"]
    return (f"epoch {record['epoch']:>3}  stage {record['stage']}  batch {record['global_batch_size']:>5}  "
            f"lr {record['learning_rate']:.4g}  workers {record['world_size']}  "
            f"{record['micro_batch_size']}x{record['accumulation_steps']}  "
            f"updates {record['updates']:>6}  train loss {record['train_loss']:.4f}  "
            f"val acc {'-' if math.isnan(accuracy) else f'{accuracy:.4f}'}  "
            f"{record['epoch_time_s']:.1f}s  data wait {record['data_wait_fraction']:.0%}")


def stage_table(history: Sequence[dict[str, Any]]) -> str:
    """Per stage: batch, lr, workers, updates, samples, final validation accuracy, wall time."""
    header = ("stage", "epochs", "batch", "lr", "workers", "micro x accum", "updates", "samples",
              "val acc", "time s")
    rows = []
    for stage in sorted({record["stage"] for record in history}):
        records = [record for record in history if record["stage"] == stage]
        last = records[-1]
        accuracy = last["validation_accuracy"]
        rows.append((
            str(stage), str(len(records)), str(last["global_batch_size"]),
            f"{last['learning_rate']:.4g}",
            "/".join(sorted({str(record["world_size"]) for record in records})),
            f"{last['micro_batch_size']}x{last['accumulation_steps']}",
            f"{sum(record['epoch_updates'] for record in records):,}",
            f"{sum(record['epoch_updates'] * record['global_batch_size'] for record in records):,}",
            "-" if math.isnan(accuracy) else f"{accuracy:.4f}",
            f"{sum(record['epoch_time_s'] for record in records):.1f}",
        ))
    return format_table(header, rows)


def write_history(history: Sequence[dict[str, Any]], run_dir: str) -> dict[str, str]:
    """``history.json``, ``history.csv``, ``curves.png`` and TensorBoard scalars in ``run_dir``."""
    os.makedirs(run_dir, exist_ok=True)
    paths = {
        "json": os.path.join(run_dir, "history.json"),
        "csv": os.path.join(run_dir, "history.csv"),
        "png": os.path.join(run_dir, "curves.png"),
        "tensorboard": os.path.join(run_dir, "tensorboard"),
    }
    with open(paths["json"], "w") as handle:
        json.dump(list(history), handle, indent=2)
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    plot_curves(history, paths["png"])
    write_tensorboard(history, paths["tensorboard"])
    return paths


def plot_curves(history: Sequence[dict[str, Any]], path: str) -> None:
    """Validation accuracy against updates and against wall time, stage boundaries dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    updates = [record["updates"] for record in history]
    elapsed = []
    clock = 0.0
    for record in history:
        clock += record["epoch_time_s"]
        elapsed.append(clock)
    accuracy = [record["validation_accuracy"] for record in history]
    figure, (by_updates, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for axis, xs, label in ((by_updates, updates, "updates"), (by_time, elapsed, "training time (s)")):
        axis.plot(xs, accuracy, marker="o", markersize=3)
        for previous, record, x in zip(history, history[1:], xs, strict=False):
            if record["stage"] != previous["stage"]:
                axis.axvline(x, color="grey", linestyle="--", linewidth=0.8)
                axis.annotate(f"B={record['global_batch_size']}, W={record['world_size']}",
                              (x, 0.02), xycoords=("data", "axes fraction"), fontsize=7,
                              rotation=90, color="grey")
        axis.set_xlabel(label)
        axis.set_ylabel("validation accuracy")
        axis.grid(alpha=0.3)
    figure.suptitle("SEBS: validation accuracy; dashed lines are stage boundaries")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_tensorboard(history: Sequence[dict[str, Any]], log_dir: str) -> None:
    from tensorboardX import SummaryWriter

    with SummaryWriter(log_dir) as writer:
        for record in history:
            for name in ("train_loss", "validation_loss", "validation_accuracy", "learning_rate",
                         "global_batch_size", "world_size", "samples_per_s", "data_wait_fraction"):
                value = record[name]
                if value is not None and not (isinstance(value, float) and math.isnan(value)):
                    writer.add_scalar(f"sebs/{name}", value, global_step=record["updates"])
