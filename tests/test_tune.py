"""Growth-ratio sweeps with Ray Tune (``ray_sebs.sweep``, ``ray_sebs.comparison``, ``ray-sebs tune``).

The comparison maths are pure functions over history lists, tested here against hand-computed
numbers without Ray. One test runs the real thing: ``ray-sebs tune`` in a subprocess on a local
Ray (3 tiny trials), killed after its first trial finished and run again with the same name; the
second run must not recompute that trial, and the comparison it writes must match the trials' own
histories. A subprocess rather than the ``ray_cluster`` fixture, because the driver has to die.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ray_sebs.cli import main
from ray_sebs.comparison import Comparison, compare, mean_std, trial_metrics
from ray_sebs.comparison_report import comparison_csv, comparison_markdown, write_comparison
from ray_sebs.history import change_totals, epoch_clock, first_reaching
from ray_sebs.plan import ClusterConfig
from ray_sebs.resources import choose_concurrency
from ray_sebs.sweep_space import Configuration, SweepSpace, TrialSpec

# ---------------------------------------------------------------------------------------------
# Hand-made histories


def make_history(accuracies: list[float], updates: list[int], world_sizes: list[int], *,
                 epoch_time: float = 2.0, restart_gap: float = 5.0, checkpoint_gap: float = 0.5,
                 batch: int = 10) -> list[dict[str, Any]]:
    """Epoch records as the loop writes them: a new worker group whenever the world size changes
    (``restart_gap`` seconds between the epochs), ``checkpoint_gap`` seconds otherwise."""
    records = []
    ended = 1000.0
    started = 990.0
    segment = 0
    for epoch, (accuracy, total, world) in enumerate(zip(accuracies, updates, world_sizes, strict=True)):
        if epoch:
            restarted = world != world_sizes[epoch - 1]  # a growing stage: a new segment
            ended += restart_gap if restarted else checkpoint_gap
            if restarted:
                started = ended - 1.0
                segment += 1
        ended += epoch_time
        records.append({"epoch": epoch, "stage": epoch + 1, "segment": segment, "world_size": world,
                        "updates": total, "samples": total * batch, "validation_accuracy": accuracy,
                        "epoch_time_s": epoch_time, "ended_at": ended, "segment_started_at": started})
    return records


def test_clock_resizes_and_worker_seconds_by_hand():
    history = make_history([0.5, 0.7, 0.8], [10, 15, 18], [1, 2, 2])
    # epoch 0 ends 2 s after the start; epoch 1 after a 5 s restart and 2 s; epoch 2 after 0.5 + 2.
    assert epoch_clock(history) == [2.0, 9.0, 11.5]
    changes = change_totals(history)
    assert (changes.resizes, changes.recoveries) == (1, 0)
    metrics = trial_metrics(history, target=0.7)
    assert metrics.worker_seconds == 1 * 2 + 2 * 2 + 2 * 2
    assert (metrics.updates, metrics.samples, metrics.final_accuracy) == (18, 180, 0.8)
    assert metrics.wall_time_s == 11.5
    assert (metrics.updates_to_target, metrics.time_to_target_s) == (15, 9.0)
    assert first_reaching(history, 0.81) is None
    assert first_reaching([{**history[0], "validation_accuracy": math.nan}], 0.0) is None
    assert trial_metrics(history, target=0.9).updates_to_target is None


def test_mean_std_is_the_sample_deviation():
    mean, std = mean_std([0.90, 0.92, 0.94])
    assert mean == pytest.approx(0.92)
    assert std == pytest.approx(0.02)  # sqrt((0.02² + 0 + 0.02²) / (3 - 1))
    assert mean_std([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


CONSTANT = Configuration("constant", 1.0)
SSGD2 = Configuration("ssgd", 2.0)
SEBS2 = Configuration("sebs", 2.0)


def sweep_histories() -> list[tuple[TrialSpec, list[dict[str, Any]]]]:
    """Two seeds of constant, SSGD rho=2 and SEBS rho=2, plus a third SEBS seed that stopped after
    two of its three epochs."""
    flat = [1, 1, 1]
    return [
        (TrialSpec(CONSTANT, 0), make_history([0.5, 0.80, 0.90], [10, 20, 30], flat)),
        (TrialSpec(CONSTANT, 1), make_history([0.5, 0.85, 0.92], [10, 20, 30], flat)),
        (TrialSpec(SSGD2, 0), make_history([0.6, 0.90, 0.93], [10, 20, 30], flat)),
        (TrialSpec(SSGD2, 1), make_history([0.6, 0.93, 0.95], [10, 20, 30], flat)),
        (TrialSpec(SEBS2, 0), make_history([0.7, 0.93, 0.94], [10, 15, 18], [1, 2, 2])),
        (TrialSpec(SEBS2, 1), make_history([0.7, 0.94, 0.94], [10, 15, 18], [1, 2, 2])),
        (TrialSpec(SEBS2, 2), make_history([0.7, 0.99], [10, 15], [1, 2])),
    ]


def test_default_target_reach_and_marks_by_hand():
    comparison = compare(sweep_histories(), planned_epochs={CONSTANT: 3, SSGD2: 3, SEBS2: 3})
    rows = {row.configuration: row for row in comparison.rows}
    assert [row.configuration for row in comparison.rows] == [CONSTANT, SSGD2, SEBS2]
    # Best SSGD-family mean final accuracy: SSGD rho=2, (0.93 + 0.95) / 2 = 0.94; minus 1 point.
    (target,) = comparison.targets.values()
    assert target.accuracy == pytest.approx(0.93)
    assert "ssgd ρ=2" in target.source

    constant = rows[CONSTANT]
    assert constant.accuracy == pytest.approx((0.91, math.sqrt(2) * 0.01))
    assert constant.seeds_reaching_target == 0 and not constant.reaches_target

    ssgd = rows[SSGD2]
    # Mean curve 0.6, 0.915, 0.94: the target at the last epoch (30 updates, 2 + 2.5 + 2.5 = 7 s),
    # although seed 1 alone gets there an epoch earlier.
    assert ssgd.updates_to_target == 30 and ssgd.time_to_target_s == pytest.approx(7.0)
    assert ssgd.seeds_reaching_target == 2
    assert ssgd.wall_time_s == pytest.approx((7.0, 0.0))
    assert (ssgd.resizes, ssgd.recoveries) == (0, 0)

    sebs = rows[SEBS2]
    assert sebs.seeds == (0, 1) and sebs.unfinished == (2,)  # the 2-epoch trial is left out
    assert sebs.accuracy == pytest.approx((0.94, 0.0))
    assert (sebs.updates, sebs.samples, sebs.resizes, sebs.recoveries) == (18, 180, 1, 0)
    # Mean curve 0.7, 0.935, 0.94: the target at epoch 1, 15 updates, 2 + 5 + 2 = 9 s.
    assert sebs.updates_to_target == 15 and sebs.time_to_target_s == pytest.approx(9.0)
    assert sebs.worker_seconds == pytest.approx((10.0, 0.0))

    assert [row.configuration for row in comparison.rows if row.fewest_updates] == [SEBS2]
    assert [row.configuration for row in comparison.rows if row.least_time] == [SSGD2]


def test_explicit_target_ties_and_groups():
    momentum = Configuration("sebs", 2.0, optimizer="momentum")
    trials = [*sweep_histories()[:4],
              (TrialSpec(momentum, 0), make_history([0.8, 0.9], [10, 15], [1, 2]))]
    comparison = compare(trials, target_accuracy=0.5)
    rows = {row.configuration: row for row in comparison.rows}
    # Everything reaches 0.5 at its first epoch: constant and SSGD tie on both marks.
    assert rows[CONSTANT].fewest_updates and rows[SSGD2].fewest_updates
    assert rows[CONSTANT].least_time and rows[SSGD2].least_time
    assert rows[momentum].fewest_updates and rows[momentum].least_time  # its own group
    assert {target.source for target in comparison.targets.values()} == {"--target-accuracy"}
    # Without a target, a group with no SSGD run takes its best configuration's accuracy.
    (momentum_target,) = [t for g, t in compare(trials).targets.items() if g[0] == "momentum"]
    assert momentum_target.accuracy == pytest.approx(0.89)
    with pytest.raises(Exception, match="target_accuracy"):
        compare(trials, target_accuracy=1.5)


def test_table_files_have_one_row_per_configuration(tmp_path):
    trials = sweep_histories()
    comparison = compare(trials, planned_epochs={CONSTANT: 3, SSGD2: 3, SEBS2: 3})
    rows = list(csv.DictReader(comparison_csv(comparison).splitlines()))
    assert [row["configuration"] for row in rows] == ["constant", "ssgd ρ=2", "sebs ρ=2"]
    sebs = rows[2]
    assert float(sebs["updates_to_target_mean"]) == 15
    assert sebs["fewest_updates_to_target"] == "True" and sebs["unfinished_seeds"] == "1"
    assert rows[0]["updates_to_target_mean"] == ""  # not reached: no number
    markdown = comparison_markdown(comparison)
    table = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table) == 1 + 3
    assert [cell.strip() for cell in table[3].strip("|").split("|")] == [
        "sebs ρ=2", "2 (+1 unfinished)", "0.9400 ± 0.0000", "18", "180", "11.5 ± 0.0", "10.0", "1",
        "0", "**15** (fewest)", "9.0"]
    assert "**7.0** (least)" in markdown
    assert "not reached (0/2 seeds did)" in markdown
    finished = {c: [h for s, h in trials if s.configuration == c and len(h) == 3]
                for c in (CONSTANT, SSGD2, SEBS2)}
    paths = write_comparison(comparison, finished, str(tmp_path))
    assert sorted(Path(p).name for p in paths.values()) == ["comparison.csv", "comparison.md",
                                                            "comparison.png"]
    assert Path(paths["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# The grid and the concurrency


def test_ratio_one_runs_once_as_constant_and_seeds_come_last():
    space = SweepSpace(ratios=(2, 1, 1.5), kinds=("sebs", "ssgd"), seeds=(0, 1))
    assert [c.label for c in space.configurations()] == [
        "constant", "sebs ρ=1.5", "sebs ρ=2", "ssgd ρ=1.5", "ssgd ρ=2"]
    trials = space.trials()
    assert len(trials) == 10 and [t.seed for t in trials[:5]] == [0] * 5
    assert len({t.slug for t in trials}) == 10
    assert TrialSpec.from_dict(trials[3].to_dict()) == trials[3]
    assert [c.label for c in SweepSpace(ratios=(2,), kinds=("constant", "sebs")).configurations()] == [
        "constant", "sebs ρ=2"]


@pytest.mark.parametrize(
    ("resources", "cluster", "peak", "trials", "expected", "bundle"),
    [
        # 2 CPUs: workers of (2 - 1 - 0.01) / 2 = 0.49 CPU; one trial at a time.
        ({"CPU": 2}, ClusterConfig(), 2, 3, 1, {"CPU": 0.49}),
        # 16 CPUs: 1 CPU per worker; floor(16 / (2 + 1 + 0.01)) = 5.
        ({"CPU": 16}, ClusterConfig(), 2, 12, 5, {"CPU": 1.0}),
        # ...but never more than there are trials.
        ({"CPU": 16}, ClusterConfig(), 2, 3, 3, {"CPU": 1.0}),
        # GPUs bind first: floor(64 / (4 x 4 + 1.01)) = 3 by CPU, floor(8 / 4) = 2 by GPU.
        ({"CPU": 64, "GPU": 8}, ClusterConfig(max_workers=4, use_gpu=True,
                                              resources_per_worker={"CPU": 4, "GPU": 1}), 4, 28, 2,
         {"CPU": 4, "GPU": 1}),
    ],
)
def test_concurrency_fits_every_running_trial_at_its_peak(resources, cluster, peak, trials, expected,
                                                          bundle):
    choice = choose_concurrency(resources, cluster, peak, trials)
    assert choice.max_concurrent_trials == expected
    assert choice.worker_bundle == bundle
    assert choice.max_concurrent_trials * choice.trial_cpus <= resources["CPU"] or expected == 1
    assert f"{peak} workers" in choice.reason


def test_concurrency_override_and_reserve():
    choice = choose_concurrency({"CPU": 16}, ClusterConfig(), 2, 12, max_concurrent_trials=2,
                                data_cpus_per_trial=3)
    assert choice.max_concurrent_trials == 2 and "as asked" in choice.reason
    assert choice.data_cpus_per_trial == 3 and choice.trial_cpus == pytest.approx(2 + 3 + 0.01)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ratio", "2"], "--ratio=2.0: sets one value, but tune sweeps it; use --ratios"),
        (["--schedule", "ssgd"], "--schedule='ssgd': sets one value"),
        (["--ratios", "1,0.5"], "--ratios='1.0,0.5': has 0.5"),
        (["--seeds", "0"], "--seeds=0: must be >= 1"),
        (["--schedules", "sebs,slow"], "--schedules='sebs,slow': names an unknown schedule kind"),
        (["--target-accuracy", "95"], "--target-accuracy=95.0: must be an accuracy between 0 and 1"),
        (["--max-concurrent-trials", "0"], "--max-concurrent-trials=0: must be an integer >= 1"),
        (["--data-cpus-per-trial", "-1"], "--data-cpus-per-trial=-1.0: must be a number >= 0"),
        (["--batch-sizes", "16,0"], "--batch-sizes='16,0': must be integers >= 1"),
    ],
)
def test_bad_flags_are_one_line_errors_before_ray_starts(capsys, argv, message):
    assert main(["tune", *argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith("ray-sebs tune: error: ") and message in error
    assert len(error.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# The real sweep, interrupted and resumed

REPO = Path(__file__).resolve().parents[1]
SWEEP_FLAGS = ["--dataset", "synthetic", "--synthetic-rows", "256", "--model", "logreg",
               "--ratios", "1,2", "--schedules", "sebs,ssgd", "--seeds", "1", "--stages", "2",
               "--epochs-per-stage", "1", "--batch-size", "16", "--max-micro-batch", "16",
               "--lr", "0.2", "--num-cpus", "2", "--name", "growth"]
SLUGS = ["constant-rho1-sgd-lr0.2-b16-seed0", "sebs-rho2-sgd-lr0.2-b16-seed0",
         "ssgd-rho2-sgd-lr0.2-b16-seed0"]


def start_sweep(storage: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "tune_growth.py"), *SWEEP_FLAGS, "--storage-path",
         str(storage), *extra],
        cwd=storage, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True)  # its own process group: the local Ray it starts dies with it


def kill_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


def terminated_trials(experiment: Path) -> set[str]:
    """Trials Tune's saved experiment state records as finished."""
    finished = set()
    for state_file in experiment.glob("experiment_state-*.json"):
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue  # being rewritten
        for trial_json, _ in state.get("trial_data", []):
            trial = json.loads(trial_json)
            if trial.get("status") == "TERMINATED":
                finished.update(slug for slug in SLUGS if slug in trial_json)
    return finished


