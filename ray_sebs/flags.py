"""The flags of ``ray-sebs`` and the config fields they set, in one table.

Each :class:`Flag` row says which field of which config it sets, how its text is parsed and
written back, its default and its help. From the rows come the argparse arguments
(:func:`add_flags`), the configs read back from the parsed arguments
(:func:`schedule_config_from_args` and its siblings), the flag an error names
(:data:`FLAG_OF_FIELD`), and the flags that reproduce a config (:func:`to_flags`), which the
KubeRay job entrypoints repeat.

Imports neither Ray nor torch: ``ray-sebs plan`` builds its parser from this table.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ray_sebs.autoscale import DEFAULT_LEAD_TIME_S
from ray_sebs.data import CACHE_MODES, DATASET_NAMES, DEFAULT_VALIDATION_FRACTION, DatasetConfig
from ray_sebs.errors import format_number
from ray_sebs.optim import OPTIMIZERS, PRECISIONS, OptimizerConfig
from ray_sebs.plan import ClusterConfig
from ray_sebs.resources import DEFAULT_CHECKPOINT_EVERY_S
from ray_sebs.schedule import LR_SCALINGS, SCHEDULE_KINDS, ScheduleConfig

DEFAULTS = ScheduleConfig(epochs_per_stage=5)
"""The schedule of a command line without schedule flags (5 epochs a stage, not 10)."""
DEFAULT_CLUSTER = ClusterConfig()
DEFAULT_DATASET = DatasetConfig()
DEFAULT_OPTIMIZER = OptimizerConfig()


@dataclass(frozen=True)
class Flag:
    """One command-line flag and the config field it sets."""

    flag: str
    """As typed, e.g. ``--batch-size``."""
    group: str | None
    """Title of the ``--help`` section it is listed in; ``None``: the parser's own options."""
    help: str
    field: str | None = None
    """The field a :class:`~ray_sebs.errors.ConfigError` about this flag's value names."""
    config: str | None = None
    """The config the flag sets: ``schedule``, ``cluster``, ``dataset``, ``optimizer`` (read by
    :func:`schedule_config_from_args` and its siblings) or ``sweep``; ``None``: a command reads
    it."""
    attribute: str | None = None
    """The config's attribute, when it is not :attr:`field`."""
    parse: Callable[[str], Any] | None = None
    """argparse ``type``: text to value; a bad text is one ``ArgumentTypeError`` line."""
    write: Callable[[Any], str] = str
    """Value to text that :attr:`parse` reads back as the same value."""
    default: Any = None
    switch: bool | None = None
    """``True``: the flag alone sets ``True`` (``store_true``); ``False``: it sets ``False``."""
    dest: str | None = None
    choices: Sequence[str] | None = None
    metavar: str | None = None

    @property
    def name(self) -> str:
        """Where argparse puts the value."""
        return self.dest or self.flag.removeprefix("--").replace("-", "_")

    @property
    def config_attribute(self) -> str:
        assert self.field is not None, self.flag
        return self.attribute or self.field


