"""A local cluster that grows on demand: Ray's fake multi-node provider under the real autoscaler.

``ray start --head --autoscaling-config=FILE`` with ``RAY_FAKE_CLUSTER=1`` runs Ray's autoscaler
(v2, as KubeRay's sidecar does) with a node provider that "launches" a node by starting one more
real raylet on this machine. Used by ``tests/test_autoscaler.py`` and
``benchmarks/prefetch_stall.py``.

Not ``ray.cluster_utils.AutoscalingCluster``: in the Ray 2.60 wheel its constructor reads
``fake_multi_node/example.yaml``, which the wheel does not ship (and so does the autoscaler for
provider type ``fake_multinode``, ``ray/autoscaler/_private/providers.py:_get_default_config``,
hence type ``external`` with the fake provider's class here), and its ``start``/``shutdown`` run
``ray stop --force``, which kills every Ray on the machine. This one writes the whole config
itself, starts the head in a session of its own (every daemon, the autoscaler's fake nodes too,
stays in it) and ends only that session.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tests.processes import end_session
from tests.slow_launch import LAUNCH_DELAY_ENV
from tests.toy_problem import make_rows, small_model, to_dataset

REPO = Path(__file__).resolve().parent.parent

SLOT = "sebs_slot"
"""A custom resource one worker takes: the head has one, each autoscaled node one more, so a
second worker fits only on a node the autoscaler adds."""

WORKER_NODE_TYPE = "ray.worker.slot"
FAKE_PROVIDER = "tests.slow_launch.SlowLaunchProvider"
"""Ray's fake multi-node provider, with an optional launch delay (:mod:`tests.slow_launch`)."""
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"
"""``ray.autoscaler._private.fake_multi_node.node_provider.FAKE_HEAD_NODE_ID``: the v2 autoscaler
finds the head's instance by this id."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class AutoscalingCluster:
    """A head with ``head_cpus`` CPUs and one :data:`SLOT`, and 0..``max_nodes`` worker nodes of
    ``node_cpus`` CPUs and one :data:`SLOT` each, added and removed by the autoscaler."""

    head_cpus: float = 2
    node_cpus: float = 1
    max_nodes: int = 1
    idle_timeout_s: float = 6.0
    launch_delay_s: float = 0.0
    """Seconds each node launch waits before its raylet starts (a cloud's minutes, scaled down)."""
    object_store_bytes: int = 150 * 1024**2
    address: str = ""
    """``IP:PORT`` of the head's GCS, once started."""
    temp_dir: str = ""
    _session: int | None = field(default=None, repr=False)

    def config(self, gcs_address: str) -> dict[str, Any]:
        """The autoscaling config: Ray's ``fake_multi_node/example.yaml`` with these node types,
        and the v2 provider settings ``AutoscalingCluster(autoscaler_v2=True)`` would add."""
        return {
            "cluster_name": "ray-sebs-fake",
            "max_workers": self.max_nodes,
            # "external" with the fake provider's class, not "fake_multinode": for that type the
            # autoscaler reads its defaults from fake_multi_node/example.yaml, missing in the wheel.
            "provider": {"type": "external", "module": FAKE_PROVIDER, "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True,
                         "launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID,
                         "gcs_address": gcs_address},
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": self.head_cpus, SLOT: 1},
                                     "node_config": {}, "max_workers": 0},
                WORKER_NODE_TYPE: {"resources": {"CPU": self.node_cpus, SLOT: 1,
                                                 "object_store_memory": self.object_store_bytes},
                                   "node_config": {}, "min_workers": 0,
                                   "max_workers": self.max_nodes},
            },
            "head_node_type": "ray.head.default",
            "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": self.idle_timeout_s / 60,
            "docker": {}, "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        }

    def start(self) -> str:
        """Start the head (and its autoscaler); the GCS address to ``ray.init``."""
        import ray._private.services

        ip = ray._private.services.get_node_ip_address()
        self.address = f"{ip}:{free_port()}"
        # Short: Ray's socket paths live under it and a Unix socket path has 107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="rsebs-as-", dir="/tmp")
        config_path = os.path.join(self.temp_dir, "autoscaling.json")
        with open(config_path, "w") as handle:
            json.dump(self.config(self.address), handle)
        env = {**os.environ,
               "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
               "RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
               "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
               "RAY_AUTH_MODE": "disabled", LAUNCH_DELAY_ENV: f"{self.launch_delay_s:g}",
               # A loaded machine starts the dashboard agent slowly; the raylet waits for it.
               "RAY_agent_register_timeout_ms": "120000",
               # Every worker, on every fake node, imports this checkout's ray_sebs.
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        command = [ray_cli, "start", "--head", f"--port={self.address.rsplit(':', 1)[1]}",
                   f"--autoscaling-config={config_path}", f"--temp-dir={self.temp_dir}",
                   f"--num-cpus={self.head_cpus:g}", f"--resources={json.dumps({SLOT: 1})}",
                   f"--object-store-memory={self.object_store_bytes}",
                   "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
                   "--disable-usage-stats"]
        process = subprocess.Popen(command, env=env, start_new_session=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._session = process.pid
        output, _ = process.communicate(timeout=180)
        if process.returncode != 0:
            self.shutdown()
            raise RuntimeError(f"ray start failed ({process.returncode}):\n{output[-3000:]}")
        return self.address

    def alive_nodes(self) -> int:
        import ray

        return sum(1 for node in ray.nodes() if node["Alive"])

    def wait_for_nodes(self, count: int, timeout_s: float) -> float:
        """Seconds until exactly ``count`` nodes are alive; ``TimeoutError`` after ``timeout_s``."""
        started = time.monotonic()
        while self.alive_nodes() != count:
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"{self.alive_nodes()} nodes alive, not {count}, after "
                                   f"{timeout_s:.0f}s")
            time.sleep(0.5)
        return time.monotonic() - started

    def autoscaler_log(self) -> str:
        """The autoscaler's own log (``monitor.log``) of this cluster's session."""
        logs = Path(self.temp_dir, "session_latest", "logs")
        return "".join(path.read_text(errors="replace") for path in sorted(logs.glob("monitor*.log")))

    def shutdown(self) -> None:
        """End this cluster's session only (never ``ray stop``: other Rays may share the machine)."""
        if self._session is not None:
            end_session(self._session)
            self._session = None
        if self.temp_dir:  # its logs and sockets: read autoscaler_log() before
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = ""


class SlowModel(torch.nn.Module):
    """The toy model with ``delay_s`` of sleep per forward: epochs that take about as long on a
    busy machine as on a quiet one, so a run leaves the autoscaler the time it needs."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.inner = small_model()
        self.delay_s = delay_s

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay_s)
        return self.inner(features)


def growing_run(storage_path: str, name: str, *, lead_time_s: float | None,
                epochs: tuple[int, int] = (3, 1), rows: int = 256, delay_s: float = 0.0,
                min_workers: int = 1) -> Any:
    """A SEBS run of 2 stages on :data:`SLOT` workers: stage 1 on 1 worker (the head's slot),
    stage 2 on up to 2, so its second worker needs a node the autoscaler adds. ``lead_time_s=None``:
    no prefetch; ``delay_s``: sleep per forward (:class:`SlowModel`); ``min_workers=2``: stage 2
    waits for both workers instead of starting with what is there. Needs
    ``RAY_SEBS_AUTOSCALING=1`` and a connected Ray."""
    from ray.train import RunConfig

    from ray_sebs import ClusterConfig, ScheduleConfig
    from ray_sebs.trainer import SEBSTrainer

    schedule = ScheduleConfig(initial_batch_size=8, growth_ratio=2, num_stages=2,
                              epochs_per_stage=epochs, learning_rate=0.1)
    cluster = ClusterConfig(min_workers=min_workers, max_workers=2, max_micro_batch=8,
                            resources_per_worker={"CPU": 0.25, SLOT: 1})
    trainer = SEBSTrainer(functools.partial(SlowModel, delay_s),
                          datasets={"train": to_dataset(*make_rows(rows))},
                          schedule=schedule, cluster=cluster,
                          run_config=RunConfig(name=name, storage_path=storage_path),
                          prefetch_lead_time_s=lead_time_s, checkpoint_every_s=None)
    return trainer.fit()
