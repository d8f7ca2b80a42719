"""KubeRay ``ray.io/v1`` manifests sized from an elastic plan. Pure Python (PyYAML only).

Why generate them: the cluster should follow the stage plan instead of being sized by hand. The
worker group scales from 0 to the plan's peak worker count, one Ray worker pod per Train worker,
and each pod is sized from the plan's per-worker bundle (GPUs as ``nvidia.com/gpu``, CPUs for the
Train worker plus room for Ray Data's read tasks, which starve otherwise: workers holding every CPU
leave none for reading, and the run hangs). The job's entrypoint repeats the plan's schedule and
worker flags, so the job trains exactly the planned run.

:func:`build_cluster_spec` is the one place the RayCluster structure is written. It backs the
manifests ``ray-sebs plan --emit-kuberay`` writes and the checked-in ``cluster/*.yaml``
(:func:`static_manifests`; a test checks the files still equal what it builds).

Secure by default, in every manifest:

* Ray token authentication: ``authOptions: {mode: token, secretName}``; the user creates the
  Secret (key ``auth_token``), so no token is ever written into a manifest;
* the head Service is ``ClusterIP`` without Ingress: the dashboard is reached through
  ``kubectl port-forward`` only;
* KubeRay's ``networkPolicy`` in ``DenyAllIngress`` mode: only the cluster's own pods, the
  operator and the RayJob submitter reach the pods. Egress stays open: the autoscaler must reach
  the Kubernetes API and the workers the storage bucket (``DenyAll`` would cut both);
* non-root containers (the Ray image's uid 1000), no privilege escalation, all capabilities
  dropped, the default seccomp profile, no service-account token where none is needed;
* requests equal to limits on every container, the autoscaler sidecar and the submitter included.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ray_sebs.errors import ConfigError, format_number
from ray_sebs.flags import to_flags
from ray_sebs.optim import OptimizerConfig
from ray_sebs.plan import ClusterConfig, ElasticPlan, build_plan
from ray_sebs.schedule import ScheduleConfig

RAY_VERSION = "2.60.0"
"""Ray in the image (``cluster/Dockerfile``) and every manifest's ``rayVersion``; a test checks
they agree and lie in pyproject's ``ray`` range."""

DEFAULT_IMAGE = "ray-sebs:0.1.0"
"""The image ``cluster/Dockerfile`` builds; push it to a registry and point the manifests at it."""

DEFAULT_AUTH_SECRET = "ray-sebs-auth-token"
"""Secret holding the Ray token under :data:`AUTH_TOKEN_KEY`, created by the user (README)."""

AUTH_TOKEN_KEY = "auth_token"
"""The data key KubeRay reads from ``authOptions.secretName``."""

PLACEHOLDER_STORAGE_PATH = "s3://CHANGE-ME/sebs_runs"
"""Storage used when none is given. Not a valid bucket name (upper case), so it cannot write into
somebody's bucket by accident; the job fails on it until it is replaced."""

APP_DIR = "/home/ray/ray-sebs"
"""Where the image holds the project (``WORKDIR`` of ``cluster/Dockerfile``)."""

TRAIN_SCRIPT = "jobs/train_sebs.py"
TUNE_SCRIPT = "jobs/tune_growth.py"

RAY_UID = 1000
RAY_GID = 100
"""The ``ray`` user and ``users`` group of the ``rayproject/ray`` images."""

MAX_RAYJOB_NAME_LENGTH = 47
"""KubeRay appends a suffix to a RayJob's name for its RayCluster and refuses longer names."""

RUNTIME_ENV_YAML = f"""\
# The submitter pod runs the same image and uploads {APP_DIR}: the
# entrypoint runs in a copy of the project, as after `ray job submit --working-dir .`
working_dir: {APP_DIR}
excludes: ["build/", "*.egg-info/"]
env_vars:
  PYTHONUNBUFFERED: "1"
  RAY_DATA_DISABLE_PROGRESS_BARS: "1"  # as in jobs/runtime_env.yaml: bars flood job logs
  RAY_SEBS_AUTOSCALING: "1"  # the cluster grows on demand: don't fail on resources not there yet
"""

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_RAY_BUILTIN_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})

POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": RAY_UID,
    "runAsGroup": RAY_GID,
    "fsGroup": RAY_GID,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": RAY_UID,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}


@dataclass(frozen=True)
class PodSize:
    """Kubernetes resources of one container; requests equal limits (Ray sizes itself from the
    limits, and equal values give the pod the Guaranteed QoS class, the last to be evicted)."""

    cpus: int
    memory_mib: int
    gpus: int = 0

    def resources(self) -> dict[str, dict[str, str]]:
        memory = (f"{self.memory_mib // 1024}Gi" if self.memory_mib % 1024 == 0
                  else f"{self.memory_mib}Mi")
        amounts = {"cpu": str(self.cpus), "memory": memory}
        if self.gpus:
            amounts["nvidia.com/gpu"] = str(self.gpus)
        return {"requests": dict(amounts), "limits": dict(amounts)}

    def describe(self) -> str:
        gpus = f", {self.gpus} GPU" if self.gpus else ""
        return f"{self.cpus} CPU, {self.memory_mib / 1024:g}Gi{gpus}"


@dataclass(frozen=True)
class KubeRayOptions:
    """Everything about the Kubernetes side that the plan does not decide."""

    image: str = DEFAULT_IMAGE
    auth_secret: str = DEFAULT_AUTH_SECRET
    ray_version: str = RAY_VERSION
    head: PodSize = PodSize(cpus=2, memory_mib=8 * 1024)
    """The head runs GCS, the dashboard, the job driver and the Train controller; it takes no
    Ray tasks (``num-cpus: 0``), so training and data tasks land on worker pods."""
    data_cpus_per_worker: int = 2
    """CPUs each worker pod has beyond its Train worker's bundle, for Ray Data's read tasks."""
    memory_mib_per_cpu: int = 4 * 1024
    idle_timeout_s: int = 180
    """Idle worker pods are removed after this long: longer than the gap between two segments'
    worker groups, short enough to hand GPUs back soon after the big stages."""
    network_policy: bool = True
    """KubeRay's ``networkPolicy`` (``DenyAllIngress``). It needs the operator's
    ``RayClusterNetworkPolicy`` feature gate (alpha in KubeRay 1.7); turn off only where that gate
    cannot be enabled, and isolate the namespace another way."""
    autoscaler: PodSize = PodSize(cpus=1, memory_mib=1024)
    submitter: PodSize = PodSize(cpus=1, memory_mib=1024)

    def __post_init__(self) -> None:
        if not self.image or any(char.isspace() for char in self.image):
            raise ConfigError("image", self.image, "is not an image reference",
                              "use e.g. registry.example.com/ray-sebs:0.1.0")
        _require_name("auth_secret", self.auth_secret, 253)
        if isinstance(self.idle_timeout_s, bool) or not isinstance(self.idle_timeout_s, int) \
                or self.idle_timeout_s < 0:
            raise ConfigError("idle_timeout_s", self.idle_timeout_s, "must be an integer >= 0",
                              "use e.g. 180 seconds")


def worker_pod_size(bundle: Mapping[str, float], options: KubeRayOptions | None = None) -> PodSize:
    """The pod that hosts one Train worker reserving ``bundle``.

    Whole CPUs and GPUs: Kubernetes schedules GPUs whole and Ray counts the pod's CPU limit, so a
    fractional bundle is rounded up (one worker per pod keeps ``maxReplicas`` = workers).
    Memory: ``memory_mib_per_cpu`` per CPU, or the bundle's own ``memory`` (bytes) plus the data
    CPUs' share when that is more.
    """
    options = options or KubeRayOptions()
    cpus = max(1, math.ceil(float(bundle.get("CPU", 0)) + options.data_cpus_per_worker))
    gpus = math.ceil(float(bundle.get("GPU", 0)))
    memory_mib = cpus * options.memory_mib_per_cpu
    if bundle.get("memory"):
        memory_mib = max(memory_mib, math.ceil(float(bundle["memory"]) / 2**20)
                         + options.data_cpus_per_worker * options.memory_mib_per_cpu)
    return PodSize(cpus=cpus, memory_mib=memory_mib, gpus=gpus)


