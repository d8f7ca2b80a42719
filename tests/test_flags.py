"""The flag table: configs written as flags parse back to the same configs, the flags KubeRay jobs
carry included, and every flag a parser has comes from the table. Pure: no Ray, no torch."""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import fields, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_sebs import kuberay
from ray_sebs.cli import build_parser
from ray_sebs.data import DATASET_NAMES, DatasetConfig
from ray_sebs.flags import (
    ALL_FLAGS,
    FLAG_OF_FIELD,
    cluster_config_from_args,
    dataset_config_from_args,
    optimizer_config_from_args,
    schedule_config_from_args,
    to_flags,
)
from ray_sebs.optim import OPTIMIZERS, OptimizerConfig
from ray_sebs.plan import ClusterConfig, build_plan
from ray_sebs.schedule import LR_SCALINGS, RUN_DECIDED_FIELDS, SCHEDULE_KINDS, ScheduleConfig

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

numbers = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)


@st.composite
def schedules(draw: st.DrawFn) -> ScheduleConfig:
    granularity = draw(st.integers(1, 8))
    first = granularity * draw(st.integers(1, 64))
    stages = draw(st.integers(1, 6))
    # A one-value tuple is written as that value and read back as an int: the same schedule, but
    # not an equal dataclass, so tuples are drawn for several stages only.
    epochs = draw(st.integers(1, 50) | (st.lists(st.integers(1, 50), min_size=stages, max_size=stages)
                                        .map(tuple) if stages > 1 else st.integers(1, 50)))
    return ScheduleConfig(
        kind=draw(st.sampled_from(SCHEDULE_KINDS)), initial_batch_size=first,
        growth_ratio=draw(st.sampled_from([1, 2]) | st.floats(1, 64, allow_nan=False)),
        num_stages=stages, epochs_per_stage=epochs, learning_rate=draw(numbers),
        max_batch_size=draw(st.none() | st.integers(first, 10**6)), batch_granularity=granularity,
        lr_scaling=draw(st.none() | st.sampled_from(LR_SCALINGS)),
        warmup_updates=draw(st.integers(0, 10**6)),
        noise_threshold=draw(st.sampled_from([0, 1]) | st.floats(0, 1e3, allow_nan=False)),
        min_epochs_per_stage=draw(st.integers(1, 50)))


optimizers = st.builds(
    OptimizerConfig, name=st.sampled_from(OPTIMIZERS),
    momentum=st.sampled_from([0, 0.9]) | st.floats(0, 1, exclude_max=True, allow_nan=False),
    weight_decay=st.sampled_from([0, 1e-4]) | st.floats(0, 1e3, allow_nan=False),
    clip_grad_norm=st.none() | st.sampled_from([1, 0.5]) | numbers)


resource_names = st.sampled_from(["CPU", "GPU", "memory", "accel_x", "TPU-v5"])


@st.composite
def clusters(draw: st.DrawFn) -> ClusterConfig:
    low = draw(st.integers(1, 16))
    bundle = draw(st.none() | st.dictionaries(
        resource_names, st.integers(0, 64) | st.floats(0, 1e12, allow_nan=False), min_size=1))
    # With use_gpu (NCCL) a worker holds whole GPUs; fractions are refused.
    use_gpu = draw(st.booleans()) and (bundle is None or (float(bundle.get("GPU", 1)).is_integer()
                                       and bundle.get("GPU", 1) >= 1))
    return ClusterConfig(min_workers=low, max_workers=draw(st.integers(low, 64)),
                         max_micro_batch=draw(st.integers(1, 4096)), use_gpu=use_gpu,
                         resources_per_worker=bundle)


column = st.text("abcxyz_0123456789", min_size=1, max_size=6)


@st.composite
def datasets(draw: st.DrawFn) -> DatasetConfig:
    path = draw(st.none() | st.sampled_from(["train.parquet", "s3://bucket/data dir/train.csv"]))
    label = draw(column)
    name = draw(st.sampled_from(DATASET_NAMES))
    return DatasetConfig(
        name=name, path=path,
        feature_columns=(draw(st.none() | st.lists(column.filter(lambda c: c != label), min_size=1,
                                                   max_size=4, unique=True).map(tuple))
                         if path else None),
        label_column=label,
        validation_path=draw(st.none() | st.just("valid.csv")) if path else None,
        validation_fraction=draw(st.sampled_from([0, 0.2]) | st.floats(0, 0.99, allow_nan=False)),
        standardize=draw(st.booleans()), num_classes=draw(st.none() | st.integers(10, 1000)),
        synthetic_rows=draw(st.integers(1, 10**6)), seed=draw(st.integers(0, 2**31)),
        synthetic_image_shape=(draw(st.none() | st.tuples(*[st.integers(1, 512)] * 3))
                               if path is None and name == "synthetic" else None))


def parse(command: str, flags: list[str]) -> argparse.Namespace:
    return build_parser().parse_args([command, *flags])


