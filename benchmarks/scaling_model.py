"""Scaling model: predicted time, GPU-hours and all-reduce rounds of SSGD on W fixed workers and of
SEBS growing its workers with the batch (up to a worker budget), and the rho that minimises each.

Per update on ``W`` workers, for the stage's decomposition from :mod:`ray_sebs.plan` (``k``
micro-steps of at most ``m`` rows on the busiest rank):

    compute   = k * (t_step + m * t_sample)           (t_step, t_sample measured, or given)
    all-reduce = 0 if W == 1 else 2 (W-1)/W * P / bandwidth + latency        (ring, P gradient bytes)
    update    = compute + all-reduce                   (no overlap of backward and communication)

A stage costs ``updates * update``; every worker-group restart (a change of the worker count)
costs ``--restart-s`` on the new group's workers. GPU-hours are workers x seconds / 3600;
all-reduce rounds are the updates of stages with more than one worker. ``--latency-us`` is the
cost of one all-reduce round (NCCL's tree all-reduce keeps it nearly flat in W);
``--ring-latency`` charges it per ring step instead, 2 (W-1) times per round.

Updates, batches, workers and decompositions come from ``ray_sebs.plan.build_plan``: nothing is
re-derived here. The compute and communication terms are validated against measurements at 1 and
2 workers on this machine (torch.distributed, gloo, one CPU thread per process, the loop's own
``train_update``); the communication constants for that check are fitted from raw gloo
all-reduces, not from the updates being predicted.

    python benchmarks/scaling_model.py [--smoke] [--device cuda] [--bandwidth-gbps 100] ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Any

import common
import torch
import torch.distributed as dist
from torch import nn

from ray_sebs import ClusterConfig, ScheduleConfig
from ray_sebs.errors import ConfigError
from ray_sebs.loop import EpochTally, UpdateRule, train_update
from ray_sebs.models import build_model
from ray_sebs.objective import classification
from ray_sebs.plan import BatchDecomposition, ElasticPlan, build_plan, decompose

DEFAULT_BANDWIDTH_GBPS = 100.0  # one 100 Gb/s-class NIC per GPU (InfiniBand HDR100 / 100 GbE)
DEFAULT_LATENCY_US = 30.0  # per all-reduce round over such a fabric: 20-50 us
DEFAULT_RESTART_S = 23.0  # a ray-sebs 1 -> 2 worker restart on this machine (benchmarks/RESULTS.md)


@dataclass(frozen=True)
class Costs:
    sample_s: float
    """Forward+backward time of one sample on one worker."""
    step_s: float
    """Fixed time of one micro-step (kernel launches, hooks, optimizer step)."""
    param_bytes: int
    bandwidth_bytes_s: float
    latency_s: float
    restart_s: float
    ring_latency: bool = False

    def allreduce_s(self, workers: int) -> float:
        if workers <= 1:
            return 0.0
        hops = 2 * (workers - 1) if self.ring_latency else 1
        return 2 * (workers - 1) / workers * self.param_bytes / self.bandwidth_bytes_s + hops * self.latency_s

    def compute_s(self, split: BatchDecomposition) -> float:
        return split.accumulation_steps * (self.step_s + split.micro_batch_size * self.sample_s)


@dataclass(frozen=True)
class Prediction:
    time_s: float
    gpu_hours: float
    rounds: int
    updates: int
    restarts: int
    peak_workers: int
    stages: list[tuple[Any, ...]]


def predict(plan: ElasticPlan, costs: Costs) -> Prediction:
    time_s = worker_s = 0.0
    rounds = 0
    stages = []
    previous_workers = None
    for stage in plan.stages:
        workers, split = stage.target_workers, stage.decomposition
        if previous_workers is not None and workers != previous_workers:
            time_s += costs.restart_s
            worker_s += workers * costs.restart_s
        previous_workers = workers
        compute, communicate = costs.compute_s(split), costs.allreduce_s(workers)
        seconds = stage.updates * (compute + communicate)
        time_s += seconds
        worker_s += workers * seconds
        rounds += stage.updates if workers > 1 else 0
        stages.append((stage.stage.index, stage.stage.global_batch_size, workers, split.describe(),
                       f"{stage.updates:,}", f"{compute * 1e3:.3f}", f"{communicate * 1e3:.3f}",
                       f"{seconds / 3600:.3f}"))
    return Prediction(time_s=time_s, gpu_hours=worker_s / 3600, rounds=rounds, updates=plan.total_updates,
                      restarts=plan.resizes, peak_workers=plan.peak_workers, stages=stages)


# ---------------------------------------------------------------------------------------------
# Measurements


def make_model(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    return build_model(args.model, args.input_shape, 10)


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def random_batch(args: argparse.Namespace, rows: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(rows)
    features = torch.randn(rows, math.prod(args.input_shape), generator=generator)
    labels = torch.randint(0, 10, (rows,), generator=generator)
    return features.to(device), labels.to(device)


def time_updates(model: nn.Module, optimizer: torch.optim.Optimizer, split: BatchDecomposition, rank: int,
                 batch: tuple[torch.Tensor, torch.Tensor], updates: int, device: torch.device) -> float:
    """Seconds per update of the loop's own ``train_update``."""
    tally = EpochTally(device=device, updates_before=0)
    # world size 1 here: this process times one rank's update without an all-reduce.
    rule = UpdateRule.for_epoch(split.loss_scale, 1, split.rank_micro_batches(rank), device)
    objective, (features, labels) = classification(), batch
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(updates):
        train_update(model, optimizer, objective, {"features": features, "label": labels}, rule, tally)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / updates


