"""Ray Tune sweeps that compare growth ratios: SEBS against its SSGD baseline, ratio by ratio.

Why a sweep: the paper's claim is comparative (SEBS is as accurate as SSGD with fewer updates), so
it is checked by running both schedules at several ratios and seeds and reading one table.
``ray-sebs tune`` is that sweep; :func:`run_sweep` is its Python API. The grid is
:mod:`ray_sebs.sweep_space`, the table :mod:`ray_sebs.comparison`.

How it runs on Ray Train V2. ``Tuner(trainer)`` does not accept a V2 trainer, so every trial is a
Tune *function trainable* (:func:`run_trial`): it loads its (seeded) data, builds a
:class:`~ray_sebs.trainer.SEBSTrainer` and runs the stage driver (one ``TorchTrainer.fit()`` per
segment) in the trial's process. ``TuneReportCallback`` in the Train ``RunConfig`` forwards every
report of the loop to Tune, so Tune's progress and schedulers (ASHA) see the epochs. The
comparison does not read Tune's results: it reads each trial's own history (``history.json``),
which holds every epoch exactly once, also for a trial resumed after an interruption.

Trials must not wait on each other's workers:
:func:`~ray_sebs.resources.choose_concurrency` caps ``max_concurrent_trials`` at what the cluster
holds when every running trial is at its peak worker count, with CPUs left over for Ray Data.

Layout of ``<storage-path>/<name>/``: Tune's experiment (state and trial folders), ``sweep.json``
(what the sweep is; a resume with different flags is refused, :mod:`ray_sebs.records`),
``runs/<trial>/`` (each trial's SEBS run: Ray Train checkpoints, ``sebs_run.json``,
``history.json``), and ``comparison.md``, ``comparison.csv``, ``comparison.png``. Running the same
command again resumes the sweep through ``Tuner.restore``: finished trials are kept, unfinished and
errored ones run again, and each of those resumes its SEBS run from its last checkpoint.

Imports neither Ray nor torch at import time.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ray_sebs.autoscale import DEFAULT_LEAD_TIME_S
from ray_sebs.comparison import Comparison, check_target_accuracy, compare
from ray_sebs.comparison_report import write_comparison
from ray_sebs.errors import ConfigError, root_cause_line
from ray_sebs.history import count_noun
from ray_sebs.optim import OptimizerConfig
from ray_sebs.plan import ClusterConfig
from ray_sebs.records import read_record, refuse_other_settings, write_record
from ray_sebs.resources import (
    DEFAULT_CHECKPOINT_EVERY_S,
    TRIAL_DRIVER_CPUS,
    Concurrency,
    choose_concurrency,
)
from ray_sebs.runlock import RunLock
from ray_sebs.schedule import ScheduleConfig
from ray_sebs.storage import read_json, write_bytes
from ray_sebs.sweep_space import SweepSpace, TrialSpec, sweep_plans

if TYPE_CHECKING:
    from ray_sebs.data import DatasetConfig

logger = logging.getLogger(__name__)

HISTORY_FILE = "history.json"
SWEEP_RECORD = "sweep.json"
RUNS_DIR = "runs"


@dataclass(frozen=True)
class SweepSettings:
    """What every trial shares; shipped to the trials with ``tune.with_parameters``."""

    schedule: ScheduleConfig
    """Stages, epochs per stage, batch cap and granularity; each configuration sets the rest."""
    cluster: ClusterConfig
    """Worker bounds, with the per-worker bundle fixed by :func:`choose_concurrency`."""
    dataset: DatasetConfig
    """The data; each trial loads it with its own seed (split, as ``ray-sebs train --seed``)."""
    model: str
    runs_dir: str
    """``<experiment>/runs``: trial ``t``'s SEBS run is ``runs/<t.slug>``."""
    max_failures: int = 1
    """Worker-group failures each trial recovers from (Ray Train's ``FailureConfig``)."""
    checkpoint_every_epochs: int | None = None
    checkpoint_every_s: float | None = DEFAULT_CHECKPOINT_EVERY_S
    """Each trial's checkpoint cadence (:class:`~ray_sebs.trainer.SEBSTrainer`)."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Momentum, weight decay and gradient clipping; each trial sets the name (its
    configuration's optimizer)."""
    precision: str = "fp32"
    """``fp32`` or ``bf16`` (``ray-sebs tune --precision``), for every trial."""
    cache_data: str = "none"
    """Where every trial's ranks keep their data (``ray-sebs tune --cache-data``)."""
    prefetch_lead_time_s: float | None = None
    """Autoscaler prefetch (:mod:`ray_sebs.autoscale`): each trial holds its own next segment's
    extra workers in a placement group of its own, so concurrent trials' requests add up."""