def build_cluster_spec(max_workers: int, worker_bundle: Mapping[str, float],
                       options: KubeRayOptions | None = None) -> dict[str, Any]:
    """The RayCluster ``spec``: a CPU head and one autoscaling worker group of 0..``max_workers``
    pods, each sized for one worker reserving ``worker_bundle``.

    ``minReplicas: 0`` and the autoscaler's idle timeout give the GPUs back when no stage needs
    them; ``maxReplicas`` is the peak of the plan (or of a sweep's plans).
    """
    options = options or KubeRayOptions()
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
        raise ConfigError("max_workers", max_workers, "must be an integer >= 1",
                          "size the worker group from the plan's peak workers")
    worker = worker_pod_size(worker_bundle, options)
    group: dict[str, Any] = {
        "groupName": "gpu-workers" if worker.gpus else "cpu-workers",
        "replicas": 0,
        "minReplicas": 0,
        "maxReplicas": max_workers,
        "rayStartParams": {},
        "template": _pod_template(
            _container("ray-worker", options.image, worker), component="worker",
            mount_service_account_token=False,
            tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
            if worker.gpus else None),
    }
    custom = {name: format_number(amount) for name, amount in sorted(worker_bundle.items())
              if name not in _RAY_BUILTIN_RESOURCES}
    if custom:
        # Ray resources that are not Kubernetes resources, e.g. an accelerator-type label.
        group["resources"] = custom
    spec: dict[str, Any] = {
        "rayVersion": options.ray_version,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "version": "v2",
            "idleTimeoutSeconds": options.idle_timeout_s,
            "upscalingMode": "Default",
            "resources": options.autoscaler.resources(),
            "securityContext": dict(CONTAINER_SECURITY_CONTEXT),
        },
        "authOptions": {"mode": "token", "secretName": options.auth_secret},
        "headGroupSpec": {
            "serviceType": "ClusterIP",
            "enableIngress": False,
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            # The autoscaler sidecar KubeRay adds to the head pod needs the API token.
            "template": _pod_template(
                _container("ray-head", options.image, options.head, ports=[
                    {"containerPort": 6379, "name": "gcs-server"},
                    {"containerPort": 8265, "name": "dashboard"},
                    {"containerPort": 10001, "name": "client"},
                ]), component="head", mount_service_account_token=True),
        },
        "workerGroupSpecs": [group],
    }
    if options.network_policy:
        spec["networkPolicy"] = {"mode": "DenyAllIngress"}
    return spec


def build_ray_cluster(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """A standalone RayCluster, for ``ray job submit`` through a port-forward."""
    _require_name("name", name, 63)
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster",
            "metadata": {"name": name, "labels": _labels("cluster")}, "spec": dict(spec)}


def build_ray_job(name: str, entrypoint: str, cluster_spec: Mapping[str, Any], *,
                  component: str = "train", options: KubeRayOptions | None = None,
                  active_deadline_s: int = 24 * 3600,
                  ttl_after_finished_s: int = 600) -> dict[str, Any]:
    """A RayJob that creates its cluster, runs ``entrypoint`` once and deletes the cluster.

    ``shutdownAfterJobFinishes`` with a short TTL: GPUs are not left running after the job (the
    TTL leaves time to read the logs); ``activeDeadlineSeconds`` bounds a job that hangs.
    """
    options = options or KubeRayOptions()
    _require_name("job_name", name, MAX_RAYJOB_NAME_LENGTH)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "labels": _labels(component)},
        "spec": {
            "entrypoint": entrypoint,
            "runtimeEnvYAML": RUNTIME_ENV_YAML,
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": ttl_after_finished_s,
            "activeDeadlineSeconds": active_deadline_s,
            "backoffLimit": 0,
            "submitterPodTemplate": _pod_template(
                _container("ray-job-submitter", options.image, options.submitter),
                component="submitter", mount_service_account_token=False),
            "rayClusterSpec": dict(cluster_spec),
        },
    }