def single_worker_times(args: argparse.Namespace, batch_sizes: list[int], micro_sizes: list[int],
                        device: torch.device) -> tuple[dict[int, float], dict[int, float]]:
    """Median seconds per update in this process: one micro-step of each micro size (the
    calibration), and the plan's decomposition at one worker for each batch size (the check)."""
    model = make_model(args).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    cases = [("micro", m, decompose(m, 1, m, dataset_size=m)) for m in micro_sizes]
    cases += [("batch", b, decompose(b, 1, args.max_micro_batch, dataset_size=b)) for b in batch_sizes]
    batches = {rows: random_batch(args, rows, device) for _, rows, _ in cases}
    times: dict[tuple[str, int], list[float]] = {(kind, rows): [] for kind, rows, _ in cases}
    for _, rows, split in cases:  # warm-up
        time_updates(model, optimizer, split, 0, batches[rows], 2, device)
    for rep in range(args.reps):
        for kind, rows, split in cases if rep % 2 == 0 else reversed(cases):
            times[(kind, rows)].append(time_updates(model, optimizer, split, 0, batches[rows],
                                                    args.updates, device))
    micro = {rows: common.median(times[("micro", rows)]) for rows in micro_sizes}
    full = {rows: common.median(times[("batch", rows)]) for rows in batch_sizes}
    return micro, full


