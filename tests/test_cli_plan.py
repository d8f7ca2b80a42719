"""``ray-sebs plan``: the table, the JSON, one-line errors, and no Ray / torch import on this path."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ray_sebs.cli import default_dataset_size, main
from ray_sebs.plan import ClusterConfig, build_plan
from ray_sebs.schedule import ScheduleConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = Path(sys.executable).parent / "ray-sebs"

ALL_FLAGS = ("--schedule", "--batch-size", "--ratio", "--stages", "--epochs-per-stage", "--lr",
             "--max-batch-size", "--batch-granularity", "--dataset-size", "--min-workers",
             "--max-workers", "--max-micro-batch", "--use-gpu", "--resources-per-worker", "--json",
             "--lr-scaling", "--warmup-updates", "--optimizer", "--momentum", "--weight-decay",
             "--clip-grad-norm", "--noise-threshold", "--min-epochs-per-stage")

TABLE_COLUMNS = ("stage", "epochs", "batch", "lr", "workers", "micro x accum", "updates", "samples")

WORKED = ["plan", "--batch-size", "16", "--ratio", "2", "--stages", "4", "--epochs-per-stage", "10",
          "--dataset-size", "1257"]


def run_main(argv: list[str]) -> int:
    """``main(argv)``'s exit status, whether it returns it or argparse exits."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return 0 if exit_.code is None else exit_.code