@pytest.fixture(scope="module")
def resumed_sweep(tmp_path_factory) -> dict[str, Any]:
    """Run the sweep, kill its driver once Tune has recorded the first finished trial, run it
    again with the same name; return what each run left behind."""
    storage = tmp_path_factory.mktemp("tune")
    experiment = storage / "growth"
    first = start_sweep(storage, storage / "first.log")
    try:
        deadline = time.monotonic() + 600
        while not terminated_trials(experiment):
            assert first.poll() is None, (storage / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished in 600 s"
            time.sleep(1)
    finally:
        kill_group(first)
    (done,) = terminated_trials(experiment)  # concurrency 1 on 2 CPUs: exactly one
    run_dir = experiment / "runs" / done
    kept = {name: ((run_dir / name).stat().st_mtime_ns, (run_dir / name).read_text())
            for name in ("history.json", "sebs_run.json")}
    second = start_sweep(storage, storage / "second.log")
    try:
        second.wait(timeout=900)
    finally:
        kill_group(second)
    log = (storage / "second.log").read_text()
    assert second.returncode == 0, log[-5000:]
    return {"storage": storage, "experiment": experiment, "done": done, "kept": kept, "log": log}


@pytest.mark.ray
def test_resumed_sweep_does_not_rerun_a_finished_trial(resumed_sweep):
    assert "resuming the sweep" in resumed_sweep["log"]
    # One line per trial that ends, with a count: the two it ran, never the one Tune kept.
    ended = re.findall(r"^\[\d+/3\] (\S+): finished", resumed_sweep["log"], flags=re.MULTILINE)
    assert sorted(ended) == sorted(set(SLUGS) - {resumed_sweep["done"]}), resumed_sweep["log"][-3000:]
    run_dir = resumed_sweep["experiment"] / "runs" / resumed_sweep["done"]
    for name, (mtime, text) in resumed_sweep["kept"].items():
        assert (run_dir / name).stat().st_mtime_ns == mtime, f"{name} of the finished trial was rewritten"
        assert (run_dir / name).read_text() == text
    for slug in SLUGS:  # and every trial finished by the end
        assert (resumed_sweep["experiment"] / "runs" / slug / "history.json").exists()


@pytest.mark.ray
def test_comparison_matches_the_trials_histories(resumed_sweep):
    experiment = resumed_sweep["experiment"]
    with (experiment / "comparison.csv").open() as handle:
        rows = {row["configuration"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["constant", "sebs ρ=2", "ssgd ρ=2"]
    histories = {label: json.loads((experiment / "runs" / slug / "history.json").read_text())
                 for label, slug in zip(rows, SLUGS, strict=True)}
    target = float(rows["constant"]["target_accuracy"])
    # The default target: the best SSGD-family final accuracy (one seed each) minus 1 point.
    best = max(histories[label][-1]["validation_accuracy"] for label in ("constant", "ssgd ρ=2"))
    assert target == pytest.approx(best - 0.01)
    for label, row in rows.items():
        history = histories[label]
        assert len(history) == 2 and row["seeds"] == "1" and row["unfinished_seeds"] == "0"
        assert float(row["final_accuracy_mean"]) == history[-1]["validation_accuracy"]
        assert float(row["updates"]) == history[-1]["updates"]
        assert float(row["samples"]) == history[-1]["samples"]
        start = history[0]["ended_at"] - history[0]["epoch_time_s"]
        assert float(row["wall_time_s_mean"]) == pytest.approx(history[-1]["ended_at"] - start)
        assert float(row["worker_seconds_mean"]) == pytest.approx(
            sum(r["world_size"] * r["epoch_time_s"] for r in history))
        reached = [r for r in history if r["validation_accuracy"] >= target]
        if reached:
            assert float(row["updates_to_target_mean"]) == reached[0]["updates"]
            assert float(row["time_to_target_s_mean"]) == pytest.approx(reached[0]["ended_at"] - start)
            assert all(row[column] != "" for column in row), row  # every column filled
        else:
            assert row["updates_to_target_mean"] == "" and row["seeds_reaching_target"] == "0"
    # 205 training rows: SSGD 2 x floor(205/16) updates on 1 worker; SEBS 12 + floor(205/32), 1 -> 2.
    assert float(rows["ssgd ρ=2"]["updates"]) == 24 and rows["ssgd ρ=2"]["resizes_mean"] == "0.0"
    assert float(rows["sebs ρ=2"]["updates"]) == 18 and rows["sebs ρ=2"]["resizes_mean"] == "1.0"
    assert rows["sebs ρ=2"]["recoveries_mean"] == "0.0"
    assert [r["world_size"] for r in histories["sebs ρ=2"]] == [1, 2]
    # The best baseline reaches its own target by definition, so at least one row has every mark.
    assert any(row["fewest_updates_to_target"] == "True" for row in rows.values())

    markdown = (experiment / "comparison.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table) == 1 + 3
    for line in table:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == 11 and all(cells), line

    png = (experiment / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    import matplotlib.image

    image = matplotlib.image.imread(str(experiment / "comparison.png"))
    assert image.shape[0] > 300 and image.shape[1] > 600


@pytest.mark.ray
def test_same_name_with_other_settings_is_refused(resumed_sweep):
    storage = resumed_sweep["storage"]
    process = start_sweep(storage, storage / "third.log", "--seeds", "2")
    try:
        process.wait(timeout=300)
    finally:
        kill_group(process)
    log = (storage / "third.log").read_text()
    assert process.returncode == 2, log[-3000:]
    assert "ray-sebs tune: error: --name='growth': names an existing sweep with other settings" in log
    assert "seeds" in log


def test_comparison_of_nothing_is_empty():
    assert compare([]) == Comparison(rows=[], targets={})


def test_a_recorded_sweep_with_other_settings_is_refused_before_ray_starts(tmp_path, capsys):
    from ray_sebs.data import DatasetConfig
    from ray_sebs.schedule import ScheduleConfig
    from ray_sebs.sweep import SWEEP_RECORD, sweep_fingerprint

    space = SweepSpace(ratios=(1.0, 2.0), seeds=(0,))
    base = ScheduleConfig(kind="sebs", growth_ratio=1.0, epochs_per_stage=5)
    recorded = {**sweep_fingerprint(space, base, DatasetConfig(), "mlp"), "dataset_size": 1438}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / SWEEP_RECORD).write_text(json.dumps(recorded))
    argv = ["tune", "--ratios", "1,2", "--seeds", "1", "--storage-path", str(tmp_path), "--name", "old",
            "--address", "ray://nowhere.invalid:1"]  # never reached: refused first
    assert main([*argv, "--epochs-per-stage", "3"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("ray-sebs tune: error: --name='old': names an existing sweep with other "
                            "settings: schedule.epochs_per_stage 5 -> 3; use the original flags")


def test_each_configuration_takes_its_own_optimizers_lr_scaling():
    from dataclasses import replace

    from ray_sebs.schedule import ScheduleConfig
    from ray_sebs.sweep_space import sweep_plans

    base = ScheduleConfig(epochs_per_stage=1, max_batch_size=48)
    space = SweepSpace(ratios=(2.0,), kinds=("sebs", "ssgd"), seeds=(0,), optimizers=("sgd", "adamw"))
    plans = sweep_plans(space, base, 1000, ClusterConfig())
    scaling = {(c.kind, c.optimizer): plan.schedule.config.lr_scaling for c, plan in plans.items()
               if c.kind != "constant"}
    assert scaling == {("sebs", "sgd"): "linear", ("ssgd", "sgd"): "linear",
                       ("sebs", "adamw"): "sqrt", ("ssgd", "adamw"): "sqrt"}
    rates = {c.optimizer: [s.learning_rate for s in plan.schedule.stages]
             for c, plan in plans.items() if c.kind == "sebs"}
    assert rates["sgd"] == [0.1, 0.1, pytest.approx(0.1 * 48 / 64), pytest.approx(0.1 * 48 / 128)]
    assert rates["adamw"] == pytest.approx(
        [0.1, 0.1 / math.sqrt(2), 0.1 * math.sqrt(3) / 4, 0.1 * math.sqrt(3) / 8], rel=1e-12)
    # --lr-scaling given: every configuration uses it.
    explicit = sweep_plans(space, replace(base, lr_scaling="linear"), 1000, ClusterConfig())
    assert {plan.schedule.config.lr_scaling for plan in explicit.values()} == {"linear"}


def test_the_sweep_fingerprint_holds_the_shared_optimizer_settings():
    from ray_sebs.data import DatasetConfig
    from ray_sebs.optim import OptimizerConfig
    from ray_sebs.schedule import ScheduleConfig
    from ray_sebs.sweep import sweep_fingerprint

    space = SweepSpace(ratios=(2.0,), seeds=(0,), optimizers=("sgd", "adamw"))
    fingerprint = sweep_fingerprint(space, ScheduleConfig(), DatasetConfig(), "mlp",
                                    optimizer=OptimizerConfig(weight_decay=0.01, clip_grad_norm=1.0))
    assert fingerprint["optimizer"] == {"momentum": 0.9, "weight_decay": 0.01, "clip_grad_norm": 1.0}
    assert "optimizer" not in sweep_fingerprint(space, ScheduleConfig(), DatasetConfig(), "mlp")