# Flags of `ray-sebs train` that the plan decides; --job-args may not repeat them.
_RUN_FLAGS = ("--storage-path", "--name")


def plan_flags(schedule: ScheduleConfig, cluster: ClusterConfig,
               optimizer: OptimizerConfig | None = None) -> list[str]:
    """The ``ray-sebs plan``/``train`` flags that reproduce ``schedule`` on ``cluster`` (and
    ``optimizer``, when given), every one spelled out (defaults included) so a change of default
    cannot change a submitted job."""
    # The worker bundle always explicit: the pods are sized for it, whatever `train` would default to.
    bundle = replace(cluster, resources_per_worker=cluster.worker_bundle())
    optimizer_flags = to_flags(optimizer, "optimizer") if optimizer is not None else []
    return [*to_flags(schedule, "schedule"), *to_flags(bundle, "cluster"), *optimizer_flags]


def train_entrypoint(plan: ElasticPlan, *, storage_path: str, name: str,
                     extra_args: Sequence[str] = (), optimizer: OptimizerConfig | None = None) -> str:
    """``python jobs/train_sebs.py <the plan's flags> --storage-path ... --name ... <extra>``."""
    flags = plan_flags(plan.schedule.config, plan.cluster, optimizer)
    _check_extra_args(extra_args, flags)
    return shlex.join(["python", TRAIN_SCRIPT, *flags,
                       "--storage-path", check_storage_path(storage_path), "--name", name,
                       *extra_args])


@dataclass(frozen=True)
class Sweep:
    """The growth-ratio sweep of ``ray-sebs tune``: every ratio x schedule kind, ``seeds`` times."""

    ratios: tuple[float, ...] = (1.0, 1.5, 2.0, 4.0)
    kinds: tuple[str, ...] = ("sebs", "ssgd")
    seeds: int = 3

    def plans(self, schedule: ScheduleConfig, dataset_size: int,
              cluster: ClusterConfig) -> list[ElasticPlan]:
        """One plan per configuration (seeds share a plan)."""
        return [build_plan(replace(schedule, kind=kind, growth_ratio=ratio), dataset_size, cluster)
                for ratio in self.ratios for kind in self.kinds]

    def peak_workers(self, schedule: ScheduleConfig, dataset_size: int, cluster: ClusterConfig) -> int:
        """Workers the largest trial needs at once: the worker group's ``maxReplicas``."""
        return max(plan.peak_workers for plan in self.plans(schedule, dataset_size, cluster))

    def flags(self) -> list[str]:
        """``--ratios``, ``--schedules`` and ``--seeds`` of ``ray-sebs tune``."""
        return to_flags(self, "sweep")


def tune_entrypoint(schedule: ScheduleConfig, cluster: ClusterConfig, sweep: Sweep, *,
                    storage_path: str, name: str, extra_args: Sequence[str] = (),
                    optimizer: OptimizerConfig | None = None) -> str:
    """``python jobs/tune_growth.py``: the plan's flags without ``--schedule``/``--ratio`` (the
    sweep sets them), then the sweep's ``--ratios``/``--schedules``/``--seeds``."""
    flags = plan_flags(schedule, cluster, optimizer)
    for swept in ("--schedule", "--ratio"):
        index = flags.index(swept)
        del flags[index:index + 2]
    _check_extra_args(extra_args, [*flags, *sweep.flags()])
    return shlex.join(["python", TUNE_SCRIPT, *flags, *sweep.flags(),
                       "--storage-path", check_storage_path(storage_path), "--name", name,
                       *extra_args])