def seeded_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int) -> Any:
    """``build_model`` after seeding torch: seeds of a sweep start from reproducible weights, and
    the configurations of one seed all start from the same ones."""
    import torch

    from ray_sebs.models import build_model

    torch.manual_seed(seed)
    return build_model(name, input_shape, num_classes)


def run_trial(config: dict[str, Any], settings: SweepSettings) -> None:
    """The Tune function trainable: one full elastic SEBS run, every epoch reported to Tune."""
    import functools

    from ray.train import FailureConfig, RunConfig
    from ray.tune.integration.ray_train import TuneReportCallback

    from ray_sebs.data import load_data
    from ray_sebs.trainer import SEBSTrainer

    spec = TrialSpec.from_dict(config["trial"])
    configuration = spec.configuration
    data = load_data(replace(settings.dataset, seed=spec.seed))
    datasets = {"train": data.train}
    if data.validation is not None:
        datasets["validation"] = data.validation
    trainer = SEBSTrainer(
        functools.partial(seeded_model, settings.model, data.input_shape, data.num_classes, spec.seed),
        datasets=datasets, schedule=configuration.schedule(settings.schedule), cluster=settings.cluster,
        optimizer=replace(settings.optimizer, name=configuration.optimizer),
        run_config=RunConfig(name=spec.slug, storage_path=settings.runs_dir,
                             failure_config=FailureConfig(max_failures=settings.max_failures),
                             callbacks=[TuneReportCallback()]),
        seed=spec.seed, prefetch_lead_time_s=settings.prefetch_lead_time_s,
        checkpoint_every_epochs=settings.checkpoint_every_epochs,
        checkpoint_every_s=settings.checkpoint_every_s, precision=settings.precision,
        cache_data=settings.cache_data, lock=False)
    result = trainer.fit()
    write_bytes(f"{result.run_dir}/{HISTORY_FILE}", json.dumps(result.history, indent=1).encode())


def trial_lines(total: int, log: Callable[[str], None]) -> Any:
    """A Tune callback that says one line per trial that ends, with a count: Tune's own status
    table (every few seconds) stays off the console."""
    from ray import tune

    class TrialLines(tune.Callback):
        def __init__(self) -> None:
            self.ended = 0

        def _line(self, trial: Any, outcome: str) -> None:
            self.ended += 1
            log(f"[{self.ended}/{total}] {trial_name(trial)}: {outcome}")

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            result = trial.last_result or {}
            accuracy = result.get("validation_accuracy")
            accuracy_text = f"val acc {accuracy:.4f}, " if isinstance(accuracy, float) else ""
            self._line(trial, f"finished after epoch {result.get('epoch', '?')}, {accuracy_text}"
                              f"{result.get('updates', 0):,} updates")

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self._line(trial, "failed (a rerun with the same --name retries it)")

    return TrialLines()


def trial_name(trial: Any) -> str:
    return str(trial.config["trial"]["slug"])


def trial_dirname(trial: Any) -> str:
    return f"{trial.config['trial']['slug']}_{trial.trial_id}"


