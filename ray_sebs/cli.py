"""``ray-sebs``: plan, train and tune SEBS runs from the command line.

Every command shares the schedule and worker flags, so a run can be planned (``ray-sebs plan``)
with exactly the flags that will train it. Bad input never produces a traceback: it is one line
that names the flag, the value and the fix, and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from ray_sebs.errors import ConfigError
from ray_sebs.plan import ClusterConfig, ElasticPlan, build_plan
from ray_sebs.report import format_table
from ray_sebs.schedule import SCHEDULE_KINDS, ScheduleConfig

# Config fields as the user typed them, so an error names the flag rather than the attribute.
FLAG_OF_FIELD = {
    "kind": "--schedule",
    "initial_batch_size": "--batch-size",
    "growth_ratio": "--ratio",
    "num_stages": "--stages",
    "epochs_per_stage": "--epochs-per-stage",
    "learning_rate": "--lr",
    "max_batch_size": "--max-batch-size",
    "batch_granularity": "--batch-granularity",
    "dataset_size": "--dataset-size",
    "min_workers": "--min-workers",
    "max_workers": "--max-workers",
    "max_micro_batch": "--max-micro-batch",
    "resources_per_worker": "--resources-per-worker",
    "optimizer": "--optimizer",
    "model": "--model",
    "dataset": "--data",
    "dataset_name": "--dataset",
    "data_path": "--data",
    "feature_columns": "--feature-columns",
    "label_column": "--label-column",
    "validation_path": "--validation-data",
    "validation_fraction": "--validation-fraction",
    "num_classes": "--num-classes",
    "storage_path": "--storage-path",
    "address": "--address",
    "name": "--name",
    "seed": "--seed",
    "synthetic_rows": "--synthetic-rows",
    "max_failures": "--max-failures",
    "num_cpus": "--num-cpus",
    # ray-sebs tune
    "ratios": "--ratios",
    "kinds": "--schedules",
    "seeds": "--seeds",
    "optimizers": "--optimizers",
    "learning_rates": "--lrs",
    "batch_sizes": "--batch-sizes",
    "target_accuracy": "--target-accuracy",
    "max_concurrent_trials": "--max-concurrent-trials",
    "data_cpus_per_trial": "--data-cpus-per-trial",
    "asha_grace_epochs": "--asha-grace-epochs",
}

DEFAULTS = ScheduleConfig(epochs_per_stage=5)
DEFAULT_CLUSTER = ClusterConfig()


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _comma_ints(text: str) -> int | tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an integer or a comma list of integers (e.g. 10 or 5,5,10,10)"
        ) from None
    return values[0] if len(values) == 1 else values


def _resources(text: str) -> dict[str, float]:
    resources: dict[str, float] = {}
    for item in filter(None, text.split(",")):
        name, sep, amount = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            resources[name.strip()] = float(amount)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not NAME=AMOUNT[,NAME=AMOUNT] (e.g. CPU=0.5 or CPU=4,GPU=1)"
            ) from None
    return resources


def add_plan_flags(parser: argparse.ArgumentParser, *, with_dataset_size: bool) -> None:
    """The schedule and worker flags that ``plan``, ``train`` and ``tune`` share."""
    schedule = parser.add_argument_group("schedule")
    schedule.add_argument("--schedule", choices=SCHEDULE_KINDS, default=DEFAULTS.kind,
                          help="sebs grows the batch by --ratio per stage; ssgd keeps the batch and "
                               "divides the learning rate by --ratio; constant changes nothing "
                               "(default: %(default)s)")
    schedule.add_argument("--batch-size", type=int, default=DEFAULTS.initial_batch_size,
                          help="global batch of stage 1, summed over workers (default: %(default)s)")
    schedule.add_argument("--ratio", type=float, default=DEFAULTS.growth_ratio,
                          help="growth ratio rho >= 1 (default: %(default)s)")
    schedule.add_argument("--stages", type=int, default=DEFAULTS.num_stages,
                          help="number of stages (default: %(default)s)")
    schedule.add_argument("--epochs-per-stage", type=_comma_ints,
                          default=DEFAULTS.epochs_per_stage,
                          help="epochs per stage: one value, or one per stage as a comma list "
                               "(default: %(default)s)")
    schedule.add_argument("--lr", type=float, default=DEFAULTS.learning_rate,
                          help="learning rate of stage 1 (default: %(default)s)")
    schedule.add_argument("--max-batch-size", type=int, default=None,
                          help="cap on the global batch; SEBS stages past it decay the learning "
                               "rate instead (default: no cap)")
    schedule.add_argument("--batch-granularity", type=int, default=DEFAULTS.batch_granularity,
                          help="round every global batch to a multiple of this, e.g. the worker "
                               "count (default: %(default)s)")
    if with_dataset_size:
        schedule.add_argument("--dataset-size", type=int, default=None,
                              help="training rows (default: the digits training split, "
                                   "the default dataset of `ray-sebs train`)")
    workers = parser.add_argument_group("workers")
    workers.add_argument("--min-workers", type=int, default=DEFAULT_CLUSTER.min_workers,
                         help="fewest workers a stage runs on (default: %(default)s)")
    workers.add_argument("--max-workers", type=int, default=DEFAULT_CLUSTER.max_workers,
                         help="most workers a stage runs on (default: %(default)s)")
    workers.add_argument("--max-micro-batch", type=int, default=DEFAULT_CLUSTER.max_micro_batch,
                         help="largest micro-batch one worker holds; a stage targets "
                              "ceil(batch / this) workers (default: %(default)s)")
    workers.add_argument("--use-gpu", action="store_true",
                         help="one GPU per worker, NCCL (default: CPU workers, gloo)")
    workers.add_argument("--resources-per-worker", type=_resources, default=None,
                         metavar="NAME=AMOUNT,...",
                         help="Ray resources per worker, e.g. CPU=0.5 or CPU=4,GPU=1 (default: "
                              "plan: 1 CPU; train: sized from the cluster so Ray Data keeps CPUs)")


def schedule_config_from_args(args: argparse.Namespace) -> ScheduleConfig:
    return ScheduleConfig(
        kind=args.schedule, initial_batch_size=args.batch_size, growth_ratio=args.ratio,
        num_stages=args.stages, epochs_per_stage=args.epochs_per_stage, learning_rate=args.lr,
        max_batch_size=args.max_batch_size, batch_granularity=args.batch_granularity,
    )


def cluster_config_from_args(args: argparse.Namespace) -> ClusterConfig:
    return ClusterConfig(
        min_workers=args.min_workers, max_workers=args.max_workers,
        max_micro_batch=args.max_micro_batch, use_gpu=args.use_gpu,
        resources_per_worker=args.resources_per_worker,
    )


def format_plan(plan: ElasticPlan, baseline: ElasticPlan | None = None) -> str:
    """The plan as a table, its totals, and the comparison with the SSGD baseline."""
    header = ("stage", "epochs", "batch", "lr", "workers", "micro x accum", "updates", "samples")
    rows = [
        (str(p.stage.index), str(p.stage.epochs), str(p.stage.global_batch_size),
         f"{p.stage.learning_rate:.6g}", str(p.target_workers), p.decomposition.describe(),
         f"{p.updates:,}", f"{p.samples:,}")
        for p in plan.stages
    ]
    lines = format_table(header, rows).splitlines()
    config = plan.schedule.config
    lines += [
        "",
        f"{config.kind}, rho={config.growth_ratio:g}, {plan.schedule.dataset_size:,} training rows, "
        f"{plan.schedule.total_epochs} epochs",
        f"updates: {plan.total_updates:,}  (all-reduce rounds: {plan.allreduce_rounds:,})",
        f"samples: {plan.total_samples:,}",
        f"peak workers: {plan.peak_workers}  segments: {len(plan.segments)}  "
        f"worker-group restarts: {plan.worker_group_restarts}",
    ]
    if baseline is not None and baseline is not plan:
        saved = baseline.total_updates - plan.total_updates
        share = saved / baseline.total_updates if baseline.total_updates else 0.0
        lines.append(
            f"vs ssgd (rho={config.growth_ratio:g}): {baseline.total_updates:,} updates; "
            f"this run saves {saved:,} updates ({share:.1%}), "
            f"{plan.total_updates / baseline.total_updates:.1%} of the baseline's"
        )
    return "\n".join(lines)


def default_dataset_size() -> int:
    """Training rows of the default dataset (digits with the default validation split)."""
    from ray_sebs.data import DEFAULT_VALIDATION_FRACTION, DIGITS_ROWS, split_sizes

    return split_sizes(DIGITS_ROWS, DEFAULT_VALIDATION_FRACTION)[0]


def command_plan(args: argparse.Namespace) -> int:
    schedule_config = schedule_config_from_args(args)
    cluster = cluster_config_from_args(args)
    dataset_size = args.dataset_size if args.dataset_size is not None else default_dataset_size()
    plan = build_plan(schedule_config, dataset_size, cluster)
    baseline = (build_plan(schedule_config.baseline(), dataset_size, cluster)
                if schedule_config.kind != "ssgd" else None)
    emitted = ""
    if args.emit_kuberay:  # first, so a bad Kubernetes flag fails before any output
        from ray_sebs.kuberay import emit_ray_job

        try:
            emitted = emit_ray_job(plan, args.emit_kuberay, image=args.image,
                                   storage_path=args.storage_path, auth_secret=args.auth_secret,
                                   name=args.job_name, job_args=args.job_args)
        except ConfigError as error:  # name the plan flag, not the manifest field
            flag = {"image": "--image", "auth_secret": "--auth-secret", "job_name": "--job-name",
                    "job_args": "--job-args"}.get(error.field, error.field)
            raise ConfigError(flag, error.value, error.problem, error.fix) from None
    if args.json:
        document = plan.to_dict()
        if baseline is not None:
            document["baseline"] = {
                "kind": "ssgd", "updates": baseline.total_updates,
                "updates_saved": baseline.total_updates - plan.total_updates,
                "updates_saved_fraction": 1 - plan.total_updates / baseline.total_updates,
            }
        text = json.dumps(document, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as handle:
                handle.write(text + "\n")
            print(f"wrote {args.json}")
    if args.json != "-":
        print(format_plan(plan, baseline))
    if emitted:
        print(emitted, file=sys.stderr if args.json == "-" else sys.stdout)
    return 0


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    """Data, model, optimizer and run flags that ``train`` and ``tune`` share."""
    from ray_sebs.data import DATASET_NAMES, DEFAULT_VALIDATION_FRACTION
    from ray_sebs.optim import OPTIMIZERS

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASET_NAMES, default="digits",
                      help="built-in dataset when --data is not given (default: %(default)s)")
    data.add_argument("--data", default=None, metavar="PATH",
                      help="a Parquet or CSV file or directory to train on instead")
    data.add_argument("--feature-columns", default=None, metavar="A,B,C",
                      help="feature columns of --data (default: every column but the label)")
    data.add_argument("--label-column", default="label",
                      help="integer class label column of --data (default: %(default)s)")
    data.add_argument("--num-classes", type=int, default=None,
                      help="number of classes (default: largest label + 1)")
    data.add_argument("--validation-data", default=None, metavar="PATH",
                      help="a separate validation file (default: a seeded split of the training data)")
    data.add_argument("--validation-fraction", type=float, default=DEFAULT_VALIDATION_FRACTION,
                      help="share of rows held out for validation without --validation-data "
                           "(default: %(default)s)")
    data.add_argument("--no-standardize", dest="standardize", action="store_false",
                      help="do not standardize features (default: Ray Data's StandardScaler, "
                           "fitted on the training split)")
    data.add_argument("--synthetic-rows", type=int, default=4096,
                      help="rows of --dataset synthetic (default: %(default)s)")
    training = parser.add_argument_group("training")
    # Not argparse choices: the model registry imports torch, and building the parser must not.
    training.add_argument("--model", default="mlp", metavar="logreg|mlp|cnn",
                          help="logreg (convex), mlp or cnn (image-shaped data) (default: %(default)s)")
    training.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                          help="sgd, momentum (0.9), adagrad, adam or adamw (default: %(default)s)")
    training.add_argument("--seed", type=int, default=0, help="seed for data split, init and order")
    training.add_argument("--max-failures", type=int, default=1,
                          help="worker-group failures to recover from, from the last checkpoint; "
                               "-1 for no limit (default: %(default)s)")
    run = parser.add_argument_group("run")
    run.add_argument("--address", default=None,
                     help="Ray cluster to use, e.g. auto or ray://host:10001 (default: start a local "
                          "Ray in-process, or the cluster of a `ray job submit`)")
    run.add_argument("--num-cpus", type=int, default=None,
                     help="CPUs of the local Ray started without --address (default: all)")
    run.add_argument("--storage-path", default="./sebs_runs",
                     help="where runs live; shared storage (s3://, gs://, NFS) on a multi-node "
                          "cluster (default: %(default)s)")
    run.add_argument("--name", default=None,
                     help="run name; the same name resumes an interrupted run "
                          "(default: derived from the config and time)")


def dataset_config_from_args(args: argparse.Namespace) -> Any:
    from ray_sebs.data import DatasetConfig

    return DatasetConfig(
        name=args.dataset, path=args.data,
        feature_columns=tuple(args.feature_columns.split(",")) if args.feature_columns else None,
        label_column=args.label_column, validation_path=args.validation_data,
        validation_fraction=args.validation_fraction, standardize=args.standardize,
        num_classes=args.num_classes, synthetic_rows=args.synthetic_rows, seed=args.seed)


ADDRESS_PROBE_TIMEOUT_S = 5.0
"""How long ``--address`` may take to accept a TCP connection. ``ray.init`` itself keeps retrying
an address where nothing listens for minutes."""


def probe_address(address: str, timeout_s: float = ADDRESS_PROBE_TIMEOUT_S) -> None:
    """Fail fast when nothing listens at a ``host:port`` or ``ray://host:port`` address.

    ``auto``, ``local`` and other forms are left to ``ray.init``, which judges them quickly.
    """
    host, separator, port = address.removeprefix("ray://").rpartition(":")
    if not separator or not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as error:
        raise ConfigError("address", address,
                          f"no Ray cluster answers there ({error.strerror or error or 'timed out'})",
                          "start one with `ray start --head`, or pass its address (HOST:6379, or "
                          "ray://HOST:10001 for Ray Client)") from None


def connect_ray(args: argparse.Namespace) -> None:
    """Join ``--address`` (or the job's cluster), else start a local Ray in this process."""
    import ray

    if ray.is_initialized():
        return
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        probe_address(address)
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise ConfigError("address", address, f"no Ray cluster could be reached ({error})",
                          "start one with `ray start --head` or pass the right --address") from None


def check_storage_path(storage_path: str) -> None:
    """A local storage path must be writable before any resources are requested."""
    if "://" in storage_path:
        return
    path = os.path.abspath(os.path.expanduser(storage_path))
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ConfigError("storage_path", storage_path, f"is not writable ({error.strerror})",
                          "pass a writable directory or a shared URI (s3://, gs://)") from None


def check_storage_shared(storage_path: str, alive_nodes: int) -> None:
    """On a multi-node cluster, workers on other nodes cannot see a local checkpoint directory."""
    if alive_nodes > 1 and "://" not in storage_path:
        raise ConfigError("storage_path", storage_path,
                          f"is a local path but the cluster has {alive_nodes} nodes",
                          "use storage every node reaches: s3://..., gs://..., or file:///path for "
                          "an NFS mount shared by all nodes")


def check_run_flags(args: argparse.Namespace) -> None:
    """Run flags that would otherwise fail late (``--num-cpus 0`` starts a Ray that never runs a
    task) or silently mean something else (Ray reads a negative ``--max-failures`` as no limit)."""
    if args.max_failures < -1:
        raise ConfigError("max_failures", args.max_failures, "must be >= 0, or -1 for no limit",
                          "use e.g. 1 to recover from one worker-group failure")
    if args.num_cpus is not None and args.num_cpus < 1:
        raise ConfigError("num_cpus", args.num_cpus, "must be >= 1",
                          "give the local Ray at least 1 CPU, or leave it unset for all")


def check_data_paths(dataset_config: Any) -> None:
    """Missing, empty or unreadable ``--data``/``--validation-data`` fail before Ray starts (the
    columns and values are checked after, by :func:`ray_sebs.data.load_data`)."""
    from ray_sebs.data_files import resolve_source

    if dataset_config.path is not None:
        resolve_source(dataset_config.path, "data_path", "data")
    if dataset_config.validation_path is not None:
        resolve_source(dataset_config.validation_path, "validation_path", "validation data")


def command_train(args: argparse.Namespace) -> int:
    """Validate everything, then train on Ray and write the run's outputs."""
    import functools

    from ray.train import FailureConfig, RunConfig

    from ray_sebs.data import check_min_rows, load_data
    from ray_sebs.models import build_model, check_model, check_model_name
    from ray_sebs.optim import OptimizerConfig
    from ray_sebs.report import stage_table, write_history
    from ray_sebs.trainer import SEBSTrainer

    schedule_config = schedule_config_from_args(args)
    cluster = cluster_config_from_args(args)
    optimizer = OptimizerConfig(name=args.optimizer)
    check_model_name(args.model)
    check_run_flags(args)
    dataset_config = dataset_config_from_args(args)
    if dataset_config.input_shape is not None:  # a built-in dataset: known without reading it
        check_model(args.model, dataset_config.input_shape)
    check_data_paths(dataset_config)
    check_storage_path(args.storage_path)
    connect_ray(args)
    import ray

    check_storage_shared(args.storage_path, sum(1 for node in ray.nodes() if node["Alive"]))
    data = load_data(dataset_config)
    try:
        check_min_rows(data, schedule_config.initial_batch_size)
    except ConfigError as error:  # the flag to change is --batch-size (or the data)
        raise ConfigError("initial_batch_size", schedule_config.initial_batch_size,
                          f"is more than the {data.train_rows} training rows of the data, so no "
                          "epoch would make an update", error.fix) from None
    check_model(args.model, data.input_shape)
    datasets = {"train": data.train}
    if data.validation is not None:
        datasets["validation"] = data.validation
    trainer = SEBSTrainer(
        functools.partial(build_model, args.model, data.input_shape, data.num_classes),
        datasets=datasets, schedule=schedule_config, cluster=cluster, optimizer=optimizer,
        run_config=RunConfig(name=args.name, storage_path=args.storage_path,
                             failure_config=FailureConfig(max_failures=args.max_failures)),
        seed=args.seed)
    try:
        plan = trainer.plan()
    except ConfigError as error:  # --dataset-size is plan's flag; here the rows come from the data
        if error.field != "dataset_size":
            raise
        field, value = ("data_path", args.data) if args.data else ("dataset_name", args.dataset)
        raise ConfigError(field, value, f"has {error.value} training rows, "
                          f"{error.problem.removeprefix('is ')}", error.fix) from None
    print(format_plan(plan), flush=True)
    print(flush=True)
    result = trainer.fit()
    paths = write_history(result.history, result.run_dir)
    summary = result.summary
    print()
    print(stage_table(result.history))
    print()
    print(f"updates {summary['updates']:,} (planned {summary['planned_updates']:,}), samples "
          f"{summary['samples']:,}, final validation accuracy {summary['final_validation_accuracy']:.4f}")
    print(f"wall time {summary['wall_time_s']:.1f}s, worker-group restarts "
          f"{summary['worker_group_restarts']} costing {summary['restart_time_s']:.1f}s, "
          f"worker-seconds {summary['worker_seconds']:.1f}")
    print(f"run directory: {result.run_dir}")
    for kind, path in paths.items():
        print(f"  {kind}: {path}")
    return 0


def _comma_list(convert: Callable[[str], Any], example: str) -> Callable[[str], tuple[Any, ...]]:
    """An argparse type for a comma list, e.g. ``1,1.5,2,4``; a bad item is a one-line error."""

    def parse(text: str) -> tuple[Any, ...]:
        try:
            values = tuple(convert(part.strip()) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma list like {example}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r} is empty; give a comma list like {example}")
        return values

    return parse


def add_tune_flags(parser: argparse.ArgumentParser) -> None:
    """The sweep's own flags; the schedule, worker and training flags are train's."""
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--ratios", type=_comma_list(float, "1,1.5,2,4"), default=(1.0, 1.5, 2.0, 4.0),
                       metavar="R,R,...",
                       help="growth ratios to compare; ratio 1 runs once, as the constant schedule "
                            "(default: 1,1.5,2,4)")
    sweep.add_argument("--schedules", type=_comma_list(str, "sebs,ssgd"), default=("sebs", "ssgd"),
                       metavar="K,K", help="schedule kinds per ratio: sebs, ssgd, constant "
                                           "(default: sebs,ssgd)")
    sweep.add_argument("--seeds", type=int, default=3,
                       help="seeds per configuration: --seed, --seed+1, ... (default: %(default)s)")
    sweep.add_argument("--optimizers", type=_comma_list(str, "sgd,momentum,adagrad"), default=None,
                       metavar="O,O", help="search over optimizers (default: --optimizer)")
    sweep.add_argument("--lrs", type=_comma_list(float, "0.05,0.1"), default=None, metavar="LR,LR",
                       help="search over first-stage learning rates (default: --lr)")
    sweep.add_argument("--batch-sizes", type=_comma_list(int, "16,32"), default=None, metavar="B,B",
                       help="search over first-stage global batches (default: --batch-size)")
    sweep.add_argument("--target-accuracy", type=float, default=None,
                       help="validation accuracy to reach for the updates/time-to-target columns "
                            "(default: the best SSGD mean final accuracy minus 1 point)")
    sweep.add_argument("--max-concurrent-trials", type=int, default=None,
                       help="trials at once (default: as many as fit the cluster at their peak "
                            "worker count, with --data-cpus-per-trial left free for each)")
    sweep.add_argument("--data-cpus-per-trial", type=float, default=None,
                       help="CPUs no worker takes, per running trial, for Ray Data "
                            "(default: min(1, cluster CPUs / 2))")
    sweep.add_argument("--asha", action="store_true",
                       help="stop trailing trials early with ASHA (stopped trials show as unfinished)")
    sweep.add_argument("--asha-grace-epochs", type=int, default=None,
                       help="first ASHA milestone in epochs (default: the first stage's epochs)")
    # --schedule and --ratio come with the shared flags; the sweep sets them per trial.
    parser.set_defaults(schedule=None, ratio=None)


