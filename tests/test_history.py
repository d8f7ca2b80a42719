"""The epoch record and the metrics read off a history (``ray_sebs.history``), by hand, no Ray."""

from __future__ import annotations

import math
from typing import Any

from ray_sebs.history import (
    HISTORY_COLUMNS,
    RECOVERY,
    RESIZE,
    change_totals,
    epoch_clock,
    first_reaching,
    worker_group_changes,
    worker_seconds,
)


def record(epoch: int, segment: int, world_size: int, group_started: float, first_update: float,
           ended: float, accuracy: float, epoch_time: float = 2.0) -> dict[str, Any]:
    return {"epoch": epoch, "segment": segment, "world_size": world_size,
            "segment_started_at": group_started, "first_update_at": first_update, "ended_at": ended,
            "epoch_time_s": epoch_time, "validation_accuracy": accuracy}


def resized_then_recovered() -> list[dict[str, Any]]:
    """Segment 0 (1 worker) trains epoch 0; the planned resize to segment 1 (2 workers) starts a
    group at 103 that trains epoch 1 (first update at 110, 8 s after epoch 0 ended at 102); a
    worker of that group dies during epoch 2, and a new group of 1 worker (started 120, first
    update 126, 14 s after epoch 1 ended at 112) trains epochs 2 and 3."""
    return [
        record(0, 0, 1, 99.0, 100.0, 102.0, 0.50),
        record(1, 1, 2, 103.0, 110.0, 112.0, 0.70),
        record(2, 1, 1, 120.0, 126.0, 128.0, 0.80),
        record(3, 1, 1, 120.0, 126.0, 130.5, 0.85),
    ]


def test_a_resize_and_a_recovery_in_the_same_segment_are_told_apart():
    changes = worker_group_changes(resized_then_recovered())
    assert [(c.kind, c.epoch, c.workers_before, c.workers_after, c.cost_s) for c in changes] == [
        (RESIZE, 1, 1, 2, 8.0), (RECOVERY, 2, 2, 1, 14.0)]
    totals = change_totals(resized_then_recovered())
    assert (totals.resizes, totals.resize_time_s, totals.recoveries, totals.recovery_time_s) \
        == (1, 8.0, 1, 14.0)
    assert totals.describe() == "1 resize (8.0 s), 1 recovery (14.0 s)"


def test_one_worker_group_has_no_changes():
    history = [record(epoch, 0, 1, 99.0, 100.0, 102.0 + 2 * epoch, 0.5) for epoch in range(3)]
    totals = change_totals(history)
    assert (totals.resizes, totals.recoveries, totals.resize_time_s, totals.recovery_time_s) == (0, 0, 0, 0)
    assert change_totals([]).describe() == "0 resizes (0.0 s), 0 recoveries"


def test_wall_time_worker_seconds_and_first_epoch_reaching_a_target():
    history = resized_then_recovered()
    # The first epoch started at 102 - 2 = 100.
    assert epoch_clock(history) == [2.0, 12.0, 28.0, 30.5]
    assert epoch_clock([]) == []
    assert worker_seconds(history) == 1 * 2 + 2 * 2 + 1 * 2 + 1 * 2
    assert first_reaching(history, 0.8) == 2
    assert first_reaching(history, 0.9) is None
    assert first_reaching([{**history[0], "validation_accuracy": math.nan}], 0.0) is None
    losses = [{"validation_loss": loss} for loss in (3.0, math.nan, 2.0, 1.5)]
    assert first_reaching(losses, 2.0, metric="loss", lower_is_better=True) == 2
    assert first_reaching(losses, 1.0, metric="loss", lower_is_better=True) is None
    assert first_reaching([{"validation_metrics": {"perplexity": 7.0}}], 8.0, metric="perplexity",
                          lower_is_better=True) == 0


def test_the_record_names_every_history_column_once():
    assert HISTORY_COLUMNS[:3] == ("epoch", "stage", "segment")
    assert HISTORY_COLUMNS[-3:] == ("segment_started_at", "first_update_at", "ended_at")
    assert len(set(HISTORY_COLUMNS)) == len(HISTORY_COLUMNS) == 27