def default_job_name(plan: ElasticPlan) -> str:
    """A RayJob (and run) name from the plan, e.g. ``sebs-rho2-b256-w8``."""
    config = plan.schedule.config
    ratio = format_number(config.growth_ratio).replace(".", "p")
    return f"{config.kind}-rho{ratio}-b{config.initial_batch_size}-w{plan.peak_workers}"


def ray_job_for_plan(plan: ElasticPlan, *, name: str | None = None,
                     storage_path: str = PLACEHOLDER_STORAGE_PATH, extra_args: Sequence[str] = (),
                     options: KubeRayOptions | None = None, active_deadline_s: int = 24 * 3600,
                     ttl_after_finished_s: int = 600,
                     optimizer: OptimizerConfig | None = None) -> dict[str, Any]:
    """The RayJob that trains ``plan``: worker group 0..``plan.peak_workers`` pods sized from the
    plan's worker bundle, entrypoint with the plan's flags. ``name`` is the RayJob's and the run's
    (the same name resumes an interrupted run); ``extra_args`` are further ``train`` flags such as
    the data (``--data s3://bucket/train.parquet --label-column y``); ``optimizer`` is spelled out
    in the entrypoint when given."""
    options = options or KubeRayOptions()
    name = name or default_job_name(plan)
    entrypoint = train_entrypoint(plan, storage_path=storage_path, name=name, extra_args=extra_args,
                                  optimizer=optimizer)
    spec = build_cluster_spec(plan.peak_workers, plan.cluster.worker_bundle(), options)
    return build_ray_job(name, entrypoint, spec, component="train", options=options,
                         active_deadline_s=active_deadline_s, ttl_after_finished_s=ttl_after_finished_s)


def emit_ray_job(plan: ElasticPlan, path: str | Path, *, image: str | None = None,
                 storage_path: str | None = None, auth_secret: str | None = None,
                 name: str | None = None, job_args: str = "",
                 optimizer: OptimizerConfig | None = None) -> str:
    """Write the RayJob of ``plan`` to ``path`` (``ray-sebs plan --emit-kuberay``) and return what
    to tell the user. ``None`` takes the default; ``job_args`` is shell-quoted ``train`` flags;
    ``optimizer`` (the plan's ``--optimizer`` and its options) is spelled out in the job."""
    options = KubeRayOptions(image=DEFAULT_IMAGE if image is None else image,
                             auth_secret=DEFAULT_AUTH_SECRET if auth_secret is None else auth_secret)
    try:
        extra_args = shlex.split(job_args)
    except ValueError as error:  # unbalanced quotes
        raise ConfigError("job_args", job_args, str(error), "quote it as for a shell") from None
    document = ray_job_for_plan(
        plan, name=name, storage_path=PLACEHOLDER_STORAGE_PATH if storage_path is None else storage_path,
        extra_args=extra_args, options=options, optimizer=optimizer)
    flags = " ".join(plan_flags(plan.schedule.config, plan.cluster, optimizer))
    write_manifest(path, document,
                   f"Written by: ray-sebs plan {flags} --emit-kuberay ...\n"
                   f"(planned on {plan.schedule.dataset_size:,} training rows). Create the token "
                   f"Secret {options.auth_secret} first; see cluster/README.md.\n")
    worker = worker_pod_size(plan.cluster.worker_bundle(), options)
    lines = [f"wrote RayJob {document['metadata']['name']} to {path}: worker group "
             f"0..{plan.peak_workers} pods of {worker.describe()}; create the token Secret "
             f"{options.auth_secret} (key {AUTH_TOKEN_KEY}), then `kubectl apply -f {path}` "
             "(cluster/README.md)"]
    if storage_path is None:
        lines.append(f"note: storage path is the placeholder {PLACEHOLDER_STORAGE_PATH}; "
                     "pass --storage-path with a bucket every pod can reach")
    return "\n".join(lines)


