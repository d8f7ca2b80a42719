"""Resize cost: a ray-sebs worker-group restart against a bare ``TorchTrainer.fit()``.

In one run, repetitions rotate through three variants:

* ``ray-sebs 1->2``: a SEBS run on digits (MLP, B1=16, rho=2, one epoch per stage) whose plan keeps
  1 worker for stages 1-2 and 2 workers for stages 3-4: one worker-group restart. Its cost is
  ``SEBSResult.summary['resize_times_s']``: from the end of the last epoch of the 1-worker segment
  to the first update of the 2-worker segment (teardown, start, process group, dataset split,
  checkpoint restore, first batch). The run's history must also show no restart where the worker
  count stays the same (one worker-group start per segment, constant world size within it).
* ``bare fit W=1`` / ``bare fit W=2``: ``TorchTrainer(trivial_loop).fit()`` wall time, with the same
  per-worker resources, under Ray Train's default controller poll (2 s), as a user's fit runs;
* ``bare fit W=2, poll as ray-sebs``: the same with the poll interval ray-sebs sets for its own
  fits (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``), so the restart is also compared like for like.

Target: restart <= 1.2 x a bare fit at the same worker count. Then the wall time of the default
job, ``ray-sebs train`` with no arguments, as a subprocess in a temp dir. ``--smoke`` runs only a
3-stage SEBS run (two fits): no bare fits, no default job.

    python benchmarks/restart_cost.py [--reps 3] [--smoke] [--device cuda] [--skip-default-job]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

import common

from ray_sebs import ClusterConfig, ScheduleConfig
from ray_sebs.data import DatasetConfig, load_data
from ray_sebs.models import build_model
from ray_sebs.plan import build_plan
from ray_sebs.resources import size_worker_resources

TARGET = 1.2


def trivial_loop(config: dict[str, Any]) -> None:
    import ray.train

    started_at = time.time()
    if ray.train.get_context().get_world_rank() == 0:  # a local Ray: the driver reads this file
        with open(config["marker"], "w") as handle:
            handle.write(repr(started_at))
    ray.train.report({"done": 1})


def bare_fit(workers: int, bundle: dict[str, float], use_gpu: bool, storage: str,
             name: str, poll_as_ray_sebs: bool = False) -> tuple[float, float]:
    """(wall time of the fit, of it the time until the train function started); with
    ``poll_as_ray_sebs`` the controller polls as often as under ray-sebs (else Ray's default)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray_sebs.trainer import controller_poll_interval

    marker = os.path.join(storage, f"{name}.started")
    trainer = TorchTrainer(trivial_loop, train_loop_config={"marker": marker}, scaling_config=ScalingConfig(
        num_workers=workers, use_gpu=use_gpu, resources_per_worker=bundle),
        run_config=RunConfig(name=name, storage_path=storage))
    started, wall_started = time.perf_counter(), time.time()
    if poll_as_ray_sebs:
        with controller_poll_interval(workers):
            trainer.fit()
    else:
        trainer.fit()
    wall = time.perf_counter() - started
    with open(marker) as handle:
        return wall, float(handle.read()) - wall_started


def schedule_and_cluster(args: argparse.Namespace) -> tuple[ScheduleConfig, ClusterConfig]:
    return (ScheduleConfig(kind="sebs", initial_batch_size=16, growth_ratio=2, num_stages=args.stages,
                           epochs_per_stage=1),
            ClusterConfig(max_workers=2, max_micro_batch=32, use_gpu=args.device == "cuda"))


def sebs_run(data: Any, args: argparse.Namespace, storage: str, name: str) -> dict[str, Any]:
    from ray.train import RunConfig

    from ray_sebs.trainer import SEBSTrainer

    schedule, cluster = schedule_and_cluster(args)
    trainer = SEBSTrainer(
        functools.partial(build_model, "mlp", data.input_shape, data.num_classes),
        datasets={"train": data.train, "validation": data.validation}, schedule=schedule,
        cluster=cluster, run_config=RunConfig(name=name, storage_path=storage), seed=0)
    started = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - started
    history = result.history
    # A worker-group start shows as a new segment_started_at; within a segment there must be one.
    starts = {(r["segment"], r["segment_started_at"]) for r in history}
    # Where a restart's time goes: old group's end to new train function start; then, inside the
    # new group, until the first update, of which waiting for the first epoch's data.
    parts = [(current["segment_started_at"] - previous["ended_at"],
              current["first_update_at"] - current["segment_started_at"],
              current["data_wait_fraction"] * current["epoch_time_s"])
             for previous, current in itertools.pairwise(history)
             if current["segment"] != previous["segment"]]
    same_count_boundaries = sum(1 for a, b in itertools.pairwise(history)
                                if a["stage"] != b["stage"] and a["world_size"] == b["world_size"])
    same_count_restarts = sum(1 for a, b in itertools.pairwise(history)
                              if a["world_size"] == b["world_size"]
                              and a["segment_started_at"] != b["segment_started_at"])
    return {"restarts": result.summary["resize_times_s"], "wall": wall, "parts": parts,
            "planned_restarts": result.plan.resizes, "starts": len(starts),
            "segments": len(result.plan.segments), "same_count_boundaries": same_count_boundaries,
            "same_count_restarts": same_count_restarts,
            "worlds": "/".join(str(r["world_size"]) for r in history)}


def default_job(timeout: float) -> tuple[float, int, str]:
    """Wall time of `ray-sebs train` (no arguments) in a fresh temp dir, its exit code, its summary."""
    command = [os.path.join(os.path.dirname(sys.executable), "ray-sebs"), "train"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        process = subprocess.run(command, cwd=directory, env=env, capture_output=True, text=True,
                                 timeout=timeout)
        wall = time.perf_counter() - started
    summary = [line for line in process.stdout.splitlines()
               if re.match(r"(updates|wall time) ", line)]
    if process.returncode:
        summary.append(process.stderr.strip().splitlines()[-1] if process.stderr.strip() else "")
    return wall, process.returncode, " / ".join(summary)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_flags(parser)
    parser.add_argument("--reps", type=int, default=None, help="repetitions of each variant (default 3)")
    parser.add_argument("--stages", type=int, default=None,
                        help="SEBS stages, one epoch each (default 4; 3 in --smoke): 1 worker for "
                             "B=16, 32, then 2 workers")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--skip-default-job", action="store_true",
                        help="do not time `ray-sebs train` with no arguments")
    parser.add_argument("--default-job-timeout", type=float, default=1800)
    args = parser.parse_args(argv)
    args.reps = args.reps or (1 if args.smoke else 3)
    args.stages = args.stages or (3 if args.smoke else 4)
    common.ship_by_value(sys.modules[__name__], common)
    started_ray = common.start_local_ray(args.num_cpus)
    import ray

    load = common.wait_for_quiet(args)
    common.print_header("restart cost: ray-sebs worker-group restart vs bare TorchTrainer.fit()", args, load)
    data = load_data(DatasetConfig())
    use_gpu = args.device == "cuda"
    # The bare fits get the per-worker resources SEBSTrainer gives this plan's workers.
    schedule, cluster = schedule_and_cluster(args)
    plan = build_plan(schedule, data.train_rows, cluster)
    bundle = size_worker_resources(cluster, plan.peak_workers, ray.cluster_resources()).worker_bundle()
    # --smoke skips the bare fits: the restart alone needs two fits, and the smoke test's budget.
    variants = ["sebs"] if args.smoke else ["sebs", "bare1", "bare2", "bare2fast"]
    restarts: list[float] = []
    bare: dict[str, list[float]] = {"W=1": [], "W=2": [], "W=2, poll as ray-sebs": []}
    bare_start: dict[str, list[float]] = {key: [] for key in bare}
    parts: list[tuple[float, float, float]] = []
    checks: list[tuple[Any, ...]] = []
    with tempfile.TemporaryDirectory() as storage:
        for rep in range(args.reps):
            order = variants[rep % len(variants):] + variants[:rep % len(variants)]
            for variant in order:
                if variant == "sebs":
                    run = sebs_run(data, args, storage, f"sebs-{rep}")
                    restarts += run["restarts"]
                    parts += run["parts"]
                    checks.append((rep, run["worlds"], run["segments"], run["starts"],
                                   len(run["restarts"]), run["planned_restarts"],
                                   run["same_count_boundaries"], run["same_count_restarts"],
                                   " ".join(f"{t:.1f}" for t in run["restarts"]), f"{run['wall']:.1f}"))
                else:
                    fast = variant.endswith("fast")
                    workers = int(variant.removesuffix("fast")[-1])
                    key = f"W={workers}" + (", poll as ray-sebs" if fast else "")
                    wall, start = bare_fit(workers, bundle, use_gpu, storage, f"{variant}-{rep}",
                                           poll_as_ray_sebs=fast)
                    bare[key].append(wall)
                    bare_start[key].append(start)
                print(f"# rep {rep} {variant} done", flush=True)
    print(f"\nper-worker resources: {bundle}")
    print("\nray-sebs runs (worlds: world size per epoch):")
    print(common.table(("rep", "worlds", "segments", "group starts", "restarts", "planned",
                        "same-count stage boundaries", "restarts there", "restart s", "run wall s"), checks))
    rows = [("ray-sebs restart 1->2", len(restarts), *fmt(restarts))]
    rows += [(f"bare fit {w}", len(times), *fmt(times)) for w, times in bare.items() if times]
    print("\n" + common.table(("variant", "n", "mean s", "std s", "min s", "max s"), rows))
    print("\nwhere the time goes (means, s):")
    breakdown = [("ray-sebs restart 1->2", "old group's last report, teardown, new group start",
                  f"{common.mean_std([p[0] for p in parts])[0]:.2f}"),
                 ("", "train fn start -> first update (restore, DDP, dataset split, first batch)",
                  f"{common.mean_std([p[1] for p in parts])[0]:.2f}"),
                 ("", "  of which the first epoch's data wait",
                  f"{common.mean_std([p[2] for p in parts])[0]:.2f}")]
    for w in bare:
        if bare[w]:
            start = common.mean_std(bare_start[w])[0]
            breakdown += [(f"bare fit {w}", "fit() call -> train fn start", f"{start:.2f}"),
                          ("", "train fn start -> fit() returns (report, teardown)",
                           f"{common.mean_std(bare[w])[0] - start:.2f}")]
    print(common.table(("variant", "part", "s"), breakdown))
    ok_zero = all(row[7] == 0 for row in checks) and all(row[3] == row[2] for row in checks)
    print(f"\nzero restarts where the worker count does not change: {'yes' if ok_zero else 'NO'}")
    mean_restart = common.mean_std(restarts)[0]
    for key, times in bare.items():
        if times:
            ratio = mean_restart / common.mean_std(times)[0]
            verdict = "met" if ratio <= TARGET else "MISSED"
            print(f"restart / bare fit {key}: {ratio:.2f}x (target <= {TARGET}x): {verdict}")
    print(f"# load average (1 min) after the fits: {common.load_average():.2f}", flush=True)
    if started_ray:
        ray.shutdown()
    if not (args.smoke or args.skip_default_job):
        load = common.wait_for_quiet(args)
        print(f"\n# load average (1 min) before the default job: {load:.2f}", flush=True)
        wall, code, summary = default_job(args.default_job_timeout)
        print(f"default job `ray-sebs train` (no arguments): wall {wall:.1f} s, exit {code}")
        print(f"  {summary}")
        print(f"# load average (1 min) at end: {common.load_average():.2f}")
    return 0


def fmt(values: list[float]) -> tuple[str, str, str, str]:
    mean, std = common.mean_std(values)
    return f"{mean:.2f}", f"{std:.2f}", f"{min(values):.2f}", f"{max(values):.2f}"


if __name__ == "__main__":
    raise SystemExit(main())
