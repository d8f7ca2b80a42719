"""``ray-sebs``: plan, train and tune SEBS runs from the command line.

Every command shares the schedule and worker flags, so a run can be planned (``ray-sebs plan``)
with exactly the flags that will train it. Bad input never produces a traceback: it is one line
that names the flag, the value and the fix, and a non-zero exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from ray_sebs.errors import ConfigError, SEBSError, root_cause_line
from ray_sebs.flags import (
    DATASET_SIZE_FLAG,
    FLAG_OF_FIELD,
    KUBERNETES_FLAGS,
    OPTIMIZER_FLAGS,
    SCHEDULE_FLAGS,
    SWEEP_FLAGS,
    TRAIN_FLAGS,
    WORKER_FLAGS,
    add_flags,
    cluster_config_from_args,
    optimizer_config_from_args,
    schedule_config_from_args,
)
from ray_sebs.interrupt import STOP_SIGNALS, Interruption, run_interruptible, shutdown_ray
from ray_sebs.plan import ElasticPlan, adaptive_plan_range, build_plan
from ray_sebs.preflight import check_before_ray, connect_and_load
from ray_sebs.report import format_table
from ray_sebs.schedule import GROWING_KINDS, LR_SCALING_EXPONENTS, ScheduleConfig, epoch_budget

RAY_AUTO_CONNECT_ENV = "RAY_ENABLE_AUTO_CONNECT"
INTERRUPTED_STATUSES = frozenset(Interruption(signum).exit_code for signum in STOP_SIGNALS)


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def lr_rule(config: ScheduleConfig, optimizer: str | None = None) -> str:
    """The schedule's learning-rate rule in one line, e.g. ``lr rule: sqrt (eta_s = eta_1 *
    (B_s/B_1)^0.5 / rho^(s-1)), optimizer adamw``, with the warm-up when there is one."""
    if config.kind in GROWING_KINDS:
        scaling = config.resolved_lr_scaling
        rule = (f"{scaling} (eta_s = eta_1 * (B_s/B_1)^{LR_SCALING_EXPONENTS[scaling]:g} "
                "/ rho^(s-1))")
    elif config.kind == "ssgd":
        rule = "ssgd (eta_s = eta_1 / rho^(s-1))"
    else:
        rule = "constant (eta_s = eta_1)"
    parts = [f"lr rule: {rule}"]
    if optimizer is not None:
        parts.append(f"optimizer {optimizer}")
    if config.warmup_updates:
        parts.append(f"linear warm-up over {config.warmup_updates:,} updates")
    return ", ".join(parts)


def format_plan(plan: ElasticPlan, baseline: ElasticPlan | None = None, *, compact: bool = False,
                optimizer: str | None = None) -> str:
    """The plan as a table, its totals, and the comparison with the SSGD baseline; ``compact``:
    the table and three lines: the learning-rate rule and the totals (the head of ``ray-sebs
    train``'s console). ``optimizer`` is named in the learning-rate rule's line."""
    header = ("stage", "epochs", "batch", "lr", "workers", "micro x accum", "updates", "samples")
    rows = [
        (str(p.stage.index), str(p.stage.epochs), str(p.stage.global_batch_size),
         f"{p.stage.learning_rate:.6g}", str(p.target_workers), p.decomposition.describe(),
         f"{p.updates:,}", f"{p.samples:,}")
        for p in plan.stages
    ]
    lines = format_table(header, rows).splitlines()
    config = plan.schedule.config
    if compact:
        return "\n".join([
            *lines,
            lr_rule(config, optimizer),
            f"{config.kind}, rho={config.growth_ratio:g}, {plan.schedule.dataset_size:,} training rows, "
            f"{plan.schedule.total_epochs} epochs: {plan.total_updates:,} updates "
            f"({plan.allreduce_rounds:,} all-reduce rounds), {plan.total_samples:,} samples",
            f"peak workers {plan.peak_workers}, segments {len(plan.segments)}, resizes {plan.resizes}"])
    lines += [
        "",
        f"{config.kind}, rho={config.growth_ratio:g}, {plan.schedule.dataset_size:,} training rows, "
        f"{plan.schedule.total_epochs} epochs",
        lr_rule(config, optimizer),
        f"updates: {plan.total_updates:,}  (all-reduce rounds: {plan.allreduce_rounds:,})",
        f"samples: {plan.total_samples:,}",
        f"peak workers: {plan.peak_workers}  segments: {len(plan.segments)}  "
        f"resizes: {plan.resizes}",
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


def format_adaptive_range(earliest: ElasticPlan, latest: ElasticPlan,
                          baseline: ElasticPlan | None = None, *, compact: bool = False,
                          optimizer: str | None = None) -> str:
    """An adaptive schedule's range of plans: the earliest growth in full (every stage after its
    minimum epochs: the most workers, the fewest updates), then the latest (stage 1 for the whole
    budget); where a run falls between them the measured noise scale decides."""
    config = earliest.schedule.config
    head = (f"adaptive: stage s+1 (batch x {config.growth_ratio:g}) begins at the first epoch end "
            f"where B_noise >= {config.noise_threshold:g} x {config.growth_ratio:g} x B_s, after "
            f"at least {config.min_epochs_per_stage} epochs of stage s; budget "
            f"{epoch_budget(config)} epochs, at most {config.num_stages} stages")
    latest_line = (f"latest growth (never grows): stage 1 for {latest.schedule.total_epochs} epochs, "
                   f"{latest.total_updates:,} updates, {latest.total_samples:,} samples, "
                   f"peak workers {latest.peak_workers}")
    range_line = (f"range: {earliest.total_updates:,} to {latest.total_updates:,} updates, "
                  f"peak workers {latest.peak_workers} to {earliest.peak_workers}, "
                  f"0 to {earliest.resizes} resizes")
    return "\n".join([head, "earliest growth (every stage after its minimum epochs):",
                      format_plan(earliest, baseline, compact=compact, optimizer=optimizer),
                      latest_line, range_line])


def default_dataset_size() -> int:
    """Training rows of the default dataset (digits with the default validation split)."""
    from ray_sebs.data import DEFAULT_VALIDATION_FRACTION, DIGITS_ROWS, split_sizes

    return split_sizes(DIGITS_ROWS, DEFAULT_VALIDATION_FRACTION)[0]


def command_plan(args: argparse.Namespace) -> int:
    optimizer = optimizer_config_from_args(args)
    # --lr-scaling not given: the optimizer's law, as `ray-sebs train` will use it.
    schedule_config = schedule_config_from_args(args).for_optimizer(optimizer.name)
    cluster = cluster_config_from_args(args)
    dataset_size = args.dataset_size if args.dataset_size is not None else default_dataset_size()
    latest = None
    if schedule_config.kind == "adaptive":
        # The earliest growth sizes the cluster and the job: its peak is the most a run can need.
        plan, latest = adaptive_plan_range(schedule_config, dataset_size, cluster)
    else:
        plan = build_plan(schedule_config, dataset_size, cluster)
    baseline = (build_plan(schedule_config.baseline(), dataset_size, cluster)
                if schedule_config.kind != "ssgd" else None)
    emitted = ""
    if args.emit_kuberay:  # first, so a bad Kubernetes flag fails before any output
        from ray_sebs.kuberay import emit_ray_job

        # A bad value's ConfigError names the manifest field (image, job_name, ...): main names
        # its flag, as for every other field.
        emitted = emit_ray_job(plan, args.emit_kuberay, image=args.image,
                               storage_path=args.storage_path, auth_secret=args.auth_secret,
                               name=args.job_name, job_args=args.job_args, optimizer=optimizer)
    if args.json:
        document = plan.to_dict()
        if baseline is not None:
            document["baseline"] = {
                "kind": "ssgd", "updates": baseline.total_updates,
                "updates_saved": baseline.total_updates - plan.total_updates,
                "updates_saved_fraction": 1 - plan.total_updates / baseline.total_updates,
            }
        if latest is not None:  # the document's own stages are the earliest growth
            latest_document = latest.to_dict()
            document["latest_growth"] = {"stages": latest_document["stages"],
                                         "totals": latest_document["totals"]}
        text = json.dumps(document, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as handle:
                handle.write(text + "\n")
            print(f"wrote {args.json}")
    if args.json != "-":
        print(format_plan(plan, baseline, optimizer=optimizer.name) if latest is None
              else format_adaptive_range(plan, latest, baseline, optimizer=optimizer.name))
    if emitted:
        print(emitted, file=sys.stderr if args.json == "-" else sys.stdout)
    return 0


def command_train(args: argparse.Namespace) -> int:
    """Validate everything, then train on Ray and write the run's outputs."""
    import ray
    from ray.train import FailureConfig, RunConfig

    from ray_sebs.history import change_totals
    from ray_sebs.models import build_model
    from ray_sebs.report import stage_table, write_history
    from ray_sebs.resources import check_gpus
    from ray_sebs.trainer import SEBSTrainer, default_run_name

    optimizer = optimizer_config_from_args(args)
    schedule_config = schedule_config_from_args(args).for_optimizer(optimizer.name)
    cluster = cluster_config_from_args(args)
    dataset_config = check_before_ray(args)
    # Too little data for one batch: the flag to change is --batch-size (or the data).
    data = connect_and_load(args, dataset_config, schedule_config.initial_batch_size,
                            batch_field="initial_batch_size")
    # Before the plan is printed: the one line is the whole output.
    check_gpus(cluster, ray.cluster_resources())
    datasets = {"train": data.train}
    if data.validation is not None:
        datasets["validation"] = data.validation
    trainer = SEBSTrainer(
        functools.partial(build_model, args.model, data.input_shape, data.num_classes),
        datasets=datasets, schedule=schedule_config, cluster=cluster, optimizer=optimizer,
        run_config=RunConfig(name=args.name, storage_path=args.storage_path,
                             failure_config=FailureConfig(max_failures=args.max_failures)),
        seed=args.seed, checkpoint_every_epochs=args.checkpoint_every,
        checkpoint_every_s=args.checkpoint_every_s, precision=args.precision,
        cache_data=args.cache_data, prefetch_lead_time_s=args.prefetch_lead_time, console=True)
    try:
        plan = trainer.plan()
    except ConfigError as error:  # --dataset-size is plan's flag; here the rows come from the data
        if error.field != "dataset_size":
            raise
        field, value = ("data_path", args.data) if args.data else ("dataset_name", args.dataset)
        raise ConfigError(field, value, f"has {error.value} training rows, "
                          f"{error.problem.removeprefix('is ')}", error.fix) from None
    if args.name is None:  # Ray's RunConfig names an unnamed run itself; ours says what it is
        trainer.run_config = dataclasses.replace(trainer.run_config, name=default_run_name(plan))
        args.name = trainer.run_config.name  # what an interruption tells the user to resume
    if schedule_config.kind == "adaptive":
        print(format_adaptive_range(trainer.widest_plan(), plan, compact=True,
                                    optimizer=optimizer.name), flush=True)
    else:
        print(format_plan(plan, compact=True, optimizer=optimizer.name), flush=True)
    print(flush=True)
    result = trainer.fit()
    paths = write_history(result.history, result.run_dir)
    summary = result.summary
    print()
    print(stage_table(result.history))
    print(f"updates {summary['updates']:,} (planned {summary['planned_updates']:,}), samples "
          f"{summary['samples']:,}, final validation accuracy {summary['final_validation_accuracy']:.4f}")
    for decision in summary.get("stage_decisions", []):
        print(f"stage {decision['stage']} began at epoch {decision['epoch']}: B_noise "
              f"{decision['noise_scale']:.1f} >= {decision['threshold_batch_size']:g} "
              f"(threshold x ratio x batch {decision['batch_size']})")
    print(f"wall time {summary['wall_time_s']:.1f}s, {change_totals(result.history).describe()}, "
          f"worker-seconds {summary['worker_seconds']:.1f}")
    prefix = result.run_dir.rstrip("/") + "/"
    print(f"run directory: {result.run_dir} ("
          + ", ".join(path.removeprefix(prefix) for path in paths.values()) + ")")
    return 0


