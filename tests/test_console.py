"""What a person sees: one line per epoch from the driver, progress within long epochs, quiet Ray.

The console's message handling and the progress throttle are tested in this process without Ray.
One test runs the main job as a user does (``ray-sebs train``, no schedule flags, a subprocess
with its own local Ray) and reads its whole console.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ray_sebs import console as console_module
from ray_sebs.console import ProgressSender, RunConsole, ray_init_options
from ray_sebs.history import epoch_clock
from ray_sebs.report import TensorBoardWriter, format_epoch, plot_curves

RAY_SEBS = Path(sys.executable).with_name("ray-sebs")


def record(epoch: int, *, segment: int = 0, world_size: int = 1, started: float = 1000.0,
           ended: float | None = None) -> dict:
    ended = ended if ended is not None else started + 1.0 + epoch
    return {"epoch": epoch, "stage": segment + 1, "segment": segment, "global_batch_size": 16 << segment,
            "learning_rate": 0.1, "world_size": world_size, "target_workers": world_size,
            "micro_batch_size": 16, "accumulation_steps": 1, "samples_per_update_min": 16,
            "samples_per_update_max": 16, "epoch_updates": 10, "updates": 10 * (epoch + 1),
            "samples": 160 * (epoch + 1), "train_loss": 1.0 / (epoch + 1), "validation_loss": 0.5,
            "validation_accuracy": 0.8 + epoch / 100, "epoch_time_s": 0.5, "samples_per_s": 320.0,
            "data_wait_fraction": 0.01, "segment_started_at": started, "first_update_at": started + 0.2,
            "ended_at": ended}


class Queue:
    def __init__(self) -> None:
        self.items: list[dict] = []

    def put_nowait(self, item: dict) -> None:
        self.items.append(item)


def test_the_driver_prints_each_epoch_once_and_hands_it_to_the_callbacks():
    stream, seen = io.StringIO(), []
    console = RunConsole(stream=stream, on_epoch=(seen.append,))
    console.handle({"kind": "epoch", "record": record(0)})
    console.handle({"kind": "warning", "text": "fewer workers than planned"})
    assert stream.getvalue().splitlines() == [format_epoch(record(0)),
                                              "warning: fewer workers than planned"]
    assert seen == [record(0)]

    quiet_stream, quiet_seen = io.StringIO(), []
    quiet = RunConsole(print_lines=False, stream=quiet_stream, on_epoch=(quiet_seen.append,))
    for message in ({"kind": "epoch", "record": record(1)}, {"kind": "warning", "text": "x"}):
        quiet.handle(message)
    assert quiet_stream.getvalue() == "" and quiet_seen == [record(1)]


def test_without_a_terminal_progress_is_a_plain_line_only_within_long_epochs(monkeypatch):
    stream = io.StringIO()  # not a terminal
    console = RunConsole(stream=stream)
    progress = {"kind": "progress", "epoch": 3, "updates_done": 40, "updates_total": 100,
                "samples_done": 640, "elapsed_s": 2.0}
    console.handle(progress)
    assert stream.getvalue() == "", "a short epoch prints no progress line"
    monkeypatch.setattr(console_module, "PLAIN_PROGRESS_INTERVAL_S", 0.0)
    console.handle({**progress, "elapsed_s": 31.0})
    (line,) = stream.getvalue().splitlines()
    assert line.startswith("epoch 3") and "40/100" in line and "21 samples/s" in line


def test_only_rank_0_sends_and_progress_is_throttled(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(console_module.time, "monotonic", lambda: clock[0])
    queue = Queue()
    assert not ProgressSender(queue, rank=1).due()
    sender = ProgressSender(queue, rank=0, interval_s=1.0)
    assert not sender.due(), "nothing in the first second"
    clock[0] += 1.0
    assert sender.due() and not sender.due()
    sender.send_progress(epoch=0, updates_done=5, updates_total=10, samples_done=80, elapsed_s=1.0)
    sender.epoch(record(0))
    ProgressSender(queue, rank=1).epoch(record(0))
    assert [item["kind"] for item in queue.items] == ["progress", "epoch"]


def test_ray_output_stays_in_its_log_files_unless_verbose():
    assert ray_init_options(verbose=False)["log_to_driver"] is False
    assert ray_init_options(verbose=True) == {"log_to_driver": True}


def test_tensorboard_scalars_are_on_disk_as_each_epoch_ends(tmp_path):
    writer = TensorBoardWriter(str(tmp_path))
    writer.add(record(0))
    (events,) = tmp_path.glob("events.out.tfevents.*")
    first = events.stat().st_size
    writer.add(record(1))
    assert events.stat().st_size > first > 0, "flushed per epoch, not at the end"
    writer.close()


def test_curves_use_the_wall_clock_with_the_resize_in_it(tmp_path):
    # Two epochs on 1 worker, a 30 s resize, two epochs on 2 workers.
    history = [record(0, ended=1000.5), record(1, ended=1001.0),
               record(2, segment=1, world_size=2, started=1031.0, ended=1031.7),
               record(3, segment=1, world_size=2, started=1031.0, ended=1032.2)]
    clock = epoch_clock(history)
    assert clock == pytest.approx([0.5, 1.0, 31.7, 32.2])  # not 4 x 0.5 s of epoch time
    path = tmp_path / "curves.png"
    plot_curves(history, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_the_default_run_prints_a_short_console(tmp_path):
    env = {key: value for key, value in os.environ.items()
           if key not in ("RAY_ADDRESS", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")}
    env["RAY_AUTH_MODE"] = "disabled"
    process = subprocess.run([str(RAY_SEBS), "train", "--num-cpus", "2", "--storage-path",
                              str(tmp_path / "runs"), "--name", "default"],
                             capture_output=True, text=True, cwd=tmp_path, env=env, timeout=280)
    assert process.returncode == 0, process.stderr[-3000:]
    lines = (process.stdout + process.stderr).splitlines()
    assert len(lines) <= 40, "\n".join(lines)
    epochs = [int(match.group(1)) for line in lines if (match := re.match(r"epoch +(\d+) +stage", line))]
    assert epochs == list(range(20)), "each epoch line once, in order, from the driver"
    text = "\n".join(lines)
    for noise in ("Checkpoint successfully created", "Reporting training result", "Execution plan",
                  "PlacementGroupCleaner", "TrainController", "Started a local Ray instance"):
        assert noise not in text
    assert re.search(r"1 resize \(\d+\.\d s\), 0 recoveries", text)
    run_dir = tmp_path / "runs" / "default"
    history = json.loads((run_dir / "history.json").read_text())
    assert [entry["epoch"] for entry in history] == list(range(20))
    assert all(entry["samples_per_update_min"] == entry["samples_per_update_max"]
               == entry["global_batch_size"] for entry in history)
    assert not math.isnan(history[-1]["validation_accuracy"])
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "curves.png").stat().st_size > 10_000
