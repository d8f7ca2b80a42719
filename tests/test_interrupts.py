"""Interruptions a user causes: Ctrl-C (SIGINT) and SIGTERM of ``ray-sebs train``, two drivers
with the same ``--name``, and a checkpoint that storage lost or cut short.

The signal tests run ``ray-sebs train`` as its own process (its own local Ray, in its own session)
and signal the driver process, as ``kill`` or a terminal's Ctrl-C would.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray.train
from processes import end_session, run_in_session, session_processes

import ray_sebs.interrupt as interrupt_handling
from ray_sebs.cli import main
from ray_sebs.errors import ConfigError
from ray_sebs.loop import CHECKPOINT_FILE
from ray_sebs.runlock import LOCK_FILE, RunLock

RAY_SEBS = Path(sys.executable).with_name("ray-sebs")
EPOCHS = 8
# 160 rows, 128 to train; 2 + 6 epochs of batch 8 then 16 on one worker: ~1 s an epoch.
FLAGS = ["--dataset", "synthetic", "--synthetic-rows", "160", "--batch-size", "8", "--stages", "2",
         "--epochs-per-stage", "2,6", "--max-micro-batch", "8", "--max-workers", "1",
         "--checkpoint-every", "1"]
ENV = os.environ | {"RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
# Result.from_path logs three INFO lines each time it reads a run; the tests poll it.
logging.getLogger("ray.train").setLevel(logging.WARNING)


def train_command(storage: Path, name: str) -> list[str]:
    return [str(RAY_SEBS), "train", *FLAGS, "--storage-path", str(storage), "--name", name,
            "--num-cpus", "2"]


def newest_registered(run_dir: Path) -> ray.train.Checkpoint | None:
    """The checkpoint Ray Train would resume from (None before the first one is registered)."""
    try:
        return ray.train.Result.from_path(str(run_dir)).checkpoint
    except Exception:  # no snapshot yet, or one being rewritten
        return None


def interrupt(storage: Path, name: str, signum: int, tmp_path: Path) -> Path:
    """Start the run and send ``signum`` to its driver once two epochs are checkpointed; the run
    directory. Asserts the exit status, the one resume line, that no process of the driver's
    session outlives it and that the lock was released."""
    log = tmp_path / f"{name}.log"
    with open(log, "w") as stdout:
        driver = subprocess.Popen(train_command(storage, name), stdout=stdout, stderr=subprocess.PIPE,
                                  text=True, env=ENV, cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            checkpoint = newest_registered(storage / name)
            if checkpoint is not None and _next_epoch(checkpoint) >= 2:
                break
            assert driver.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "two epochs were never checkpointed"
            time.sleep(0.2)
        driver.send_signal(signum)
        _, errors = driver.communicate(timeout=90)
        deadline = time.monotonic() + 20
        while session_processes(driver.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert session_processes(driver.pid) == [], "processes of the local Ray outlived the driver"
    finally:
        end_session(driver.pid)
    signal_name = signal.Signals(signum).name
    assert driver.returncode == 128 + signum, errors
    assert "Traceback" not in errors and "*** " not in errors, errors  # *** starts Ray's C++ dump
    lines = [line for line in errors.splitlines() if line.startswith("ray-sebs train:")]
    assert lines == [f"ray-sebs train: interrupted by {signal_name}; to resume the run, run the same "
                     f"command with --name {name}"], errors
    assert not (storage / name / LOCK_FILE).exists(), "the interrupted driver released its lock"
    return storage / name


def _next_epoch(checkpoint: ray.train.Checkpoint) -> int:
    import torch

    try:
        with checkpoint.as_directory() as directory:
            return torch.load(os.path.join(directory, CHECKPOINT_FILE), weights_only=False)["state"][
                "next_epoch"]
    except Exception:  # being written or deleted
        return 0


def finish(storage: Path, name: str, tmp_path: Path) -> list[dict]:
    """Run the same command again; the run's history once it finished."""
    done = run_in_session(train_command(storage, name), env=ENV, cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    history = json.loads((storage / name / "history.json").read_text())
    assert [entry["epoch"] for entry in history] == list(range(EPOCHS)), "every epoch exactly once"
    return history


@pytest.mark.timeout(420)
def test_ctrl_c_stops_cleanly_a_cut_checkpoint_is_one_line_and_the_same_command_resumes(tmp_path):
    storage = tmp_path / "runs"
    run_dir = interrupt(storage, "sigint", signal.SIGINT, tmp_path)
    record = (run_dir / "sebs_run.json").read_text()

    # The newest registered checkpoint cut in half: refused in one line naming the file, before
    # any worker starts (so no --max-failures retry), and nothing of the run is changed.
    newest = Path(newest_registered(run_dir).path) / CHECKPOINT_FILE
    whole = newest.read_bytes()
    newest.write_bytes(whole[:len(whole) // 2])
    refused = run_in_session(train_command(storage, "sigint"), env=ENV, cwd=tmp_path, timeout=240)
    assert refused.returncode == 1, refused.stdout[-3000:] + refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr
    (line,) = [line for line in refused.stderr.splitlines() if line.startswith("ray-sebs train:")]
    assert line.startswith(f"ray-sebs train: failed: the checkpoint file {newest} cannot be read ("), line
    assert line.endswith("restore it, or start a new run with another --name"), line
    assert "epoch " not in refused.stdout.split("peak workers")[-1], "no worker trained"
    assert (run_dir / "sebs_run.json").read_text() == record

    newest.write_bytes(whole)
    history = finish(storage, "sigint", tmp_path)
    assert history[-1]["updates"] == sum(entry["epoch_updates"] for entry in history)


@pytest.mark.timeout(420)
def test_sigterm_stops_cleanly_and_the_same_command_resumes(tmp_path):
    storage = tmp_path / "runs"
    interrupt(storage, "sigterm", signal.SIGTERM, tmp_path)
    finish(storage, "sigterm", tmp_path)


def write_lock(directory: Path, *, host: str, pid: int, heartbeat_age_s: float) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    now = time.time()
    (directory / LOCK_FILE).write_text(json.dumps({
        "host": host, "pid": pid, "started_at": now - 600, "heartbeat_at": now - heartbeat_age_s,
        "token": "someone-else"}))


def test_a_live_lock_refuses_and_a_dead_or_silent_driver_s_lock_is_taken_over(tmp_path, caplog):
    here = socket.gethostname()
    # Live: this host, a live pid, a fresh heartbeat; or another host with a fresh heartbeat.
    for host in (here, "other-host"):
        write_lock(tmp_path / "run", host=host, pid=os.getpid(), heartbeat_age_s=5)
        with pytest.raises(ConfigError, match=r"is in use by another run \(pid \d+ on ") as info:
            RunLock(str(tmp_path / "run"), name="run").acquire()
        assert info.value.field == "name" and "another --name" in info.value.fix
    # Dead: a pid gone on this host (at once), or no heartbeat from another host for 60 s.
    dead_pid = subprocess.Popen(["true"])  # its pid is free once it exited
    dead_pid.wait()
    for host, pid, age, reason in ((here, dead_pid.pid, 5, "its process is gone"),
                                   ("other-host", os.getpid(), 61, "no heartbeat for 61 s")):
        write_lock(tmp_path / "run", host=host, pid=pid, heartbeat_age_s=age)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ray_sebs"), \
                RunLock(str(tmp_path / "run"), name="run", heartbeat_s=0.05) as lock:
            time.sleep(0.2)  # a few heartbeats
            held = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
            assert held["token"] == lock.holder.token and held["pid"] == os.getpid()
            assert held["heartbeat_at"] > held["started_at"]
        assert [record.getMessage() for record in caplog.records if reason in record.getMessage()]
        assert not (tmp_path / "run" / LOCK_FILE).exists(), "released when the run ends"


def test_an_interrupted_command_stuck_in_its_clean_up_still_leaves_no_lock(tmp_path, monkeypatch, caplog):
    # The command thread holds the lock and never returns (as one stuck in a Ray call after
    # Ray was shut down under it): the main thread waits CLEANUP_WAIT_S, then releases the lock
    # itself, so the same command can resume at once. No Ray here: shutdown_ray does nothing.
    monkeypatch.setattr(interrupt_handling, "CLEANUP_WAIT_S", 0.5)
    monkeypatch.setattr(interrupt_handling, "shutdown_ray", lambda: None)
    stuck = threading.Event()

    def command() -> int:
        RunLock(str(tmp_path / "run"), name="run").acquire()
        os.kill(os.getpid(), signal.SIGINT)
        stuck.wait(60)
        return 0

    try:
        with caplog.at_level(logging.WARNING, logger="ray_sebs"):
            outcome = interrupt_handling.run_interruptible(command)
    finally:
        stuck.set()
    assert outcome == interrupt_handling.Interruption(signal.SIGINT)
    assert "did not finish its clean-up within 0.5 s" in caplog.text
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    assert interrupt_handling.release_held_locks() == 0, "each lock released once"


@pytest.mark.timeout(300)
def test_a_second_run_with_the_same_name_is_refused_before_any_worker_starts(tmp_path, ray_cluster):
    run_dir = tmp_path / "busy"
    write_lock(run_dir, host=socket.gethostname(), pid=os.getpid(), heartbeat_age_s=1)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert main(["train", *FLAGS, "--storage-path", str(tmp_path), "--name", "busy"]) == 2
    (line,) = stderr.getvalue().splitlines()
    assert line.startswith("ray-sebs train: error: --name='busy': is in use by another run (pid "), line
    assert "use another --name" in line
    assert sorted(os.listdir(run_dir)) == [LOCK_FILE], "no record, no checkpoint: nothing started"