def command_tune(args: argparse.Namespace) -> int:
    """Validate, sweep growth ratios with Ray Tune, write comparison.{md,csv,png}."""
    import datetime

    from ray_sebs.data import check_min_rows, load_data
    from ray_sebs.models import check_model, check_model_name
    from ray_sebs.trainer import absolute_storage_path
    from ray_sebs.tune import (
        SweepSpace,
        check_same_sweep,
        check_sweep_options,
        comparison_markdown,
        run_sweep,
        sweep_fingerprint,
        sweep_plans,
    )

    for field, flag in (("kind", "--schedules"), ("growth_ratio", "--ratios")):
        value = args.schedule if field == "kind" else args.ratio
        if value is not None:
            raise ConfigError(field, value, "sets one value, but tune sweeps it",
                              f"use {flag} (e.g. {flag} {value})")
    if args.seeds < 1:
        raise ConfigError("seeds", args.seeds, "must be >= 1", "use e.g. --seeds 3")
    check_sweep_options(target_accuracy=args.target_accuracy,
                        max_concurrent_trials=args.max_concurrent_trials,
                        data_cpus_per_trial=args.data_cpus_per_trial,
                        asha_grace_epochs=args.asha_grace_epochs)
    space = SweepSpace(ratios=args.ratios, kinds=args.schedules,
                       seeds=tuple(range(args.seed, args.seed + args.seeds)),
                       optimizers=args.optimizers or (args.optimizer,),
                       learning_rates=args.lrs or (args.lr,),
                       batch_sizes=args.batch_sizes or (args.batch_size,))
    # The base of every configuration; each one sets its own kind, ratio, lr and first batch.
    base = schedule_config_from_args(argparse.Namespace(**{
        **vars(args), "schedule": "sebs", "ratio": 1.0, "lr": space.learning_rates[0],
        "batch_size": space.batch_sizes[0]}))
    cluster = cluster_config_from_args(args)
    check_model_name(args.model)
    dataset_config = dataset_config_from_args(args)
    check_storage_path(args.storage_path)
    name = args.name or f"growth-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    # A resume with other settings fails now, before Ray starts (the data size is checked later).
    check_same_sweep(f"{absolute_storage_path(args.storage_path).rstrip('/')}/{name}", name,
                     sweep_fingerprint(space, base, dataset_config, args.model))
    connect_ray(args)
    import ray

    check_storage_shared(args.storage_path, sum(1 for node in ray.nodes() if node["Alive"]))
    data = load_data(dataset_config)
    check_min_rows(data, max(space.batch_sizes))
    check_model(args.model, data.input_shape)
    plans = sweep_plans(space, base, data.train_rows, cluster)
    print(f"sweep {name}: {len(plans)} configurations x {len(space.seeds)} seeds = "
          f"{len(space.trials())} trials on {data.train_rows:,} training rows", flush=True)
    for configuration, plan in plans.items():
        print(f"  {configuration.label:<12} {configuration.optimizer:<8} lr {configuration.learning_rate:g}  "
              f"B1 {configuration.batch_size:<5} updates {plan.total_updates:>7,}  workers "
              f"{' -> '.join(str(s.workers) for s in plan.segments)}", flush=True)
    result = run_sweep(space=space, schedule=base, cluster=cluster, dataset=dataset_config,
                       dataset_size=data.train_rows, model=args.model, name=name,
                       storage_path=args.storage_path, target_accuracy=args.target_accuracy,
                       max_concurrent_trials=args.max_concurrent_trials,
                       data_cpus_per_trial=args.data_cpus_per_trial, max_failures=args.max_failures,
                       asha=args.asha, asha_grace_epochs=args.asha_grace_epochs)
    print()
    print(comparison_markdown(result.comparison))
    print(f"sweep directory: {result.experiment_dir}")
    for kind, path in result.paths.items():
        print(f"  {kind}: {path}")
    for line in result.stopped:
        print(f"  stopped early: {line}")
    if result.failed:
        print(f"ray-sebs tune: {len(result.failed)} trials did not finish; run the same command (same "
              f"--name {name}) to retry them:", file=sys.stderr)
        for line in result.failed:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "plan": command_plan,
    "train": command_train,
    "tune": command_tune,
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ray-sebs", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    plan = commands.add_parser(
        "plan", help="print the stage plan of a run, before any cluster exists",
        description="Print the stage plan: per stage the global batch, learning rate, workers, "
                    "micro-batch x accumulation, updates and samples; then the totals and the "
                    "updates saved against the SSGD baseline of the same ratio.")
    add_plan_flags(plan, with_dataset_size=True)
    plan.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                      help="write the plan as JSON to FILE (or stdout with no FILE)")
    kuberay = plan.add_argument_group("kubernetes (with --emit-kuberay)")
    kuberay.add_argument("--emit-kuberay", default=None, metavar="FILE",
                         help="write a KubeRay RayJob that trains this plan to FILE: worker group "
                              "0..peak workers, pods sized from the per-worker resources")
    kuberay.add_argument("--image", default=None,
                         help="image of the Ray pods, built from cluster/Dockerfile "
                              "(default: ray-sebs:0.1.0)")
    kuberay.add_argument("--storage-path", default=None, metavar="URI",
                         help="shared storage every pod reaches, e.g. s3://bucket/sebs_runs "
                              "(default: a placeholder to replace)")
    kuberay.add_argument("--auth-secret", default=None, metavar="NAME",
                         help="Secret with the Ray token under key auth_token "
                              "(default: ray-sebs-auth-token)")
    kuberay.add_argument("--job-name", default=None, metavar="NAME",
                         help="RayJob and run name; the same name resumes the run "
                              "(default: from the plan, e.g. sebs-rho2-b16-w2)")
    kuberay.add_argument("--job-args", default="", metavar="'FLAGS'",
                         help="further `ray-sebs train` flags for the job, shell-quoted after '=', "
                              "e.g. --job-args='--data s3://bucket/train.parquet --label-column y'")
    train = commands.add_parser(
        "train", help="train with SEBS on Ray (the main job)",
        description="Train on Ray with SEBS. With no arguments: a local Ray, the MLP on digits, "
                    "SEBS rho=2 over 4 stages growing from 1 to 2 workers. Writes history.json, "
                    "history.csv, curves.png and TensorBoard scalars to <storage-path>/<name>/.")
    add_plan_flags(train, with_dataset_size=False)
    add_training_flags(train)
    tune = commands.add_parser(
        "tune", help="compare growth ratios with Ray Tune: SEBS against SSGD, over seeds",
        description="Run every growth ratio x schedule (SEBS, SSGD; ratio 1 once, as constant) x "
                    "seed as Ray Tune trials, each a full elastic SEBS run, and write "
                    "comparison.md, comparison.csv and comparison.png to <storage-path>/<name>/. "
                    "The same --name resumes an interrupted sweep.")
    add_plan_flags(tune, with_dataset_size=False)
    add_training_flags(tune)
    add_tune_flags(tune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as error:
        flag = FLAG_OF_FIELD.get(error.field, error.field)
        print(f"ray-sebs {args.command}: error: {error.describe(flag)}", file=sys.stderr)
        return 2
    except Exception as error:
        if type(error).__name__ not in ("TrainingFailedError", "NonFiniteLossError"):
            raise
        print(f"ray-sebs {args.command}: failed: {root_cause(error)}", file=sys.stderr)
        return 1


def root_cause(error: BaseException) -> str:
    """The innermost message of a chain of Ray wrappers: what actually went wrong."""
    from ray_sebs.errors import NonFiniteLossError

    seen = error
    while True:
        if isinstance(seen, NonFiniteLossError):
            return str(seen)
        inner = seen.__cause__ or getattr(seen, "cause", None) or seen.__context__
        if inner is None or inner is seen:
            break
        seen = inner
    lines = [line for line in str(seen).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(seen).__name__


def run() -> NoReturn:
    """Console-script entry point."""
    sys.exit(main())