def check_storage_path(storage_path: str) -> str:
    """Every pod must reach the storage: a local path exists in one pod only, and multi-node Ray
    Train needs shared storage (S3, GCS, NFS) for ``RunConfig.storage_path``."""
    scheme, sep, rest = storage_path.partition("://")
    if not sep or not scheme or not rest:
        raise ConfigError("storage_path", storage_path,
                          "is not a URI; on Kubernetes a local path exists in one pod only",
                          "use shared storage every pod reaches, e.g. s3://bucket/sebs_runs or "
                          "gs://bucket/sebs_runs")
    return storage_path


def render_manifest(document: Mapping[str, Any], header: str = "") -> str:
    """YAML for ``kubectl apply``: keys in the order built, multi-line strings as blocks, long
    lines (the entrypoint) kept whole; ``header`` becomes leading comment lines."""
    comment = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    body = yaml.dump(dict(document), Dumper=_ManifestDumper, sort_keys=False, width=10**6,
                     allow_unicode=True)
    return comment + body


def write_manifest(path: str | Path, document: Mapping[str, Any], header: str = "") -> Path:
    path = Path(path)
    path.write_text(render_manifest(document, header))
    return path


# ---------------------------------------------------------------------------------------------
# The checked-in examples (cluster/*.yaml): a realistic GPU run, 1 -> 2 -> 4 -> 8 workers.

EXAMPLE_SCHEDULE = ScheduleConfig(kind="sebs", initial_batch_size=256, growth_ratio=2.0, num_stages=4,
                                  epochs_per_stage=5, learning_rate=0.1)
EXAMPLE_CLUSTER = ClusterConfig(min_workers=1, max_workers=8, max_micro_batch=256, use_gpu=True,
                                resources_per_worker={"CPU": 4, "GPU": 1})
EXAMPLE_DATA_ARGS: tuple[str, ...] = ("--dataset", "synthetic", "--synthetic-rows", "262144")
"""Runs without any data of the user's; replace with ``--data s3://bucket/train.parquet
--label-column label`` to train on a Parquet/CSV dataset."""
EXAMPLE_SIZING_ROWS = 262144
"""Rows the example plans with. A plan's worker counts depend only on its batches and the worker
flags, never on the dataset size, as long as the data holds the largest batch."""
EXAMPLE_SWEEP = Sweep()
EXAMPLE_OPTIMIZER = OptimizerConfig()


@dataclass(frozen=True)
class StaticManifest:
    filename: str
    header: str
    document: dict[str, Any] = field(repr=False)


def static_manifests(options: KubeRayOptions | None = None) -> list[StaticManifest]:
    """The manifests checked in under ``cluster/``, built from the example plan.

    Regenerate after changing this module::

        python -c "from ray_sebs.kuberay import write_static_manifests; write_static_manifests('cluster')"
    """
    options = options or KubeRayOptions()
    plan = build_plan(EXAMPLE_SCHEDULE, EXAMPLE_SIZING_ROWS, EXAMPLE_CLUSTER)
    bundle = EXAMPLE_CLUSTER.worker_bundle()
    flags = " ".join(plan_flags(EXAMPLE_SCHEDULE, EXAMPLE_CLUSTER, EXAMPLE_OPTIMIZER))
    regenerate = ("Generated by ray_sebs.kuberay.write_static_manifests(); a test checks this file "
                  "equals what\nthat builds, so change the code (or emit your own with "
                  "`ray-sebs plan ... --emit-kuberay FILE`).\n")
    cluster_spec = build_cluster_spec(plan.peak_workers, bundle, options)
    train_name = "ray-sebs-train"
    train = build_ray_job(
        train_name,
        train_entrypoint(plan, storage_path=PLACEHOLDER_STORAGE_PATH, name="sebs-gpu-rho2",
                         extra_args=EXAMPLE_DATA_ARGS, optimizer=EXAMPLE_OPTIMIZER),
        cluster_spec, component="train", options=options, active_deadline_s=12 * 3600)
    sweep_peak = EXAMPLE_SWEEP.peak_workers(EXAMPLE_SCHEDULE, EXAMPLE_SIZING_ROWS, EXAMPLE_CLUSTER)
    tune = build_ray_job(
        "ray-sebs-tune",
        tune_entrypoint(EXAMPLE_SCHEDULE, EXAMPLE_CLUSTER, EXAMPLE_SWEEP,
                        storage_path=PLACEHOLDER_STORAGE_PATH, name="sebs-gpu-growth",
                        extra_args=EXAMPLE_DATA_ARGS, optimizer=EXAMPLE_OPTIMIZER),
        build_cluster_spec(sweep_peak, bundle, options), component="tune", options=options,
        active_deadline_s=72 * 3600)
    sizing = (f"Plan: {flags}\n-> {len(plan.segments)} segments of "
              f"{' -> '.join(str(s.workers) for s in plan.segments)} workers; worker group 0.."
              f"{plan.peak_workers} pods of {worker_pod_size(bundle, options).describe()}.\n")
    return [
        StaticManifest("raycluster.yaml",
                       "A standing RayCluster for `ray job submit` through `kubectl port-forward` "
                       "(cluster/README.md).\n" + sizing + regenerate,
                       build_ray_cluster("ray-sebs", cluster_spec)),
        StaticManifest("rayjob-train.yaml",
                       "One SEBS training run: KubeRay creates the cluster, runs the job, deletes "
                       "the cluster.\n" + sizing
                       + f"Replace {PLACEHOLDER_STORAGE_PATH} with your bucket before applying.\n"
                       + regenerate, train),
        StaticManifest("rayjob-tune.yaml",
                       "The growth-ratio sweep (`ray-sebs tune`); the worker group fits its "
                       f"largest trial ({sweep_peak} workers).\n"
                       + f"Replace {PLACEHOLDER_STORAGE_PATH} with your bucket before applying.\n"
                       + regenerate, tune),
    ]


