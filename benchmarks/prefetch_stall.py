"""The growing boundary on the real autoscaler, with and without the prefetch.

A local autoscaling cluster (Ray's autoscaler v2 with the fake multi-node provider: a node it adds
is one more real raylet on this machine; ``tests/autoscaling_cluster.py``): a head with one worker
slot and up to one node with another, which takes ``--launch-delay`` seconds to launch (a cloud VM
or a new Kubernetes node takes minutes; the fake provider alone, 3-5 s). Each run is SEBS on a toy
problem, stage 1 on 1 worker, stage 2 on 2, so stage 2's second worker needs a node that does not
exist when the run starts. Arms, interleaved (the order alternates per repetition), and before
every run the cluster is back at the head alone (the idle node scaled down):

* ``prefetch``: ``prefetch_lead_time_s`` longer than the run, so the driver holds the extra
  worker's bundle from the first epoch on (:mod:`ray_sebs.autoscale`);
* ``none``: no prefetch; the 2-worker segment's elastic range starts with the one worker there
  is, Ray Train asks for the node then, and grows the group once it is up and its resize monitor
  (every 60 s) sees it.

Per run: the stall at the growing boundary, counted to the target world size (from the 1-worker
group's last epoch end to the first update of a 2-worker group: ``history.worker_group_changes``),
the restart alone (to the grown segment's first update at any size), the grown segment's world
sizes and wall time, whether the prefetched node was up at the boundary, and the run's wall time.

    python benchmarks/prefetch_stall.py [--reps 2] [--epochs 5,12] [--launch-delay 20] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.autoscaling_cluster

from ray_sebs.history import worker_group_changes
from tests.autoscaling_cluster import AutoscalingCluster, growing_run

LEAD_TIME_S = 10**4
"""Longer than any run here: the prefetch holds the bundle from the first epoch on."""


TARGET_WORLD_SIZE = 2
"""Stage 2's workers."""


def one_run(storage: str, name: str, lead_time_s: float | None, epochs: tuple[int, int],
            rows: int, delay_s: float) -> dict[str, Any]:
    started = time.perf_counter()
    result = growing_run(storage, name, lead_time_s=lead_time_s, epochs=epochs, rows=rows,
                         delay_s=delay_s)
    history = result.history
    boundary = history[epochs[0] - 1]["ended_at"]
    changes = worker_group_changes(history)
    at_target = [c for c in changes if c.workers_after >= TARGET_WORLD_SIZE]
    requests = result.summary.get("prefetch_requests", [])
    return {
        "stall": at_target[0].first_update_at - boundary if at_target else None,
        "restart": changes[0].first_update_at - boundary,
        "worlds": [r["world_size"] for r in history if r["segment"] == 1],
        "grown_wall": history[-1]["ended_at"] - boundary,
        "lead": boundary - requests[0]["requested_at"] if requests else None,
        "placed": requests[0]["placed"] if requests else None,
        "wall": time.perf_counter() - started,
        "updates_ok": history[-1]["updates"] == result.plan.total_updates,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_flags(parser)
    parser.add_argument("--reps", type=int, default=None, help="runs of each arm (default 2; 1 in --smoke)")
    parser.add_argument("--epochs", default=None,
                        help="epochs of stage 1 (1 worker) and stage 2 (2 workers) (default 5,12: "
                             "long enough for Ray Train's 60 s resize monitor to grow the group "
                             "without the prefetch; 2,1 in --smoke)")
    parser.add_argument("--rows", type=int, default=256, help="training rows (default: %(default)s)")
    parser.add_argument("--delay", type=float, default=0.25,
                        help="seconds of sleep per forward, so epochs last as long on a busy machine "
                             "(default: %(default)s: 8 s per 1-worker epoch at 256 rows)")
    parser.add_argument("--launch-delay", type=float, default=None,
                        help="seconds each node launch takes before its raylet starts (default 20; "
                             "0 in --smoke)")
    parser.add_argument("--idle-timeout", type=float, default=6.0,
                        help="the autoscaler's idle timeout in seconds (default: %(default)s)")
    args = parser.parse_args(argv)
    args.reps = args.reps or (1 if args.smoke else 2)
    epochs = tuple(int(e) for e in (args.epochs or ("2,1" if args.smoke else "5,12")).split(","))
    launch_delay_s = args.launch_delay if args.launch_delay is not None else (0 if args.smoke else 20)
    assert len(epochs) == 2, "--epochs takes two numbers"
    os.environ["RAY_SEBS_AUTOSCALING"] = "1"
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")
    load = common.wait_for_quiet(args)
    import ray

    cluster = AutoscalingCluster(idle_timeout_s=args.idle_timeout, launch_delay_s=launch_delay_s)
    rows: list[tuple[Any, ...]] = []
    stalls: dict[str, list[float | None]] = {"prefetch": [], "none": []}
    try:
        ray.init(address=cluster.start(), log_to_driver=False)
        common.print_header("the growing boundary on the real autoscaler: prefetch vs none", args, load)
        print(f"# fake autoscaling cluster: head 2 CPU + 1 slot, up to 1 node of 1 CPU + 1 slot "
              f"launched in {launch_delay_s:g} s + the raylet's start, idle timeout "
              f"{args.idle_timeout:g} s; epochs {epochs[0]} on 1 worker, {epochs[1]} on "
              f"2; {args.rows} rows, {args.delay:g} s sleep per forward", flush=True)
        with tempfile.TemporaryDirectory() as storage:
            for rep in range(args.reps):
                arms = ["prefetch", "none"] if rep % 2 == 0 else ["none", "prefetch"]
                for arm in arms:
                    cluster.wait_for_nodes(1, timeout_s=120)  # every run starts without the node
                    run = one_run(storage, f"{arm}-{rep}", LEAD_TIME_S if arm == "prefetch" else None,
                                  epochs, args.rows, args.delay)
                    stalls[arm].append(run["stall"])
                    rows.append((rep, arm, seconds(run["stall"]), seconds(run["restart"]),
                                 ",".join(map(str, run["worlds"])), seconds(run["grown_wall"]),
                                 seconds(run["lead"]),
                                 "-" if run["placed"] is None else ("yes" if run["placed"] else "no"),
                                 seconds(run["wall"]), "yes" if run["updates_ok"] else "NO"))
                    print(f"# rep {rep} {arm} done", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print()
    print(common.table(("rep", "arm", "stall to 2 workers s", "restart s",
                        "grown segment world size per epoch", "grown segment wall s",
                        "request before boundary s", "node up at boundary", "run wall s",
                        "updates as planned"), rows))
    print()
    summary = []
    for arm, values in stalls.items():
        reached = [value for value in values if value is not None]
        summary.append((arm, len(values), len(reached),
                        *((f"{v:.1f}" for v in common.mean_std(reached)) if reached else ("-", "-")),
                        seconds(max(reached, default=None))))
    print(common.table(("arm", "n", "reached 2 workers", "mean stall to 2 workers s", "std", "max"),
                       summary))
    print(f"# load average (1 min) at the end: {common.load_average():.2f}", flush=True)
    return 0


def seconds(value: float | None) -> str:
    """``12.3``, or ``-`` for a run that never got there."""
    return "-" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    sys.exit(main())
