"""A real multi-node Ray cluster on one machine: runs that span nodes, a node lost mid-segment,
and ``ray job submit`` to a head plus a second raylet.

Two nodes of one CPU each, every worker holding one unit of a custom resource each node has once
(``sebs_node``), so a 2-worker group must span both nodes: what Ray places where is then
visible in its state API, as on a real cluster. Run these apart with ``pytest -m multinode`` (or
leave them out with ``-m "not multinode"``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray
import ray.cloudpickle
import ray.train
import torch
from processes import (
    RAY,
    dashboard_port,
    free_ports,
    job_api_answers,
    processes_mentioning,
    ray_env,
    ray_start_command,
    registered_epochs,
    start_ray_node,
    stop_ray_node,
    wait_for_job,
)
from ray.cluster_utils import Cluster
from ray.train import FailureConfig, RunConfig
from ray.util.state import list_actors
from toy_problem import make_rows, small_model, to_dataset

from ray_sebs import ClusterConfig, ScheduleConfig
from ray_sebs.cli import main
from ray_sebs.history import RECOVERY, RESIZE, worker_group_changes
from ray_sebs.trainer import SEBSTrainer

pytestmark = [pytest.mark.multinode, pytest.mark.ray]

# Workers do not have tests/ on their path: ship this module's classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

NODE_RESOURCE = "sebs_node"
"""One unit on each node; every worker takes one, so no node runs two workers."""
WORKER_RESOURCES = f"CPU=0.25,{NODE_RESOURCE}=1"
# The smallest run that still grows the worker group: stage 1 (batch 16) on 1 worker, stage 2
# (batch 32) on 2, one epoch each, over 256 synthetic rows (as tests/test_jobs.py).
TINY_RUN = ["--dataset", "synthetic", "--synthetic-rows", "256", "--stages", "2",
            "--epochs-per-stage", "1", "--batch-size", "16", "--max-micro-batch", "16",
            "--max-workers", "2"]
TRAIN_WORKER_CLASS = "RayTrainWorker"
"""Ray Train V2's worker actor (``ray/train/v2/_internal/execution/worker_group/worker.py``)."""


@dataclass
class TwoNodes:
    cluster: Cluster
    temp_dir: str
    node_args: dict[str, Any]

    @property
    def address(self) -> str:
        return self.cluster.address

    @property
    def second(self) -> Any:
        (node,) = self.cluster.worker_nodes
        return node

    def train_workers(self) -> list[dict[str, Any]]:
        """Every Ray Train worker actor the cluster has had, alive or dead, from the state API."""
        return list(list_actors(address=self.address, detail=True, limit=1000,
                                filters=[("class_name", "=", TRAIN_WORKER_CLASS)]))


