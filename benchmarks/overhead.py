"""Per-update overhead of the ray-sebs worker step against a bare PyTorch loop.

Both variants run in this process, on the same model weights, the same tensors and the same
micro-batches (the plan's decomposition at one worker):

* ``ray-sebs``: :func:`ray_sebs.loop.train_update`, the function the training loop calls for every
  update (micro-batch split, summed per-sample loss times ``W / B``, epoch counters, step, and on
  one update in ``UpdateRule.noise_every`` the gradient noise measurement);
* ``ray-sebs, no noise``: the same without the noise measurement (``UpdateRule.noise_every=None``),
  whose cost is the ratio of the two (target <= 1.02, issue 16);
* ``bare``: ``cross_entropy(model(x), y)`` (scaled by the micro-batch's share when accumulating),
  ``backward()``, ``step()``, ``zero_grad()``.

Repetitions alternate the variants (ABBA order) so load drift hits all; the ratio is the
median of the per-repetition ratios. Target: <= 1.05. Ray is not involved: the data-loading side is
``benchmarks/ingest.py``.

    python benchmarks/overhead.py [--smoke] [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import common
import torch
from torch import nn

from ray_sebs.data import DatasetConfig, synthetic_arrays
from ray_sebs.loop import EpochTally, UpdateRule, train_update
from ray_sebs.models import build_model
from ray_sebs.objective import classification
from ray_sebs.plan import decompose

TARGET = 1.05
NOISE_TARGET = 1.02


@dataclass(frozen=True)
class Case:
    model: str
    input_shape: tuple[int, ...]
    batch_size: int


def cases(smoke: bool) -> list[Case]:
    mlp, cnn = (64,), (3, 32, 32)
    batches = (16, 128)
    return [Case(name, shape, batch) for name, shape in (("mlp", mlp), ("cnn", cnn))
            for batch in (batches[:1] if smoke else batches)]


def make_batches(case: Case, count: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = case.input_shape
    config = DatasetConfig(name="synthetic", synthetic_rows=count * case.batch_size,
                           synthetic_features=shape[0] if len(shape) == 1 else 32,
                           synthetic_image_shape=shape if len(shape) == 3 else None)
    features, labels = synthetic_arrays(config)
    x = torch.as_tensor(features, dtype=torch.float32).to(device)
    y = torch.as_tensor(labels).to(device)
    size = case.batch_size
    return [(x[i * size:(i + 1) * size], y[i * size:(i + 1) * size]) for i in range(count)]


def bare_update(model: nn.Module, optimizer: torch.optim.Optimizer, features: torch.Tensor,
                labels: torch.Tensor, micro_batches: tuple[int, ...]) -> None:
    """What a hand-written PyTorch loop does for the same update."""
    if len(micro_batches) == 1:
        nn.functional.cross_entropy(model(features), labels).backward()
    else:  # gradient accumulation: each micro-batch's mean loss weighted by its share
        offset = 0
        for size in micro_batches:
            loss = nn.functional.cross_entropy(model(features[offset:offset + size]),
                                               labels[offset:offset + size])
            (loss * (size / len(labels))).backward()
            offset += size
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_case(case: Case, args: argparse.Namespace, device: torch.device) -> dict[str, float | str]:
    split = decompose(case.batch_size, 1, args.max_micro_batch, dataset_size=10 * case.batch_size)
    micro_batches = split.rank_micro_batches(0)
    batches = make_batches(case, 8, device)
    torch.manual_seed(0)
    initial = build_model(case.model, case.input_shape, 10).to(device)

    def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = copy.deepcopy(initial)
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    sebs_model, sebs_optimizer = fresh()
    quiet_model, quiet_optimizer = fresh()
    bare_model, bare_optimizer = fresh()

    def sebs_runner(model: nn.Module, optimizer: torch.optim.Optimizer,
                    measure_noise: bool) -> Callable[[int], None]:
        def run(updates: int) -> None:
            tally = EpochTally(device=device, updates_before=0)  # both made once per epoch in the loop
            rule = UpdateRule.for_epoch(split.loss_scale, 1, micro_batches, device)
            if not measure_noise:
                rule = replace(rule, noise_every=None)
            for index in range(updates):
                features, labels = batches[index % len(batches)]
                train_update(model, optimizer, OBJECTIVE, {"features": features, "label": labels},
                             rule, tally)

        return run

    run_sebs = sebs_runner(sebs_model, sebs_optimizer, True)
    run_quiet = sebs_runner(quiet_model, quiet_optimizer, False)

    def run_bare(updates: int) -> None:
        for index in range(updates):
            features, labels = batches[index % len(batches)]
            bare_update(bare_model, bare_optimizer, features, labels, micro_batches)

    same = check_same_update(fresh, batches[0], micro_batches, split.loss_scale, device)
    for run in (run_sebs, run_quiet, run_bare):  # warm-up: allocator, autograd graph caches
        run(3)
    # Each timed repetition runs about --rep-seconds of updates (at least 3).
    updates = args.updates or max(3, min(500, round(args.rep_seconds / (timed(run_bare, 3, device) / 3))))
    times: dict[str, list[float]] = {"sebs": [], "quiet": [], "bare": []}
    for rep in range(args.reps):
        order = [("sebs", run_sebs), ("quiet", run_quiet), ("bare", run_bare)]
        if rep % 2:
            order.reverse()
        for name, run in order:
            times[name].append(timed(run, updates, device) / updates)
    ratios = [s / b for s, b in zip(times["sebs"], times["bare"], strict=True)]
    noise_ratios = [s / q for s, q in zip(times["sebs"], times["quiet"], strict=True)]
    return {"sebs_us": common.median(times["sebs"]) * 1e6, "bare_us": common.median(times["bare"]) * 1e6,
            "ratio": common.median(ratios), "ratio_of_min": min(times["sebs"]) / min(times["bare"]),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "updates": updates,
            "split": split.describe(), "same": "yes" if same else "NO",
            "noise_ratio": common.median(noise_ratios)}


OBJECTIVE = classification()
"""The loop's built-in objective: cross-entropy over ``features`` and ``label``."""


