"""KubeRay manifests: schema-valid, consistent with the image, the Ray pin and the plan, secure.

Every ``RayCluster``/``RayJob`` in ``cluster/*.yaml`` and every manifest ``ray-sebs plan
--emit-kuberay`` writes is validated against KubeRay's v1 JSON schemas, found in
``$KUBERAY_SCHEMA_DIR`` or ``<repo>/../shared/kuberay-schema``. The cross-checks read the job's
entrypoint back through the CLI's own parser, so a manifest can only pass if the job it submits
trains a plan that fits its worker group.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from ray_sebs import kuberay
from ray_sebs.cli import build_parser, default_dataset_size, main
from ray_sebs.errors import ConfigError
from ray_sebs.flags import cluster_config_from_args, schedule_config_from_args
from ray_sebs.plan import ClusterConfig, ElasticPlan, build_plan
from ray_sebs.schedule import ScheduleConfig

REPO = Path(__file__).resolve().parents[1]
CLUSTER_DIR = REPO / "cluster"
SCHEMA_DIR = Path(os.environ.get("KUBERAY_SCHEMA_DIR") or REPO.parent / "shared" / "kuberay-schema")
SCHEMA_FILES = {"RayCluster": "raycluster_v1.json", "RayJob": "rayjob_v1.json"}
SIZING_ROWS = 10**7
"""Rows to plan a manifest's entrypoint with: worker counts depend on batches and worker flags
only, and this holds every batch the manifests use."""

# Plans to emit: the CLI default (CPU), GPU plans of different peaks, fractional CPUs, a custom
# resource, per-stage epochs and a capped (hybrid) schedule.
EMIT_CASES: dict[str, list[str]] = {
    "cpu-default": [],
    "gpu-peak-8": ["--batch-size", "256", "--max-workers", "8", "--max-micro-batch", "256",
                   "--use-gpu", "--resources-per-worker", "CPU=4,GPU=1", "--dataset-size", "100000"],
    "gpu-peak-3-capped": ["--batch-size", "64", "--ratio", "1.5", "--stages", "5", "--max-batch-size", "200",
                          "--max-workers", "3", "--max-micro-batch", "64", "--use-gpu",
                          "--epochs-per-stage", "2,2,3,3,4", "--dataset-size", "5000"],
    "cpu-fractional-custom": ["--max-workers", "4", "--max-micro-batch", "8",
                              "--resources-per-worker", "CPU=0.5,accel_x=0.25,memory=3221225472"],
}


# --------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def validators() -> dict[str, Any]:
    jsonschema = pytest.importorskip("jsonschema")
    missing = [name for name in SCHEMA_FILES.values() if not (SCHEMA_DIR / name).is_file()]
    if missing:
        pytest.skip(f"KubeRay v1 JSON schemas not found in {SCHEMA_DIR} (missing {', '.join(missing)}); "
                    "set KUBERAY_SCHEMA_DIR to the folder that holds raycluster_v1.json and rayjob_v1.json")
    return {kind: jsonschema.Draft7Validator(json.loads((SCHEMA_DIR / name).read_text()))
            for kind, name in SCHEMA_FILES.items()}


def assert_valid(validators: Mapping[str, Any], document: Mapping[str, Any]) -> None:
    errors = sorted(validators[document["kind"]].iter_errors(document), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, error.absolute_path))}: {error.message[:300]}"
                                 for error in errors)


def cluster_documents() -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) for every YAML document in cluster/."""
    documents = []
    for path in sorted(CLUSTER_DIR.glob("*.yaml")):
        documents += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def ray_documents() -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name, doc in cluster_documents() if doc.get("kind") in SCHEMA_FILES]


def cluster_spec(document: Mapping[str, Any]) -> dict[str, Any]:
    return document["spec"]["rayClusterSpec"] if document["kind"] == "RayJob" else document["spec"]


