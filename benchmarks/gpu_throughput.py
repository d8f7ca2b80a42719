"""Training throughput of the CNN: ray-sebs on one worker against bare PyTorch loops, fp32 and bf16.

Per global batch (64, 128, 256 by default) it prints samples/s per epoch of the small CNN
(``build_model("cnn", (3, 32, 32), 10)``) on synthetic 3x32x32 images, for:

* ``ray-sebs``: one ``SEBSTrainer`` run on 1 worker whose stages are the batch sizes (SEBS, rho=2,
  one worker group for the whole run), read from ``history[*]['samples_per_s']`` (training time
  only) with the data-wait fraction the loop reports; one run per ``--precision`` and
  ``--cache-data`` pair of ``--sebs-variants`` (streaming, and the rank's shard on the device;
  ``--smoke``: one run with both levers, bf16 from the device cache);
* ``bare, on device``: a PyTorch loop over the same rows already on the device, a shuffled index
  per epoch: what the model alone can do;
* ``bare, copy``: the same loop with the rows in host memory (pinned on CUDA), each batch copied
  host -> device: what a plain DataLoader-style loop gets.

Each in fp32 and bf16 (``torch.autocast(device_type, dtype=torch.bfloat16)``, as ray-sebs's
``--precision bf16`` does). A figure is the median over the
epochs after the first (warm-up: allocator, cuDNN autotuning, the worker's first batches). Bare
variants alternate epoch by epoch. No target: it shows what a GPU loses between the model and
ray-sebs, and whether bf16 is worth adding.

    python benchmarks/gpu_throughput.py [--smoke] [--device cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import common
import numpy as np
import torch
from torch import nn

from ray_sebs import ClusterConfig, ScheduleConfig
from ray_sebs.data import CACHE_MODES, DatasetConfig, PreparedData, load_data
from ray_sebs.models import build_model

IMAGE_SHAPE = (3, 32, 32)
CLASSES = 10
PRECISIONS = ("fp32", "bf16")
DEFAULT_VARIANTS = "fp32:none,fp32:device,bf16:none,bf16:device"
SMOKE_VARIANTS = "bf16:device"


def precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16: autocast on ``device``'s type; fp32: nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class BareLoop:
    """A hand-written PyTorch training loop: SGD, mean cross-entropy, a shuffled index per epoch.

    ``on_device``: the rows live on the device and each batch is an index into them; otherwise
    they live in host memory (pinned on CUDA) and each batch is gathered there and copied over.
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, device: torch.device,
                 on_device: bool, precision: str) -> None:
        self.device, self.on_device, self.precision = device, on_device, precision
        if on_device:
            features, labels = features.to(device), labels.to(device)
        elif device.type == "cuda":
            features, labels = features.pin_memory(), labels.pin_memory()
        self.features, self.labels = features, labels
        torch.manual_seed(0)
        self.model = build_model("cnn", IMAGE_SHAPE, CLASSES).to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)

    def batches(self, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.labels), generator=generator)
        if self.on_device:
            order = order.to(self.device)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            features, labels = self.features[index], self.labels[index]
            if not self.on_device:
                if self.device.type == "cuda":  # the gathered batch is not pinned: pin, then copy async
                    features, labels = features.pin_memory(), labels.pin_memory()
                features = features.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
            yield features, labels

    def epoch(self, batch_size: int, seed: int) -> float:
        """Samples/s of one epoch (drop_last, as the loop's iterator)."""
        synchronize(self.device)
        started = time.perf_counter()
        samples = 0
        for features, labels in self.batches(batch_size, seed):
            with precision_context(self.precision, self.device):
                loss = nn.functional.cross_entropy(self.model(features), labels)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            samples += len(labels)
        synchronize(self.device)
        return samples / (time.perf_counter() - started)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def after_warmup(values: list[float]) -> float:
    """Median of the epochs after the first, or the only one."""
    return common.median(values[1:] if len(values) > 1 else values)


def measure_bare(data: PreparedData, batch_sizes: list[int], epochs: int,
                 device: torch.device) -> dict[tuple[int, str, str], float]:
    """(batch, precision, variant) -> samples/s; variants alternate epoch by epoch."""
    frame = data.train.to_pandas()
    features = torch.as_tensor(np.stack(frame["features"].to_numpy()), dtype=torch.float32)
    labels = torch.as_tensor(frame["label"].to_numpy().copy())
    results: dict[tuple[int, str, str], float] = {}
    for precision in PRECISIONS:
        loops = {name: BareLoop(features, labels, device, on_device, precision)
                 for name, on_device in (("on device", True), ("copy", False))}
        for batch_size in batch_sizes:
            rates: dict[str, list[float]] = {name: [] for name in loops}
            for epoch in range(epochs):
                for name in loops if epoch % 2 == 0 else reversed(list(loops)):
                    rates[name].append(loops[name].epoch(batch_size, seed=epoch))
            for name, values in rates.items():
                results[batch_size, precision, name] = after_warmup(values)
        print(f"# bare loops, {precision} done", flush=True)
    return results


def parse_variants(text: str) -> list[tuple[str, str]]:
    """``fp32:none,bf16:device``: (precision, cache-data) pairs."""
    variants = []
    for item in filter(None, text.split(",")):
        precision, _, cache = item.partition(":")
        if precision not in PRECISIONS or cache not in CACHE_MODES:
            raise argparse.ArgumentTypeError(
                f"{item!r} is not PRECISION:CACHE with PRECISION in {', '.join(PRECISIONS)} and "
                f"CACHE in {', '.join(CACHE_MODES)}")
        variants.append((precision, cache))
    return variants


