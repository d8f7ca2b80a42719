"""Ingest: what the Ray Data shard iterator delivers, and how long real epochs wait for it.

1. Samples/s of one epoch of update batches at the stage batch sizes of a CNN run on synthetic
   image data, from :func:`ray_sebs.loop.epoch_batches` (the loop's exact iterator settings) on a
   ``streaming_split(1, equal=True)`` shard, as Ray Train hands a worker; against slicing (and
   shuffled indexing of) the same rows held as in-memory tensors; and against tuning variants of
   the Ray Data side (no local shuffle, deeper prefetch, a smaller shuffle buffer, more blocks).
   Variants alternate epoch by epoch. A shard's first epoch (the split's start-up) is shown apart.
   ``--cache-data host`` (:class:`ray_sebs.loop.ShardBatches`: the shard read once, shuffled by
   index each epoch) is one of the variants.
2. The data-wait fraction the loop itself reports (``history[*]['data_wait_fraction']``: time
   blocked in ``next(batches)`` over the epoch's time) for a real SEBS run of the CNN on the same
   data, growing 1 -> 2 workers, once per ``--cache-data`` mode (streaming, then the host cache).
   Target: < 5% of epoch time.

    python benchmarks/ingest.py [--smoke] [--device cuda]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import common
import numpy as np
import torch

from ray_sebs import ClusterConfig, ScheduleConfig
from ray_sebs.data import DatasetConfig, load_data
from ray_sebs.loop import ShardBatches, epoch_batches
from ray_sebs.models import build_model
from ray_sebs.plan import build_plan

TARGET_WAIT = 0.05
Batches = Callable[[Any, int, int], Iterator[dict[str, torch.Tensor]]]


def parse_shape(text: str) -> tuple[int, int, int]:
    values = tuple(int(part) for part in text.split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} is not C,H,W")
    return values  # type: ignore[return-value]


def iterator(shuffle: bool = True, buffer: Callable[[int], int] | None = None, **options: Any) -> Batches:
    """An epoch iterator like the loop's, with other Ray Data settings."""

    def batches(shard: Any, rows: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        extra = dict(options)
        if shuffle:
            extra["local_shuffle_buffer_size"] = buffer(rows) if buffer else max(4 * rows, 1024)
            extra["local_shuffle_seed"] = seed
        return iter(shard.iter_torch_batches(batch_size=rows, drop_last=True, **extra))

    return batches


def cached(cache: str) -> Batches:
    """The loop's ``--cache-data`` source: one :class:`ShardBatches` per shard, read on first use."""
    sources: dict[int, ShardBatches] = {}

    def batches(shard: Any, rows: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        source = sources.setdefault(id(shard), ShardBatches(shard, cache, torch.device("cpu")))
        return source.epoch(rows, seed)

    return batches


def ray_variants(blocks: int) -> dict[str, tuple[str, Batches]]:
    """Name -> (dataset key, iterator factory). ``loop`` is exactly what the training loop uses."""
    return {
        "loop (epoch_batches)": ("base", epoch_batches),
        "loop --cache-data host": ("base", cached("host")),
        "no local shuffle": ("base", iterator(shuffle=False)),
        "prefetch_batches=4": ("base", iterator(prefetch_batches=4)),
        "shuffle buffer 4*rows": ("base", iterator(buffer=lambda rows: 4 * rows)),
        f"{blocks} blocks (repartition)": ("blocks", epoch_batches),
    }


def bind(factory: Batches, shard: Any) -> Callable[[int, int], Iterator[dict[str, torch.Tensor]]]:
    return lambda rows, seed: factory(shard, rows, seed)


def in_memory_epoch(features: torch.Tensor, labels: torch.Tensor, rows: int, shuffled: bool,
                    seed: int) -> Iterator[dict[str, torch.Tensor]]:
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)) if shuffled else None
    for start in range(0, len(labels) - rows + 1, rows):
        if order is None:
            yield {"features": features[start:start + rows], "label": labels[start:start + rows]}
        else:
            index = order[start:start + rows]
            yield {"features": features[index], "label": labels[index]}


