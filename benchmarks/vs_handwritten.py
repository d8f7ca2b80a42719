"""End to end: ``ray-sebs train`` against the plain Ray Train loop a careful user would write.

Every variant is a fresh process, timed from its start to its exit (Python start, imports, a local
Ray, data, training, teardown), on the same schedule: digits, the MLP, SGD at lr 0.1, 4 stages x 5
epochs with the global batch 16, 32, 64, 128. Interleaved in one run, repetition by repetition:

* ``ray-sebs train``: the default job (1 -> 2 workers: one resize);
* ``ray-sebs train --max-workers 1``: the same on one worker (no resize);
* ``handwritten, checkpoint every epoch``: one ``TorchTrainer.fit()`` on 1 worker that loops over
  the stages itself (``iter_torch_batches`` at the stage's batch), evaluates and reports with a
  checkpoint after every epoch, as Ray Train's guides do;
* ``handwritten, report per stage``: the same loop reporting once per stage, no checkpoints.

The hand-written loop runs with Ray Train's defaults (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` unset),
as a user's would. Targets, from the issue: ray-sebs <= 0.6 x the checkpoint-every-epoch loop and
<= 0.8 x the report-per-stage loop, for both ray-sebs variants.

    python benchmarks/vs_handwritten.py [--reps 3] [--smoke]

``--smoke`` runs one repetition of two variants on a 2-stage, 1-epoch schedule. ``--before DIR``
adds both ray-sebs variants once more, run from another checkout of ray-sebs (e.g. a ``git worktree``
of the commit before a change), so a change is measured before and after in the same run.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import common

TARGETS = {"handwritten, checkpoint every epoch": 0.6, "handwritten, report per stage": 0.8}
SCHEDULE = {"batch_size": 16, "ratio": 2.0, "stages": 4, "epochs_per_stage": 5, "lr": 0.1}
SMOKE_SCHEDULE = {**SCHEDULE, "stages": 2, "epochs_per_stage": 1}


def handwritten_loop(config: dict[str, Any]) -> None:
    """What a careful Ray Train user writes for a stagewise batch schedule on a fixed worker group."""
    import tempfile

    import ray.train
    import ray.train.torch
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(nn.Sequential(
        nn.Flatten(), nn.Linear(config["inputs"], 128), nn.ReLU(), nn.Linear(128, config["classes"])))
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"])
    train = ray.train.get_dataset_shard("train")
    validation = ray.train.get_dataset_shard("validation")
    epoch = 0
    for stage in range(config["stages"]):
        batch_size = round(config["batch_size"] * config["ratio"] ** stage)
        for _ in range(config["epochs_per_stage"]):
            model.train()
            for batch in train.iter_torch_batches(batch_size=batch_size, drop_last=True):
                loss = nn.functional.cross_entropy(model(batch["features"]), batch["label"])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            model.eval()
            correct = total = 0
            with torch.no_grad():
                for batch in validation.iter_torch_batches(batch_size=1024):
                    correct += int((model(batch["features"]).argmax(1) == batch["label"]).sum())
                    total += len(batch["label"])
            metrics = {"epoch": epoch, "stage": stage + 1, "validation_accuracy": correct / total}
            if config["checkpoint_every_epoch"]:
                with tempfile.TemporaryDirectory() as directory:
                    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "epoch": epoch}, os.path.join(directory, "state.pt"))
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
            epoch += 1
        if not config["checkpoint_every_epoch"]:
            ray.train.report(metrics)


def run_handwritten(checkpoint_every_epoch: bool, storage: str, schedule: dict[str, Any]) -> int:
    """One hand-written run in this process (the benchmark's child): a local Ray, digits, a fit."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray_sebs.data import DatasetConfig, load_data

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    data = load_data(DatasetConfig())
    trainer = TorchTrainer(
        handwritten_loop,
        train_loop_config={**schedule, "inputs": math.prod(data.input_shape), "classes": data.num_classes,
                           "checkpoint_every_epoch": checkpoint_every_epoch},
        datasets={"train": data.train, "validation": data.validation},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="handwritten", storage_path=storage))
    result = trainer.fit()
    print(f"final validation accuracy {result.metrics['validation_accuracy']:.4f}")
    ray.shutdown()
    return 0


