"""Processes of a test's subprocess and everything it started (Linux ``/proc``), shared by the
tests that run ``ray-sebs`` as its own process: a driver started with ``start_new_session=True``
leads a session, and its local Ray's daemons and workers are in it too. Also the Ray nodes that
tests start with ``ray start`` (a token-auth head, a second node) and stop again."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
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


# ---------------------------------------------------------------------------------------------
# Ray nodes started with `ray start` (tests/test_jobs.py, tests/test_multinode.py)

BIN_DIR = Path(sys.executable).parent
RAY = str(BIN_DIR / "ray") if (BIN_DIR / "ray").exists() else (shutil.which("ray") or "ray")

_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free right now: none of Ray's fixed defaults (6379, 8265,
    10001, 52365), which another Ray on this machine may hold."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        if port not in ports:
            ports.append(port)
    return ports


def ray_env(home: Path) -> dict[str, str]:
    """This environment without any Ray auth setting, with HOME moved away from ~/.ray/auth_token.

    This machine has a ``~/.ray/auth_token``: a head started with the mode unset would switch token
    auth on by itself, and a client could read that file. Every process here gets a private HOME,
    so the only token in play is the one a test hands over explicitly.
    """
    env = {key: value for key, value in os.environ.items()
           if key not in _AUTH_VARS and key != "RAY_ADDRESS"}
    env["HOME"] = str(home)
    # `python` in a job's entrypoint must be this interpreter (it has ray and ray_sebs).
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # `ray start --block` on SIGTERM first drains the node for up to 30 s (for Ray Serve); there is
    # nothing to drain here, so teardown is immediate.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    return env


def ray_start_command(*, temp_dir: str, num_cpus: float, head_gcs_port: int | None = None,
                      address: str | None = None, resources: str | None = None) -> list[str]:
    """``ray start --block`` for a head (``head_gcs_port``) or a node joining ``address``, on
    127.0.0.1, every port picked free, Ray's files under the private ``temp_dir``."""
    (agent_http, agent_grpc, runtime_env, metrics, node_manager, object_manager, dashboard,
     client) = free_ports(8)
    command = [RAY, "start", "--block", "--node-ip-address", "127.0.0.1",
               "--dashboard-agent-listen-port", str(agent_http),
               "--dashboard-agent-grpc-port", str(agent_grpc),
               "--runtime-env-agent-port", str(runtime_env),
               "--metrics-export-port", str(metrics),
               "--node-manager-port", str(node_manager),
               "--object-manager-port", str(object_manager),
               "--num-cpus", f"{num_cpus:g}", "--temp-dir", temp_dir, "--disable-usage-stats"]
    if resources is not None:
        command += ["--resources", resources]
    if head_gcs_port is not None:
        return [*command, "--head", "--port", str(head_gcs_port), "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(dashboard), "--include-dashboard", "true",
                "--ray-client-server-port", str(client)]
    assert address is not None, "a node that is not the head joins an address"
    return [*command, "--address", address]


def dashboard_port(command: list[str]) -> int:
    """The ``--dashboard-port`` of a :func:`ray_start_command`."""
    return int(command[command.index("--dashboard-port") + 1])


def start_ray_node(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start ``ray start --block`` in a new session of its own (for :func:`stop_ray_node`)."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def job_api_answers(url: str, token: str) -> bool:
    """Whether the dashboard at ``url`` answers the job API with this token."""
    request = urllib.request.Request(f"{url}/api/jobs/",
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def processes_mentioning(marker: str) -> list[int]:
    """Pids whose command line contains ``marker`` (a private temp dir): workers, agents."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
    return pids


def stop_ray_node(process: subprocess.Popen, temp_dir: str | None = None) -> None:
    """Stop only a node this test started: never `ray stop`, which would stop every Ray on the
    machine, other engineers' included.

    SIGTERM makes `ray start --block` drain and kill the processes it spawned (raylet, GCS,
    dashboard, ...), and the raylet takes its workers with it. Whatever is left in its session,
    or (with ``temp_dir``) naming the test's private temp dir on its command line, is killed.
    """
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    for pid in processes_mentioning(temp_dir) if temp_dir else ():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def wait_for_job(client, submission_id: str, timeout_s: float) -> str:
    """Poll a submitted job until it ends (or ``timeout_s``); its logs. Fails the test, with the
    job's message and the end of its logs, unless it SUCCEEDED; a job still running is stopped."""
    import pytest
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    status = client.get_job_status(submission_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(2)
        status = client.get_job_status(submission_id)
    if status != JobStatus.SUCCEEDED:
        if not status.is_terminal():
            client.stop_job(submission_id)
        info = client.get_job_info(submission_id)
        pytest.fail(f"job {submission_id} ended {status} ({info.message}):\n"
                    f"{client.get_job_logs(submission_id)[-6000:]}")
    return client.get_job_logs(submission_id)


def registered_epochs(run_dir: Path) -> set[int]:
    """Epochs whose checkpoints Ray Train's checkpoint manager has registered (its snapshot): what
    a test waits for before it kills something while a run trains."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or being rewritten
        return set()
    return {result["metrics"]["epoch"] for result in snapshot["checkpoint_results"]}