def run_epoch(batches: Iterator[dict[str, torch.Tensor]], device: torch.device) -> tuple[int, float, float]:
    """(samples, seconds, seconds to the first batch) of one epoch, touching every batch."""
    started = time.perf_counter()
    first = None
    samples = 0
    for batch in batches:
        features = batch["features"].to(device, non_blocking=True)
        samples += len(batch["label"])
        if first is None:
            first = time.perf_counter() - started
        del features
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return samples, time.perf_counter() - started, first or 0.0


def measure_iterators(data: Any, batch_sizes: list[int], epochs: int, device: torch.device,
                      blocks: int, smoke: bool) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    frame = data.train.to_pandas()
    features = torch.as_tensor(np.stack(frame["features"].to_numpy()), dtype=torch.float32)
    labels = torch.as_tensor(frame["label"].to_numpy().copy())
    datasets = {"base": data.train}
    variants: dict[str, Callable[[int, int], Iterator[dict[str, torch.Tensor]]]] = {
        "in-memory slices": lambda rows, seed: in_memory_epoch(features, labels, rows, False, seed),
        "in-memory shuffled index": lambda rows, seed: in_memory_epoch(features, labels, rows, True, seed),
    }
    startup: list[tuple[Any, ...]] = []
    candidates = list(ray_variants(blocks).items())
    for name, (key, factory) in candidates[:2] if smoke else candidates:  # each starts a split
        if key == "blocks" and key not in datasets:
            datasets[key] = data.train.repartition(blocks).materialize()
        shard = datasets[key].streaming_split(1, equal=True)[0]
        samples, seconds, first = run_epoch(factory(shard, batch_sizes[0], 0), device)
        startup.append((name, batch_sizes[0], f"{seconds:.2f}", f"{first:.3f}"))
        variants[name] = bind(factory, shard)
    rows_out = []
    for rows in batch_sizes:
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        names = list(variants)
        for epoch in range(epochs):
            for name in names if epoch % 2 == 0 else reversed(names):
                samples, seconds, first = run_epoch(variants[name](rows, epoch), device)
                results[name].append((samples / seconds, first))
        for name in names:
            rates = [rate for rate, _ in results[name]]
            rows_out.append((rows, name, f"{common.median(rates):,.0f}", f"{min(rates):,.0f}",
                             f"{common.median([first for _, first in results[name]]) * 1e3:.1f}"))
    return rows_out, startup


def epoch_run(data: Any, args: argparse.Namespace, storage: str,
              cache_data: str) -> tuple[list[tuple[Any, ...]], float, float]:
    from ray.train import RunConfig

    from ray_sebs.trainer import SEBSTrainer

    schedule = ScheduleConfig(kind="sebs", initial_batch_size=args.batch_size, growth_ratio=2,
                              num_stages=args.stages, epochs_per_stage=args.epochs_per_stage)
    cluster = ClusterConfig(max_workers=2, max_micro_batch=args.max_micro_batch,
                            use_gpu=args.device == "cuda")
    datasets = {"train": data.train, "validation": data.validation}
    trainer = SEBSTrainer(functools.partial(build_model, "cnn", data.input_shape, data.num_classes),
                          datasets=datasets, schedule=schedule, cluster=cluster,
                          run_config=RunConfig(name=f"ingest-cnn-{cache_data}", storage_path=storage),
                          seed=0, cache_data=cache_data)
    result = trainer.fit()
    history = result.history
    # The first epoch of each worker group also waits for the group's dataset split to start.
    first = [i == 0 or r["segment_started_at"] != history[i - 1]["segment_started_at"]
             for i, r in enumerate(history)]
    rows = [(r["epoch"], r["stage"], r["world_size"], r["global_batch_size"],
             f"{r['micro_batch_size']}x{r['accumulation_steps']}", "yes" if is_first else "",
             f"{r['epoch_time_s']:.2f}", f"{r['samples_per_s']:,.0f}", f"{r['data_wait_fraction']:.1%}")
            for r, is_first in zip(history, first, strict=True)]
    return rows, wait_fraction(history), wait_fraction([r for r, f in zip(history, first, strict=True)
                                                        if not f])