def fit_line(points: dict[int, float]) -> tuple[float, float]:
    """Least-squares ``time = intercept + slope * rows`` with ``intercept >= 0``; (intercept, slope).

    A negative intercept (noise, or per-sample cost falling with the micro-batch) is refitted
    through the origin rather than clipped, so the line still fits the measured points.
    """
    xs, ys = list(points), list(points.values())
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / \
        sum((x - mean_x) ** 2 for x in xs)
    intercept = mean_y - slope * mean_x
    if intercept >= 0:
        return intercept, slope
    return 0.0, sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def distributed_worker(rank: int, world: int, port: int, args: argparse.Namespace, batch_sizes: list[int],
                       out_path: str) -> None:
    """One of ``world`` gloo processes: raw all-reduce timings, then DDP updates with and without
    the gradient all-reduce (``no_sync`` around the whole update), interleaved."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=rank, world_size=world)
    model = nn.parallel.DistributedDataParallel(make_model(args).to(device),
                                                device_ids=[rank] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    numel = sum(p.numel() for p in model.parameters())
    raw: dict[str, list[float]] = {"small": [], "params": []}
    tensors = {"small": torch.zeros(1, device=device), "params": torch.zeros(numel, device=device)}
    for rep in range(args.reps * 10):
        for name in ("small", "params") if rep % 2 == 0 else ("params", "small"):
            dist.barrier()
            started = time.perf_counter()
            dist.all_reduce(tensors[name])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            raw[name].append(time.perf_counter() - started)
    splits = {b: decompose(b, world, args.max_micro_batch, dataset_size=b) for b in batch_sizes}
    batches = {b: random_batch(args, splits[b].rank_samples[rank], device) for b in batch_sizes}
    cases = [(b, sync) for b in batch_sizes for sync in (True, False)]
    times: dict[str, list[float]] = {f"{b}-{sync}": [] for b, sync in cases}
    for rep in range(args.reps + 1):  # the first repetition warms up
        for b, sync in cases if rep % 2 == 0 else reversed(cases):
            dist.barrier()
            if sync:
                seconds = time_updates(model, optimizer, splits[b], rank, batches[b], args.updates, device)
            else:
                with model.no_sync():
                    seconds = time_updates(model, optimizer, splits[b], rank, batches[b], args.updates,
                                           device)
            if rep:
                times[f"{b}-{sync}"].append(seconds)
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump({"raw": {k: common.median(v) for k, v in raw.items()},
                       "times": {k: common.median(v) for k, v in times.items()}, "numel": numel}, handle)
    dist.destroy_process_group()


def two_worker_times(args: argparse.Namespace, batch_sizes: list[int]) -> dict[str, Any]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as directory:
        out_path = os.path.join(directory, "result.json")
        mp.spawn(distributed_worker, args=(2, free_port(), args, batch_sizes, out_path), nprocs=2)
        with open(out_path) as handle:
            return json.load(handle)


def error(predicted: float, measured: float) -> str:
    return f"{(predicted - measured) / measured:+.0%}" if measured > 0 else "-"


def validate(args: argparse.Namespace, device: torch.device) -> tuple[Costs, list[tuple[Any, ...]], str]:
    """Calibrate on one worker and raw all-reduces, then check predictions at 1 and 2 workers."""
    batch_sizes = args.validation_batches
    micro_sizes = sorted({max(1, args.max_micro_batch // 4), max(1, args.max_micro_batch // 2),
                          args.max_micro_batch})
    micro, full = single_worker_times(args, batch_sizes, micro_sizes, device)
    step_s, sample_s = fit_line(micro)
    two = two_worker_times(args, batch_sizes)
    numel_bytes = two["numel"] * 4
    latency = two["raw"]["small"]
    bandwidth = numel_bytes / max(two["raw"]["params"] - latency, 1e-9)  # 2(W-1)/W = 1 at W=2
    local = Costs(sample_s=sample_s, step_s=step_s, param_bytes=numel_bytes, bandwidth_bytes_s=bandwidth,
                  latency_s=latency, restart_s=args.restart_s)
    rows = []
    for b in batch_sizes:
        split = decompose(b, 1, args.max_micro_batch, dataset_size=b)
        predicted = local.compute_s(split)
        rows.append((1, b, split.describe(), f"{full[b] * 1e3:.3f}", f"{predicted * 1e3:.3f}",
                     error(predicted, full[b]), "-", "-", "-", f"{full[b] * 1e3:.3f}",
                     f"{predicted * 1e3:.3f}", error(predicted, full[b])))
    for b in batch_sizes:
        split = decompose(b, 2, args.max_micro_batch, dataset_size=b)
        compute, total = two["times"][f"{b}-False"], two["times"][f"{b}-True"]
        predicted_compute, predicted_comm = local.compute_s(split), local.allreduce_s(2)
        rows.append((2, b, split.describe(), f"{compute * 1e3:.3f}", f"{predicted_compute * 1e3:.3f}",
                     error(predicted_compute, compute), f"{(total - compute) * 1e3:.3f}",
                     f"{predicted_comm * 1e3:.3f}", error(predicted_comm, total - compute),
                     f"{total * 1e3:.3f}", f"{(predicted_compute + predicted_comm) * 1e3:.3f}",
                     error(predicted_compute + predicted_comm, total)))
    note = (f"calibration: t_step {step_s * 1e6:.1f} us + {sample_s * 1e6:.2f} us/sample (one worker, micro "
            f"sizes {micro_sizes}); gloo all-reduce at W=2: latency {latency * 1e6:.0f} us, bandwidth "
            f"{bandwidth * 8 / 1e9:.2f} Gb/s over {numel_bytes:,} bytes")
    return local, rows, note


# ---------------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def parse_floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",")]


def parse_ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_flags(parser)
    model = parser.add_argument_group("model (measured unless given)")
    model.add_argument("--model", default=None, help="mlp, cnn or logreg (default: cnn; mlp in --smoke)")
    model.add_argument("--input-shape", type=parse_shape, default=None,
                       help="C,H,W or F (default: 3,32,32 for cnn, 64 otherwise)")
    model.add_argument("--sample-time-us", type=float, default=None,
                       help="forward+backward time of one sample (default: measured on --device)")
    model.add_argument("--step-time-us", type=float, default=None,
                       help="fixed time per micro-step (default: measured on --device)")
    model.add_argument("--param-bytes", type=float, default=None,
                       help="gradient bytes all-reduced per update (default: the model's fp32 parameters)")
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--bandwidth-gbps", type=float, default=DEFAULT_BANDWIDTH_GBPS,
                         help="per-worker all-reduce bandwidth in Gb/s (default: %(default)s, a "
                              "100 Gb/s-class GPU cluster fabric)")
    cluster.add_argument("--latency-us", type=float, default=DEFAULT_LATENCY_US,
                         help="latency of one all-reduce round in us (default: %(default)s; 20-50 is "
                              "typical)")
    cluster.add_argument("--ring-latency", action="store_true",
                         help="charge the latency per ring step, 2(W-1) per round (default: once per round)")
    cluster.add_argument("--restart-s", type=float, default=DEFAULT_RESTART_S,
                         help="cost of one worker-group restart in s (default: %(default)s, measured here)")
    cluster.add_argument("--max-workers", type=int, default=512, help="worker budget (default: %(default)s)")
    cluster.add_argument("--max-micro-batch", type=int, default=32,
                         help="largest micro-batch per worker (default: %(default)s)")
    cluster.add_argument("--ssgd-workers", type=parse_ints, default=None,
                         help="fixed worker counts for SSGD (default: its own target and SEBS's peak)")
    schedule = parser.add_argument_group("schedule")
    schedule.add_argument("--dataset-size", type=int, default=1_281_167,
                          help="training rows (default: %(default)s, ImageNet-1k)")
    schedule.add_argument("--batch-size", type=int, default=1024, help="B1 (default: %(default)s)")
    schedule.add_argument("--ratio", type=float, default=2.0, help="rho (default: %(default)s)")
    schedule.add_argument("--stages", type=int, default=5, help="(default: %(default)s)")
    schedule.add_argument("--epochs-per-stage", type=int, default=18, help="(default: %(default)s)")
    schedule.add_argument("--max-batch-size", type=int, default=None, help="batch cap (default: none)")
    schedule.add_argument("--ratios", type=parse_floats, default=[1.5, 2.0, 3.0, 4.0, 8.0],
                          help="rho values to sweep (default: 1.5,2,3,4,8)")
    check = parser.add_argument_group("validation at 1 and 2 workers on this machine")
    check.add_argument("--skip-validation", action="store_true")
    check.add_argument("--validation-batches", type=parse_ints, default=None,
                       help="global batches to check (default: 16,64; 16 in --smoke)")
    check.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7)")
    check.add_argument("--updates", type=int, default=None, help="updates per repetition (default 10)")
    args = parser.parse_args(argv)
    args.model = args.model or ("mlp" if args.smoke else "cnn")
    args.input_shape = tuple(args.input_shape or ((3, 32, 32) if args.model == "cnn" else (64,)))
    args.validation_batches = args.validation_batches or ([16] if args.smoke else [16, 64])
    args.reps = args.reps or (1 if args.smoke else 7)
    args.updates = args.updates or (2 if args.smoke else 10)
    torch.set_num_threads(1)
    device = torch.device(args.device)

    load = common.wait_for_quiet(args)
    common.print_header("scaling model: SSGD on fixed workers vs SEBS growing workers", args, load)
    measured_bytes = param_bytes(make_model(args))
    if args.skip_validation:
        micro, _ = single_worker_times(args, [], sorted({max(1, args.max_micro_batch // 2),
                                                         args.max_micro_batch}), device)
        step_s, sample_s = fit_line(micro)
        local = None
    else:
        local, rows, note = validate(args, device)
        step_s, sample_s = local.step_s, local.sample_s
        print(f"validation: {args.model} {'x'.join(map(str, args.input_shape))}, {device.type}, 1 thread "
              "per worker; per update, ms; error = (predicted - measured) / measured")
        print(note)
        print(common.table(("W", "batch", "micro x accum", "compute meas", "compute pred", "err",
                            "all-reduce meas", "all-reduce pred", "err", "update meas", "update pred", "err"),
                           rows))
        print()
    costs = Costs(
        sample_s=args.sample_time_us * 1e-6 if args.sample_time_us is not None else sample_s,
        step_s=args.step_time_us * 1e-6 if args.step_time_us is not None else step_s,
        param_bytes=int(args.param_bytes) if args.param_bytes is not None else measured_bytes,
        bandwidth_bytes_s=args.bandwidth_gbps * 1e9 / 8, latency_s=args.latency_us * 1e-6,
        restart_s=args.restart_s, ring_latency=args.ring_latency)
    print(f"inputs: t_sample {costs.sample_s * 1e6:.2f} us, t_step {costs.step_s * 1e6:.1f} us "
          f"({'given' if args.sample_time_us is not None else f'measured, {device.type}'}), gradient bytes "
          f"{costs.param_bytes:,}, bandwidth {args.bandwidth_gbps:g} Gb/s, latency {args.latency_us:g} us "
          f"per {'ring step' if args.ring_latency else 'round'}, restart {args.restart_s:g} s, "
          f"worker budget {args.max_workers}")

    def schedule_config(kind: str, ratio: float) -> ScheduleConfig:
        return ScheduleConfig(kind=kind, initial_batch_size=args.batch_size, growth_ratio=ratio,
                              num_stages=args.stages, epochs_per_stage=args.epochs_per_stage,
                              max_batch_size=args.max_batch_size)

    budget = ClusterConfig(max_workers=args.max_workers, max_micro_batch=args.max_micro_batch)
    sebs_plan = build_plan(schedule_config("sebs", args.ratio), args.dataset_size, budget)
    sebs = predict(sebs_plan, costs)
    ssgd_natural = build_plan(schedule_config("ssgd", args.ratio), args.dataset_size, budget).peak_workers
    ssgd_workers = args.ssgd_workers or sorted({ssgd_natural, sebs.peak_workers})
    print(f"\nSEBS rho={args.ratio:g}, {args.dataset_size:,} rows, B1={args.batch_size}, {args.stages} "
          f"stages x {args.epochs_per_stage} epochs (per update: ms):")
    print(common.table(("stage", "batch", "workers", "micro x accum", "updates", "compute", "all-reduce",
                        "stage h"), sebs.stages))
    rows = [summary_row(f"SEBS rho={args.ratio:g}, W growing", sebs)]
    for workers in ssgd_workers:
        fixed = replace(budget, min_workers=workers, max_workers=workers)
        try:
            plan = build_plan(schedule_config("ssgd", args.ratio), args.dataset_size, fixed)
        except ConfigError as problem:
            print(f"SSGD on {workers} workers: {problem}")
            continue
        rows.append(summary_row(f"SSGD rho={args.ratio:g}, W={workers}", predict(plan, costs)))
    print()
    print(common.table(("schedule", "updates", "all-reduce rounds", "restarts", "peak W", "time h",
                        "GPU-hours"), rows))

    sweep = []
    for ratio in args.ratios:
        try:
            sweep.append((ratio, predict(build_plan(schedule_config("sebs", ratio), args.dataset_size,
                                                    budget), costs)))
        except ConfigError as problem:
            print(f"rho={ratio:g}: not feasible: {problem}")
    if sweep:
        fastest = min(sweep, key=lambda item: item[1].time_s)[0]
        cheapest = min(sweep, key=lambda item: item[1].gpu_hours)[0]
        print(f"\nrho sweep under a budget of {args.max_workers} workers (same stages and epochs; accuracy "
              "is not modelled):")
        print(common.table(("rho", "updates", "all-reduce rounds", "restarts", "peak W", "time h",
                            "GPU-hours", "best"),
                           [(f"{ratio:g}", *summary_row("", p)[1:],
                             " ".join(label for label, best in (("time", fastest), ("GPU-h", cheapest))
                                      if best == ratio)) for ratio, p in sweep]))
        print(f"\nrho minimising time: {fastest:g}; rho minimising GPU-hours: {cheapest:g}")
    print(f"# load average (1 min) at end: {common.load_average():.2f}")
    return 0


def summary_row(label: str, prediction: Prediction) -> tuple[Any, ...]:
    return (label, f"{prediction.updates:,}", f"{prediction.rounds:,}", prediction.restarts,
            prediction.peak_workers, f"{prediction.time_s / 3600:.3f}", f"{prediction.gpu_hours:.2f}")


if __name__ == "__main__":
    sys.exit(main())
