"""The stagewise schedules (SEBS, SSGD, constant): pure arithmetic, no Ray, no torch.

Expectations are computed independently of ``ray_sebs.schedule`` where possible: exact rational
arithmetic (``fractions.Fraction``) for the ideal batch, hand-written per-stage numbers for the
paper-reproduction example (digits' 1,257 training rows, B1 = 16, rho = 2, 4 stages x 10 epochs).
"""

from __future__ import annotations

import math
from dataclasses import replace
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_sebs.errors import ConfigError
from ray_sebs.optim import LR_SCALING_OF_OPTIMIZER, OPTIMIZERS, OptimizerConfig, default_lr_scaling
from ray_sebs.schedule import (
    LR_SCALINGS,
    SCHEDULE_KINDS,
    ScheduleConfig,
    build_schedule,
    stage_batch_and_lr,
    warmup_factor,
)

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

ratios = st.one_of(st.integers(1, 8), st.floats(1.0, 8.0, allow_nan=False, allow_infinity=False))


@st.composite
def schedule_configs(draw, kind: str = "sebs", ratio=ratios) -> ScheduleConfig:
    """Wide-range configs: B1 1..4096 (a multiple of the granularity 1..16), rho 1..8, 1..8 stages,
    1..20 epochs (one value, or one per stage), an optional cap >= B1."""
    granularity = draw(st.integers(1, 16))
    initial = granularity * draw(st.integers(1, 4096 // granularity))
    rho = draw(ratio)
    stages = draw(st.integers(1, 8))
    epochs = draw(st.one_of(
        st.integers(1, 20),
        st.lists(st.integers(1, 20), min_size=stages, max_size=stages).map(tuple),
        st.lists(st.integers(1, 20), min_size=1, max_size=1),
    ))
    largest_ideal = initial * rho ** (stages - 1)
    cap = draw(st.one_of(st.none(), st.integers(initial, int(largest_ideal * 1.5) + initial)))
    learning_rate = draw(st.floats(1e-5, 10.0, allow_nan=False, allow_infinity=False))
    return ScheduleConfig(kind=kind, initial_batch_size=initial, growth_ratio=rho, num_stages=stages,
                          epochs_per_stage=epochs, learning_rate=learning_rate, max_batch_size=cap,
                          batch_granularity=granularity)


def exact_ideal(config: ScheduleConfig, stage: int) -> Fraction:
    """``B1 * rho**(s-1)`` in exact rational arithmetic (the float rho taken at face value)."""
    return Fraction(config.initial_batch_size) * Fraction(config.growth_ratio) ** (stage - 1)


def epochs_list(config: ScheduleConfig) -> list[int]:
    epochs = config.epochs_per_stage
    if isinstance(epochs, int):
        return [epochs] * config.num_stages
    epochs = list(epochs)
    return epochs * config.num_stages if len(epochs) == 1 else epochs


def largest_batch(config: ScheduleConfig) -> int:
    return max(stage_batch_and_lr(config, s)[0] for s in range(1, config.num_stages + 1))


@st.composite
def config_and_dataset(draw, kind: str = "sebs", ratio=ratios) -> tuple[ScheduleConfig, int]:
    """A config and a dataset that holds every stage's batch (1x to 50x the largest one)."""
    config = draw(schedule_configs(kind=kind, ratio=ratio))
    biggest = largest_batch(config)
    return config, draw(st.integers(biggest, biggest * 50 + 7))


# --------------------------------------------------------------------------------------------
# The paper-reproduction example: 1,257 rows, B1 = 16, rho = 2, 4 stages x 10 epochs
# --------------------------------------------------------------------------------------------

DIGITS_TRAIN_ROWS = 1257


def worked_example(kind: str = "sebs", rho: float = 2.0) -> ScheduleConfig:
    return ScheduleConfig(kind=kind, initial_batch_size=16, growth_ratio=rho, num_stages=4,
                          epochs_per_stage=10, learning_rate=0.1)


def test_worked_example_sebs_makes_1450_updates():
    schedule = build_schedule(worked_example(), DIGITS_TRAIN_ROWS)
    # Per stage, drop-last: floor(1257 / B_s) updates per epoch, 10 epochs each.
    #   stage 1: B =  16, 1257 //  16 = 78  (78 *  16 = 1248, 9 rows dropped)   -> 780 updates
    #   stage 2: B =  32, 1257 //  32 = 39  (39 *  32 = 1248)                   -> 390 updates
    #   stage 3: B =  64, 1257 //  64 = 19  (19 *  64 = 1216)                   -> 190 updates
    #   stage 4: B = 128, 1257 // 128 =  9  ( 9 * 128 = 1152)                   ->  90 updates
    #   total 780 + 390 + 190 + 90 = 1,450
    assert [s.global_batch_size for s in schedule.stages] == [16, 32, 64, 128]
    assert [s.updates_per_epoch for s in schedule.stages] == [78, 39, 19, 9]
    assert [s.updates for s in schedule.stages] == [780, 390, 190, 90]
    assert [s.learning_rate for s in schedule.stages] == [0.1] * 4
    assert [s.samples for s in schedule.stages] == [12480, 12480, 12160, 11520]
    assert [(s.first_epoch, s.end_epoch) for s in schedule.stages] == [(0, 10), (10, 20), (20, 30),
                                                                       (30, 40)]
    assert schedule.total_epochs == 40
    assert schedule.total_updates == 1450
    assert schedule.total_samples == 12480 + 12480 + 12160 + 11520


def test_worked_example_ssgd_makes_3120_updates():
    schedule = build_schedule(worked_example("ssgd"), DIGITS_TRAIN_ROWS)
    # B = 16 throughout: 78 updates per epoch x 40 epochs = 3,120; lr 0.1, 0.05, 0.025, 0.0125.
    assert [s.global_batch_size for s in schedule.stages] == [16] * 4
    assert [s.updates_per_epoch for s in schedule.stages] == [78] * 4
    assert schedule.total_updates == 3120
    assert [s.learning_rate for s in schedule.stages] == pytest.approx([0.1, 0.05, 0.025, 0.0125])
    # 1,450 / 3,120 = 46%: SEBS makes under half the updates of SSGD, at equal test accuracy.
    assert round(100 * 1450 / schedule.total_updates) == 46


def test_worked_example_rho4_makes_1020_updates():
    schedule = build_schedule(worked_example(rho=4.0), DIGITS_TRAIN_ROWS)
    # B = 16, 64, 256, 1024: 78, 19, 4, 1 updates per epoch -> 780 + 190 + 40 + 10 = 1,020.
    assert [s.global_batch_size for s in schedule.stages] == [16, 64, 256, 1024]
    assert [s.updates_per_epoch for s in schedule.stages] == [78, 19, 4, 1]
    assert schedule.total_updates == 1020


def test_baseline_is_ssgd_with_everything_else_equal():
    config = worked_example()
    baseline = config.baseline()
    assert baseline.kind == "ssgd"
    assert (baseline.initial_batch_size, baseline.growth_ratio, baseline.num_stages,
            baseline.epochs_per_stage, baseline.learning_rate) == (16, 2.0, 4, 10, 0.1)


def test_stage_of_epoch():
    schedule = build_schedule(
        ScheduleConfig(initial_batch_size=16, num_stages=3, epochs_per_stage=(2, 1, 3)), 1000)
    assert [schedule.stage_of_epoch(e).index for e in range(6)] == [1, 1, 2, 3, 3, 3]
    with pytest.raises(IndexError):
        schedule.stage_of_epoch(6)


# --------------------------------------------------------------------------------------------
# Hybrid cap (Smith et al.): the batch stops at the cap, the learning rate takes the growth
# --------------------------------------------------------------------------------------------


def test_hybrid_cap_batches_and_learning_rates():
    eta = 0.1
    config = ScheduleConfig(initial_batch_size=16, growth_ratio=2, num_stages=4, epochs_per_stage=10,
                            learning_rate=eta, max_batch_size=40)
    schedule = build_schedule(config, DIGITS_TRAIN_ROWS)
    assert [s.global_batch_size for s in schedule.stages] == [16, 32, 40, 40]
    assert [s.learning_rate for s in schedule.stages] == pytest.approx(
        [eta, eta, eta * 40 / 64, eta * 40 / 128], rel=1e-12)
    # lr / B follows SSGD's path eta / (16 * 2**(s-1)) at every stage.
    ssgd = [eta / 2 ** (s - 1) / 16 for s in range(1, 5)]
    assert [s.learning_rate / s.global_batch_size for s in schedule.stages] == pytest.approx(
        ssgd, rel=1e-12)
    assert [s.updates_per_epoch for s in schedule.stages] == [78, 39, 31, 31]


def test_cap_is_rounded_down_to_the_granularity():
    config = ScheduleConfig(initial_batch_size=16, growth_ratio=2, num_stages=3, epochs_per_stage=1,
                            max_batch_size=50, batch_granularity=8)
    # The ideal 64 exceeds the cap 50, which rounds down to 48 (a multiple of 8).
    assert [stage_batch_and_lr(config, s)[0] for s in (1, 2, 3)] == [16, 32, 48]
    assert stage_batch_and_lr(config, 3)[1] == pytest.approx(0.1 * 48 / 64)


def test_rounding_is_half_up_to_the_granularity():
    # rho = 1.5, B1 = 4, granularity 4: ideals 4, 6, 9, 13.5 -> 8 (6 is exactly half way: up), 8, 12.
    config = ScheduleConfig(initial_batch_size=4, growth_ratio=1.5, num_stages=4, epochs_per_stage=1,
                            batch_granularity=4)
    assert [stage_batch_and_lr(config, s)[0] for s in (1, 2, 3, 4)] == [4, 8, 8, 12]
    # Granularity 1: 4, 6, 9, 13.5 -> 14 (half up).
    config = ScheduleConfig(initial_batch_size=4, growth_ratio=1.5, num_stages=4, epochs_per_stage=1)
    assert [stage_batch_and_lr(config, s)[0] for s in (1, 2, 3, 4)] == [4, 6, 9, 14]


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(config_and_dataset())
def test_sebs_stage_batches_follow_the_rounding_and_cap_rules(case):
    config, dataset_size = case
    g = config.batch_granularity
    cap = None if config.max_batch_size is None else g * (config.max_batch_size // g)
    schedule = build_schedule(config, dataset_size)
    assert len(schedule.stages) == config.num_stages
    previous = 0
    for stage in schedule.stages:
        ideal = exact_ideal(config, stage.index)
        batch = stage.global_batch_size
        assert batch % g == 0 and batch >= g
        assert batch >= config.initial_batch_size
        assert batch >= previous, "SEBS batches never shrink"
        previous = batch
        hybrid = stage.learning_rate != config.learning_rate
        if hybrid:
            assert cap is not None and batch == cap
            # Only a stage whose ideal batch rounds past the cap is hybrid.
            assert ideal >= cap + Fraction(g, 2) - Fraction(1, 10**6)
        else:
            assert abs(batch - ideal) <= Fraction(g, 2) * (1 + Fraction(1, 10**9))
            if cap is not None:
                assert batch <= cap
        if cap is not None and ideal >= cap + Fraction(g, 2) + Fraction(1, 10**6):
            assert hybrid and batch == cap
        assert stage.updates_per_epoch == dataset_size // batch
        assert stage.updates == stage.epochs * (dataset_size // batch)
        assert stage.samples == stage.updates * batch <= stage.epochs * dataset_size
    assert [s.epochs for s in schedule.stages] == epochs_list(config)
    assert schedule.total_updates == sum(s.updates for s in schedule.stages)
    assert schedule.total_samples == sum(s.samples for s in schedule.stages)
    assert schedule.total_epochs == sum(epochs_list(config))
    # Stages are contiguous epoch ranges from 0.
    assert [s.first_epoch for s in schedule.stages] == [
        sum(epochs_list(config)[:i]) for i in range(config.num_stages)]


@PROPERTY_SETTINGS
@given(config_and_dataset())
def test_sebs_and_ssgd_share_lr_over_batch_at_every_stage(case):
    config, dataset_size = case
    sebs = build_schedule(config, dataset_size)
    ssgd = build_schedule(config.baseline(), dataset_size)
    eta, b1, g = config.learning_rate, config.initial_batch_size, config.batch_granularity
    for mine, theirs in zip(sebs.stages, ssgd.stages, strict=True):
        s = mine.index
        # The SSGD side, computed independently.
        assert theirs.global_batch_size == b1
        assert theirs.learning_rate == pytest.approx(eta / config.growth_ratio ** (s - 1), rel=1e-12)
        sebs_noise = mine.learning_rate / mine.global_batch_size
        ssgd_noise = theirs.learning_rate / theirs.global_batch_size
        ideal = exact_ideal(config, s)
        if mine.learning_rate != eta:  # past the cap: equal by construction
            assert math.isclose(sebs_noise, ssgd_noise, rel_tol=1e-12)
        else:
            relative = abs(sebs_noise - ssgd_noise) / sebs_noise
            assert relative <= g / (2 * float(ideal)) * (1 + 1e-9) + 1e-12
            if ideal.denominator == 1 and ideal.numerator % g == 0:
                assert mine.global_batch_size == ideal
                assert math.isclose(sebs_noise, ssgd_noise, rel_tol=1e-12)


@PROPERTY_SETTINGS
@given(config_and_dataset(ratio=st.integers(1, 8)))
def test_integer_ratio_gives_exactly_ssgds_noise_scale(case):
    config, dataset_size = case
    sebs = build_schedule(config, dataset_size)
    ssgd = build_schedule(config.baseline(), dataset_size)
    for mine, theirs in zip(sebs.stages, ssgd.stages, strict=True):
        ideal = config.initial_batch_size * config.growth_ratio ** (mine.index - 1)
        if mine.learning_rate == config.learning_rate:
            assert mine.global_batch_size == ideal
        assert math.isclose(mine.learning_rate / mine.global_batch_size,
                            theirs.learning_rate / theirs.global_batch_size, rel_tol=1e-12)


@PROPERTY_SETTINGS
@given(config_and_dataset())
def test_sebs_never_makes_more_updates_than_ssgd(case):
    config, dataset_size = case
    sebs = build_schedule(config, dataset_size)
    ssgd = build_schedule(config.baseline(), dataset_size)
    for mine, theirs in zip(sebs.stages, ssgd.stages, strict=True):
        assert mine.epochs == theirs.epochs
        assert mine.updates <= theirs.updates
    assert sebs.total_updates <= ssgd.total_updates
    assert ssgd.total_updates == sum(epochs_list(config)) * (dataset_size // config.initial_batch_size)


@PROPERTY_SETTINGS
@given(config_and_dataset(ratio=st.just(1)))
def test_rho_one_makes_sebs_the_constant_schedule(case):
    config, dataset_size = case
    sebs = build_schedule(config, dataset_size)
    constant = build_schedule(replace(config, kind="constant"), dataset_size)
    ssgd = build_schedule(config.baseline(), dataset_size)
    triples = [(s.global_batch_size, s.learning_rate, s.updates) for s in sebs.stages]
    assert triples == [(s.global_batch_size, s.learning_rate, s.updates) for s in constant.stages]
    assert triples == [(s.global_batch_size, s.learning_rate, s.updates) for s in ssgd.stages]
    assert all(b == config.initial_batch_size and lr == config.learning_rate for b, lr, _ in triples)


@PROPERTY_SETTINGS
@given(st.data())
def test_dataset_smaller_than_a_stage_batch_is_refused(data):
    config = data.draw(schedule_configs())
    batches = [stage_batch_and_lr(config, s)[0] for s in range(1, config.num_stages + 1)]
    dataset_size = data.draw(st.integers(1, max(batches) - 1)) if max(batches) > 1 else None
    if dataset_size is None:
        return
    first_too_big = next(s for s, b in enumerate(batches, start=1) if b > dataset_size)
    with pytest.raises(ConfigError) as info:
        build_schedule(config, dataset_size)
    assert info.value.field == "dataset_size"
    assert info.value.value == dataset_size
    assert str(dataset_size) in str(info.value)
    assert f"stage {first_too_big}'s global batch of {batches[first_too_big - 1]}" in str(info.value)


# --------------------------------------------------------------------------------------------
# Validation: every bad field is a ConfigError that names the field and shows the value
# --------------------------------------------------------------------------------------------

BAD_FIELDS = [
    ("growth_ratio", {"growth_ratio": 0.5}, "0.5"),
    ("growth_ratio", {"growth_ratio": 0.999}, "0.999"),
    ("growth_ratio", {"growth_ratio": float("nan")}, "nan"),
    ("growth_ratio", {"growth_ratio": float("inf")}, "inf"),
    ("growth_ratio", {"growth_ratio": True}, "True"),
    ("growth_ratio", {"growth_ratio": "2"}, "'2'"),
    ("num_stages", {"num_stages": 0}, "0"),
    ("num_stages", {"num_stages": -2}, "-2"),
    ("num_stages", {"num_stages": True}, "True"),
    ("num_stages", {"num_stages": 2.0}, "2.0"),
    ("initial_batch_size", {"initial_batch_size": 0}, "0"),
    ("initial_batch_size", {"initial_batch_size": -3}, "-3"),
    ("initial_batch_size", {"initial_batch_size": True}, "True"),
    ("initial_batch_size", {"initial_batch_size": 16.0}, "16.0"),
    ("epochs_per_stage", {"num_stages": 3, "epochs_per_stage": (1, 2)}, "1,2"),
    ("epochs_per_stage", {"num_stages": 2, "epochs_per_stage": [1, 2, 3]}, "1,2,3"),
    ("epochs_per_stage", {"epochs_per_stage": 0}, "0"),
    ("epochs_per_stage", {"num_stages": 2, "epochs_per_stage": (3, 0)}, "0"),
    ("epochs_per_stage", {"epochs_per_stage": True}, "True"),
    ("learning_rate", {"learning_rate": 0.0}, "0.0"),
    ("learning_rate", {"learning_rate": -0.1}, "-0.1"),
    ("learning_rate", {"learning_rate": float("nan")}, "nan"),
    ("max_batch_size", {"initial_batch_size": 16, "max_batch_size": 8}, "8"),
    ("max_batch_size", {"max_batch_size": 0}, "0"),
    ("initial_batch_size", {"initial_batch_size": 10, "batch_granularity": 4}, "10"),
    ("batch_granularity", {"batch_granularity": 0}, "0"),
    ("kind", {"kind": "foo"}, "'foo'"),
]


@pytest.mark.parametrize(("field", "kwargs", "shown"), BAD_FIELDS,
                         ids=[f"{f}-{k}" for f, k, _ in BAD_FIELDS])
def test_invalid_schedule_config_names_field_and_value(field, kwargs, shown):
    with pytest.raises(ConfigError) as info:
        ScheduleConfig(**kwargs)
    error = info.value
    assert isinstance(error, ValueError)
    assert error.field == field
    message = str(error)
    assert message.startswith(f"{field}=")
    assert shown in message
    assert error.fix and error.fix in message


def test_granularity_error_says_which_granularity():
    with pytest.raises(ConfigError, match="batch_granularity=4"):
        ScheduleConfig(initial_batch_size=10, batch_granularity=4)


def test_dataset_size_must_be_a_positive_int():
    config = ScheduleConfig()
    for bad in (0, -1, True, 10.0):
        with pytest.raises(ConfigError) as info:
            build_schedule(config, bad)
        assert info.value.field == "dataset_size"
        assert repr(bad) in str(info.value)


def test_valid_edge_configs_are_accepted():
    # cap == B1, rho == 1, a single stage, one epoch value for many stages, an epochs list.
    assert ScheduleConfig(initial_batch_size=16, max_batch_size=16).max_batch_size == 16
    assert ScheduleConfig(growth_ratio=1).growth_ratio == 1
    assert ScheduleConfig(num_stages=1, epochs_per_stage=1).num_stages == 1
    assert ScheduleConfig(num_stages=3, epochs_per_stage=[7]).epochs_of_stage(3) == 7
    assert ScheduleConfig(num_stages=3, epochs_per_stage=[1, 2, 3]).epochs_per_stage == (1, 2, 3)
    schedule = build_schedule(ScheduleConfig(initial_batch_size=5, num_stages=1, epochs_per_stage=1), 5)
    assert schedule.total_updates == 1


# --------------------------------------------------------------------------------------------
# --lr-scaling: the law tying the learning rate to the batch, and the warm-up
# --------------------------------------------------------------------------------------------


def todays_rule(config: ScheduleConfig, stage: int) -> tuple[int, float]:
    """The rule before ``lr_scaling`` existed, kept verbatim: ``linear`` must reproduce it bit for
    bit."""
    g = config.batch_granularity
    if config.kind == "ssgd":
        return config.initial_batch_size, config.learning_rate / config.growth_ratio ** (stage - 1)
    if config.kind == "constant":
        return config.initial_batch_size, config.learning_rate
    ideal = config.initial_batch_size * config.growth_ratio ** (stage - 1)
    batch = g * max(1, math.floor(ideal / g + 0.5))
    if config.max_batch_size is not None:
        cap = g * (config.max_batch_size // g)
        if batch > cap:
            return cap, config.learning_rate * cap / ideal
    return batch, config.learning_rate


kinds = st.sampled_from(SCHEDULE_KINDS)


@PROPERTY_SETTINGS
@given(st.data())
def test_linear_and_unset_scaling_are_todays_rule_exactly(data):
    config = data.draw(schedule_configs(kind=data.draw(kinds)))
    for scaling in (None, "linear"):
        scaled = replace(config, lr_scaling=scaling)
        for s in range(1, config.num_stages + 1):
            assert stage_batch_and_lr(scaled, s) == todays_rule(config, s)


@PROPERTY_SETTINGS
@given(st.data())
def test_ssgd_and_constant_do_not_depend_on_the_scaling(data):
    config = data.draw(schedule_configs(kind=data.draw(st.sampled_from(["ssgd", "constant"]))))
    for s in range(1, config.num_stages + 1):
        assert stage_batch_and_lr(replace(config, lr_scaling="sqrt"), s) == todays_rule(config, s)


@PROPERTY_SETTINGS
@given(schedule_configs())
def test_sqrt_gives_eta1_over_sqrt_rho_while_the_batch_grows_and_decays_by_rho_past_the_cap(config):
    config = replace(config, lr_scaling="sqrt")
    eta, rho, b1 = config.learning_rate, config.growth_ratio, config.initial_batch_size
    previous = None
    for s in range(1, config.num_stages + 1):
        batch, lr = stage_batch_and_lr(config, s)
        linear_batch, linear_lr = todays_rule(config, s)
        assert batch == linear_batch  # the law changes the learning rate only
        capped = linear_lr != eta  # past the cap (the linear rule decays only there)
        unrounded = batch if capped else b1 * rho ** (s - 1)  # B~_s
        if not capped:
            assert lr == pytest.approx(eta / math.sqrt(rho) ** (s - 1), rel=1e-12)
            # eta_s * sqrt(B~_s) stays eta_1 * sqrt(B_1) while the batch grows.
            assert lr * math.sqrt(unrounded) == pytest.approx(eta * math.sqrt(b1), rel=1e-12)
        else:
            assert lr == pytest.approx(eta * math.sqrt(batch / b1) / rho ** (s - 1), rel=1e-12)
            if previous is not None and previous[1]:
                assert lr == pytest.approx(previous[0] / rho, rel=1e-12)
        # Adam's analogue of eta/B: eta_s / sqrt(B~_s) is SSGD's eta_s / sqrt(B_1) at every stage.
        ssgd_lr = eta / rho ** (s - 1)
        assert lr / math.sqrt(unrounded) == pytest.approx(ssgd_lr / math.sqrt(b1), rel=1e-12)
        previous = (lr, capped)


def test_sqrt_worked_example():
    # B1 = 16, rho = 2, cap 40: stages 16, 32, 40, 40.
    config = ScheduleConfig(learning_rate=0.1, max_batch_size=40, lr_scaling="sqrt")
    batches, rates = zip(*(stage_batch_and_lr(config, s) for s in range(1, 5)), strict=True)
    assert batches == (16, 32, 40, 40)
    assert rates == pytest.approx([0.1, 0.1 / math.sqrt(2), 0.1 * math.sqrt(40 / 16) / 4,
                                   0.1 * math.sqrt(40 / 16) / 8], rel=1e-12)


def test_for_optimizer_fills_in_the_optimizers_law_only_when_unset():
    assert {name: ScheduleConfig().for_optimizer(name).lr_scaling for name in OPTIMIZERS} == {
        "sgd": "linear", "momentum": "linear", "adagrad": "linear", "adam": "sqrt", "adamw": "sqrt"}
    assert {name: default_lr_scaling(name) for name in OPTIMIZERS} == LR_SCALING_OF_OPTIMIZER
    assert set(LR_SCALING_OF_OPTIMIZER.values()) <= set(LR_SCALINGS)
    explicit = ScheduleConfig(lr_scaling="linear")
    assert explicit.for_optimizer("adamw") is explicit
    assert ScheduleConfig().resolved_lr_scaling == "linear"
    with pytest.raises(ConfigError) as info:
        default_lr_scaling("lamb")
    assert info.value.field == "optimizer"


@PROPERTY_SETTINGS
@given(st.integers(1, 10**6))
def test_warmup_factor_is_a_linear_ramp_to_one(warmup):
    assert warmup_factor(1, warmup) == pytest.approx(1 / warmup)
    assert warmup_factor(warmup, warmup) == 1.0
    assert warmup_factor(warmup + 1, warmup) == 1.0
    steps = sorted({1, 2, warmup // 3 + 1, warmup // 2 + 1, max(1, warmup - 1), warmup, warmup + 5})
    factors = [warmup_factor(u, warmup) for u in steps]
    assert factors == sorted(factors) and all(0 < f <= 1 for f in factors)
    for u in steps:
        assert warmup_factor(u, warmup) == pytest.approx(min(1, u / warmup), rel=1e-15)


def test_no_warmup_is_a_factor_of_one():
    assert [warmup_factor(u, 0) for u in (1, 2, 10**9)] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(("args", "field"), [((0, 10), "update_number"), ((1, -1), "warmup_updates"),
                                             ((1.0, 10), "update_number"), ((1, True), "warmup_updates")])
def test_warmup_factor_refuses_bad_counts(args, field):
    with pytest.raises(ConfigError) as info:
        warmup_factor(*args)
    assert info.value.field == field


LR_BAD_FIELDS = [
    ("lr_scaling", {"lr_scaling": "log"}, "'log'", "linear, sqrt"),
    ("lr_scaling", {"lr_scaling": "Linear"}, "'Linear'", "linear, sqrt"),
    ("warmup_updates", {"warmup_updates": -1}, "-1", "0 for no warm-up"),
    ("warmup_updates", {"warmup_updates": 1.5}, "1.5", "0 for no warm-up"),
    ("warmup_updates", {"warmup_updates": True}, "True", "0 for no warm-up"),
]


@pytest.mark.parametrize(("field", "kwargs", "shown", "fix"), LR_BAD_FIELDS,
                         ids=[f"{f}-{s}" for f, _, s, _ in LR_BAD_FIELDS])
def test_invalid_lr_scaling_and_warmup_name_field_value_and_fix(field, kwargs, shown, fix):
    with pytest.raises(ConfigError) as info:
        ScheduleConfig(**kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}={shown}")
    assert fix in info.value.fix


OPTIMIZER_BAD_FIELDS = [
    ("clip_grad_norm", {"clip_grad_norm": 0}, "0"),
    ("clip_grad_norm", {"clip_grad_norm": -1.0}, "-1.0"),
    ("clip_grad_norm", {"clip_grad_norm": float("inf")}, "inf"),
    ("clip_grad_norm", {"clip_grad_norm": float("nan")}, "nan"),
    ("clip_grad_norm", {"clip_grad_norm": True}, "True"),
    ("clip_grad_norm", {"clip_grad_norm": "1"}, "'1'"),
    ("weight_decay", {"weight_decay": -0.1}, "-0.1"),
    ("optimizer", {"name": "lamb"}, "'lamb'"),
]


@pytest.mark.parametrize(("field", "kwargs", "shown"), OPTIMIZER_BAD_FIELDS,
                         ids=[f"{f}-{s}" for f, _, s in OPTIMIZER_BAD_FIELDS])
def test_invalid_optimizer_config_names_field_and_value(field, kwargs, shown):
    with pytest.raises(ConfigError) as info:
        OptimizerConfig(**kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}={shown}")
    assert info.value.fix


def test_clip_grad_norm_accepts_positive_numbers_and_none():
    assert OptimizerConfig().clip_grad_norm is None
    assert OptimizerConfig(clip_grad_norm=1).clip_grad_norm == 1
    assert OptimizerConfig(clip_grad_norm=0.5).clip_grad_norm == 0.5
