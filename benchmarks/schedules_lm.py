"""Adaptive vs SEBS vs SSGD on the byte-level language model (examples/byte_gpt.py), per seed.

Each run is ``examples/byte_gpt.py``'s own ``main`` (imported from the file, not copied) with
``--schedule adaptive`` (one arm per ``--thresholds`` value, default 1), ``sebs`` (one arm per
``--ratios`` value, default 2) or ``ssgd``, on one
local Ray shared by all runs, in a temporary storage path. Every run trains on the same rows (a
multiple of the largest batch any SEBS arm reaches: ``--keep-multiple-of``), the same budget of
stages x epochs per stage (byte_gpt's defaults: 3 x 2; adaptive and SSGD at ``--ratio``), and per
seed the same initial weights. The runs of a seed are interleaved, the order rotating by one arm
per seed. Flags this script does not know are passed on to byte_gpt (e.g. ``--stages 4
--epochs-per-stage 3 --noise-threshold 0.5``); ``--smoke`` passes ``--tiny``.

Per run, from the history (:mod:`ray_sebs.history`): final validation loss (nats per byte),
updates, the updates and the wall seconds (``epoch_clock``: from the first epoch's start) at the
first epoch whose validation loss is at most the target, worker-seconds, and for adaptive the
epochs where its stages began with the B_noise that began them and the threshold batch
``noise_threshold x rho x B_s``. The target: ``--target-loss``, else the mean final validation
loss of the SSGD seeds (the baseline; a seed of SSGD itself may miss it). Then the means per arm
over seeds and a verdict, computed, not asserted: whether adaptive reached the target on every
seed with no more mean updates to target than the best fixed SEBS arm that did, per adaptive arm.

    python benchmarks/schedules_lm.py [--seeds 3] [--ratios 2,4] [--thresholds 1,16] [--smoke]

For digits (where accuracy saturates in the first stage; continuity with the earlier results) the
same comparison is ``ray-sebs tune --schedules adaptive,sebs,ssgd`` (its comparison has the
updates and wall time to target), or ``python benchmarks/sebs_vs_ssgd.py --arms
adaptive,sebs,ssgd``, whose table gives final accuracy and updates and, for adaptive, the epochs its
stages began at.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import tempfile
from functools import reduce
from pathlib import Path
from types import ModuleType
from typing import Any

import common

from ray_sebs.history import epoch_clock, first_reaching, worker_seconds

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "byte_gpt.py"


def load_byte_gpt() -> ModuleType:
    """examples/byte_gpt.py as a module (shipped to Ray's workers by value: they cannot import it)."""
    name = "example_byte_gpt"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    common.ship_by_value(module)
    return module


def parse_numbers(text: str, least: float, what: str) -> list[float]:
    numbers = [float(part) for part in text.split(",") if part.strip()]
    if not numbers or any(number < least for number in numbers):
        raise argparse.ArgumentTypeError(f"{text!r}: give {what} >= {least:g}, e.g. 2 or 2,4")
    return numbers


Arm = tuple[str, str, list[str]]
"""(label, byte_gpt's --schedule, its further flags)."""


def arms_of(ratios: list[float], thresholds: list[float]) -> list[Arm]:
    """Adaptive per noise threshold, SEBS per ratio, SSGD."""
    return [*((f"adaptive t={t:g}", "adaptive", ["--noise-threshold", f"{t:g}"]) for t in thresholds),
            *((f"sebs rho={r:g}", "sebs", ["--ratio", f"{r:g}"]) for r in ratios),
            ("ssgd", "ssgd", [])]


def run(byte_gpt: ModuleType, arm: Arm, seed: int, passed: list[str], keep_multiple_of: int,
        storage: str) -> dict[str, Any]:
    label, schedule, flags = arm
    argv = [*passed, "--schedule", schedule, *flags, "--seed", str(seed), "--keep-multiple-of",
            str(keep_multiple_of), "--storage-path", storage,
            "--name", f"{label.replace(' ', '-').replace('=', '')}-seed{seed}"]
    outcome = byte_gpt.main(argv)
    result = outcome["result"]
    return {"arm": label, "seed": seed, "history": list(result.history),
            "decisions": outcome["stage_decisions"], "exact": outcome["exact"]}


def measure(record: dict[str, Any], target: float) -> dict[str, Any]:
    history = record["history"]
    clock = epoch_clock(history)
    reached = first_reaching(history, target, metric="loss", lower_is_better=True)
    return {**record, "loss": float(history[-1]["validation_loss"]),
            "updates": int(history[-1]["updates"]), "wall": clock[-1],
            "worker_s": worker_seconds(history),
            "updates_to_target": None if reached is None else int(history[reached]["updates"]),
            "time_to_target": None if reached is None else clock[reached]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_flags(parser)
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; 1 in --smoke)")
    parser.add_argument("--ratios", type=lambda text: parse_numbers(text, 1, "growth ratios"),
                        default=[2.0], help="growth ratios of the fixed SEBS arms (default: 2)")
    parser.add_argument("--thresholds", type=lambda text: parse_numbers(text, 0, "noise thresholds"),
                        default=[1.0], help="--noise-threshold of each adaptive arm (default: 1)")
    parser.add_argument("--ratio", type=float, default=2.0,
                        help="rho of adaptive and SSGD (default: %(default)s)")
    parser.add_argument("--stages", type=int, default=3,
                        help="stages of every arm (adaptive: the most it may reach) (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="B1 (default: %(default)s)")
    parser.add_argument("--target-loss", type=float, default=None,
                        help="validation loss (nats/byte) to reach (default: SSGD's mean final loss)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    args, passed = parser.parse_known_args(argv)
    args.seeds = args.seeds or (1 if args.smoke else 3)
    if args.smoke:
        passed = ["--tiny", *passed]
    if args.device == "cuda":
        passed = ["--use-gpu", *passed]
    if args.smoke and args.stages == 3:
        args.stages = 2  # --tiny's
    passed += ["--ratio", f"{args.ratio:g}", "--stages", str(args.stages),
               "--batch-size", str(args.batch_size)]
    # Every arm trains on the same rows: a multiple of every SEBS arm's (and adaptive's) last batch.
    byte_gpt = load_byte_gpt()
    from ray_sebs import ScheduleConfig
    from ray_sebs.schedule import stage_batch_and_lr

    last_batches = [stage_batch_and_lr(ScheduleConfig(kind="sebs", initial_batch_size=args.batch_size,
                                                      growth_ratio=ratio, num_stages=args.stages),
                                       args.stages)[0] for ratio in {*args.ratios, args.ratio}]
    keep_multiple_of = reduce(math.lcm, last_batches)
    started_ray = common.start_local_ray(args.num_cpus)

    load = common.wait_for_quiet(args)
    common.print_header("adaptive vs SEBS vs SSGD on byte_gpt (stdlib source, next-byte loss)", args, load)
    arms = arms_of(args.ratios, args.thresholds)
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as storage:
        for seed in range(args.seeds):
            shift = seed % len(arms)
            for arm in arms[shift:] + arms[:shift]:
                records.append(run(byte_gpt, arm, seed, passed, keep_multiple_of, storage))
                print(f"# seed {seed} {arm[0]} done: validation loss "
                      f"{records[-1]['history'][-1]['validation_loss']:.4f}", flush=True)
    baseline = [r["history"][-1]["validation_loss"] for r in records if r["arm"] == "ssgd"]
    if args.target_loss is not None:
        target, source = args.target_loss, "--target-loss"
    else:
        target, source = common.mean_std(baseline)[0], "SSGD's mean final validation loss"
    runs = [measure(record, target) for record in records]

    def maybe(value: float | None, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    print(f"\nbyte_gpt flags: {' '.join(passed)}; training rows a multiple of {keep_multiple_of}")
    print(f"target: validation loss <= {target:.4f} nats/byte ({source})\n")
    print(common.table(("seed", "schedule", "val loss", "updates", "updates to target",
                        "s to target", "wall s", "worker-s", "exact", "adaptive stage starts (B_noise>=)"),
                       [(r["seed"], r["arm"], f"{r['loss']:.4f}", r["updates"],
                         maybe(r["updates_to_target"], "d"), maybe(r["time_to_target"], ".1f"),
                         f"{r['wall']:.1f}", f"{r['worker_s']:.1f}", "yes" if r["exact"] else "NO",
                         common.stage_starts_text(r["decisions"]) if r["arm"].startswith("adaptive") else "")
                        for r in runs]))
    rows, means = [], {}
    for label, _, _ in arms:
        mine = [r for r in runs if r["arm"] == label]
        loss, loss_std = common.mean_std([r["loss"] for r in mine])
        reaching = [r for r in mine if r["updates_to_target"] is not None]
        to_target = common.mean_std([r["updates_to_target"] for r in reaching])[0]
        time_to_target = common.mean_std([r["time_to_target"] for r in reaching])[0]
        means[label] = (to_target if len(reaching) == len(mine) else None)
        rows.append((label, len(mine), f"{loss:.4f} ± {loss_std:.4f}",
                     f"{common.mean_std([r['updates'] for r in mine])[0]:,.0f}",
                     f"{len(reaching)}/{len(mine)}", "—" if not reaching else f"{to_target:,.0f}",
                     "—" if not reaching else f"{time_to_target:.1f}",
                     f"{common.mean_std([r['wall'] for r in mine])[0]:.1f}",
                     f"{common.mean_std([r['worker_s'] for r in mine])[0]:.1f}"))
    print()
    print(common.table(("schedule", "seeds", "final val loss (mean ± std)", "updates", "seeds at target",
                        "updates to target", "s to target", "wall s", "worker-s"), rows))
    sebs = {label: value for label, value in means.items() if label.startswith("sebs") and value is not None}
    best = min(sebs, key=sebs.__getitem__) if sebs else None
    print("\n" + ("no fixed SEBS arm reached the target on every seed" if best is None
                  else f"best fixed SEBS arm: {best}, {sebs[best]:,.0f} updates to target"))
    for label in (label for label, schedule, _ in arms if schedule == "adaptive"):
        adaptive = means[label]
        met = adaptive is not None and (best is None or adaptive <= sebs[best])
        print(f"{label}: " + ("did not reach the target on every seed" if adaptive is None
                              else f"{adaptive:,.0f} updates to target"))
        print(f"target: {label} reaches the target with no more updates than the best fixed SEBS "
              f"arm: {'met' if met else 'MISSED'}")
    print(f"# load average (1 min) at end: {common.load_average():.2f}")
    if started_ray:
        import ray

        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
