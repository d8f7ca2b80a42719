"""What every benchmark shares: the quiet-machine gate, machine facts, tables, a local Ray.

Not a benchmark itself. Scripts import it as ``common`` (their own folder is first on
``sys.path`` when run as ``python benchmarks/NAME.py``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

DEFAULT_MAX_LOAD = 1.5
DEFAULT_WAIT_S = 1200.0
POLL_S = 30.0


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """``--smoke``, ``--device``, and the quiet-machine gate."""
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, no waiting for a quiet machine: checks the script runs")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the model runs (cuda: one GPU per worker, NCCL) (default: cpu)")
    parser.add_argument("--max-load", type=float, default=DEFAULT_MAX_LOAD,
                        help="wait until the 1-minute load average is below this before measuring "
                             "(default: %(default)s; 0 disables the wait)")
    parser.add_argument("--max-wait", type=float, default=DEFAULT_WAIT_S,
                        help="give up waiting for a quiet machine after this many seconds and measure "
                             "anyway, saying so (default: %(default)s)")


def load_average() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(args: argparse.Namespace) -> float:
    """Poll every 30 s until the 1-minute load average is below ``--max-load``; return it.

    Skipped with ``--smoke`` or ``--max-load 0``. After ``--max-wait`` seconds it measures anyway
    and prints that the machine was busy, so the figures carry their context.
    """
    load = load_average()
    if args.smoke or args.max_load <= 0:
        return load
    deadline = time.monotonic() + args.max_wait
    while load >= args.max_load:
        if time.monotonic() >= deadline:
            print(f"# machine still busy after {args.max_wait:.0f} s (load {load:.2f} >= "
                  f"{args.max_load}); measuring anyway", flush=True)
            return load
        print(f"# waiting for a quiet machine: load {load:.2f} >= {args.max_load}", flush=True)
        time.sleep(POLL_S)
        load = load_average()
    return load


def machine_lines(device: str) -> list[str]:
    """Date, CPUs, memory and library versions: the context every figure needs."""
    import ray
    import torch

    lines = [f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
             f"machine: {platform.node()} {platform.machine()}, nproc {os.cpu_count()}, "
             f"memory {_memory()}",
             f"python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}, "
             f"device {device}"]
    if device == "cuda" and torch.cuda.is_available():
        lines.append(f"gpu: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}")
    return lines


def _memory() -> str:
    try:
        output = subprocess.run(["free", "-h"], capture_output=True, text=True, check=True).stdout
        total = output.splitlines()[1].split()[1]
        return f"{total} total"
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown"


def print_header(title: str, args: argparse.Namespace, load: float) -> None:
    print(f"## {title}")
    for line in machine_lines(args.device):
        print(f"# {line}")
    print(f"# command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"# load average (1 min) at start: {load:.2f}{' (smoke run)' if args.smoke else ''}")
    print(flush=True)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A right-aligned plain-text table (Markdown-compatible: pipes between cells)."""
    text_rows = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(header[i]), *(len(row[i]) for row in text_rows)) if text_rows else len(header[i])
              for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.rjust(width) for cell, width in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|",
                      *(line(row) for row in text_rows)])


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def stage_starts_text(decisions: Sequence[dict[str, Any]]) -> str:
    """An adaptive run's ``summary["stage_decisions"]`` in a cell: ``s2@e3 (45>=32)`` per stage
    begun, at its first epoch, with the B_noise that began it and ``noise_threshold x rho x B_s``."""
    return "; ".join(f"s{d['stage']}@e{d['epoch']} ({d['noise_scale']:.0f}>={d['threshold_batch_size']:g})"
                     for d in decisions) or "none (stage 1 throughout)"


def start_local_ray(num_cpus: int | None) -> bool:
    """Start a local Ray unless one is running (tests share theirs); True when this call started it."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")
    import ray

    if ray.is_initialized():
        return False
    # address="local": a new instance even when a `ray start` head of someone else's is running.
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
             log_to_driver=False)
    return True


def ship_by_value(*modules: Any) -> None:
    """Let Ray workers unpickle functions of modules they cannot import (this folder)."""
    import ray.cloudpickle

    for module in modules:
        if module.__name__ != "__main__":
            ray.cloudpickle.register_pickle_by_value(module)