def comma_ints(text: str) -> int | tuple[int, ...]:
    """``10`` or ``5,5,10,10``: one integer, or a tuple of them."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an integer or a comma list of integers (e.g. 10 or 5,5,10,10)"
        ) from None
    return values[0] if len(values) == 1 else values


def resources(text: str) -> dict[str, float]:
    """``CPU=4,GPU=1``: Ray resources by name."""
    amounts: dict[str, float] = {}
    for item in filter(None, text.split(",")):
        name, sep, amount = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            amounts[name.strip()] = float(amount)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not NAME=AMOUNT[,NAME=AMOUNT] (e.g. CPU=0.5 or CPU=4,GPU=1)"
            ) from None
    return amounts


def comma_list(convert: Callable[[str], Any], example: str) -> Callable[[str], tuple[Any, ...]]:
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


def column_names(text: str) -> tuple[str, ...] | None:
    """``a,b,c``: column names in order; an empty text is none."""
    return tuple(text.split(",")) if text else None


def write_comma(value: Any, write: Callable[[Any], str] = str) -> str:
    """The text :func:`comma_ints`, :func:`comma_list` and :func:`column_names` read back."""
    return ",".join(map(write, value)) if isinstance(value, tuple) else write(value)


def write_resources(amounts: Mapping[str, float]) -> str:
    return ",".join(f"{name}={format_number(amount)}" for name, amount in amounts.items())


def write_numbers(values: Iterable[float]) -> str:
    return ",".join(map(format_number, values))


SCHEDULE_FLAGS: tuple[Flag, ...] = (
    Flag("--schedule", "schedule", field="kind", config="schedule", choices=SCHEDULE_KINDS,
         default=DEFAULTS.kind,
         help="sebs grows the batch by --ratio per stage; ssgd keeps the batch and divides the "
              "learning rate by --ratio; constant changes nothing; adaptive grows as sebs when the "
              "measured gradient noise scale says so (see the noise threshold) (default: "
              "%(default)s)"),
    Flag("--batch-size", "schedule", field="initial_batch_size", config="schedule", parse=int,
         default=DEFAULTS.initial_batch_size,
         help="global batch of stage 1, summed over workers (default: %(default)s)"),
    Flag("--ratio", "schedule", field="growth_ratio", config="schedule", parse=float,
         write=format_number, default=DEFAULTS.growth_ratio,
         help="growth ratio rho >= 1 (default: %(default)s)"),
    Flag("--stages", "schedule", field="num_stages", config="schedule", parse=int,
         default=DEFAULTS.num_stages, help="number of stages (default: %(default)s)"),
    Flag("--epochs-per-stage", "schedule", field="epochs_per_stage", config="schedule",
         parse=comma_ints, write=write_comma, default=DEFAULTS.epochs_per_stage,
         help="epochs per stage: one value, or one per stage as a comma list "
              "(default: %(default)s)"),
    Flag("--lr", "schedule", field="learning_rate", config="schedule", parse=float,
         write=format_number, default=DEFAULTS.learning_rate,
         help="learning rate of stage 1 (default: %(default)s)"),
    Flag("--max-batch-size", "schedule", field="max_batch_size", config="schedule", parse=int,
         help="cap on the global batch; SEBS stages past it decay the learning rate instead "
              "(default: no cap)"),
    Flag("--batch-granularity", "schedule", field="batch_granularity", config="schedule",
         parse=int, default=DEFAULTS.batch_granularity,
         help="round every global batch to a multiple of this, e.g. the worker count "
              "(default: %(default)s)"),
    Flag("--lr-scaling", "schedule", field="lr_scaling", config="schedule", choices=LR_SCALINGS,
         help="how SEBS ties the learning rate to the batch: linear keeps lr/batch on SSGD's path, "
              "sqrt makes lr go with sqrt(batch) (default: linear for sgd/momentum/adagrad, sqrt "
              "for adam/adamw)"),
    Flag("--warmup-updates", "schedule", field="warmup_updates", config="schedule", parse=int,
         default=DEFAULTS.warmup_updates,
         help="warm the learning rate up linearly from 0 over the run's first N updates "
              "(default: %(default)s, none)"),
    Flag("--noise-threshold", "schedule", field="noise_threshold", config="schedule", parse=float,
         write=format_number, default=DEFAULTS.noise_threshold,
         help="adaptive: begin the next stage (batch x --ratio) at the first epoch end where the "
              "smoothed gradient noise scale >= this x --ratio x the batch; 0: as soon as the "
              "stage has run its minimum epochs (default: %(default)s)"),
    Flag("--min-epochs-per-stage", "schedule", field="min_epochs_per_stage", config="schedule",
         parse=int, default=DEFAULTS.min_epochs_per_stage,
         help="adaptive: epochs a stage runs before the next may begin; the run's epoch budget "
              "is the sum of the epochs per stage over --stages, which is also the most stages "
              "(default: %(default)s)"),
)

DATASET_SIZE_FLAG = Flag(
    "--dataset-size", "schedule", field="dataset_size", parse=int,
    help="training rows (default: the digits training split, the default dataset of "
         "`ray-sebs train`)")

WORKER_FLAGS: tuple[Flag, ...] = (
    Flag("--min-workers", "workers", field="min_workers", config="cluster", parse=int,
         default=DEFAULT_CLUSTER.min_workers,
         help="fewest workers a stage runs on (default: %(default)s)"),
    Flag("--max-workers", "workers", field="max_workers", config="cluster", parse=int,
         default=DEFAULT_CLUSTER.max_workers,
         help="most workers a stage runs on (default: %(default)s)"),
    Flag("--max-micro-batch", "workers", field="max_micro_batch", config="cluster", parse=int,
         default=DEFAULT_CLUSTER.max_micro_batch,
         help="largest micro-batch one worker holds; a stage targets ceil(batch / this) workers "
              "(default: %(default)s)"),
    Flag("--use-gpu", "workers", field="use_gpu", config="cluster", switch=True,
         help="one GPU per worker, NCCL (default: CPU workers, gloo)"),
    Flag("--resources-per-worker", "workers", field="resources_per_worker", config="cluster",
         parse=resources, write=write_resources, metavar="NAME=AMOUNT,...",
         help="Ray resources per worker, e.g. CPU=0.5 or CPU=4,GPU=1 (default: plan: 1 CPU; "
              "train: sized from the cluster so Ray Data keeps CPUs)"),
)

DATA_FLAGS: tuple[Flag, ...] = (
    Flag("--dataset", "data", field="dataset_name", config="dataset", attribute="name",
         choices=DATASET_NAMES, default=DEFAULT_DATASET.name,
         help="built-in dataset when --data is not given (default: %(default)s)"),
    Flag("--data", "data", field="data_path", config="dataset", attribute="path", metavar="PATH",
         help="a Parquet or CSV file or directory to train on instead"),
    Flag("--feature-columns", "data", field="feature_columns", config="dataset",
         parse=column_names, write=write_comma, metavar="A,B,C",
         help="feature columns of --data (default: every column but the label)"),
    Flag("--label-column", "data", field="label_column", config="dataset",
         default=DEFAULT_DATASET.label_column,
         help="integer class label column of --data (default: %(default)s)"),
    Flag("--num-classes", "data", field="num_classes", config="dataset", parse=int,
         help="number of classes (default: largest label + 1)"),
    Flag("--validation-data", "data", field="validation_path", config="dataset", metavar="PATH",
         help="a separate validation file (default: a seeded split of the training data)"),
    Flag("--validation-fraction", "data", field="validation_fraction", config="dataset",
         parse=float, write=format_number, default=DEFAULT_VALIDATION_FRACTION,
         help="share of rows held out for validation without --validation-data "
              "(default: %(default)s)"),
    Flag("--no-standardize", "data", field="standardize", config="dataset", switch=False,
         dest="standardize",
         help="do not standardize features (default: Ray Data's StandardScaler, fitted on the "
              "training split)"),
    Flag("--synthetic-rows", "data", field="synthetic_rows", config="dataset", parse=int,
         default=DEFAULT_DATASET.synthetic_rows,
         help="rows of --dataset synthetic (default: %(default)s)"),
    Flag("--image-shape", "data", field="synthetic_image_shape", config="dataset",
         parse=comma_ints, write=write_comma, metavar="C,H,W",
         help="make --dataset synthetic images of this shape, e.g. 3,32,32, for --model cnn "
              "(default: flat features)"),
)

OPTIMIZER_FLAGS: tuple[Flag, ...] = (
    Flag("--optimizer", "training", field="optimizer", config="optimizer", attribute="name",
         choices=OPTIMIZERS, default=DEFAULT_OPTIMIZER.name,
         help="sgd, momentum, adagrad, adam or adamw (default: %(default)s)"),
    Flag("--momentum", "training", field="momentum", config="optimizer", parse=float,
         write=format_number, default=DEFAULT_OPTIMIZER.momentum,
         help="momentum of --optimizer momentum (default: %(default)s)"),
    Flag("--weight-decay", "training", field="weight_decay", config="optimizer", parse=float,
         write=format_number, default=DEFAULT_OPTIMIZER.weight_decay,
         help="L2 penalty, decoupled for adamw (default: %(default)s)"),
    Flag("--clip-grad-norm", "training", field="clip_grad_norm", config="optimizer", parse=float,
         write=format_number, metavar="MAX_NORM",
         help="clip each update's gradient (the mean over the global batch, after the all-reduce) "
              "to this global L2 norm (default: no clipping)"),
)
"""The optimizer's flags; ``ray-sebs plan`` takes them too (the optimizer picks --lr-scaling)."""

