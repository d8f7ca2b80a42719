"""The adaptive schedule's pure parts: the growth rule, the stage calendar and the range of plans.
No Ray, no torch."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_sebs.errors import ConfigError
from ray_sebs.plan import ClusterConfig, adaptive_plan_range, build_plan
from ray_sebs.schedule import (
    ScheduleConfig,
    build_schedule,
    earliest_stage_starts,
    epoch_budget,
    should_grow,
    stage_batch_and_lr,
)

ADAPTIVE = ScheduleConfig(kind="adaptive", initial_batch_size=16, growth_ratio=2.0, num_stages=4,
                          epochs_per_stage=5, min_epochs_per_stage=2)


@given(noise=st.floats(min_value=-1e3, max_value=1e6), batch=st.integers(1, 4096),
       ratio=st.floats(1, 8), threshold=st.one_of(st.just(0.0), st.floats(0, 10)), epochs=st.integers(0, 20),
       min_epochs=st.integers(1, 20))
def test_grows_exactly_when_noise_reaches_the_threshold_after_the_minimum_epochs(
        noise, batch, ratio, threshold, epochs, min_epochs):
    grows = should_grow(noise, batch, ratio, threshold, epochs, min_epochs)
    assert grows == (epochs >= min_epochs and (threshold == 0 or noise >= threshold * ratio * batch))
    assert should_grow(math.nan, batch, ratio, threshold, epochs, min_epochs) \
        == (threshold == 0 and epochs >= min_epochs)


def test_grow_rule_examples():
    assert should_grow(64.0, 32, 2.0, 1.0, 1, 1), "B_noise = rho * B_s: grow"
    assert not should_grow(63.9, 32, 2.0, 1.0, 1, 1)
    assert not should_grow(1e9, 32, 2.0, 1.0, 1, 2), "the stage has not run its minimum"
    assert not should_grow(-1.0, 32, 2.0, 0.5, 3, 2), "a negative estimate is below any batch"
    for noise in (-1.0, math.nan, 0.0):
        assert should_grow(noise, 32, 2.0, 0.0, 3, 2), "threshold 0: grows after the minimum"
        assert not should_grow(noise, 32, 2.0, 0.0, 1, 2)
    assert not should_grow(math.nan, 32, 2.0, 1e-9, 3, 2), "no measurement: no growth"


def test_budget_is_the_fixed_schedules_and_the_stages_are_sebs():
    assert epoch_budget(ADAPTIVE) == 20
    assert epoch_budget(replace(ADAPTIVE, epochs_per_stage=(1, 2, 3, 4))) == 10
    sebs = replace(ADAPTIVE, kind="sebs", max_batch_size=64)
    for stage in range(1, 5):
        assert stage_batch_and_lr(replace(ADAPTIVE, max_batch_size=64), stage) \
            == stage_batch_and_lr(sebs, stage)
    schedule = build_schedule(ADAPTIVE, 1000)
    assert [(s.index, s.first_epoch, s.epochs) for s in schedule.stages] == [(1, 0, 20)]
    decided = build_schedule(replace(ADAPTIVE, stage_starts=(3, 7)), 1000)
    assert [(s.index, s.first_epoch, s.epochs, s.global_batch_size) for s in decided.stages] \
        == [(1, 0, 3, 16), (2, 3, 4, 32), (3, 7, 13, 64)]
    assert decided.total_epochs == 20


@pytest.mark.parametrize(("starts", "problem"), [
    ((1,), "1 epochs after"),              # stage 1 ran fewer than min_epochs_per_stage
    ((2, 3), "1 epochs after"),
    ((4, 4), "0 epochs after"),
    ((2, 20), "budget of 20"),             # a stage beginning at the end of the budget
    ((2, 4, 6, 8), "begins 5 stages of at most 4"),
])
def test_bad_stage_starts_are_refused(starts, problem):
    with pytest.raises(ConfigError, match=problem) as error:
        replace(ADAPTIVE, stage_starts=starts)
    assert error.value.field == "stage_starts"


def test_stage_starts_belong_to_adaptive_and_bad_options_name_their_field():
    with pytest.raises(ConfigError) as error:
        replace(ADAPTIVE, kind="sebs", stage_starts=(2,))
    assert error.value.field == "stage_starts"
    for field, value in (("noise_threshold", -1.0), ("noise_threshold", math.nan),
                         ("noise_threshold", True), ("min_epochs_per_stage", 0)):
        with pytest.raises(ConfigError) as error:
            replace(ADAPTIVE, **{field: value})
        assert error.value.field == field


@settings(max_examples=60, deadline=None)
@given(stages=st.integers(1, 6), epochs=st.integers(1, 6), min_epochs=st.integers(1, 5),
       ratio=st.sampled_from([1.0, 1.5, 2.0, 4.0]), micro=st.sampled_from([8, 16, 64]),
       data=st.data())
def test_any_decided_calendar_plans_the_budget_between_the_earliest_and_latest_growth(
        stages, epochs, min_epochs, ratio, micro, data):
    config = ScheduleConfig(kind="adaptive", initial_batch_size=8, growth_ratio=ratio,
                            num_stages=stages, epochs_per_stage=epochs,
                            min_epochs_per_stage=min_epochs, max_batch_size=256)
    cluster = ClusterConfig(min_workers=1, max_workers=4, max_micro_batch=micro)
    earliest, latest = adaptive_plan_range(config, 2000, cluster)
    budget = stages * epochs
    assert latest.schedule.total_epochs == earliest.schedule.total_epochs == budget
    assert len(latest.stages) == 1
    assert all(p.stage.epochs == min_epochs for p in earliest.stages[:-1])
    assert earliest.stages[-1].stage.epochs >= 1
    # Some calendar the rule could decide: a prefix of stages, each at least min_epochs long.
    starts: list[int] = []
    while len(starts) + 1 < stages:
        first = (starts[-1] if starts else 0) + min_epochs
        if first >= budget or not data.draw(st.booleans()):
            break
        starts.append(data.draw(st.integers(first, budget - 1)))
    plan = latest.with_stage_starts(tuple(starts))
    assert plan.schedule.total_epochs == budget
    assert [p.stage.first_epoch for p in plan.stages] == [0, *starts]
    assert earliest.total_updates <= plan.total_updates <= latest.total_updates
    assert plan.peak_workers <= earliest.peak_workers
    # Whenever a stage begins, its batch, workers and layout are those of the earliest plan, so
    # segments are the same runs of candidate stages and keep their numbers.
    for stage_plan in plan.stages:
        candidate = earliest.stage_plan(stage_plan.stage.index)
        assert (stage_plan.stage.global_batch_size, stage_plan.target_workers,
                stage_plan.decomposition) == (candidate.stage.global_batch_size,
                                              candidate.target_workers, candidate.decomposition)
        assert plan.segment_of_epoch(stage_plan.stage.first_epoch).index \
            == earliest.segment_of_epoch(candidate.stage.first_epoch).index


def test_earliest_growth_fits_as_many_stages_as_the_budget_reaches():
    assert earliest_stage_starts(ADAPTIVE) == (2, 4, 6)
    assert earliest_stage_starts(replace(ADAPTIVE, min_epochs_per_stage=8)) == (8, 16)
    assert earliest_stage_starts(replace(ADAPTIVE, min_epochs_per_stage=20)) == ()


def test_a_fixed_schedule_has_no_range_and_its_plan_is_unchanged():
    with pytest.raises(ConfigError):
        adaptive_plan_range(replace(ADAPTIVE, kind="sebs"), 1000, ClusterConfig())
    sebs = build_plan(replace(ADAPTIVE, kind="sebs"), 1000, ClusterConfig())
    assert "adaptive" not in sebs.to_dict()["schedule"] and "stage_starts" not in sebs.to_dict()
    document = build_plan(replace(ADAPTIVE, stage_starts=(2,)), 1000, ClusterConfig()).to_dict()
    assert document["stage_starts"] == [2]
    assert document["schedule"]["adaptive"] == {"noise_threshold": 1.0, "min_epochs_per_stage": 2,
                                                "epoch_budget": 20}


def test_plan_command_prints_the_earliest_and_latest_growth(capsys):
    from ray_sebs.cli import main

    flags = ["plan", "--schedule", "adaptive", "--batch-size", "16", "--stages", "3",
             "--epochs-per-stage", "4", "--min-epochs-per-stage", "2", "--noise-threshold", "0.5",
             "--dataset-size", "1000", "--max-micro-batch", "16"]
    assert main(flags) == 0
    out = capsys.readouterr().out
    earliest, latest = adaptive_plan_range(
        ScheduleConfig(kind="adaptive", initial_batch_size=16, num_stages=3, epochs_per_stage=4,
                       min_epochs_per_stage=2, noise_threshold=0.5),
        1000, ClusterConfig(max_micro_batch=16))
    assert [p.stage.epochs for p in earliest.stages] == [2, 2, 8]
    assert "B_noise >= 0.5 x 2 x B_s, after at least 2 epochs" in out
    assert "budget 12 epochs, at most 3 stages" in out
    assert f"updates: {earliest.total_updates:,}" in out
    assert (f"latest growth (never grows): stage 1 for 12 epochs, {latest.total_updates:,} "
            "updates") in out
    assert (f"range: {earliest.total_updates:,} to {latest.total_updates:,} updates, peak workers "
            f"1 to {earliest.peak_workers}") in out
    assert main([*flags, "--json"]) == 0
    import json

    document = json.loads(capsys.readouterr().out)
    assert document["totals"]["updates"] == earliest.total_updates
    assert document["latest_growth"]["totals"]["updates"] == latest.total_updates
    assert document["stage_starts"] == [2, 4]


@pytest.mark.parametrize(("flag", "value"), [("--noise-threshold", "-1"),
                                             ("--noise-threshold", "nan"),
                                             ("--min-epochs-per-stage", "0")])
def test_bad_adaptive_flags_are_one_line_naming_the_flag(flag, value, capsys):
    from ray_sebs.cli import main

    assert main(["plan", "--schedule", "adaptive", flag, value]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"ray-sebs plan: error: {flag}=") and len(error.splitlines()) == 1


def test_a_sweep_may_compare_adaptive_and_sizes_it_by_its_earliest_growth():
    from ray_sebs.sweep_space import SweepSpace, sweep_plans

    space = SweepSpace(ratios=(2.0,), kinds=("sebs", "adaptive", "ssgd"), seeds=(0,))
    assert [c.label for c in space.configurations()] == ["sebs ρ=2", "adaptive ρ=2", "ssgd ρ=2"]
    cluster = ClusterConfig(max_micro_batch=16)
    plans = sweep_plans(space, replace(ADAPTIVE, kind="sebs"), 1000, cluster)
    adaptive_plan = next(plan for c, plan in plans.items() if c.kind == "adaptive")
    assert adaptive_plan.to_dict()["stages"] \
        == adaptive_plan_range(ADAPTIVE, 1000, cluster)[0].to_dict()["stages"]
    assert adaptive_plan.schedule.total_epochs == 20


def test_the_trainer_refuses_decided_stage_starts():
    pytest.importorskip("ray")
    from ray_sebs.trainer import SEBSTrainer

    with pytest.raises(ConfigError) as error:
        SEBSTrainer(lambda: None, datasets={"train": object()},
                    schedule=replace(ADAPTIVE, stage_starts=(2,)))
    assert error.value.field == "stage_starts"
