"""A byte-level GPT trained with SEBS on the Python standard library's own source code.

Run it (from the repository root; a local Ray starts in-process; 2-4 minutes on 2 CPUs)::

    python examples/byte_gpt.py

``--tiny`` is the seconds-long run that ``tests/test_examples.py`` makes; ``--address auto`` (or
``ray://host:10001``) trains on an existing Ray cluster; ``--help`` lists the sizes.

The data is real and offline: the ``.py`` files every Python install ships
(``sysconfig.get_paths()["stdlib"]``), read as bytes. Each file is cut into rows of
``context + 1`` byte ids (the inputs and, shifted by one, the next-byte targets); the tail of each
file is padded with a pad id. So rows carry different numbers of real targets, and the loss an
update is the mean over is the mean per *target byte* across the whole global batch, not the mean
of per-row means. That is what the ``Summed(total, count)`` form of ``batch_loss_fn`` says: each
micro-batch returns its summed cross-entropy and its number of real targets, ray-sebs all-reduces
both once per update and divides, whatever the workers and micro-batches the B_s rows were split
into. (With the defaults about 1% of the rows are padded tails, 29 of 2,880, so the weighting moves
the loss little here; with short documents it is most of the loss. Either way it is exact, and the
run checks that every epoch's all-reduced count is the training set's target bytes.)

The schedule is SEBS with AdamW: the global batch (in rows) doubles every stage, and the stage
that outgrows one worker's micro-batch runs on two workers. ``--schedule ssgd`` keeps B_1 and
divides the learning rate by rho per stage instead (the baseline); ``--schedule adaptive`` takes
SEBS's stages but begins each when the measured gradient noise scale reaches
``--noise-threshold`` x rho x B_s (after at least ``--min-epochs-per-stage`` epochs), within the
same budget of ``--stages`` x ``--epochs-per-stage`` epochs, and prints why each stage began. Every
schedule trains on the same rows (a multiple of the largest batch SEBS reaches), so the three are
comparable (``benchmarks/schedules_lm.py`` compares them). AdamW takes SEBS's ``sqrt``
learning-rate law by default: eta_s * sqrt(B_s) stays eta_1 * sqrt(B_1), so the learning rate falls
by sqrt(rho) per stage while the batch grows (the stage table shows it), after a short linear
warm-up. ``--precision bf16`` runs the forward
and the loss under bf16 autocast (the default with ``--use-gpu``); on this project's 2-core CPU
machine the default run (then with a fixed learning rate, no warm-up) took 68 s of training in
bf16 against 49 s in fp32, with the same validation loss (2.00 and 2.01 nats per byte), so CPU
runs default to fp32.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import sysconfig
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

PAD = 256
"""Pad id after a file's last byte: the 257th token of the embedding, never a target."""
VOCAB = 257
"""256 byte values plus the pad id."""
VALIDATION_EVERY = 10
"""One file in ten (by a hash of its name) is validation: the split is by file, so no validation
row shares a file with a training row."""
MAX_FILE_BYTES = 32_000


# ---------------------------------------------------------------------------------------------
# Data: the standard library's source, as rows of byte ids.
# ---------------------------------------------------------------------------------------------

