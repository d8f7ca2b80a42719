"""Processes of a test's subprocess and everything it started (Linux ``/proc``), shared by the
tests that run ``ray-sebs`` as its own process: a driver started with ``start_new_session=True``
leads a session, and its local Ray's daemons and workers are in it too."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


def session_processes(session: int) -> list[int]:
    """Live processes of a session (Linux ``/proc``): a process started with
    ``start_new_session=True`` and everything it started, Ray's daemons and workers included."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, _, _, sid = stat[stat.rindex(")") + 2:].split()[:4]
        if int(sid) == session and state != "Z":
            pids.append(int(entry))
    return pids


def end_session(session: int, grace_s: float = 20.0) -> None:
    """SIGKILL the session's process group, give the rest ``grace_s`` to follow, then SIGKILL each
    one left (all of them started by the test's driver process)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(session, signal.SIGKILL)
    deadline = time.monotonic() + grace_s
    while session_processes(session) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in session_processes(session):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run_in_session(command: list[str], *, env: dict[str, str], cwd: Path | str,
                   timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in its own session to the end (text stdout and stderr captured), then end
    whatever of its session is left (its local Ray's processes)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, cwd=cwd, start_new_session=True)
    try:
        output, errors = process.communicate(timeout=timeout)
    finally:
        end_session(process.pid)
    return subprocess.CompletedProcess(command, process.returncode, output, errors)