@pytest.fixture(scope="class")
def two_nodes() -> Iterator[TwoNodes]:
    """A head and a second node (``ray.cluster_utils.Cluster``: each its own raylet), 1 CPU each,
    the dashboard on the head for the state API; no driver connected."""

    if ray.is_initialized():
        ray.shutdown()
    # Unix socket paths under Ray's temp dir must stay short: not pytest's tmp paths.
    temp_dir = tempfile.mkdtemp(prefix="rsm-", dir="/tmp")
    dashboard_port, head_agent_port = free_ports(2)
    node_args = {"num_cpus": 1, "resources": {NODE_RESOURCE: 1}, "temp_dir": temp_dir,
                 "object_store_memory": 100 * 1024 * 1024}
    cluster = Cluster(initialize_head=True, head_node_args={
        **node_args, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": dashboard_port, "dashboard_agent_listen_port": head_agent_port})
    try:
        cluster.add_node(**node_args, dashboard_agent_listen_port=free_ports(1)[0])
        cluster.wait_for_nodes()
        yield TwoNodes(cluster=cluster, temp_dir=temp_dir, node_args=node_args)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        for pid in processes_mentioning(temp_dir):  # none expected; never leave one behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def worker_groups(workers: list[dict[str, Any]]) -> list[set[str]]:
    """The node ids of each worker group (the workers of one placement group), smallest group
    first, as a list of one set per group with one entry per worker's node."""
    groups: dict[str, list[str]] = {}
    for worker in workers:
        groups.setdefault(worker["placement_group_id"], []).append(worker["node_id"])
    for nodes in groups.values():  # no node runs two workers of one group
        assert len(nodes) == len(set(nodes)), groups
    return sorted((set(nodes) for nodes in groups.values()), key=len)


class HoldOnce(torch.nn.Module):
    """The toy model, with two pauses the test controls through files in ``gates``.

    In a worker group of 2, the ``at_forward``-th training forward writes ``held`` and then waits
    forever: the group trains no further until its node is taken away. In the first worker group
    of 1 after that (the recovery), the first forward writes ``gated`` and waits until the test
    writes ``released``.
    """

    def __init__(self, gates: str, at_forward: int) -> None:
        super().__init__()
        self.inner = small_model()
        self.gates, self.at_forward = Path(gates), at_forward
        self.forwards = 0

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.forwards += 1
            world_size = ray.train.get_context().get_world_size()
            held, gated, released = (self.gates / name for name in ("held", "gated", "released"))
            if (world_size, self.forwards) == (2, self.at_forward) and not held.exists():
                held.write_text(ray.get_runtime_context().get_node_id())
                while True:
                    time.sleep(0.5)
            if (world_size, self.forwards) == (1, 1) and held.exists() and not released.exists():
                gated.write_text(ray.get_runtime_context().get_node_id())
                while not released.exists():
                    time.sleep(0.1)
        return self.inner(features)


def drain_for_preemption(address: str, node_id: str, deadline_s: int) -> None:
    """Tell the GCS that ``node_id`` is preempted and goes in ``deadline_s``: what a cloud
    autoscaler does before it reclaims a spot node (``ray drain-node``, Ray's own CLI)."""

    subprocess.run([RAY, "drain-node", "--address", address, "--node-id", node_id,
                    "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "test",
                    "--deadline-remaining-seconds", str(deadline_s)],
                   check=True, capture_output=True, timeout=60)


class TestTwoNodes:
    """Both share one two-node cluster; the second test takes its second node away and adds a
    new one."""

    @pytest.mark.timeout(400)
    def test_a_growing_run_spans_both_nodes_and_writes_only_to_its_storage(
            self, two_nodes: TwoNodes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        cwd = tmp_path / "cwd"
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        storage = tmp_path / "shared"
        # What a user runs against a cluster: the CLI with --address and a file:// storage path.
        assert main(["train", "--address", two_nodes.address, *TINY_RUN,
                     "--resources-per-worker", WORKER_RESOURCES,
                     "--storage-path", f"file://{storage}", "--name", "span"]) == 0
        run_dir = storage / "span"
        history = json.loads((run_dir / "history.json").read_text())
        assert [record["world_size"] for record in history] == [1, 2]
        assert all(record["samples_per_update_min"] == record["samples_per_update_max"]
                   == record["global_batch_size"] for record in history)
        for name in ("history.csv", "curves.png", "sebs_run.json"):
            assert (run_dir / name).is_file(), name
        assert any((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
        assert list(cwd.iterdir()) == [], "the run wrote into the working directory"
        # Ray's own record of where the workers ran: segment 0's one worker, and segment 1's two
        # workers, one on each node.
        groups = worker_groups(two_nodes.train_workers())
        assert [len(nodes) for nodes in groups] == [1, 2], groups
        assert groups[1] == {two_nodes.cluster.head_node.node_id, two_nodes.second.node_id}

    @pytest.mark.timeout(600)
    def test_a_preempted_node_shrinks_the_segment_without_spending_max_failures(
            self, two_nodes: TwoNodes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """The second node goes while the 2-worker segment trains: drained as preempted (as a
        cloud autoscaler does before reclaiming a spot node), then its raylet ended. Ray Train
        restarts the segment on the 1 worker left, within the elastic range (1, 2); the loop
        re-splits every update (8 x 2 accumulation instead of 8 x 1 on 2 workers), so every
        update still uses exactly B_s samples. Then a new node joins, and the next segment
        starts on 2 workers again.

        Ray 2.60, what decides this (``ray/train/v2/_internal/execution``):

        * Only a preemption spares ``max_failures``: ``FailureConfig(max_failures=0)`` here, and
          the shrink is charged to ``max_preemption_failures`` (default -1, no limit;
          ``failure_handling/default.py``, ``_is_preemption_failure``: a worker whose node died
          with ``AUTOSCALER_DRAIN_PREEMPTED``). A node that just dies (raylet killed, no drain) is
          a ``WorkerGroupError`` charged to ``max_failures``: measured with ``max_failures=0``,
          ``[FailurePolicy] RAISE Source: worker group Error count: 1 (max allowed: 0)`` and the
          run fails; with the default ``--max-failures 1`` it recovers as here.
        * After the loss the controller first retries the old size: the elastic policy counts
          workers from Ray Data's AutoscalingCoordinator, whose view of the nodes is refreshed
          every 20 s (``_AutoscalingCoordinatorActor.TICK_INTERVAL_S``), so it asks for 2
          workers, waits ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (60 s by default; 10 s here)
          for a placement group that cannot be placed, and retries (``controller`` failures,
          no limit) until the view has 1 node. With Ray's default that recovery took 77 s.
        * A returned node does not grow the running segment back here: a healthy group is
          reconsidered only every ``ScalingConfig.elastic_resize_monitor_interval_s`` (60 s by
          default, which ray-sebs does not change; ``scaling_policy/elastic.py``), and this
          segment's last epochs end well before. The test waits 21 s after the node joins
          (one coordinator tick) and then asserts what does happen: the next segment (target
          4 workers, capped at the 2 the cluster can place) starts on both nodes.
        """
        monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "10")
        ray.init(address=two_nodes.address, log_to_driver=False)
        # Stage 1 (batch 8) on 1 worker; stage 2 (batch 16, 3 epochs) on 2; stage 3 (batch 32)
        # targets 4 workers, capped at the 2 the cluster can place.
        schedule = ScheduleConfig(initial_batch_size=8, growth_ratio=2, num_stages=3,
                                  epochs_per_stage=(1, 3, 1), learning_rate=0.2)
        cluster = ClusterConfig(min_workers=1, max_workers=4, max_micro_batch=8,
                                resources_per_worker={"CPU": 0.25, NODE_RESOURCE: 1})
        gates = tmp_path / "gates"
        gates.mkdir()
        storage = tmp_path / "shared"
        run_dir = storage / "lost"
        # 128 rows, batch 16, 2 workers: 8 forwards per rank per epoch; the 9th is epoch 2's first.
        trainer = SEBSTrainer(
            lambda: HoldOnce(str(gates), at_forward=9),
            datasets={"train": to_dataset(*make_rows(128)),
                      "validation": to_dataset(*make_rows(30, seed=9))},
            # One forward per update (the hold is placed by counting forwards): no noise
            # measurement splitting sampled updates.
            schedule=schedule, cluster=cluster, checkpoint_every_epochs=1, gradient_noise=False,
            run_config=RunConfig(name="lost", storage_path=f"file://{storage}",
                                 failure_config=FailureConfig(max_failures=0)))
        outcome: dict[str, Any] = {}

        def fit() -> None:
            try:
                outcome["result"] = trainer.fit()
            except BaseException as error:  # handed to the test thread
                outcome["error"] = error

        thread = threading.Thread(target=fit, name="sebs-fit", daemon=True)
        thread.start()

        def wait_for(condition: Any, what: str, timeout_s: float = 300) -> None:
            deadline = time.monotonic() + timeout_s
            while not condition():
                assert thread.is_alive(), f"the run ended before {what}: {outcome}"
                assert time.monotonic() < deadline, f"no {what} in {timeout_s} s"
                time.sleep(0.2)

        # Epoch 1 (the first on 2 workers) is registered and both workers wait in epoch 2.
        wait_for(lambda: (gates / "held").exists() and 1 in registered_epochs(run_dir),
                 "2-worker segment")
        head, second = two_nodes.cluster.head_node.node_id, two_nodes.second.node_id
        alive = [worker for worker in two_nodes.train_workers() if worker["state"] == "ALIVE"]
        assert {worker["node_id"] for worker in alive} == {head, second}, alive
        drain_for_preemption(two_nodes.address, second, deadline_s=3)
        time.sleep(4)  # past the deadline: the node is gone as announced
        two_nodes.cluster.remove_node(two_nodes.second)

        # The recovered group (1 worker) waits at its first update until a new node has joined
        # and the coordinator has seen it.
        wait_for(lambda: (gates / "gated").exists(), "recovered 1-worker group")
        new = two_nodes.cluster.add_node(**two_nodes.node_args,
                                         dashboard_agent_listen_port=free_ports(1)[0]).node_id
        time.sleep(21)
        (gates / "released").write_text("")
        thread.join(300)
        assert "error" not in outcome, outcome["error"]
        result = outcome["result"]

        history = result.history
        assert [record["epoch"] for record in history] == [0, 1, 2, 3, 4], "each epoch once"
        assert [record["world_size"] for record in history] == [1, 2, 1, 1, 2]
        assert [record["accumulation_steps"] for record in history] == [1, 1, 2, 2, 2]
        for record in history:
            assert record["samples_per_update_min"] == record["samples_per_update_max"] \
                == record["global_batch_size"], record
        assert history[-1]["updates"] == result.plan.total_updates == 44
        assert history[-1]["samples"] == result.plan.total_samples == 640
        changes = [(change.kind, change.epoch, change.workers_before, change.workers_after)
                   for change in worker_group_changes(history)]
        assert changes == [(RESIZE, 1, 1, 2), (RECOVERY, 2, 2, 1), (RESIZE, 4, 1, 2)]
        assert (result.summary["resizes"], result.summary["recoveries"]) == (2, 1)
        # The last segment's group: one worker on the head, one on the node that joined.
        groups = [nodes for nodes in worker_groups(two_nodes.train_workers()) if new in nodes]
        assert groups == [{head, new}], groups


# ---------------------------------------------------------------------------------------------
# `ray job submit` to a head and a second raylet, with token authentication


@dataclass
class TokenCluster:
    dashboard_url: str
    token: str
    home: Path
    gcs_address: str

    def client(self):
        from ray.job_submission import JobSubmissionClient

        # Explicit header: this pytest process runs with RAY_AUTH_MODE=disabled (conftest).
        return JobSubmissionClient(self.dashboard_url,
                                   headers={"Authorization": f"Bearer {self.token}"})

    def alive_nodes(self) -> int:
        request = urllib.request.Request(
            f"{self.dashboard_url}/api/v0/nodes?limit=100&filter_keys=state&filter_predicates=%3D"
            "&filter_values=ALIVE", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return len(json.load(response)["data"]["result"]["result"])

    def train_workers(self) -> list[dict[str, Any]]:
        """Ray Train's worker actors, from the state API's REST endpoint (with the token)."""
        request = urllib.request.Request(
            f"{self.dashboard_url}/api/v0/actors?detail=1&limit=1000&filter_keys=class_name"
            f"&filter_predicates=%3D&filter_values={TRAIN_WORKER_CLASS}",
            headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)["data"]["result"]["result"]


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenCluster]:
    """``ray start --head`` and ``ray start --address`` (a second raylet, its own process and temp
    dir), both with token auth and 1 CPU and one ``sebs_node``; every process stopped after."""

    base = tmp_path_factory.mktemp("token-cluster")
    home = base / "home"
    home.mkdir()
    token = secrets.token_hex(32)
    env = ray_env(home) | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    resources = json.dumps({NODE_RESOURCE: 1})
    temp_dirs = [tempfile.mkdtemp(prefix=prefix, dir="/tmp") for prefix in ("rsh-", "rsw-")]
    (gcs_port,) = free_ports(1)
    head_command = ray_start_command(temp_dir=temp_dirs[0], num_cpus=1, head_gcs_port=gcs_port,
                                     resources=resources)
    url = f"http://127.0.0.1:{dashboard_port(head_command)}"
    nodes = [start_ray_node(head_command, env, base / "head.log")]
    try:
        deadline = time.monotonic() + 180
        while not job_api_answers(url, token):
            assert nodes[0].poll() is None and time.monotonic() < deadline, \
                (base / "head.log").read_text(errors="replace")[-4000:]
            time.sleep(1)
        nodes.append(start_ray_node(
            ray_start_command(temp_dir=temp_dirs[1], num_cpus=1, address=f"127.0.0.1:{gcs_port}",
                              resources=resources), env, base / "worker.log"))
        cluster = TokenCluster(dashboard_url=url, token=token, home=home,
                               gcs_address=f"127.0.0.1:{gcs_port}")
        while cluster.alive_nodes() < 2:
            assert nodes[1].poll() is None and time.monotonic() < deadline, \
                (base / "worker.log").read_text(errors="replace")[-4000:]
            time.sleep(1)
        yield cluster
    finally:
        for process, temp_dir in reversed(list(zip(nodes, temp_dirs, strict=False))):
            stop_ray_node(process, temp_dir)
        stray = [pid for temp_dir in temp_dirs for pid in processes_mentioning(temp_dir)]
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)
        assert not stray, f"processes of the token cluster outlived it: {stray}"


@pytest.mark.timeout(600)
def test_a_job_submitted_with_the_token_trains_on_both_nodes_into_the_shared_storage(
        token_cluster: TokenCluster, tmp_path: Path) -> None:

    repo = Path(__file__).resolve().parents[1]
    storage = tmp_path / "shared"
    submission_id = f"sebs-multinode-{secrets.token_hex(4)}"
    env = ray_env(token_cluster.home) | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token_cluster.token}
    submitted = subprocess.run(
        [RAY, "job", "submit", "--address", token_cluster.dashboard_url,
         "--submission-id", submission_id, "--working-dir", str(repo),
         "--runtime-env", "jobs/runtime_env.yaml", "--no-wait", "--",
         "python", "jobs/train_sebs.py", *TINY_RUN, "--resources-per-worker", WORKER_RESOURCES,
         "--storage-path", f"file://{storage}", "--name", "job"],
        env=env, cwd=repo, capture_output=True, text=True, timeout=120, check=False)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    logs = wait_for_job(token_cluster.client(), submission_id, timeout_s=480)

    run_dir = storage / "job"
    for name in ("history.json", "history.csv", "curves.png", "sebs_run.json"):
        assert (run_dir / name).is_file(), f"no {name} in {run_dir}:\n{logs[-3000:]}"
    assert any((run_dir / "tensorboard").iterdir())
    assert f"run directory: file://{run_dir}" in logs
    history = json.loads((run_dir / "history.json").read_text())
    assert [record["world_size"] for record in history] == [1, 2]
    # The 2-worker group had one worker on each raylet (each node has one sebs_node).
    groups = worker_groups(token_cluster.train_workers())
    assert [len(nodes) for nodes in groups] == [1, 2], groups