def stdlib_sources(max_bytes: int) -> tuple[list[bytes], list[bytes]]:
    """(training files, validation files), about ``max_bytes`` of source in all.

    The top-level modules of the standard library (not its tests or vendored packages) of at most
    :data:`MAX_FILE_BYTES`, so that the budget spans many files (and many padded tails), taken in
    the order of a hash of their names (a fixed, well-mixed order on every machine with the same
    Python) until the budget is spent.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((path for path in root.glob("*.py") if path.stat().st_size <= MAX_FILE_BYTES),
                   key=lambda path: (zlib.crc32(path.name.encode()), path.name))
    train: list[bytes] = []
    validation: list[bytes] = []
    total = 0
    for path in files:
        if total >= max_bytes:
            break
        data = path.read_bytes()[: max_bytes - total]
        if len(data) < 2:
            continue
        total += len(data)
        is_validation = zlib.crc32(path.name.encode()) % VALIDATION_EVERY == 0
        (validation if is_validation else train).append(data)
    return train, validation


def byte_rows(files: list[bytes], context: int) -> np.ndarray:
    """Rows of ``context + 1`` byte ids (int64), the last of each file padded with :data:`PAD`.

    Consecutive rows of a file overlap by one byte, so every byte after a file's first is a
    target exactly once. A row's inputs are ``row[:-1]`` and its targets ``row[1:]``.
    """
    rows = []
    for data in files:
        ids = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
        for start in range(0, len(ids) - 1, context):
            row = np.full(context + 1, PAD, dtype=np.int64)
            chunk = ids[start:start + context + 1]
            row[: len(chunk)] = chunk
            rows.append(row)
    return np.stack(rows)


def target_count(rows: np.ndarray) -> int:
    """Real (non-pad) targets in ``rows``: the tokens the loss is a mean over."""
    return int((rows[:, 1:] != PAD).sum())


def to_dataset(rows: np.ndarray):
    """A materialized Ray Dataset with one column, ``tokens`` (int64, ``context + 1`` per row).

    Materialized: its blocks sit in the object store and every epoch reads them without a task,
    so ray-sebs keeps no CPU back from the workers for Ray Data.
    """
    import ray.data

    return ray.data.from_numpy(rows).rename_columns({"data": "tokens"}).materialize()


# ---------------------------------------------------------------------------------------------
# Model: a small causal transformer. LayerNorm only (per token): no statistic depends on how the
# global batch is split into micro-batches, so the split cannot change an update.
# ---------------------------------------------------------------------------------------------

class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP, each with a residual."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attention_norm = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.projection = nn.Linear(d_model, d_model)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, length, width = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).split(width, dim=2)
        q, k, v = (t.view(rows, length, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.projection(attended.transpose(1, 2).reshape(rows, length, width))
        return x + self.mlp(self.mlp_norm(x))


class ByteGPT(nn.Module):
    """Byte and position embeddings, ``layers`` blocks, a final norm, an untied head over the 256
    byte values (the pad id is input only)."""

    def __init__(self, context: int = 128, d_model: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.token = nn.Embedding(VOCAB, d_model)
        self.position = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 256, bias=False)
        # GPT-2's initialisation: small normal weights, zero biases.
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token(tokens) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


# ---------------------------------------------------------------------------------------------
# Loss and evaluation: sums and counts, so ray-sebs can make exact means over the global batch
# and over the whole validation set.
# ---------------------------------------------------------------------------------------------

def next_byte_loss(model: nn.Module, batch: dict[str, torch.Tensor]):
    """Cross-entropy summed over the micro-batch's real targets, and their number.

    ``model`` is the DDP-wrapped model here: calling it is what lets DDP all-reduce the gradient.
    """
    from ray_sebs import Summed

    tokens = batch["tokens"]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = model(inputs)
    # ignore_index drops the pad targets from the sum; the count is what the mean divides by.
    total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=PAD,
                            reduction="sum")
    return Summed(total=total, count=(targets != PAD).sum())


def next_byte_metrics(model: nn.Module, batch: dict[str, torch.Tensor]):
    """Validation loss and next-byte accuracy, both per real target."""
    from ray_sebs import Summed

    tokens = batch["tokens"]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = model(inputs).float()
    real = targets != PAD
    count = real.sum()
    total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=PAD, reduction="sum")
    correct = ((logits.argmax(dim=-1) == targets) & real).sum()
    return {"loss": Summed(total=total, count=count), "accuracy": Summed(total=correct.float(), count=count)}


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tiny", action="store_true",
                        help="a seconds-long run (what the test runs): 24 KB of source, a 1-layer model")
    parser.add_argument("--source-bytes", type=int, default=400_000, help="bytes of stdlib source")
    parser.add_argument("--context", type=int, default=128, help="bytes a row predicts")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16, help="rows per update in stage 1 (B_1)")
    parser.add_argument("--schedule", choices=("sebs", "ssgd", "adaptive"), default="sebs",
                        help="sebs grows the batch per stage, ssgd decays the learning rate, adaptive "
                             "grows the batch when the gradient noise scale says so")
    parser.add_argument("--ratio", type=float, default=2.0,
                        help="batch growth (sebs, adaptive) or learning-rate decay (ssgd) per stage (rho)")
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--epochs-per-stage", type=int, default=2,
                        help="epochs of each stage; adaptive: the budget is stages x this")
    parser.add_argument("--noise-threshold", type=float, default=1.0,
                        help="adaptive: the next stage begins once B_noise >= this x rho x B_s")
    parser.add_argument("--min-epochs-per-stage", type=int, default=1,
                        help="adaptive: epochs every stage runs before the next may begin")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate of stage 1")
    parser.add_argument("--warmup-updates", type=int, default=30, help="linear warm-up from 0")
    parser.add_argument("--max-micro-batch", type=int, default=32,
                        help="rows one worker holds per forward; a larger B_s adds a worker")
    parser.add_argument("--max-workers", type=int, default=2)
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                        help="bf16 autocast or plain fp32; unset: bf16 with --use-gpu, else fp32 (at "
                             "this model's width CPU bf16 measured 1.4x slower than fp32, same loss)")
    parser.add_argument("--keep-multiple-of", type=int, default=None,
                        help="keep a multiple of this many training rows; unset: of the largest batch "
                             "SEBS reaches at --ratio (a comparison of ratios passes a common multiple)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--address", default=None,
                        help="an existing Ray cluster (e.g. auto); unset: a new local Ray")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray; unset: all")
    parser.add_argument("--storage-path", default="./sebs_runs")
    parser.add_argument("--name", default=None, help="run name (the same name resumes)")
    args = parser.parse_args(argv)
    if args.precision is None:
        args.precision = "bf16" if args.use_gpu else "fp32"
    if args.tiny:
        args.source_bytes, args.context, args.d_model, args.layers = 24_000, 32, 32, 1
        args.batch_size, args.stages, args.epochs_per_stage = 16, 2, 1
        args.max_micro_batch, args.warmup_updates = 16, 5
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # Ray and ray_sebs are imported here, not at the top: the test imports this module for its
    # functions without starting anything.
    from ray.train import RunConfig

    from ray_sebs import ClusterConfig, OptimizerConfig, ScheduleConfig, SEBSTrainer, build_schedule
    from ray_sebs.history import every_update_exact
    from ray_sebs.preflight import start_or_join_ray
    from ray_sebs.report import stage_table, write_history
    from ray_sebs.schedule import stage_batch_and_lr

    # As `ray-sebs train` does: join --address, else a new local Ray in this process (even when
    # another runs on the machine); Ray's own INFO lines stay in its log files.
    start_or_join_ray(args.address, num_cpus=args.num_cpus)

    train_files, validation_files = stdlib_sources(args.source_bytes)
    train_rows = byte_rows(train_files, args.context)
    validation_rows = byte_rows(validation_files, args.context)
    schedule = ScheduleConfig(
        kind=args.schedule, initial_batch_size=args.batch_size, growth_ratio=args.ratio,
        num_stages=args.stages, epochs_per_stage=args.epochs_per_stage, learning_rate=args.lr,
        # lr_scaling unset: SEBSTrainer takes AdamW's default law, sqrt.
        warmup_updates=args.warmup_updates, noise_threshold=args.noise_threshold,
        min_epochs_per_stage=args.min_epochs_per_stage)
    # Keep a multiple of the largest batch SEBS reaches (whatever this run's schedule, so every
    # schedule trains on the same rows): then every epoch of every stage uses every row (no partial
    # batch is dropped), and each epoch's target count must equal the dataset's.
    sebs = replace(schedule, kind="sebs")
    last_batch = max(stage_batch_and_lr(sebs, stage)[0] for stage in range(1, args.stages + 1))
    build_schedule(sebs, len(train_rows))  # says so when the data is smaller than the last batch
    if args.keep_multiple_of is not None:
        if args.keep_multiple_of % last_batch:
            raise SystemExit(f"--keep-multiple-of {args.keep_multiple_of} is not a multiple of the "
                             f"largest batch, {last_batch}")
        last_batch = args.keep_multiple_of
    train_rows = train_rows[: len(train_rows) // last_batch * last_batch]
    if not len(train_rows):
        raise SystemExit(f"fewer training rows than {last_batch}: use more --source-bytes")
    train_targets = target_count(train_rows)
    padded = int((train_rows[:, -1] == PAD).sum())
    print(f"data: {len(train_files)} training files, {len(validation_files)} validation files of "
          f"{sysconfig.get_paths()['stdlib']}; {len(train_rows):,} training rows of {args.context + 1} "
          f"bytes ({padded} padded file tails, {train_targets:,} targets), {len(validation_rows):,} "
          f"validation rows ({target_count(validation_rows):,} targets)", flush=True)

    trainer = SEBSTrainer(
        functools.partial(ByteGPT, context=args.context, d_model=args.d_model, layers=args.layers,
                          heads=args.heads),
        datasets={"train": to_dataset(train_rows), "validation": to_dataset(validation_rows)},
        schedule=schedule,
        cluster=ClusterConfig(min_workers=1, max_workers=args.max_workers,
                              max_micro_batch=args.max_micro_batch, use_gpu=args.use_gpu),
        # Clipping the global gradient norm (after the all-reduce, so the same for any worker
        # count) keeps the early, small-batch updates of a transformer in check.
        optimizer=OptimizerConfig(name="adamw", weight_decay=0.1, clip_grad_norm=1.0),
        batch_loss_fn=next_byte_loss,
        eval_fn=next_byte_metrics,
        precision=args.precision,
        run_config=RunConfig(name=args.name, storage_path=os.path.abspath(args.storage_path)),
        seed=args.seed,
        console=True,
    )
    result = trainer.fit()
    history = result.history
    paths = write_history(history, result.run_dir)

    print()
    print(stage_table(history))
    exact = every_update_exact(history)
    print(f"every update used exactly B_s rows: {'yes' if exact else 'NO'} "
          f"({sum(r['epoch_updates'] for r in history):,} updates; planned {result.plan.total_updates:,})")
    counts = {int(r["train_loss_count"]) for r in history}
    print(f"target bytes per epoch: {', '.join(f'{c:,}' for c in sorted(counts))} "
          f"(the training set holds {train_targets:,})")
    decisions = result.summary.get("stage_decisions", [])
    for decision in decisions:
        print(f"stage {decision['stage']} began at epoch {decision['epoch']}: B_noise "
              f"{decision['noise_scale']:.1f} >= {decision['threshold_batch_size']:g} "
              f"(threshold x ratio x batch {decision['batch_size']})")
    if args.schedule == "adaptive" and not decisions:
        print(f"stage 1 ran the whole budget: B_noise never reached {args.noise_threshold:g} x "
              f"{args.ratio:g} x {args.batch_size}")
    first, last = history[0], history[-1]
    print(f"validation loss {first['validation_loss']:.3f} -> {last['validation_loss']:.3f} nats/byte, "
          f"perplexity {math.exp(first['validation_loss']):.2f} -> {math.exp(last['validation_loss']):.2f}, "
          f"next-byte accuracy {last['validation_accuracy']:.3f}")
    print(f"run directory: {result.run_dir}")
    for kind, path in paths.items():
        print(f"  {kind}: {path}")
    return {"result": result, "train_targets": train_targets, "exact": exact,
            "stage_decisions": decisions}


if __name__ == "__main__":
    main(sys.argv[1:])
