"""Writing a run's outputs: history (JSON, CSV), curves (PNG), TensorBoard scalars, stage table."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO

from ray_sebs.history import (
    HISTORY_COLUMNS,
    METRICS_FIELD,
    RECOVERY,
    clock_origin,
    epoch_clock,
    flat_record,
    worker_group_changes,
)
from ray_sebs.storage import exists, write_bytes


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
    # A run without accuracy (a language model, a regression) shows its validation loss instead.
    validation = f"val acc {accuracy:.4f}" if not math.isnan(accuracy) else (
        f"val loss {record['validation_loss']:.4f}" if not math.isnan(record["validation_loss"])
        else "val acc -")
    return (f"epoch {record['epoch']:>3}  stage {record['stage']}  batch {record['global_batch_size']:>5}  "
            f"lr {record['learning_rate']:.4g}  workers {record['world_size']}  "
            f"{record['micro_batch_size']}x{record['accumulation_steps']}  "
            f"updates {record['updates']:>6}  train loss {record['train_loss']:.4f}  "
            f"{validation}  {record['epoch_time_s']:.1f}s  data wait {record['data_wait_fraction']:.0%}")


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


def write_history(history: Sequence[Mapping[str, Any]], run_dir: str) -> dict[str, str]:
    """``history.json``, ``history.csv`` and ``curves.png`` in ``run_dir`` (a local path or a URI,
    written through :mod:`ray_sebs.storage`); their paths, with the TensorBoard directory when the
    run wrote one (:func:`ray_sebs.trainer.run_tensorboard`)."""
    base = run_dir.rstrip("/")
    paths = {"json": f"{base}/history.json", "csv": f"{base}/history.csv"}
    write_bytes(paths["json"], json.dumps(list(history), indent=2).encode())
    rows = [flat_record(record) for record in history]
    columns = [name for name in HISTORY_COLUMNS if name != METRICS_FIELD]
    columns += sorted({name for row in rows for name in row} - set(columns))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(paths["csv"], table.getvalue().encode())
    image = io.BytesIO()
    plot_curves(history, image)
    if image.getvalue():
        paths["png"] = f"{base}/curves.png"
        write_bytes(paths["png"], image.getvalue())
    if exists(f"{base}/{TENSORBOARD_DIR}"):
        paths["tensorboard"] = f"{base}/{TENSORBOARD_DIR}"
    return paths


def plot_curves(history: Sequence[Mapping[str, Any]], output: str | BinaryIO) -> None:
    """Loss, validation accuracy, and the global batch against the gradient noise scale, over the
    run's real wall clock, as a PNG written to
    ``output`` (a local file name or a binary file object); nothing for an empty history.

    The clock (:func:`~ray_sebs.history.epoch_clock`) starts with the first epoch and runs through
    everything the run spent: epochs, evaluation, checkpoints, and the gaps between worker groups,
    which are shaded
    and labelled (a resize, planned at a stage boundary, or a recovery after a failure). Each
    stage's global batch and workers are written at its start, so what SEBS saves or costs is
    visible where it happens, not hidden in a sum of epoch times.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    origin = clock_origin(history)
    ends = epoch_clock(history)
    starts = [0.0, *ends[:-1]]
    figure, (losses, accuracy, noise) = plt.subplots(3, 1, figsize=(10, 9.5), sharex=True,
                                                     height_ratios=(3, 3, 2))
    losses.plot(ends, [record["train_loss"] for record in history], marker="o", markersize=3,
                label="training loss")
    validation_loss = [record["validation_loss"] for record in history]
    if not all(math.isnan(value) for value in validation_loss):
        losses.plot(ends, validation_loss, marker="o", markersize=3, label="validation loss")
    accuracy.plot(ends, [record["validation_accuracy"] for record in history], marker="o",
                  markersize=3, color="tab:green", label="validation accuracy")
    # How far each stage's batch was from the batch that still trains efficiently.
    noise.step(ends, [record["global_batch_size"] for record in history], where="pre",
               color="tab:purple", label="global batch B_s")
    noise.plot(ends, [record.get("gradient_noise_scale", math.nan) for record in history],
               marker="o", markersize=3, color="tab:brown", label="gradient noise scale B_noise")
    noise.set_yscale("log")
    axes = (losses, accuracy, noise)
    for change in worker_group_changes(history):
        begin = change.previous_ended_at - origin
        end = change.first_update_at - origin
        for axis in axes:
            axis.axvspan(begin, end, color="tab:red" if change.kind == RECOVERY else "tab:orange",
                         alpha=0.15, linewidth=0)
        accuracy.annotate(f"{change.kind} {change.workers_before}→{change.workers_after} workers, "
                          f"{change.cost_s:.1f} s", ((begin + end) / 2, 0.02),
                          xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                          ha="center", va="bottom")
    previous_stage = None
    for record, begin in zip(history, starts, strict=True):
        if record["stage"] != previous_stage:
            previous_stage = record["stage"]
            for axis in axes:
                axis.axvline(begin, color="grey", linestyle="--", linewidth=0.8)
            losses.annotate(f"stage {record['stage']}: B={record['global_batch_size']}, "
                            f"W={record['world_size']}", (begin, 0.98),
                            xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                            ha="right", va="top", color="grey")
    losses.set_ylabel("loss")
    losses.legend(loc="upper right", fontsize=8)
    accuracy.set_ylabel("validation accuracy")
    noise.set_ylabel("samples")
    noise.legend(loc="upper left", fontsize=8)
    noise.set_xlabel("wall clock since the first epoch started (s)")
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.suptitle("SEBS run: dashed lines start stages; shaded: worker-group changes")
    figure.tight_layout()
    figure.savefig(output, format="png", dpi=100)
    plt.close(figure)


TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_SCALARS = ("train_loss", "validation_loss", "validation_accuracy", "learning_rate",
                       "global_batch_size", "gradient_noise_scale", "world_size", "samples_per_s",
                       "data_wait_fraction")


class TensorBoardWriter:
    """Writes each epoch's scalars as the epoch finishes, so ``tensorboard --logdir`` shows a live
    run. The step is the run's update count, the x axis SEBS is about."""

    def __init__(self, log_dir: str) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(log_dir, flush_secs=5)

    def add(self, record: Mapping[str, Any]) -> None:
        scalars = {f"sebs/{name}": record.get(name) for name in TENSORBOARD_SCALARS}
        scalars |= {f"validation/{name}": value
                    for name, value in (record.get(METRICS_FIELD) or {}).items()}
        for tag, value in scalars.items():
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                self.writer.add_scalar(tag, value, global_step=record["updates"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
