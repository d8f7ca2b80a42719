"""``ray-sebs``: plan, train and tune SEBS runs from the command line.

Every command shares the schedule and worker flags, so a run can be planned (``ray-sebs plan``)
with exactly the flags that will train it. Bad input never produces a traceback: it is one line
that names the flag, the value and the fix, and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from ray_sebs.errors import ConfigError
from ray_sebs.plan import ClusterConfig, ElasticPlan, build_plan
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
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True))
             for line in (header, *rows)]
    lines.insert(1, "  ".join("-" * width for width in widths))
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
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"plan": command_plan}


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


def run() -> NoReturn:
    """Console-script entry point."""
    sys.exit(main())