TRAINING_FLAGS: tuple[Flag, ...] = (
    # Not argparse choices: the model registry imports torch, and building the parser must not.
    Flag("--model", "training", field="model", default="mlp", metavar="logreg|mlp|cnn",
         help="logreg (convex), mlp or cnn (image-shaped data) (default: %(default)s)"),
    *OPTIMIZER_FLAGS,
    Flag("--precision", "training", field="precision", choices=PRECISIONS, default="fp32",
         help="bf16: autocast to bfloat16 on GPU, and on CPU where torch supports it "
              "(default: %(default)s)"),
    Flag("--cache-data", "training", field="cache_data", choices=CACHE_MODES, default="none",
         help="none streams each rank's Ray Data shard every epoch (data of any size); host or "
              "device reads the shard once per worker group into host memory or onto the GPU and "
              "shuffles it by index each epoch, for shards that fit (default: %(default)s)"),
    # The seed of the data split and synthetic data, and of the model's init and the data order.
    Flag("--seed", "training", field="seed", config="dataset", parse=int,
         default=DEFAULT_DATASET.seed, help="seed for data split, init and order"),
    Flag("--max-failures", "training", field="max_failures", parse=int, default=1,
         help="worker-group failures to recover from, from the last checkpoint; -1 for no limit "
              "(default: %(default)s)"),
)