def command_tune(args: argparse.Namespace) -> int:
    """Validate, sweep growth ratios with Ray Tune, write comparison.{md,csv,png}."""
    import datetime

    import ray

    from ray_sebs.comparison_report import comparison_markdown
    from ray_sebs.resources import check_gpus
    from ray_sebs.sweep import check_same_sweep, check_sweep_options, run_sweep, sweep_fingerprint
    from ray_sebs.sweep_space import SweepSpace, sweep_plans
    from ray_sebs.trainer import absolute_storage_path

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
    dataset_config = check_before_ray(args)
    name = args.name or f"growth-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    args.name = name  # what an interruption tells the user to resume
    # A resume with other settings fails now, before Ray starts (the data size is checked later).
    # Each trial's optimizer is the user's, with the trial's --optimizers name.
    optimizer = optimizer_config_from_args(args)
    check_same_sweep(f"{absolute_storage_path(args.storage_path).rstrip('/')}/{name}", name,
                     sweep_fingerprint(space, base, dataset_config, args.model, optimizer=optimizer))
    data = connect_and_load(args, dataset_config, max(space.batch_sizes))
    check_gpus(cluster, ray.cluster_resources())  # else every trial would fail on it
    plans = sweep_plans(space, base, data.train_rows, cluster)
    print(f"sweep {name}: {len(plans)} configurations x {len(space.seeds)} seeds = "
          f"{len(space.trials())} trials on {data.train_rows:,} training rows", flush=True)
    for configuration, plan in plans.items():
        print(f"  {configuration.label:<12} {configuration.optimizer:<8} lr {configuration.learning_rate:g}  "
              f"B1 {configuration.batch_size:<5} updates {plan.total_updates:>7,}  workers "
              f"{' -> '.join(str(s.workers) for s in plan.segments)}", flush=True)
    result = run_sweep(space=space, schedule=base, cluster=cluster, dataset=dataset_config,
                       dataset_size=data.train_rows, model=args.model, optimizer=optimizer,
                       precision=args.precision, cache_data=args.cache_data, name=name,
                       storage_path=args.storage_path, target_accuracy=args.target_accuracy,
                       max_concurrent_trials=args.max_concurrent_trials,
                       data_cpus_per_trial=args.data_cpus_per_trial, max_failures=args.max_failures,
                       checkpoint_every_epochs=args.checkpoint_every,
                       checkpoint_every_s=args.checkpoint_every_s,
                       prefetch_lead_time_s=args.prefetch_lead_time,
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
    add_flags(plan, [*SCHEDULE_FLAGS, DATASET_SIZE_FLAG, *WORKER_FLAGS, *OPTIMIZER_FLAGS])
    plan.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                      help="write the plan as JSON to FILE (or stdout with no FILE)")
    add_flags(plan, KUBERNETES_FLAGS)
    train = commands.add_parser(
        "train", help="train with SEBS on Ray (the main job)",
        description="Train on Ray with SEBS. With no arguments: a local Ray, the MLP on digits, "
                    "SEBS rho=2 over 4 stages growing from 1 to 2 workers. Writes history.json, "
                    "history.csv, curves.png and TensorBoard scalars to <storage-path>/<name>/.")
    add_flags(train, TRAIN_FLAGS)
    tune = commands.add_parser(
        "tune", help="compare growth ratios with Ray Tune: SEBS against SSGD, over seeds",
        description="Run every growth ratio x schedule (SEBS, SSGD; ratio 1 once, as constant) x "
                    "seed as Ray Tune trials, each a full elastic SEBS run, and write "
                    "comparison.md, comparison.csv and comparison.png to <storage-path>/<name>/. "
                    "The same --name resumes an interrupted sweep.")
    add_flags(tune, [*TRAIN_FLAGS, *SWEEP_FLAGS])
    # --schedule and --ratio come with train's flags; the sweep sets them per trial.
    tune.set_defaults(schedule=None, ratio=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status. SIGINT and SIGTERM stop ``train`` and ``tune`` cleanly
    (:mod:`ray_sebs.interrupt`) with status 130 or 143 and one line that says how to resume."""
    # The CLI always connects explicitly (preflight.connect_ray). Without Ray's auto-init, a Ray
    # call made after an interruption shut Ray down fails instead of starting a new local Ray
    # that outlives the command. Read when Ray is first imported.
    os.environ.setdefault(RAY_AUTO_CONNECT_ENV, "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        outcome = run_interruptible(functools.partial(COMMANDS[args.command], args))
        if isinstance(outcome, Interruption):
            print(f"ray-sebs {args.command}: {interruption_line(outcome, args)}", file=sys.stderr,
                  flush=True)
            return outcome.exit_code
        return outcome
    except ConfigError as error:
        flag = FLAG_OF_FIELD.get(error.field, error.field)
        print(f"ray-sebs {args.command}: error: {error.describe(flag)}", file=sys.stderr)
        return 2
    except Exception as error:
        if not isinstance(error, _failures()):
            raise
        print(f"ray-sebs {args.command}: failed: {root_cause_line(error)}", file=sys.stderr)
        return 1


def interruption_line(interruption: Interruption, args: argparse.Namespace) -> str:
    """What was stopped and how to resume it."""
    what = {"train": "run", "tune": "sweep"}.get(args.command)
    name = getattr(args, "name", None)
    if what is None:
        return f"interrupted by {interruption.name}"
    if name is None:
        return f"interrupted by {interruption.name} before the {what} started; nothing to resume"
    return (f"interrupted by {interruption.name}; to resume the {what}, run the same command with "
            f"--name {name}")


def _failures() -> tuple[type[BaseException], ...]:
    """What ends a run with one line instead of a traceback: ray-sebs's own errors, and Ray
    Train's failed run in every form (``WorkerGroupError`` is a ``TrainingFailedError``). Ray is
    not imported for this: while it is not loaded, no Ray error can have been raised."""
    ray_train = sys.modules.get("ray.train")
    training_failed = getattr(ray_train, "TrainingFailedError", None)
    return (SEBSError,) if training_failed is None else (SEBSError, training_failed)


def run(argv: Sequence[str] | None = None) -> NoReturn:
    """Console-script and job entry point: :func:`main`, then the process ends.

    Ray is shut down first: a local Ray the command started would otherwise keep the interpreter
    waiting at exit (its client retries the gone GCS for 60 s, then the process exits 1). After
    an interruption the process ends with ``os._exit``: a thread of the command may still
    be inside Ray's C++ client, and interpreter shutdown under it can abort the process (status
    134) instead of exiting with the status the signal calls for.
    """
    status = main(argv)
    shutdown_ray()
    if status in INTERRUPTED_STATUSES:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)