@dataclass(frozen=True)
class SweepResult:
    """What :func:`run_sweep` returns."""

    experiment_dir: str
    comparison: Comparison
    histories: dict[str, list[dict[str, Any]]]
    """Trial slug -> its history (empty when the trial never reported)."""
    paths: dict[str, str]
    """``md``, ``csv``, ``png`` -> where the comparison was written."""
    concurrency: Concurrency
    failed: list[str] = field(default_factory=list)
    """Trials that failed or did not run to the end (a rerun with the same name retries them)."""
    stopped: list[str] = field(default_factory=list)
    """Trials ASHA stopped early (not failures)."""
    resumed: bool = False


def sweep_fingerprint(space: SweepSpace, schedule: ScheduleConfig, dataset: DatasetConfig, model: str,
                      dataset_size: int | None = None, *,
                      optimizer: OptimizerConfig | None = None) -> dict[str, Any]:
    """What must not change when a sweep is resumed: Tune cannot change a restored grid.
    ``dataset_size`` ``None`` leaves it out (a check before the data is loaded); so does
    ``optimizer`` ``None`` (its name is swept; its other settings are every trial's)."""
    base = asdict(schedule)
    for swept in ("kind", "growth_ratio", "learning_rate", "initial_batch_size"):
        base.pop(swept)
    data = {key: value for key, value in asdict(dataset).items() if key != "seed"}
    document = {"space": space.to_dict(), "schedule": base, "dataset": data, "model": model}
    if dataset_size is not None:
        document["dataset_size"] = dataset_size
    if optimizer is not None:
        document["optimizer"] = {key: value for key, value in asdict(optimizer).items() if key != "name"}
    # Through JSON, so that it compares equal to the recorded copy (tuples become lists).
    return json.loads(json.dumps(document))


def check_same_sweep(experiment_dir: str, name: str, fingerprint: Mapping[str, Any]) -> bool:
    """Refuse to resume a sweep under ``name`` whose recorded settings differ from
    ``fingerprint`` (only its keys are compared); ``True`` when a sweep is recorded there."""
    recorded = read_record(f"{experiment_dir}/{SWEEP_RECORD}")
    if recorded is None:
        return False
    refuse_other_settings("sweep", name, recorded, fingerprint)
    return True