RUN_FLAGS: tuple[Flag, ...] = (
    Flag("--address", "run", field="address",
         help="Ray cluster to use, e.g. auto or ray://host:10001 (default: start a local Ray "
              "in-process, or the cluster of a `ray job submit`)"),
    Flag("--num-cpus", "run", field="num_cpus", parse=int,
         help="CPUs of the local Ray started without --address (default: all)"),
    Flag("--storage-path", "run", field="storage_path", default="./sebs_runs",
         help="where runs live; shared storage (s3://, gs://, NFS) on a multi-node cluster "
              "(default: %(default)s)"),
    Flag("--name", "run", field="name",
         help="run name; the same name resumes an interrupted run (default: derived from the "
              "config and time)"),
    Flag("--checkpoint-every", "run", field="checkpoint_every_epochs", parse=int,
         help="checkpoint after this many epochs (default: by time, --checkpoint-every-s); a "
              "failure retrains at most the epochs since the last checkpoint"),
    Flag("--checkpoint-every-s", "run", field="checkpoint_every_s", parse=float,
         default=DEFAULT_CHECKPOINT_EVERY_S,
         help="checkpoint at the first epoch end this many seconds after the last one; every "
              "segment end is checkpointed too (default: %(default)s)"),
    Flag("--prefetch-lead-time", "run", field="prefetch_lead_time_s", parse=float,
         default=DEFAULT_LEAD_TIME_S, metavar="SECONDS",
         help="with RAY_SEBS_AUTOSCALING=1, hold the next larger stage's extra workers this many "
              "seconds before it starts, so the autoscaler's nodes are up by then: at least a "
              "node's launch and image pull (default: %(default)s)"),
    Flag("--verbose", "run", switch=True,
         help="also print Ray's own output: Ray Data plans and progress, Train controller and "
              "checkpoint messages (default: in Ray's log files only)"),
)

SWEEP_FLAGS: tuple[Flag, ...] = (
    Flag("--ratios", "sweep", field="ratios", config="sweep",
         parse=comma_list(float, "1,1.5,2,4"), write=write_numbers, default=(1.0, 1.5, 2.0, 4.0),
         metavar="R,R,...",
         help="growth ratios to compare; ratio 1 runs once, as the constant schedule "
              "(default: 1,1.5,2,4)"),
    Flag("--schedules", "sweep", field="kinds", config="sweep", parse=comma_list(str, "sebs,ssgd"),
         write=write_comma, default=("sebs", "ssgd"), metavar="K,K",
         help="schedule kinds per ratio: sebs, ssgd, constant, adaptive (default: sebs,ssgd)"),
    Flag("--seeds", "sweep", field="seeds", config="sweep", parse=int, default=3,
         help="seeds per configuration: --seed, --seed+1, ... (default: %(default)s)"),
    Flag("--optimizers", "sweep", field="optimizers",
         parse=comma_list(str, "sgd,momentum,adagrad"), metavar="O,O",
         help="search over optimizers (default: --optimizer)"),
    Flag("--lrs", "sweep", field="learning_rates", parse=comma_list(float, "0.05,0.1"),
         metavar="LR,LR", help="search over first-stage learning rates (default: --lr)"),
    Flag("--batch-sizes", "sweep", field="batch_sizes", parse=comma_list(int, "16,32"),
         metavar="B,B", help="search over first-stage global batches (default: --batch-size)"),
    Flag("--target-accuracy", "sweep", field="target_accuracy", parse=float,
         help="validation accuracy to reach for the updates/time-to-target columns (default: the "
              "best SSGD mean final accuracy minus 1 point)"),
    Flag("--max-concurrent-trials", "sweep", field="max_concurrent_trials", parse=int,
         help="trials at once (default: as many as fit the cluster at their peak worker count, "
              "with --data-cpus-per-trial left free for each)"),
    Flag("--data-cpus-per-trial", "sweep", field="data_cpus_per_trial", parse=float,
         help="CPUs no worker takes, per running trial, for Ray Data "
              "(default: min(1, cluster CPUs / 2))"),
    Flag("--asha", "sweep", switch=True,
         help="stop trailing trials early with ASHA (stopped trials show as unfinished)"),
    Flag("--asha-grace-epochs", "sweep", field="asha_grace_epochs", parse=int,
         help="first ASHA milestone in epochs (default: the first stage's epochs)"),
)