def measure_ray_sebs(data: PreparedData, args: argparse.Namespace, storage: str, precision: str,
                     cache_data: str) -> dict[int, tuple[float, float]]:
    """Global batch -> (samples/s, data-wait fraction) of one 1-worker ray-sebs run whose stages
    are the batch sizes (one worker group: the stages keep the worker count)."""
    from ray.train import RunConfig

    from ray_sebs.trainer import SEBSTrainer

    schedule = ScheduleConfig(kind="sebs", initial_batch_size=args.batch_size, growth_ratio=2,
                              num_stages=args.stages, epochs_per_stage=args.epochs)
    cluster = ClusterConfig(min_workers=1, max_workers=1, max_micro_batch=max_batch(args),
                            use_gpu=args.device == "cuda")
    trainer = SEBSTrainer(functools.partial(build_model, "cnn", IMAGE_SHAPE, CLASSES),
                          datasets={"train": data.train}, schedule=schedule, cluster=cluster,
                          run_config=RunConfig(name=f"gpu-throughput-{precision}-{cache_data}",
                                               storage_path=storage),
                          seed=0, precision=precision, cache_data=cache_data)
    history = trainer.fit().history
    by_batch: dict[int, list[dict[str, Any]]] = {}
    for record in history:
        by_batch.setdefault(record["global_batch_size"], []).append(record)
    return {batch: (after_warmup([r["samples_per_s"] for r in records]),
                    common.median([r["data_wait_fraction"] for r in records[1:] or records]))
            for batch, records in by_batch.items()}


def max_batch(args: argparse.Namespace) -> int:
    """The last stage's batch: one worker holds it in one micro-batch, as the bare loops do."""
    return args.batch_size * 2 ** (args.stages - 1)


def rate(value: float) -> str:
    return f"{value:,.0f}"


def build_rows(batch_sizes: list[int], bare: dict[tuple[int, str, str], float],
               sebs: dict[tuple[str, str], dict[int, tuple[float, float]]]) -> list[tuple[Any, ...]]:
    rows = []
    for batch_size in batch_sizes:
        for precision in PRECISIONS:
            on_device, copy = bare[batch_size, precision, "on device"], bare[batch_size, precision, "copy"]
            for (variant_precision, cache_data), by_batch in sebs.items():
                if variant_precision != precision:
                    continue
                sebs_rate, wait = by_batch[batch_size]
                rows.append((batch_size, precision, cache_data, rate(sebs_rate), f"{wait:.1%}",
                             rate(on_device), rate(copy), f"{sebs_rate / on_device:.2f}",
                             f"{sebs_rate / copy:.2f}"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_flags(parser)
    parser.add_argument("--rows", type=int, default=None,
                        help="synthetic 3x32x32 training rows (default 8192; smoke 128)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="first global batch; each next one doubles (default 64; smoke 8)")
    parser.add_argument("--stages", type=int, default=None,
                        help="number of batch sizes: 64, 128, 256 (default 3; smoke 2)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per batch size and variant, the first not counted (default 4; smoke 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads of the bare loops with --device cpu, as a 1-CPU Ray "
                             "worker gets (default: %(default)s)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--sebs-variants", type=parse_variants, default=None,
                        help=f"ray-sebs runs as PRECISION:CACHE pairs (default {DEFAULT_VARIANTS}; "
                             f"smoke {SMOKE_VARIANTS})")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.sebs_variants = args.sebs_variants or parse_variants(SMOKE_VARIANTS if smoke else DEFAULT_VARIANTS)
    args.rows = args.rows or (128 if smoke else 8192)
    args.batch_size = args.batch_size or (8 if smoke else 64)
    args.stages = args.stages or (2 if smoke else 3)
    args.epochs = args.epochs or (2 if smoke else 4)
    batch_sizes = [args.batch_size * 2 ** stage for stage in range(args.stages)]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here; use --device cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    common.ship_by_value(sys.modules[__name__], common)
    common.start_local_ray(args.num_cpus)

    load = common.wait_for_quiet(args)
    common.print_header("gpu throughput: ray-sebs vs bare PyTorch, CNN on 3x32x32, fp32 and bf16",
                        args, load)
    started = time.perf_counter()
    data = load_data(DatasetConfig(name="synthetic", synthetic_rows=args.rows, validation_fraction=0,
                                   synthetic_image_shape=IMAGE_SHAPE, synthetic_classes=CLASSES))
    print(f"# data: synthetic 3x32x32 images, {data.train_rows} training rows, no validation, "
          f"prepared in {time.perf_counter() - started:.1f} s", flush=True)
    bare = measure_bare(data, batch_sizes, args.epochs, device)
    sebs = {}
    with tempfile.TemporaryDirectory() as storage:
        for precision, cache_data in args.sebs_variants:
            sebs[precision, cache_data] = measure_ray_sebs(data, args, storage, precision, cache_data)
            print(f"# ray-sebs {precision} --cache-data {cache_data} done", flush=True)
    print(f"\nsamples/s per epoch (median of epochs 2..{args.epochs} of {args.epochs}), 1 worker / 1 "
          f"{'GPU' if device.type == 'cuda' else 'process'}; ratio = ray-sebs / bare:")
    print(common.table(("batch", "precision", "--cache-data", "ray-sebs samples/s", "ray-sebs data wait",
                        "bare on-device samples/s", "bare copy samples/s", "ratio vs on-device",
                        "ratio vs copy"), build_rows(batch_sizes, bare, sebs)))
    print(f"# load average (1 min) at end: {common.load_average():.2f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    raise SystemExit(main())