def console(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed ``ray-sebs`` console script (or the same entry point via ``-c``)."""
    command = ([str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists()
               else [sys.executable, "-c", "from ray_sebs.cli import run; run()"])
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=60,
                          cwd=REPO_ROOT, check=False)


def table_rows(out: str) -> list[list[str]]:
    """The data rows of the plan table (split on runs of 2+ spaces)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["stage"])
    rows = []
    for line in lines[start + 2:]:
        if not line.strip():
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def test_default_plan_prints_table_totals_and_ssgd_comparison(capsys):
    assert main(["plan"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    out = captured.out
    header = next(line for line in out.splitlines() if line.strip().startswith("stage"))
    assert re.split(r"\s{2,}", header.strip()) == list(TABLE_COLUMNS)
    # Defaults: sebs, B1 16, rho 2, 4 stages of 5 epochs, the digits training split, 1..2 workers
    # with micro-batches of 32. Expected numbers computed here, by hand.
    rows_n = default_dataset_size()
    batches = [16, 32, 64, 128]
    updates = [5 * (rows_n // b) for b in batches]
    ssgd = 20 * (rows_n // 16)
    rows = table_rows(out)
    assert [row[0] for row in rows] == ["1", "2", "3", "4"]
    assert [row[1] for row in rows] == ["5"] * 4
    assert [row[2] for row in rows] == [str(b) for b in batches]
    assert [row[3] for row in rows] == ["0.1"] * 4
    assert [row[4] for row in rows] == ["1", "1", "2", "2"]
    assert [row[5] for row in rows] == ["16x1", "32x1", "32x1", "32x2"]
    assert [row[6] for row in rows] == [f"{u:,}" for u in updates]
    assert [row[7] for row in rows] == [f"{u * b:,}" for u, b in zip(updates, batches, strict=True)]
    assert f"updates: {sum(updates):,}  (all-reduce rounds: {sum(updates):,})" in out
    assert f"samples: {sum(u * b for u, b in zip(updates, batches, strict=True)):,}" in out
    assert f"{rows_n:,} training rows, 20 epochs" in out
    assert "peak workers: 2  segments: 2  resizes: 1" in out
    saved = ssgd - sum(updates)
    vs = next(line for line in out.splitlines() if line.startswith("vs ssgd"))
    assert f"{ssgd:,} updates" in vs
    assert f"saves {saved:,} updates ({saved / ssgd:.1%})" in vs
    assert f"{sum(updates) / ssgd:.1%} of the baseline's" in vs


def test_worked_example_plan_saves_1670_updates(capsys):
    assert main(WORKED) == 0
    out = capsys.readouterr().out
    # SEBS 780 + 390 + 190 + 90 = 1,450 updates; SSGD 78 x 40 = 3,120; saved 1,670 (53.5%).
    assert "updates: 1,450  (all-reduce rounds: 1,450)" in out
    assert "vs ssgd (rho=2): 3,120 updates; this run saves 1,670 updates (53.5%), 46.5% of the " \
           "baseline's" in out
    assert [row[6] for row in table_rows(out)] == ["780", "390", "190", "90"]


def test_hybrid_cap_in_the_table(capsys):
    assert main([*WORKED, "--max-batch-size", "40", "--lr", "0.1"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [row[2] for row in rows] == ["16", "32", "40", "40"]
    assert [float(row[3]) for row in rows] == pytest.approx([0.1, 0.1, 0.0625, 0.03125])


def test_adamw_plan_uses_the_sqrt_law_and_says_so(capsys):
    assert main([*WORKED, "--max-batch-size", "40", "--optimizer", "adamw"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert [row[2] for row in rows] == ["16", "32", "40", "40"]
    # eta_1 / sqrt(rho)^(s-1) while the batch grows; past the cap, / rho per stage.
    expected = [0.1, 0.1 / math.sqrt(2), 0.1 * math.sqrt(40 / 16) / 4, 0.1 * math.sqrt(40 / 16) / 8]
    assert [float(row[3]) for row in rows] == pytest.approx(expected, rel=1e-5)
    assert "lr rule: sqrt (eta_s = eta_1 * (B_s/B_1)^0.5 / rho^(s-1)), optimizer adamw" in out
    assert "warm-up" not in out


@pytest.mark.parametrize(("flags", "rule"), [
    ([], "lr rule: linear (eta_s = eta_1 * (B_s/B_1)^1 / rho^(s-1)), optimizer sgd"),
    (["--optimizer", "adam", "--lr-scaling", "linear"],
     "lr rule: linear (eta_s = eta_1 * (B_s/B_1)^1 / rho^(s-1)), optimizer adam"),
    (["--optimizer", "momentum", "--lr-scaling", "sqrt"],
     "lr rule: sqrt (eta_s = eta_1 * (B_s/B_1)^0.5 / rho^(s-1)), optimizer momentum"),
    (["--schedule", "ssgd", "--optimizer", "adamw"],
     "lr rule: ssgd (eta_s = eta_1 / rho^(s-1)), optimizer adamw"),
    (["--warmup-updates", "200"],
     "lr rule: linear (eta_s = eta_1 * (B_s/B_1)^1 / rho^(s-1)), optimizer sgd, linear warm-up over 200 "
     "updates"),
])
def test_plan_states_the_learning_rate_rule(flags, rule, capsys):
    assert main([*WORKED, *flags]) == 0
    assert rule in capsys.readouterr().out.splitlines()


def test_json_has_the_resolved_lr_scaling_and_the_warmup(capsys):
    assert main([*WORKED, "--optimizer", "adamw", "--warmup-updates", "50", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["schedule"]["lr_scaling"] == "sqrt"
    assert document["schedule"]["warmup_updates"] == 50
    assert [s["learning_rate"] for s in document["stages"]] == pytest.approx(
        [0.1 / math.sqrt(2) ** s for s in range(4)], rel=1e-12)
    assert main([*WORKED, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert (document["schedule"]["lr_scaling"], document["schedule"]["warmup_updates"]) == ("linear", 0)


def test_ssgd_plan_has_no_comparison_line(capsys):
    assert main([*WORKED, "--schedule", "ssgd"]) == 0
    out = capsys.readouterr().out
    assert "updates: 3,120" in out
    assert "vs ssgd" not in out


# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------


def test_json_to_stdout_parses_and_matches_build_plan(capsys):
    assert main([*WORKED, "--json", "-"]) == 0
    out = capsys.readouterr().out
    document = json.loads(out)  # nothing but the JSON on stdout
    config = ScheduleConfig(initial_batch_size=16, growth_ratio=2, num_stages=4, epochs_per_stage=10)
    plan = build_plan(config, 1257, ClusterConfig())
    assert document["totals"] == plan.to_dict()["totals"]
    assert document["totals"]["updates"] == 1450
    assert document["totals"]["allreduce_rounds"] == 1450
    assert document["dataset_size"] == 1257
    assert document["schedule"]["epochs_per_stage"] == [10, 10, 10, 10]
    assert document["baseline"] == {"kind": "ssgd", "updates": 3120, "updates_saved": 1670,
                                    "updates_saved_fraction": pytest.approx(1 - 1450 / 3120)}
    assert [s["global_batch_size"] for s in document["stages"]] == [16, 32, 64, 128]


def test_json_bare_flag_means_stdout(capsys):
    assert main([*WORKED, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["updates"] == 1450


def test_json_to_a_file(tmp_path, capsys):
    target = tmp_path / "plan.json"
    assert main([*WORKED, "--json", str(target)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {target}" in out
    assert "updates: 1,450" in out  # the table is still printed
    document = json.loads(target.read_text())
    assert document["totals"]["updates"] == 1450
    assert document["baseline"]["updates"] == 3120


# --------------------------------------------------------------------------------------------
# Errors: exit 2, one line on stderr naming the flag and the value, no traceback
# --------------------------------------------------------------------------------------------

BAD_ARGUMENTS = [
    (["--ratio", "0.5"], "--ratio", "0.5"),
    (["--ratio", "nan"], "--ratio", "nan"),
    (["--ratio", "abc"], "--ratio", "abc"),
    (["--stages", "0"], "--stages", "0"),
    (["--batch-size", "0"], "--batch-size", "0"),
    (["--batch-size", "-3"], "--batch-size", "-3"),
    (["--batch-size", "1.5"], "--batch-size", "1.5"),
    (["--min-workers", "3", "--max-workers", "2"], "--min-workers", "3"),
    (["--min-workers", "32"], "--min-workers", "32"),
    (["--max-workers", "0"], "--max-workers", "0"),
    (["--max-micro-batch", "0"], "--max-micro-batch", "0"),
    (["--max-batch-size", "8"], "--max-batch-size", "8"),
    (["--epochs-per-stage", "1,2", "--stages", "3"], "--epochs-per-stage", "1,2"),
    (["--epochs-per-stage", "0"], "--epochs-per-stage", "0"),
    (["--epochs-per-stage", "x"], "--epochs-per-stage", "x"),
    (["--lr", "0"], "--lr", "0"),
    (["--batch-granularity", "5"], "--batch-size", "16"),
    (["--dataset-size", "100"], "--dataset-size", "100"),
    (["--schedule", "foo"], "--schedule", "foo"),
    (["--resources-per-worker", "CPU"], "--resources-per-worker", "CPU"),
    (["--resources-per-worker", "CPU=-1"], "--resources-per-worker", "-1"),
    # NCCL would refuse two ranks on one GPU only after the workers start.
    (["--use-gpu", "--resources-per-worker", "CPU=1,GPU=0.5"], "--resources-per-worker", "GPU=0.5"),
    (["--lr-scaling", "log"], "--lr-scaling", "log"),
    (["--warmup-updates", "-1"], "--warmup-updates", "-1"),
    (["--clip-grad-norm", "0"], "--clip-grad-norm", "0"),
    (["--clip-grad-norm", "inf"], "--clip-grad-norm", "inf"),
    (["--weight-decay", "-1"], "--weight-decay", "-1"),
    (["--optimizer", "lamb"], "--optimizer", "lamb"),
]


@pytest.mark.parametrize(("args", "flag", "value"), BAD_ARGUMENTS,
                         ids=[" ".join(args) for args, _, _ in BAD_ARGUMENTS])
def test_bad_argument_is_one_line_naming_flag_and_value(args, flag, value, capsys):
    assert run_main(["plan", *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert flag in lines[0] and value in lines[0]
    assert lines[0].startswith("ray-sebs plan: error: ")
    assert "Traceback" not in captured.err + captured.out
    assert captured.out == ""


@pytest.mark.parametrize(("args", "flag", "value"), [
    (["--ratio", "0.5"], "--ratio", "0.5"),
    (["--ratio", "abc"], "--ratio", "abc"),
])
def test_console_script_errors_are_one_line(args, flag, value):
    result = console("plan", *args)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert flag in lines[0] and value in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_console_script_plans_the_worked_example():
    result = console(*WORKED, "--json", "-")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert json.loads(result.stdout)["totals"]["updates"] == 1450


def test_plan_help_mentions_every_flag(capsys):
    assert run_main(["plan", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ALL_FLAGS:
        assert flag in out, flag


def test_missing_command_is_an_error(capsys):
    assert run_main([]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


# --------------------------------------------------------------------------------------------
# The planning path imports neither Ray nor torch
# --------------------------------------------------------------------------------------------

ISOLATION_PROBE = textwrap.dedent("""
    import contextlib, importlib.util, io, json, sys
    import ray_sebs
    import ray_sebs.schedule
    import ray_sebs.plan
    from ray_sebs.cli import main
    with contextlib.redirect_stdout(io.StringIO()) as out:
        status = main(["plan"])
    heavy = sorted(name for name in sys.modules
                   if name in ("ray", "torch") or name.startswith(("ray.", "torch.")))
    print(json.dumps({
        "status": status,
        "ours": sorted(name for name in sys.modules if name.startswith("ray_sebs")),
        "planned": "updates:" in out.getvalue(),
        "heavy": heavy,
        "ray_sebs_loaded": "ray_sebs.plan" in sys.modules,
        "ray_installed": importlib.util.find_spec("ray") is not None,
        "torch_installed": importlib.util.find_spec("torch") is not None,
    }))
""")


def test_planning_imports_neither_ray_nor_torch():
    env = {key: value for key, value in os.environ.items() if key != "PYTHONSTARTUP"}
    result = subprocess.run([sys.executable, "-c", ISOLATION_PROBE], capture_output=True, text=True,
                            timeout=60, cwd=REPO_ROOT, env=env, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["status"] == 0 and report["planned"] and report["ray_sebs_loaded"]
    heavy_roots = sorted({name.split(".")[0] for name in report["heavy"]})
    assert heavy_roots == [], f"{heavy_roots} imported while planning; ray_sebs modules: {report['ours']}"
    if not (report["ray_installed"] or report["torch_installed"]):
        pytest.skip("neither ray nor torch is installed: the isolation check proves nothing here")