_KUBERNETES = "kubernetes (with --emit-kuberay)"
KUBERNETES_FLAGS: tuple[Flag, ...] = (
    Flag("--emit-kuberay", _KUBERNETES, metavar="FILE",
         help="write a KubeRay RayJob that trains this plan to FILE: worker group 0..peak "
              "workers, pods sized from the per-worker resources"),
    Flag("--image", _KUBERNETES, field="image",
         help="image of the Ray pods, built from cluster/Dockerfile (default: ray-sebs:0.1.0)"),
    Flag("--storage-path", _KUBERNETES, field="storage_path", metavar="URI",
         help="shared storage every pod reaches, e.g. s3://bucket/sebs_runs (default: a "
              "placeholder to replace)"),
    Flag("--auth-secret", _KUBERNETES, field="auth_secret", metavar="NAME",
         help="Secret with the Ray token under key auth_token (default: ray-sebs-auth-token)"),
    Flag("--job-name", _KUBERNETES, field="job_name", metavar="NAME",
         help="RayJob and run name; the same name resumes the run (default: from the plan, "
              "e.g. sebs-rho2-b16-w2)"),
    Flag("--job-args", _KUBERNETES, field="job_args", default="", metavar="'FLAGS'",
         help="further `ray-sebs train` flags for the job, shell-quoted after '=', e.g. "
              "--job-args='--data s3://bucket/train.parquet --label-column y'"),
)

TRAIN_FLAGS: tuple[Flag, ...] = (*SCHEDULE_FLAGS, *WORKER_FLAGS, *DATA_FLAGS, *TRAINING_FLAGS,
                                 *RUN_FLAGS)
"""The flags of ``ray-sebs train``, and of ``ray-sebs tune`` before the sweep's own."""

ALL_FLAGS: tuple[Flag, ...] = (*SCHEDULE_FLAGS, DATASET_SIZE_FLAG, *WORKER_FLAGS, *DATA_FLAGS,
                               *TRAINING_FLAGS, *RUN_FLAGS, *SWEEP_FLAGS, *KUBERNETES_FLAGS)

FLAG_OF_FIELD: dict[str, str] = {
    # check_min_rows names the data itself: the fix is other data (or another batch size).
    "dataset": "--data",
    **{flag.field: flag.flag for flag in ALL_FLAGS if flag.field is not None},
}
"""Config fields as the user typed them, so an error names the flag rather than the attribute."""


def add_flags(parser: argparse.ArgumentParser, flags: Iterable[Flag]) -> None:
    """Add ``flags`` to ``parser``, each in its ``--help`` section, in table order."""
    groups: dict[str | None, Any] = {None: parser}
    for flag in flags:
        if flag.group not in groups:
            groups[flag.group] = parser.add_argument_group(flag.group)
        options: dict[str, Any] = {"help": flag.help}
        if flag.switch is not None:
            options["action"] = "store_true" if flag.switch else "store_false"
        else:
            options.update(default=flag.default, type=flag.parse, choices=flag.choices,
                           metavar=flag.metavar)
        if flag.dest is not None:
            options["dest"] = flag.dest
        groups[flag.group].add_argument(flag.flag, **options)


def config_values(args: argparse.Namespace, config: str) -> dict[str, Any]:
    """The attributes of ``config`` that flags set, as parsed into ``args``."""
    return {flag.config_attribute: getattr(args, flag.name)
            for flag in ALL_FLAGS if flag.config == config}


def schedule_config_from_args(args: argparse.Namespace) -> ScheduleConfig:
    return ScheduleConfig(**config_values(args, "schedule"))


def cluster_config_from_args(args: argparse.Namespace) -> ClusterConfig:
    return ClusterConfig(**config_values(args, "cluster"))


def dataset_config_from_args(args: argparse.Namespace) -> DatasetConfig:
    return DatasetConfig(**config_values(args, "dataset"))


def optimizer_config_from_args(args: argparse.Namespace) -> OptimizerConfig:
    return OptimizerConfig(**config_values(args, "optimizer"))


def to_flags(value: Any, config: str) -> list[str]:
    """The flags that set ``value``'s fields (a ``config`` object) to what they are: every field a
    flag sets, defaults included, so a change of default cannot change what they mean. A field
    that is ``None`` (the flag's "not given") is left out."""
    flags: list[str] = []
    for flag in ALL_FLAGS:
        if flag.config != config:
            continue
        current = getattr(value, flag.config_attribute)
        if flag.switch is not None:
            if current == flag.switch:
                flags.append(flag.flag)
        elif current is not None:
            flags += [flag.flag, flag.write(current)]
    return flags