def containers(document: Mapping[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Every (pod spec, container) pair of a manifest, wherever its pod templates sit."""
    stack: list[Any] = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("containers"), list):
                for container in node["containers"]:
                    yield node, container
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def subcommands() -> set[str]:
    parser = build_parser()
    return {name for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name in action.choices}


def entrypoint_plans(job: Mapping[str, Any]) -> tuple[str, list[ElasticPlan]]:
    """The script a RayJob runs and the plans its flags train (one per sweep configuration).

    The train flags are parsed by ``build_parser()``'s ``train`` command, so an entrypoint with a
    flag ``ray-sebs train`` does not know fails here, not on the cluster.
    """
    tokens = shlex.split(job["spec"]["entrypoint"])
    assert tokens[0] == "python", tokens
    script, flags = tokens[1], tokens[2:]
    parser = build_parser()
    if script == kuberay.TRAIN_SCRIPT:
        args = parser.parse_args(["train", *flags])
        plan = build_plan(schedule_config_from_args(args).for_optimizer(args.optimizer), SIZING_ROWS,
                          cluster_config_from_args(args))
        return script, [plan]
    assert script == kuberay.TUNE_SCRIPT, script
    if "tune" in subcommands():
        parser.parse_args(["tune", *flags])  # `ray-sebs tune` takes every flag of the job
    sweep = argparse.ArgumentParser(allow_abbrev=False)
    sweep.add_argument("--ratios", required=True)
    sweep.add_argument("--schedules", required=True)
    sweep.add_argument("--seeds", type=int, required=True)
    swept, train_flags = sweep.parse_known_args(flags)
    args = parser.parse_args(["train", *train_flags])
    base = schedule_config_from_args(args)
    plans = kuberay.Sweep(ratios=tuple(float(r) for r in swept.ratios.split(",")),
                          kinds=tuple(swept.schedules.split(",")),
                          seeds=swept.seeds).plans(base, SIZING_ROWS, cluster_config_from_args(args))
    return script, plans


def emit(tmp_path: Path, flags: list[str], *extra: str) -> tuple[int, dict[str, Any], ElasticPlan]:
    """Run ``ray-sebs plan FLAGS --emit-kuberay FILE``; return (exit code, manifest, plan)."""
    path = tmp_path / "rayjob.yaml"
    code = main(["plan", *flags, "--emit-kuberay", str(path), *extra])
    args = build_parser().parse_args(["plan", *flags])
    rows = args.dataset_size or default_dataset_size()
    # As `ray-sebs plan` does: --lr-scaling left out is the optimizer's.
    plan = build_plan(schedule_config_from_args(args).for_optimizer(args.optimizer), rows,
                      cluster_config_from_args(args))
    return code, (yaml.safe_load(path.read_text()) if path.exists() else {}), plan


# --------------------------------------------------------------------------------------------
# cluster/: schema, drift, versions, sizing


def test_cluster_folder_holds_the_cluster_and_both_jobs() -> None:
    found = {(name, doc["kind"]) for name, doc in ray_documents()}
    assert found == {("raycluster.yaml", "RayCluster"), ("rayjob-train.yaml", "RayJob"),
                     ("rayjob-tune.yaml", "RayJob")}


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob-train.yaml", "rayjob-tune.yaml"])
def test_static_manifest_validates_against_the_kuberay_schema(validators: dict[str, Any], name: str) -> None:
    for file_name, document in ray_documents():
        if file_name == name:
            assert_valid(validators, document)


def test_static_manifests_are_what_the_code_builds() -> None:
    """cluster/*.yaml are written by write_static_manifests(); hand edits would drift from the
    one builder, so the files must equal what it builds (comments aside)."""
    for manifest in kuberay.static_manifests():
        on_disk = yaml.safe_load((CLUSTER_DIR / manifest.filename).read_text())
        assert on_disk == manifest.document, (
            f"cluster/{manifest.filename} differs from ray_sebs.kuberay.static_manifests(); regenerate "
            "with write_static_manifests('cluster')")


def test_kustomization_applies_the_training_job() -> None:
    kustomization = yaml.safe_load((CLUSTER_DIR / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    for resource in kustomization["resources"]:
        assert (CLUSTER_DIR / resource).is_file(), resource
    assert kustomization["resources"] == ["rayjob-train.yaml"]
    images = {image["name"] for image in kustomization.get("images", [])}
    for _, document in ray_documents():
        for _, container in containers(document):
            assert container["image"].split(":")[0] in images


def test_ray_version_is_one_everywhere_and_within_the_pyproject_pin() -> None:
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

    dockerfile = (CLUSTER_DIR / "Dockerfile").read_text()
    version = re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.MULTILINE).group(1)
    base = re.search(r"^FROM (\S+)", dockerfile, re.MULTILINE).group(1)
    assert re.fullmatch(r"rayproject/ray:\$\{RAY_VERSION\}(-py3\d+)?-gpu", base), base
    assert f"ray[train,tune,default]=={'${RAY_VERSION}'}" in dockerfile  # pip cannot move Ray
    assert version == kuberay.RAY_VERSION
    versions = {cluster_spec(doc)["rayVersion"] for _, doc in ray_documents()}
    assert versions == {version}
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_pin = next(Requirement(dep) for dep in dependencies if Requirement(dep).name == "ray")
    assert ray_pin.specifier.contains(version), f"Ray {version} is outside pyproject's {ray_pin}"


def test_dockerfile_runs_as_the_manifests_non_root_user() -> None:
    dockerfile = (CLUSTER_DIR / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert users and users[-1] == f"{kuberay.RAY_UID}:{kuberay.RAY_GID}"
    assert f"WORKDIR {kuberay.APP_DIR}" in dockerfile
    assert f"working_dir: {kuberay.APP_DIR}" in kuberay.RUNTIME_ENV_YAML


def test_worker_groups_cover_the_plans_their_jobs_train() -> None:
    documents = dict(ray_documents())
    script, (train_plan,) = entrypoint_plans(documents["rayjob-train.yaml"])
    assert script == "jobs/train_sebs.py"
    assert [segment.workers for segment in train_plan.segments] == [1, 2, 4, 8]
    train_group = cluster_spec(documents["rayjob-train.yaml"])["workerGroupSpecs"][0]
    assert train_group["minReplicas"] == 0
    assert train_group["maxReplicas"] == train_plan.peak_workers
    # The standing cluster is sized for the same run, so `ray job submit` of it fits too.
    assert cluster_spec(documents["raycluster.yaml"])["workerGroupSpecs"][0]["maxReplicas"] \
        == train_plan.peak_workers
    script, tune_plans = entrypoint_plans(documents["rayjob-tune.yaml"])
    assert script == "jobs/tune_growth.py"
    assert len(tune_plans) == 8  # 4 ratios x (sebs, ssgd)
    tune_group = cluster_spec(documents["rayjob-tune.yaml"])["workerGroupSpecs"][0]
    assert tune_group["maxReplicas"] >= max(plan.peak_workers for plan in tune_plans)
    for document in documents.values():
        group = cluster_spec(document)["workerGroupSpecs"][0]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) == train_plan.cluster.worker_bundle()["GPU"] == 1


def test_jobs_write_to_shared_storage_and_clean_up() -> None:
    for _, document in ray_documents():
        if document["kind"] != "RayJob":
            continue
        spec = document["spec"]
        flags = shlex.split(spec["entrypoint"])
        storage = flags[flags.index("--storage-path") + 1]
        assert "://" in storage
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
        assert spec["submissionMode"] == "K8sJobMode"
        assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == kuberay.APP_DIR


# --------------------------------------------------------------------------------------------
# secure by default, for every manifest we ship or emit


def assert_secure(document: Mapping[str, Any]) -> None:
    spec = cluster_spec(document)
    assert spec["authOptions"] == {"mode": "token", "secretName": kuberay.DEFAULT_AUTH_SECRET}
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    assert spec["networkPolicy"]["mode"] in ("DenyAll", "DenyAllIngress")
    assert spec["enableInTreeAutoscaling"] is True
    autoscaler = spec["autoscalerOptions"]
    assert autoscaler["version"] == "v2" and autoscaler["idleTimeoutSeconds"] > 0
    sidecars = [({}, {"name": "autoscaler", **autoscaler})]
    found = list(containers(document))
    assert {c["name"] for _, c in found} >= {"ray-head", "ray-worker"}
    for pod, container in [*found, *sidecars]:
        resources = container["resources"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources[kind]), (container["name"], kind)
        assert resources["requests"] == resources["limits"], container["name"]
        security = container["securityContext"]
        assert security.get("runAsNonRoot", pod.get("securityContext", {}).get("runAsNonRoot")) is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert not security.get("privileged", False)
    for _, container in found:
        resources = container["resources"]
        assert resources["limits"].get("nvidia.com/gpu") == resources["requests"].get("nvidia.com/gpu")


def test_static_manifests_are_secure_by_default() -> None:
    for _, document in cluster_documents():
        assert not (document.get("kind") == "Service"
                    and document["spec"].get("type") in ("LoadBalancer", "NodePort"))
    for _, document in ray_documents():
        assert_secure(document)


# --------------------------------------------------------------------------------------------
# ray-sebs plan --emit-kuberay


@pytest.mark.parametrize("case", sorted(EMIT_CASES))
def test_emitted_rayjob_validates_and_follows_the_plan(validators: dict[str, Any], tmp_path: Path,
                                                       case: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, document, plan = emit(tmp_path, EMIT_CASES[case], "--storage-path", "s3://bucket/runs")
    assert code == 0
    assert "wrote RayJob" in capsys.readouterr().out
    assert_valid(validators, document)
    assert_secure(document)
    group = cluster_spec(document)["workerGroupSpecs"][0]
    assert (group["minReplicas"], group["maxReplicas"]) == (0, plan.peak_workers)
    bundle = plan.cluster.worker_bundle()
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits.get("nvidia.com/gpu", 0)) == math.ceil(bundle.get("GPU", 0))
    assert int(limits["cpu"]) >= bundle["CPU"] + 1  # room for Ray Data beside the Train worker
    # The job trains exactly the planned run: its flags give back the same configs and plan.
    _, (job_plan,) = entrypoint_plans(document)
    assert job_plan.schedule.config == plan.schedule.config
    # Same bounds; the bundle is spelled out (the pods are sized for it, whatever train defaults to).
    assert replace(job_plan.cluster, resources_per_worker=None) \
        == replace(plan.cluster, resources_per_worker=None)
    assert job_plan.cluster.worker_bundle() == bundle
    assert [s.workers for s in job_plan.segments] == [s.workers for s in plan.segments]


def test_emitted_gpu_job_asks_one_gpu_per_worker(tmp_path: Path) -> None:
    code, document, plan = emit(tmp_path, EMIT_CASES["gpu-peak-8"], "--storage-path", "gs://b/r",
                                "--image", "registry.example.com/ml/ray-sebs:1.2", "--job-name", "my-run",
                                "--job-args=--data 's3://b/train data.parquet' --label-column y")
    assert code == 0 and plan.peak_workers == 8
    assert document["metadata"]["name"] == "my-run"
    group = cluster_spec(document)["workerGroupSpecs"][0]
    worker = group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["resources"]["limits"]["cpu"] == "6"
    assert {c["image"] for _, c in containers(document)} == {"registry.example.com/ml/ray-sebs:1.2"}
    tokens = shlex.split(document["spec"]["entrypoint"])
    assert tokens[tokens.index("--data") + 1] == "s3://b/train data.parquet"
    assert tokens[tokens.index("--name") + 1] == "my-run"
    assert tokens[tokens.index("--storage-path") + 1] == "gs://b/r"


def test_emit_defaults_to_a_placeholder_storage_and_says_so(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, document, plan = emit(tmp_path, [])
    assert code == 0
    out = capsys.readouterr().out
    assert kuberay.PLACEHOLDER_STORAGE_PATH in out and "--storage-path" in out
    assert document["metadata"]["name"] == kuberay.default_job_name(plan) == "sebs-rho2-b16-w2"
    assert cluster_spec(document)["workerGroupSpecs"][0]["groupName"] == "cpu-workers"


def test_emit_with_json_on_stdout_keeps_stdout_json(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--json", "-", "--emit-kuberay", str(tmp_path / "job.yaml")]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["totals"]["peak_workers"] == 2
    assert "wrote RayJob" in captured.err


@pytest.mark.parametrize(("extra", "message"), [
    (["--storage-path", "./sebs_runs"], "--storage-path='./sebs_runs': is not a URI"),
    (["--job-args=--batch-size 32"], "--job-args='--batch-size 32': sets --batch-size"),
    (["--job-args=--name other"], "sets --name"),
    (["--job-args=--data 'unclosed"], "--job-args="),
    (["--job-name", "Not_A_Name"], "--job-name='Not_A_Name'"),
    (["--job-name", "x" * 48], "at most 47 characters"),
    (["--auth-secret", "bad secret"], "--auth-secret='bad secret'"),
    (["--image", "has space:1"], "--image='has space:1'"),
])
def test_emit_refuses_what_would_break_on_the_cluster(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      extra: list[str], message: str) -> None:
    path = tmp_path / "job.yaml"
    assert main(["plan", "--emit-kuberay", str(path), *extra]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.out == ""  # refused before the plan is printed
    assert not path.exists()


# --------------------------------------------------------------------------------------------
# the builder's pieces


def test_worker_pod_size_rounds_up_to_whole_cpus_and_gpus() -> None:
    options = kuberay.KubeRayOptions(data_cpus_per_worker=1, memory_mib_per_cpu=2048)
    assert kuberay.worker_pod_size({"CPU": 0.5}, options) == kuberay.PodSize(cpus=2, memory_mib=4096)
    assert kuberay.worker_pod_size({"CPU": 4, "GPU": 0.5}, options) == \
        kuberay.PodSize(cpus=5, memory_mib=10240, gpus=1)
    # A bundle that reserves memory gets it, plus the data CPUs' share.
    assert kuberay.worker_pod_size({"CPU": 1, "memory": 16 * 2**30}, options).memory_mib == 16384 + 2048


def test_plan_flags_spell_out_every_setting() -> None:
    schedule = ScheduleConfig(kind="ssgd", initial_batch_size=24, growth_ratio=1.5, num_stages=3,
                              epochs_per_stage=(1, 2, 3), learning_rate=0.05, max_batch_size=48,
                              batch_granularity=4)
    cluster = ClusterConfig(min_workers=2, max_workers=6, max_micro_batch=12, use_gpu=True,
                            resources_per_worker={"CPU": 2.5, "GPU": 1})
    flags = kuberay.plan_flags(schedule, cluster)
    assert " ".join(flags) == (
        "--schedule ssgd --batch-size 24 --ratio 1.5 --stages 3 --epochs-per-stage 1,2,3 --lr 0.05 "
        "--max-batch-size 48 --batch-granularity 4 --warmup-updates 0 --noise-threshold 1 "
        "--min-epochs-per-stage 1 --min-workers 2 --max-workers 6 "
        "--max-micro-batch 12 --use-gpu --resources-per-worker CPU=2.5,GPU=1")
    args = build_parser().parse_args(["plan", *flags])
    assert schedule_config_from_args(args) == schedule
    assert cluster_config_from_args(args) == cluster


def test_one_builder_for_clusters_and_jobs() -> None:
    plan = build_plan(kuberay.EXAMPLE_SCHEDULE, SIZING_ROWS, kuberay.EXAMPLE_CLUSTER)
    spec = kuberay.build_cluster_spec(plan.peak_workers, plan.cluster.worker_bundle())
    job = kuberay.ray_job_for_plan(plan, storage_path="s3://b/r")
    assert job["spec"]["rayClusterSpec"] == spec
    assert kuberay.build_ray_cluster("c", spec)["spec"] == spec


def test_network_policy_can_be_left_out_where_the_feature_gate_is_off(validators: dict[str, Any]) -> None:
    spec = kuberay.build_cluster_spec(2, {"CPU": 1}, kuberay.KubeRayOptions(network_policy=False))
    assert "networkPolicy" not in spec
    assert_valid(validators, kuberay.build_ray_cluster("c", spec))


def test_bad_inputs_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="max_workers"):
        kuberay.build_cluster_spec(0, {"CPU": 1})
    with pytest.raises(ConfigError, match="storage_path"):
        kuberay.check_storage_path("/mnt/runs")
    assert kuberay.check_storage_path("s3://bucket/runs") == "s3://bucket/runs"


def test_rendered_yaml_has_no_anchors_and_a_block_runtime_env() -> None:
    plan = build_plan(ScheduleConfig(), 1000, ClusterConfig())
    job = kuberay.ray_job_for_plan(plan, storage_path="s3://b/r")
    text = kuberay.render_manifest(job, "line one\nline two")
    assert text.startswith("# line one\n# line two\napiVersion: ray.io/v1\n")
    assert "&id" not in text and "*id" not in text
    assert "runtimeEnvYAML: |\n" in text