def variant_command(variant: str, storage: str, schedule: dict[str, Any],
                    before: str | None) -> tuple[list[str], dict[str, str]]:
    """The command line of one variant and the environment entries it adds."""
    if variant.startswith("ray-sebs"):
        checkout = {"PYTHONPATH": before} if variant.startswith("ray-sebs (before)") and before else {}
        command = [sys.executable, "-c", "from ray_sebs.cli import run; run()", "train",
                   "--storage-path", storage, "--batch-size", str(schedule["batch_size"]),
                   "--ratio", str(schedule["ratio"]), "--stages", str(schedule["stages"]),
                   "--epochs-per-stage", str(schedule["epochs_per_stage"]), "--lr", str(schedule["lr"])]
        return command + (["--max-workers", "1"] if variant.endswith("--max-workers 1") else []), checkout
    every = "every" if "every epoch" in variant else "stage"
    return [sys.executable, os.path.abspath(__file__), "--child", every, "--child-storage", storage,
            "--child-stages", str(schedule["stages"]),
            "--child-epochs-per-stage", str(schedule["epochs_per_stage"])], {}


def timed(command: list[str], extra_env: dict[str, str], timeout: float) -> tuple[float, int, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("RAY_ADDRESS", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.update(extra_env)
    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        process = subprocess.run(command, cwd=directory, env=env, capture_output=True, text=True,
                                 timeout=timeout)
        wall = time.perf_counter() - started
    tail = (process.stdout if process.returncode == 0 else process.stderr).strip().splitlines()
    return wall, process.returncode, tail[-1] if tail else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_flags(parser)
    parser.add_argument("--reps", type=int, default=None, help="repetitions of each variant (default 3)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one run may take")
    parser.add_argument("--before", default=None, metavar="DIR",
                        help="another ray-sebs checkout whose `train` runs as the '(before)' variants")
    parser.add_argument("--child", choices=("every", "stage"), help=argparse.SUPPRESS)
    parser.add_argument("--child-storage", help=argparse.SUPPRESS)
    parser.add_argument("--child-stages", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-epochs-per-stage", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        schedule = {**SCHEDULE, "stages": args.child_stages, "epochs_per_stage": args.child_epochs_per_stage}
        return run_handwritten(args.child == "every", args.child_storage, schedule)
    args.reps = args.reps or (1 if args.smoke else 3)
    schedule = SMOKE_SCHEDULE if args.smoke else SCHEDULE
    variants = ["ray-sebs train", "ray-sebs train --max-workers 1", "handwritten, checkpoint every epoch",
                "handwritten, report per stage"]
    if args.before:
        variants += ["ray-sebs (before) train", "ray-sebs (before) train --max-workers 1"]
    if args.smoke:
        variants = ["ray-sebs train --max-workers 1", "handwritten, checkpoint every epoch"]
    load = common.wait_for_quiet(args)
    common.print_header("end to end: ray-sebs train vs a hand-written Ray Train loop", args, load)
    print(f"# schedule: {schedule}", flush=True)
    walls: dict[str, list[float]] = {variant: [] for variant in variants}
    runs = []
    with tempfile.TemporaryDirectory() as storage:
        for rep in range(args.reps):
            order = variants[rep % len(variants):] + variants[:rep % len(variants)]
            for variant in order:
                command, extra_env = variant_command(variant, f"{storage}/{rep}", schedule, args.before)
                wall, code, last = timed(command, extra_env, args.timeout)
                if code:
                    print(f"{variant} failed (exit {code}): {last}", file=sys.stderr)
                    return 1
                walls[variant].append(wall)
                runs.append((rep, variant, f"{wall:.1f}", last[:90]))
                print(f"# rep {rep} {variant}: {wall:.1f} s", flush=True)
    print(common.table(("rep", "variant", "wall s", "last line"), runs))
    rows = []
    for variant, times in walls.items():
        mean, std = common.mean_std(times)
        rows.append((variant, len(times), f"{mean:.1f}", f"{std:.1f}", f"{min(times):.1f}",
                     f"{max(times):.1f}"))
    print("\n" + common.table(("variant", "n", "mean s", "std s", "min s", "max s"), rows))
    print()
    verdicts = []
    for ours in (v for v in variants if v.startswith("ray-sebs")):
        for theirs, target in TARGETS.items():
            if theirs not in walls:
                continue
            ratio = common.median(walls[ours]) / common.median(walls[theirs])
            verdicts.append((ours, theirs, f"{ratio:.2f}", f"<= {target}",
                             "met" if ratio <= target else "MISSED"))
    print(common.table(("ray-sebs", "vs", "ratio of medians", "target", "verdict"), verdicts))
    print(f"# load average (1 min) at end: {common.load_average():.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