def timed(run: Callable[[int], None], updates: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    run(updates)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def check_same_update(fresh: Callable[[], tuple[nn.Module, torch.optim.Optimizer]],
                      batch: tuple[torch.Tensor, torch.Tensor], micro_batches: tuple[int, ...],
                      loss_scale: float, device: torch.device) -> bool:
    """Both variants do the same work: one update from the same weights gives the same weights."""
    (sebs_model, sebs_optimizer), (bare_model, bare_optimizer) = fresh(), fresh()
    features, labels = batch
    train_update(sebs_model, sebs_optimizer, OBJECTIVE, {"features": features, "label": labels},
                 UpdateRule.for_epoch(loss_scale, 1, micro_batches, device),
                 EpochTally(device=device, updates_before=0))
    bare_update(bare_model, bare_optimizer, *batch, micro_batches)
    return all(torch.allclose(a, b, rtol=1e-4, atol=1e-6)
               for a, b in zip(sebs_model.parameters(), bare_model.parameters(), strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_flags(parser)
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per variant (default 30)")
    parser.add_argument("--updates", type=int, default=None,
                        help="updates per timed repetition (default: about --rep-seconds of them)")
    parser.add_argument("--rep-seconds", type=float, default=None,
                        help="length of one timed repetition (default 0.25 s)")
    parser.add_argument("--max-micro-batch", type=int, default=32,
                        help="micro-batch cap, as in `ray-sebs train` (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads, as a 1-CPU Ray worker gets (default: %(default)s)")
    args = parser.parse_args(argv)
    args.reps = args.reps or (2 if args.smoke else 30)
    args.rep_seconds = args.rep_seconds or (0.01 if args.smoke else 0.25)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = common.wait_for_quiet(args)
    common.print_header("overhead: ray-sebs worker step vs bare PyTorch", args, load)
    rows = []
    worst = worst_noise = 0.0
    for case in cases(args.smoke):
        result = measure_case(case, args, device)
        worst = max(worst, float(result["ratio"]))
        worst_noise = max(worst_noise, float(result["noise_ratio"]))
        rows.append((case.model, "x".join(map(str, case.input_shape)), case.batch_size, result["split"],
                     result["updates"], f"{result['bare_us']:.0f}", f"{result['sebs_us']:.0f}",
                     f"{result['ratio']:.3f}", f"{result['ratio_of_min']:.3f}",
                     f"{result['ratio_min']:.3f}-{result['ratio_max']:.3f}",
                     f"{result['noise_ratio']:.3f}", result["same"]))
        print(f"# {case.model} batch {case.batch_size} done", flush=True)
    print(f"{args.reps} repetitions per variant, alternating; us/update: medians; ratio = ray-sebs / bare")
    print(common.table(("model", "input", "batch", "micro x accum", "updates/rep", "bare us/update",
                        "ray-sebs us/update", "ratio (median)", "ratio of fastest", "ratio range",
                        "noise cost", "same weights"), rows))
    print("noise cost = ray-sebs / ray-sebs without the noise measurement (median of repetitions)")
    print()
    print(f"worst ratio {worst:.3f} (target <= {TARGET}): {'met' if worst <= TARGET else 'MISSED'}")
    print(f"worst noise cost {worst_noise:.3f} (target <= {NOISE_TARGET}): "
          f"{'met' if worst_noise <= NOISE_TARGET else 'MISSED'}")
    print(f"# load average (1 min) at end: {common.load_average():.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