def write_static_manifests(directory: str | Path) -> list[Path]:
    """Write :func:`static_manifests` into ``directory`` (``cluster/``)."""
    return [write_manifest(Path(directory) / manifest.filename, manifest.document, manifest.header)
            for manifest in static_manifests()]


# ---------------------------------------------------------------------------------------------


def _container(name: str, image: str, size: PodSize,
               ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "resources": size.resources(),
        "securityContext": dict(CONTAINER_SECURITY_CONTEXT),
    }
    if ports:
        container["ports"] = ports
    return container


def _pod_template(container: dict[str, Any], *, component: str, mount_service_account_token: bool,
                  tolerations: list[dict[str, str]] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [container],
        # Autoscaler v2 wants pods that are replaced, never restarted in place.
        "restartPolicy": "Never",
        "securityContext": dict(POD_SECURITY_CONTEXT),
    }
    if not mount_service_account_token:
        spec["automountServiceAccountToken"] = False
    if tolerations:
        spec["tolerations"] = tolerations
    return {"metadata": {"labels": _labels(component)}, "spec": spec}


def _labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "ray-sebs", "app.kubernetes.io/component": component}


def _require_name(field_name: str, name: str, max_length: int) -> None:
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > max_length:
        raise ConfigError(field_name, name,
                          f"is not a Kubernetes name of at most {max_length} characters",
                          "use lower-case letters, digits and '-', starting and ending with a "
                          "letter or digit")


def _check_extra_args(extra_args: Sequence[str], planned: Sequence[str]) -> None:
    """Refuse extra flags that would override what the plan (or the job) already sets."""
    taken = {flag for flag in planned if flag.startswith("--")} | set(_RUN_FLAGS)
    for arg in extra_args:
        flag = arg.split("=", 1)[0]
        if flag in taken:
            raise ConfigError("job_args", " ".join(extra_args),
                              f"sets {flag}, which the plan already sets",
                              "pass it to `ray-sebs plan` itself, so plan and job agree")


class _ManifestDumper(yaml.SafeDumper):
    """Block style for multi-line strings (``runtimeEnvYAML``), lists indented as kubectl does."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)

    def ignore_aliases(self, data: Any) -> bool:
        return True  # shared dicts (security contexts) are written out, never as &anchors


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ManifestDumper.add_representer(str, _represent_str)