@SETTINGS
@given(schedules(), clusters(), datasets(), optimizers)
def test_configs_written_as_flags_parse_back_to_the_same_configs(schedule, cluster, dataset, optimizer):
    flags = [*to_flags(schedule, "schedule"), *to_flags(cluster, "cluster"),
             *to_flags(dataset, "dataset"), *to_flags(optimizer, "optimizer")]
    args = parse("train", flags)
    assert schedule_config_from_args(args) == schedule
    assert cluster_config_from_args(args) == cluster
    assert dataset_config_from_args(args) == dataset
    assert optimizer_config_from_args(args) == optimizer
    # The same text through a shell: what a job's entrypoint holds.
    assert parse("train", shlex.split(shlex.join(flags))) == args


@SETTINGS
@given(schedules(), clusters(), st.none() | optimizers)
def test_the_flags_a_rayjob_trains_with_reproduce_the_plan(schedule, cluster, optimizer):
    flags = kuberay.plan_flags(schedule, cluster, optimizer)
    for command in ("plan", "train"):
        args = parse(command, flags)
        assert schedule_config_from_args(args) == schedule
        assert optimizer_config_from_args(args) == (optimizer or OptimizerConfig())
        # The job spells the worker bundle out: the pods are sized for it.
        assert cluster_config_from_args(args) == replace(
            cluster, resources_per_worker=cluster.worker_bundle())


@SETTINGS
@given(schedules(), clusters(), optimizers,
       st.builds(kuberay.Sweep,
                 ratios=st.lists(st.sampled_from([1, 1.5, 2]) | st.floats(1, 8, allow_nan=False),
                                 min_size=1, max_size=4).map(tuple),
                 kinds=st.lists(st.sampled_from(SCHEDULE_KINDS), min_size=1, max_size=3).map(tuple),
                 seeds=st.integers(1, 9)))
def test_the_tune_job_entrypoint_parses_back_to_its_sweep(schedule, cluster, optimizer, sweep):
    entrypoint = shlex.split(kuberay.tune_entrypoint(schedule, cluster, sweep, storage_path="s3://b/r",
                                                     name="growth", optimizer=optimizer))
    assert entrypoint[:2] == ["python", kuberay.TUNE_SCRIPT]
    args = parse("tune", entrypoint[2:])
    assert kuberay.Sweep(ratios=args.ratios, kinds=args.schedules, seeds=args.seeds) == sweep
    assert (args.schedule, args.ratio) == (None, None)  # the sweep sets them per trial
    swept = {"kind": schedule.kind, "growth_ratio": schedule.growth_ratio}
    assert schedule_config_from_args(argparse.Namespace(**{
        **vars(args), "schedule": schedule.kind, "ratio": schedule.growth_ratio})) == replace(
        schedule, **swept)
    assert optimizer_config_from_args(args) == optimizer
    assert (args.storage_path, args.name) == ("s3://b/r", "growth")


def test_the_train_job_entrypoint_parses_back_to_its_plan():
    plan = build_plan(kuberay.EXAMPLE_SCHEDULE, kuberay.EXAMPLE_SIZING_ROWS, kuberay.EXAMPLE_CLUSTER)
    entrypoint = shlex.split(kuberay.train_entrypoint(plan, storage_path="s3://b/r", name="run",
                                                      extra_args=kuberay.EXAMPLE_DATA_ARGS))
    args = parse("train", entrypoint[2:])
    assert schedule_config_from_args(args) == kuberay.EXAMPLE_SCHEDULE
    assert cluster_config_from_args(args) == kuberay.EXAMPLE_CLUSTER
    assert dataset_config_from_args(args) == DatasetConfig(name="synthetic", synthetic_rows=262144)


def test_defaults_are_the_configs_defaults_but_five_epochs_a_stage():
    args = parse("train", [])
    assert schedule_config_from_args(args) == ScheduleConfig(epochs_per_stage=5)
    assert cluster_config_from_args(args) == ClusterConfig()
    assert dataset_config_from_args(args) == DatasetConfig()
    assert optimizer_config_from_args(args) == OptimizerConfig()
    assert args.precision == "fp32"


def test_every_config_field_and_every_parser_flag_is_in_the_table(capsys):
    for config, cls in (("schedule", ScheduleConfig), ("cluster", ClusterConfig),
                        ("optimizer", OptimizerConfig)):
        settable = [f.name for f in fields(cls) if f.name not in RUN_DECIDED_FIELDS]
        assert {flag.config_attribute for flag in ALL_FLAGS if flag.config == config} == \
            set(settable)
        for name in settable:
            assert name in FLAG_OF_FIELD, name
    table = {flag.flag for flag in ALL_FLAGS} | {"--help", "--json"}
    for command in ("plan", "train", "tune"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        listed = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", capsys.readouterr().out))
        assert listed and listed <= table, (command, listed - table)


def test_precision_is_a_train_and_tune_flag_only():
    assert parse("train", ["--precision", "bf16"]).precision == "bf16"
    assert parse("tune", ["--precision", "bf16"]).precision == "bf16"
    with pytest.raises(SystemExit):
        parse("train", ["--precision", "fp16"])
    with pytest.raises(SystemExit):
        parse("plan", ["--precision", "bf16"])
