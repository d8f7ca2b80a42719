"""`ray job submit` end to end, against a real Ray head with token authentication on.

The module starts its own head (``ray start --head --block``) on 127.0.0.1 with
``RAY_AUTH_MODE=token``, submits ``jobs/train_sebs.py`` exactly as README.md tells users to, and
checks that a submission without the token, or with a wrong one, is refused before any job exists.

Other engineers run Ray on this machine at the same time, so the head is fenced off from them:
every port is picked free (none of Ray's fixed defaults: 6379, 8265, 10001, 52365), the temp dir is
private, and teardown signals only the processes this module started (never ``ray stop``, which
stops every Ray on the machine).
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from processes import (
    RAY,
    dashboard_port,
    free_ports,
    job_api_answers,
    ray_env,
    ray_start_command,
    start_ray_node,
    stop_ray_node,
    wait_for_job,
)

from ray_sebs.errors import ConfigError
from ray_sebs.preflight import check_storage_shared

REPO_ROOT = Path(__file__).resolve().parents[1]

# Starting a head with the dashboard takes ~10-20 s on an idle 2-core machine, much longer when
# other Ray clusters share the cores; a `ray job submit` client call is ~3-5 s of imports.
HEAD_START_TIMEOUT_S = 180
CLI_TIMEOUT_S = 120
# The job itself: two `TorchTrainer.fit()` segments (1 worker, then 2) at ~15 s each plus the
# job driver's `ray.init`, Ray Data and the runtime-env upload: ~1 min idle, bounded well above.
JOB_TIMEOUT_S = 600

# The smallest run that still grows the worker group: stage 1 (batch 16) on 1 worker, stage 2
# (batch 32) on 2, one epoch each, over 256 synthetic rows.
TINY_RUN = ["--dataset", "synthetic", "--synthetic-rows", "256", "--stages", "2",
            "--epochs-per-stage", "1", "--batch-size", "16", "--max-micro-batch", "16",
            "--max-workers", "2"]


@dataclass
class Head:
    dashboard_url: str
    token: str
    home: Path

    def env(self, token: str | None = None, mode: str | None = "token") -> dict[str, str]:
        """A client environment: ``RAY_AUTH_MODE=mode`` and ``RAY_AUTH_TOKEN=token`` when given."""
        env = ray_env(self.home)
        if mode is not None:
            env["RAY_AUTH_MODE"] = mode
        if token is not None:
            env["RAY_AUTH_TOKEN"] = token
        return env

    def client(self):
        from ray.job_submission import JobSubmissionClient

        # Explicit header: this pytest process runs with RAY_AUTH_MODE=disabled (conftest), so the
        # SDK would not attach a token on its own.
        return JobSubmissionClient(self.dashboard_url,
                                   headers={"Authorization": f"Bearer {self.token}"})


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    base = tmp_path_factory.mktemp("ray-head")
    home = base / "home"
    home.mkdir()
    # Ray's temp dir holds Unix sockets (<temp>/session_<date>_<pid>/sockets/plasma_store) whose
    # paths must stay under ~107 bytes: pytest's tmp paths are too long, so use a short one.
    temp_dir = tempfile.mkdtemp(prefix="rsj-", dir="/tmp")
    (gcs_port,) = free_ports(1)
    token = secrets.token_hex(32)
    env = ray_env(home)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    command = ray_start_command(temp_dir=temp_dir, num_cpus=2, head_gcs_port=gcs_port)
    log_path = base / "ray-start.log"
    process = start_ray_node(command, env, log_path)
    url = f"http://127.0.0.1:{dashboard_port(command)}"
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while not job_api_answers(url, token):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not come up (exit status {process.poll()}):\n"
                            f"{log_path.read_text(errors='replace')[-4000:]}")
            time.sleep(1)
        yield Head(dashboard_url=url, token=token, home=home)
    finally:
        stop_ray_node(process, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(head: Head, env: dict[str, str], submission_id: str, storage: Path,
            name: str) -> subprocess.CompletedProcess[str]:
    """The README's command, with ``--no-wait`` so the test polls the status itself."""
    command = [
        RAY, "job", "submit", "--address", head.dashboard_url, "--submission-id", submission_id,
        "--working-dir", str(REPO_ROOT), "--runtime-env", "jobs/runtime_env.yaml", "--no-wait",
        "--", "python", "jobs/train_sebs.py", *TINY_RUN,
        "--storage-path", str(storage), "--name", name,
    ]
    return subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, check=False)


def test_local_storage_is_refused_on_a_multi_node_cluster() -> None:
    with pytest.raises(ConfigError) as refused:
        check_storage_shared("./sebs_runs", alive_nodes=3)
    message = refused.value.describe("--storage-path")
    assert "--storage-path" in message and "3 nodes" in message and "s3://" in message
    check_storage_shared("./sebs_runs", alive_nodes=1)
    for uri in ("s3://bucket/runs", "gs://bucket/runs", "file:///mnt/nfs/runs"):
        check_storage_shared(uri, alive_nodes=3)


@pytest.mark.ray
def test_submitted_job_trains_and_writes_results(head: Head, tmp_path: Path) -> None:
    storage = tmp_path / "runs"
    submission_id = f"sebs-e2e-{secrets.token_hex(4)}"
    submitted = _submit(head, head.env(token=head.token), submission_id, storage, "e2e")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr

    logs = wait_for_job(head.client(), submission_id, JOB_TIMEOUT_S)
    run_dir = storage / "e2e"
    for name in ("history.json", "history.csv", "curves.png"):
        assert (run_dir / name).is_file(), f"no {name} in {run_dir}:\n{logs[-3000:]}"
    history = json.loads((run_dir / "history.json").read_text())
    assert [record["stage"] for record in history] == [1, 2], history
    assert [record["global_batch_size"] for record in history] == [16, 32]
    # The stage-2 worker group grew to 2 workers (the cluster has 2 CPUs; workers get fractions).
    assert [record["world_size"] for record in history] == [1, 2]
    assert f"run directory: {run_dir}" in logs


@pytest.mark.ray
@pytest.mark.parametrize(("case", "reason"), [
    # The dashboard's HTTP 401 and 403 bodies, as the job CLI reports them.
    pytest.param("no token", "Authentication required: Unauthorized: Missing authentication token",
                 id="no-token"),
    pytest.param("wrong token", "Authentication failed: Forbidden: Invalid authentication token",
                 id="wrong-token"),
])
def test_submission_without_the_token_is_refused(head: Head, tmp_path: Path, case: str,
                                                 reason: str) -> None:
    # "no token": the client's RAY_AUTH_MODE is unset (HOME has no ~/.ray/auth_token either), so
    # it sends no Authorization header at all. "wrong token": token mode with someone else's token.
    env = head.env(token=secrets.token_hex(32)) if case == "wrong token" else head.env(mode=None)
    submission_id = f"sebs-refused-{secrets.token_hex(4)}"
    refused = _submit(head, env, submission_id, tmp_path / "runs", "refused")
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0, output
    assert reason in output, output
    # Refused before anything ran: no job, no run directory.
    assert submission_id not in {job.submission_id for job in head.client().list_jobs()}
    assert not (tmp_path / "runs").exists()