def run_sweep(
    *,
    space: SweepSpace,
    schedule: ScheduleConfig,
    cluster: ClusterConfig,
    dataset: DatasetConfig,
    dataset_size: int,
    model: str = "mlp",
    optimizer: OptimizerConfig | None = None,
    precision: str = "fp32",
    cache_data: str = "none",
    name: str,
    storage_path: str,
    target_accuracy: float | None = None,
    max_concurrent_trials: int | None = None,
    data_cpus_per_trial: float | None = None,
    max_failures: int = 1,
    checkpoint_every_epochs: int | None = None,
    checkpoint_every_s: float | None = DEFAULT_CHECKPOINT_EVERY_S,
    prefetch_lead_time_s: float | None = DEFAULT_LEAD_TIME_S,
    asha: bool = False,
    asha_grace_epochs: int | None = None,
    log: Callable[[str], None] = print,
) -> SweepResult:
    """Run (or resume) the sweep on the connected Ray cluster and write the comparison.

    ``optimizer`` gives every trial its momentum, weight decay and clipping (default:
    :class:`OptimizerConfig`'s); each trial's configuration names the optimizer. ``precision``
    (``fp32`` or ``bf16``) and ``cache_data`` are every trial's.

    ``dataset_size`` is the training rows of ``dataset`` (the split's size does not depend on
    the seed); every configuration is planned with it before any trial starts. With ``asha``,
    ASHA stops trials whose validation accuracy trails at an epoch milestone (first milestone:
    ``asha_grace_epochs``, default the first stage's epochs); stopped trials appear as unfinished.
    """
    import ray
    from ray import tune

    from ray_sebs.resources import check_cluster_can_start
    from ray_sebs.trainer import absolute_storage_path

    check_sweep_options(target_accuracy=target_accuracy, max_concurrent_trials=max_concurrent_trials,
                        data_cpus_per_trial=data_cpus_per_trial, asha_grace_epochs=asha_grace_epochs)
    plans = sweep_plans(space, schedule, dataset_size, cluster)
    specs = space.trials()
    peak = max(plan.peak_workers for plan in plans.values())
    resources = ray.cluster_resources()
    concurrency = choose_concurrency(resources, cluster, peak, len(specs),
                                     data_cpus_per_trial=data_cpus_per_trial,
                                     max_concurrent_trials=max_concurrent_trials)
    sized = replace(cluster, resources_per_worker=concurrency.worker_bundle)
    for configuration in plans:
        plans[configuration] = replace(plans[configuration], cluster=sized)
        check_cluster_can_start(sized, plans[configuration], resources)
    log(f"concurrency: {concurrency.reason}")
    logger.info("concurrency: %s", concurrency.reason)

    storage = absolute_storage_path(storage_path)
    experiment_dir = f"{storage.rstrip('/')}/{name}"
    # One driver per sweep directory; its trials then need no lock of their own.
    with RunLock(experiment_dir, name=name, what="sweep"):
        optimizer = optimizer or OptimizerConfig()
        fingerprint = sweep_fingerprint(space, schedule, dataset, model, dataset_size,
                                        optimizer=optimizer)
        if not check_same_sweep(experiment_dir, name, fingerprint):
            write_record(f"{experiment_dir}/{SWEEP_RECORD}", fingerprint)

        settings = SweepSettings(
            schedule=schedule, cluster=sized, dataset=dataset, model=model, optimizer=optimizer,
            precision=precision, cache_data=cache_data, runs_dir=f"{experiment_dir}/{RUNS_DIR}",
            max_failures=max_failures,
            checkpoint_every_epochs=checkpoint_every_epochs, checkpoint_every_s=checkpoint_every_s,
            prefetch_lead_time_s=prefetch_lead_time_s)
        trainable = tune.with_resources(tune.with_parameters(run_trial, settings=settings),
                                        {"CPU": TRIAL_DRIVER_CPUS})
        resumed = tune.Tuner.can_restore(experiment_dir)
        if resumed:
            log(f"resuming the sweep in {experiment_dir}: finished trials are kept, the others run")
            tuner = tune.Tuner.restore(experiment_dir, trainable, resume_unfinished=True,
                                       restart_errored=True)
        else:
            scheduler = None
            if asha:
                from ray.tune.schedulers import ASHAScheduler

                first_stage = schedule.epochs_of_stage(1)
                total = sum(schedule.epochs_of_stage(s) for s in range(1, schedule.num_stages + 1))
                # time_attr "epoch" (0-based, global) stays right for a trial that resumes mid-run;
                # max_t past the last epoch so ASHA never stops a trial while it writes its history.
                scheduler = ASHAScheduler(time_attr="epoch", metric="validation_accuracy", mode="max",
                                          max_t=total + 1, grace_period=asha_grace_epochs or first_stage,
                                          reduction_factor=2)
            tuner = tune.Tuner(
                trainable,
                param_space={"trial": tune.grid_search([spec.to_dict() for spec in specs])},
                tune_config=tune.TuneConfig(max_concurrent_trials=concurrency.max_concurrent_trials,
                                            scheduler=scheduler, trial_name_creator=trial_name,
                                            trial_dirname_creator=trial_dirname),
                run_config=tune.RunConfig(name=name, storage_path=storage,
                                          failure_config=tune.FailureConfig(max_failures=1), verbose=0,
                                          callbacks=[trial_lines(len(specs), log)]))
        results = tuner.fit()

        reported: dict[str, list[dict[str, Any]]] = {}
        errors: dict[str, str] = {}
        for result in results:
            slug = result.config["trial"]["slug"] if result.config else None
            if slug is None:
                continue
            if result.error is not None:
                errors[slug] = root_cause_line(result.error)
            frame = result.metrics_dataframe
            if frame is not None and "epoch" in frame:
                records = frame.drop_duplicates("epoch", keep="last").sort_values("epoch")
                reported[slug] = records.to_dict("records")
        histories: dict[str, list[dict[str, Any]]] = {}
        failed, stopped = [], []
        for spec in specs:
            history = read_json(f"{settings.runs_dir}/{spec.slug}/{HISTORY_FILE}")
            if history is None:
                # Not finished: keep what it reported to Tune (the table counts it as unfinished).
                history = reported.get(spec.slug, [])
                if asha and history and spec.slug not in errors:
                    stopped.append(f"{spec.slug}: stopped by ASHA after epoch {history[-1]['epoch']}")
                else:
                    failed.append(f"{spec.slug}: {errors.get(spec.slug, 'did not finish')}")
            histories[spec.slug] = history
        trials = [(spec, histories[spec.slug]) for spec in specs]
        planned = {configuration: plan.schedule.total_epochs for configuration, plan in plans.items()}
        comparison = compare(trials, planned_epochs=planned, target_accuracy=target_accuracy,
                             configurations=space.configurations())
        finished = {row.configuration: [histories[TrialSpec(row.configuration, seed).slug]
                                        for seed in row.seeds]
                    for row in comparison.rows}
        notes = [f"Sweep `{name}`: {len(space.configurations())} configurations x "
                 f"{count_noun(len(space.seeds), 'seed')} ({', '.join(map(str, space.seeds))}), "
                 f"{count_noun(len(specs), 'trial')}; "
                 f"{schedule.num_stages} stages x {_epochs_text(schedule)} epochs, {dataset_size:,} training "
                 f"rows, model {model}.",
                 f"Concurrency: {concurrency.reason}."]
        if failed:
            notes.append(f"Unfinished trials: {'; '.join(failed)}.")
        if stopped:
            notes.append(f"Stopped early: {'; '.join(stopped)}.")
        paths = write_comparison(comparison, finished, experiment_dir, notes=notes)
        return SweepResult(experiment_dir=experiment_dir, comparison=comparison, histories=histories,
                           paths=paths, concurrency=concurrency, failed=failed, stopped=stopped,
                           resumed=resumed)


