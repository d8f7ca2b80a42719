"""SEBS against SSGD on digits through SEBSTrainer on a local Ray: accuracy, updates, wall time.

The default ``ray-sebs train`` data and model (scikit-learn digits, its 80/20 seeded split,
standardized; the MLP 64-128-10), B1=16, 4 stages x 10 epochs, lr 0.1, plain SGD. SEBS (rho=2)
doubles the batch per stage and grows 1 -> 2 workers (max micro-batch 32); SSGD (rho=2) keeps B=16
and halves the learning rate per stage on 1 worker. Per seed both runs share the data split and
the initial weights; the runs of a seed are interleaved (SEBS first on even seeds, SSGD first on
odd ones). Target: SEBS within 1 point of SSGD's accuracy with about half the updates.

``--arms`` compares other schedules and learning-rate laws, e.g. for AdamW the square-root law
against today's linear one and SSGD-style decay (issue 13's fidelity runs), or the adaptive
schedule (its noise threshold 1, at least 1 epoch per stage; the table says at which epochs its
stages began) against SEBS and SSGD (``--arms adaptive,sebs,ssgd``; the language-model comparison
is ``schedules_lm.py``):

    python benchmarks/sebs_vs_ssgd.py [--seeds 3] [--smoke] [--device cuda]
    python benchmarks/sebs_vs_ssgd.py --optimizer adamw --lr 0.003 --arms sebs:sqrt,sebs:linear,ssgd
    python benchmarks/sebs_vs_ssgd.py --arms adaptive,sebs,ssgd
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from typing import Any

import common

from ray_sebs import ClusterConfig, ScheduleConfig
from ray_sebs.data import DatasetConfig, load_data
from ray_sebs.models import build_model
from ray_sebs.schedule import LR_SCALINGS, SCHEDULE_KINDS

TARGET_POINTS = 1.0


def parse_arms(text: str) -> list[str]:
    """``sebs,ssgd`` or ``sebs:sqrt,sebs:linear,ssgd``: schedule kinds, each with an optional
    learning-rate law (default: the optimizer's)."""
    arms = [arm.strip() for arm in text.split(",") if arm.strip()]
    for arm in arms:
        kind, _, law = arm.partition(":")
        if kind not in SCHEDULE_KINDS or law not in ("", *LR_SCALINGS):
            raise argparse.ArgumentTypeError(
                f"{arm!r} is not KIND[:LAW] with KIND in {', '.join(SCHEDULE_KINDS)} and LAW in "
                f"{', '.join(LR_SCALINGS)}")
    return arms


def run(arm: str, seed: int, data: Any, args: argparse.Namespace, storage: str) -> dict[str, Any]:
    from ray.train import RunConfig

    from ray_sebs.trainer import SEBSTrainer

    kind, _, law = arm.partition(":")
    schedule = ScheduleConfig(kind=kind, initial_batch_size=args.batch_size, growth_ratio=args.ratio,
                              num_stages=args.stages, epochs_per_stage=args.epochs_per_stage,
                              learning_rate=args.lr, lr_scaling=law or None)
    trainer = SEBSTrainer(
        functools.partial(build_model, "mlp", data.input_shape, data.num_classes),
        datasets={"train": data.train, "validation": data.validation}, schedule=schedule,
        cluster=ClusterConfig(max_workers=args.max_workers, max_micro_batch=32,
                              use_gpu=args.device == "cuda"),
        optimizer=args.optimizer,
        run_config=RunConfig(name=f"{arm.replace(':', '-')}-seed{seed}", storage_path=storage),
        seed=seed)
    started = time.perf_counter()
    result = trainer.fit()
    summary = result.summary
    return {"kind": arm if law else f"{arm}:{trainer.schedule.resolved_lr_scaling}"
            if kind == "sebs" else arm, "seed": seed, "accuracy": summary["final_validation_accuracy"],
            "loss": summary["final_validation_loss"],
            "updates": summary["updates"], "planned": summary["planned_updates"],
            "wall": time.perf_counter() - started, "restarts": summary["resizes"] + summary["recoveries"],
            "restart_s": summary["resize_time_s"] + summary["recovery_time_s"],
            "peak_workers": summary["peak_workers"],
            "stage_starts": common.stage_starts_text(summary["stage_decisions"])
            if kind == "adaptive" else "",
            "train_rows": result.plan.schedule.dataset_size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_flags(parser)
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; 1 in --smoke)")
    parser.add_argument("--ratio", type=float, default=2.0,
                        help="rho of both schedules (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="B1 (default: %(default)s)")
    parser.add_argument("--stages", type=int, default=None, help="(default 4; 2 in --smoke)")
    parser.add_argument("--epochs-per-stage", type=int, default=None, help="(default 10; 1 in --smoke)")
    parser.add_argument("--lr", type=float, default=0.1, help="(default: %(default)s)")
    parser.add_argument("--optimizer", default="sgd", help="(default: %(default)s)")
    parser.add_argument("--max-workers", type=int, default=2, help="(default: %(default)s)")
    parser.add_argument("--arms", type=parse_arms, default=["sebs", "ssgd"],
                        help="schedules to compare, KIND[:LAW], e.g. sebs:sqrt,sebs:linear,ssgd "
                             "(default: sebs,ssgd; sebs with the optimizer's law)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or (1 if args.smoke else 3)
    args.stages = args.stages or (2 if args.smoke else 4)
    args.epochs_per_stage = args.epochs_per_stage or (1 if args.smoke else 10)
    common.ship_by_value(sys.modules[__name__], common)
    started_ray = common.start_local_ray(args.num_cpus)

    load = common.wait_for_quiet(args)
    common.print_header(f"SEBS vs SSGD (rho={args.ratio:g}) on digits through SEBSTrainer", args, load)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as storage:
        for seed in range(args.seeds):
            data = load_data(DatasetConfig(seed=seed))
            arms = args.arms if seed % 2 == 0 else list(reversed(args.arms))
            for arm in arms:
                runs.append(run(arm, seed, data, args, storage))
                print(f"# seed {seed} {runs[-1]['kind']} done: accuracy {runs[-1]['accuracy']:.4f}",
                      flush=True)
    print(f"\n{runs[0]['train_rows']} training rows, B1={args.batch_size}, {args.stages} stages x "
          f"{args.epochs_per_stage} epochs, lr {args.lr:g}, {args.optimizer}\n")
    print(common.table(("seed", "schedule", "val acc", "val loss", "updates", "planned", "peak workers",
                        "restarts", "restart s", "wall s", "adaptive stage starts (B_noise>=)"),
                       [(r["seed"], r["kind"], f"{r['accuracy']:.4f}", f"{r['loss']:.4f}", r["updates"],
                         r["planned"],
                         r["peak_workers"], r["restarts"], f"{r['restart_s']:.1f}", f"{r['wall']:.1f}",
                         r["stage_starts"])
                        for r in runs]))
    rows, means = [], {}
    for kind in dict.fromkeys(r["kind"] for r in runs):
        mine = [r for r in runs if r["kind"] == kind]
        accuracy, accuracy_std = common.mean_std([r["accuracy"] for r in mine])
        wall, wall_std = common.mean_std([r["wall"] for r in mine])
        updates = common.mean_std([r["updates"] for r in mine])[0]
        means[kind] = (accuracy, updates, wall)
        rows.append((kind, len(mine), f"{accuracy:.4f} ± {accuracy_std:.4f}", f"{updates:,.0f}",
                     f"{wall:.1f} ± {wall_std:.1f}"))
    print()
    print(common.table(("schedule", "seeds", "final val acc (mean ± std)", "updates", "wall s (mean ± std)"),
                       rows))
    if "ssgd" in means:
        for kind in (kind for kind in means if kind.startswith("sebs")):
            gap = 100 * (means[kind][0] - means["ssgd"][0])
            ratio = means[kind][1] / means["ssgd"][1]
            print(f"\n{kind}: updates / SSGD's {ratio:.3f}   accuracy - SSGD's {gap:+.2f} points   "
                  f"wall / SSGD's {means[kind][2] / means['ssgd'][2]:.2f}")
            print(f"target: within {TARGET_POINTS:g} point of SSGD: "
                  f"{'met' if gap >= -TARGET_POINTS else 'MISSED'}; "
                  f"about half the updates: {'met' if ratio <= 0.55 else 'MISSED'}")
    print(f"# load average (1 min) at end: {common.load_average():.2f}")
    if started_ray:
        import ray

        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
