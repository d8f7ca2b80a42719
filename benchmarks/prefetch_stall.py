"""The growing boundary on the real autoscaler, with and without the prefetch.

A local autoscaling cluster (Ray's autoscaler v2 with the fake multi-node provider: a node it adds
is one more real raylet on this machine; ``tests/autoscaling_cluster.py``): a head with one worker
slot and up to one node with another. Each run is SEBS on a toy problem, stage 1 on 1 worker,
stage 2 on 2, so stage 2's second worker needs a node that does not exist when the run starts.
Arms, interleaved (the order alternates per repetition), and before every run the cluster is back
at the head alone (the idle node scaled down):

* ``prefetch``: ``prefetch_lead_time_s`` longer than the run, so the driver holds the extra
  worker's bundle from the first epoch on (:mod:`ray_sebs.autoscale`);
* ``none``: no prefetch; Ray Train asks for the node when the 2-worker segment's ``fit()`` starts.

Per run: the stall at the growing boundary (``history.change_totals``: from the 1-worker group's
last epoch end to the 2-worker group's first update), the world size the grown segment ran at,
whether the prefetched node was up at the boundary, and the run's wall time.

    python benchmarks/prefetch_stall.py [--reps 2] [--epochs 4,2] [--rows 256] [--delay 0.25] [--smoke]
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

from ray_sebs.history import change_totals
from tests.autoscaling_cluster import AutoscalingCluster, growing_run

LEAD_TIME_S = 10**4
"""Longer than any run here: the prefetch holds the bundle from the first epoch on."""


def one_run(storage: str, name: str, lead_time_s: float | None, epochs: tuple[int, int],
            rows: int, delay_s: float) -> dict[str, Any]:
    started = time.perf_counter()
    result = growing_run(storage, name, lead_time_s=lead_time_s, epochs=epochs, rows=rows,
                         delay_s=delay_s)
    history = result.history
    boundary = history[epochs[0] - 1]["ended_at"]
    requests = result.summary.get("prefetch_requests", [])
    return {
        "stall": change_totals(history).resize_times_s[0],
        "worlds": sorted({r["world_size"] for r in history if r["segment"] == 1}),
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
                        help="epochs of stage 1 (1 worker) and stage 2 (2 workers) (default 4,2; 2,1 "
                             "in --smoke)")
    parser.add_argument("--rows", type=int, default=256, help="training rows (default: %(default)s)")
    parser.add_argument("--delay", type=float, default=0.25,
                        help="seconds of sleep per forward, so epochs last as long on a busy machine "
                             "(default: %(default)s: 8 s per 1-worker epoch at 256 rows)")
    parser.add_argument("--idle-timeout", type=float, default=6.0,
                        help="the autoscaler's idle timeout in seconds (default: %(default)s)")
    args = parser.parse_args(argv)
    args.reps = args.reps or (1 if args.smoke else 2)
    epochs = tuple(int(e) for e in (args.epochs or ("2,1" if args.smoke else "4,2")).split(","))
    assert len(epochs) == 2, "--epochs takes two numbers"
    os.environ["RAY_SEBS_AUTOSCALING"] = "1"
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")
    load = common.wait_for_quiet(args)
    import ray

    cluster = AutoscalingCluster(idle_timeout_s=args.idle_timeout)
    rows: list[tuple[Any, ...]] = []
    stalls: dict[str, list[float]] = {"prefetch": [], "none": []}
    try:
        ray.init(address=cluster.start(), log_to_driver=False)
        common.print_header("the growing boundary on the real autoscaler: prefetch vs none", args, load)
        print(f"# fake autoscaling cluster: head 2 CPU + 1 slot, up to 1 node of 1 CPU + 1 slot, "
              f"idle timeout {args.idle_timeout:g} s; epochs {epochs[0]} on 1 worker, {epochs[1]} on "
              f"2; {args.rows} rows, {args.delay:g} s sleep per forward", flush=True)
        with tempfile.TemporaryDirectory() as storage:
            for rep in range(args.reps):
                arms = ["prefetch", "none"] if rep % 2 == 0 else ["none", "prefetch"]
                for arm in arms:
                    cluster.wait_for_nodes(1, timeout_s=120)  # every run starts without the node
                    run = one_run(storage, f"{arm}-{rep}", LEAD_TIME_S if arm == "prefetch" else None,
                                  epochs, args.rows, args.delay)
                    stalls[arm].append(run["stall"])
                    rows.append((rep, arm, f"{run['stall']:.1f}", ",".join(map(str, run["worlds"])),
                                 "-" if run["lead"] is None else f"{run['lead']:.1f}",
                                 "-" if run["placed"] is None else ("yes" if run["placed"] else "no"),
                                 f"{run['wall']:.1f}", "yes" if run["updates_ok"] else "NO"))
                    print(f"# rep {rep} {arm} done", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print()
    print(common.table(("rep", "arm", "stall s", "grown segment world size",
                        "request before boundary s", "node up at boundary", "run wall s",
                        "updates as planned"), rows))
    print()
    summary = [(arm, len(values), *(f"{v:.1f}" for v in common.mean_std(values)),
                f"{min(values):.1f}", f"{max(values):.1f}") for arm, values in stalls.items()]
    print(common.table(("arm", "n", "mean stall s", "std", "min", "max"), summary))
    print(f"# load average (1 min) at the end: {common.load_average():.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