# Small helpers


def check_sweep_options(*, target_accuracy: float | None = None, max_concurrent_trials: int | None = None,
                        data_cpus_per_trial: float | None = None,
                        asha_grace_epochs: int | None = None) -> None:
    """Refuse bad sweep options before Ray starts (each a :class:`ConfigError` naming the option)."""
    if target_accuracy is not None:
        check_target_accuracy(target_accuracy)
    if max_concurrent_trials is not None and (isinstance(max_concurrent_trials, bool) or not isinstance(
            max_concurrent_trials, int) or max_concurrent_trials < 1):
        raise ConfigError("max_concurrent_trials", max_concurrent_trials, "must be an integer >= 1",
                          "leave it unset to size it from the cluster")
    if data_cpus_per_trial is not None and (
            isinstance(data_cpus_per_trial, bool) or not isinstance(data_cpus_per_trial, int | float)
            or not math.isfinite(data_cpus_per_trial) or data_cpus_per_trial < 0):
        raise ConfigError("data_cpus_per_trial", data_cpus_per_trial, "must be a number >= 0",
                          "use e.g. 1 (CPUs left free for Ray Data's reads per trial)")
    if asha_grace_epochs is not None and (isinstance(asha_grace_epochs, bool) or not isinstance(
            asha_grace_epochs, int) or asha_grace_epochs < 1):
        raise ConfigError("asha_grace_epochs", asha_grace_epochs, "must be an integer >= 1",
                          "use e.g. the first stage's epochs")


def _epochs_text(schedule: ScheduleConfig) -> str:
    epochs = [schedule.epochs_of_stage(s) for s in range(1, schedule.num_stages + 1)]
    return str(epochs[0]) if len(set(epochs)) == 1 else ",".join(map(str, epochs))