def wait_fraction(records: list[dict[str, Any]]) -> float:
    waited = sum(r["data_wait_fraction"] * r["epoch_time_s"] for r in records)
    total = sum(r["epoch_time_s"] for r in records)
    return waited / total if total else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_flags(parser)
    parser.add_argument("--rows", type=int, default=None, help="synthetic rows (default 4096)")
    parser.add_argument("--image-shape", type=parse_shape, default=None, help="C,H,W (default 3,32,32)")
    parser.add_argument("--batch-size", type=int, default=32, help="B1 of the CNN run (default: %(default)s)")
    parser.add_argument("--stages", type=int, default=None, help="stages of the CNN run (default 3)")
    parser.add_argument("--epochs-per-stage", type=int, default=None, help="(default 2)")
    parser.add_argument("--max-micro-batch", type=int, default=64,
                        help="micro-batch cap: the run grows 1 -> 2 workers at B=128 (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="timed epochs per iterator variant and batch size (default 5)")
    parser.add_argument("--blocks", type=int, default=16, help="blocks of the repartition variant")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--skip-epoch-run", action="store_true", help="only the iterator comparison")
    parser.add_argument("--cache-modes", default=None,
                        type=lambda text: [mode for mode in text.split(",") if mode],
                        help="--cache-data modes of the real-epoch runs, in order (default: none,host; "
                             "host in --smoke: streaming runs in every other test)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.rows = args.rows or (512 if smoke else 4096)
    args.image_shape = args.image_shape or ((1, 8, 8) if smoke else (3, 32, 32))
    args.stages = args.stages or (1 if smoke else 3)
    args.epochs_per_stage = args.epochs_per_stage or (1 if smoke else 2)
    args.epochs = args.epochs or (1 if smoke else 5)
    args.cache_modes = args.cache_modes or (["host"] if smoke else ["none", "host"])
    common.ship_by_value(sys.modules[__name__], common)
    common.start_local_ray(args.num_cpus)
    device = torch.device(args.device)

    load = common.wait_for_quiet(args)
    common.print_header("ingest: Ray Data shard iterator vs in-memory tensors", args, load)
    started = time.perf_counter()
    data = load_data(DatasetConfig(name="synthetic", synthetic_rows=args.rows,
                                   synthetic_image_shape=args.image_shape))
    print(f"# data: synthetic {'x'.join(map(str, args.image_shape))} images, {data.train_rows} training "
          f"rows, {data.train.num_blocks()} block(s), prepared in {time.perf_counter() - started:.1f} s")
    plan = build_plan(ScheduleConfig(initial_batch_size=args.batch_size, num_stages=args.stages,
                                     epochs_per_stage=args.epochs_per_stage), data.train_rows,
                      ClusterConfig(max_workers=2, max_micro_batch=args.max_micro_batch))
    batch_sizes = sorted({p.decomposition.rank_samples[0] for p in plan.stages})
    rates, startup = measure_iterators(data, batch_sizes, args.epochs, device, args.blocks, args.smoke)
    print(f"\niterator throughput, one shard, {args.epochs} epochs per cell, variants interleaved "
          "(rows = per-rank rows of an update at the plan's stages):")
    print(common.table(("rows/update", "source", "samples/s (median)", "samples/s (min)",
                        "first batch ms"), rates))
    print("\nfirst epoch of a fresh shard (the split starting up):")
    print(common.table(("source", "rows/update", "epoch s", "first batch s"), startup))
    for cache_data in () if args.skip_epoch_run else args.cache_modes:
        with tempfile.TemporaryDirectory() as storage:
            rows, overall, steady = epoch_run(data, args, storage, cache_data)
        print(f"\nreal epochs (SEBSTrainer, CNN, B1={args.batch_size}, rho=2, {args.stages} stages x "
              f"{args.epochs_per_stage} epochs, --cache-data {cache_data}), data wait as the loop "
              "reports it:")
        print(common.table(("epoch", "stage", "workers", "batch", "micro x accum", "group's first",
                            "epoch s", "samples/s", "data wait"), rows))
        for label, value in (("all epochs", overall),
                             ("epochs after each worker group's first", steady)):
            print(f"--cache-data {cache_data}: data wait over {label}: {value:.1%} "
                  f"(target < {TARGET_WAIT:.0%}): {'met' if value < TARGET_WAIT else 'MISSED'}")
    print(f"# load average (1 min) at end: {common.load_average():.2f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    raise SystemExit(main())
