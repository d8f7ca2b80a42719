"""Writing a sweep's comparison: the Markdown table a person reads, a CSV, and a PNG of curves."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from typing import BinaryIO

from ray_sebs.comparison import Comparison, ComparisonRow, mean_curve
from ray_sebs.errors import format_number
from ray_sebs.history import History
from ray_sebs.storage import write_bytes
from ray_sebs.sweep_space import Configuration, group_label

COMPARISON_FILES = ("comparison.md", "comparison.csv", "comparison.png")


CSV_COLUMNS = (
    "configuration", "kind", "ratio", "optimizer", "learning_rate", "batch_size", "seeds",
    "unfinished_seeds", "final_accuracy_mean", "final_accuracy_std", "updates", "samples",
    "wall_time_s_mean", "wall_time_s_std", "worker_seconds_mean", "worker_seconds_std",
    "resizes_mean", "recoveries_mean", "target_accuracy", "seeds_reaching_target", "updates_to_target_mean",
    "time_to_target_s_mean", "fewest_updates_to_target", "least_time_to_target",
)


def comparison_csv(comparison: Comparison) -> str:
    """One row per configuration; an empty cell where there is no number (see ComparisonRow)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in comparison.rows:
        c = row.configuration
        writer.writerow([
            c.label, c.kind, format_number(c.ratio), c.optimizer, format_number(c.learning_rate),
            c.batch_size,
            len(row.seeds), len(row.unfinished),
            *_pair_cells(row.accuracy), _cell(row.updates), _cell(row.samples),
            *_pair_cells(row.wall_time_s), *_pair_cells(row.worker_seconds), _cell(row.resizes),
            _cell(row.recoveries),
            _cell(row.target), row.seeds_reaching_target, _cell(row.updates_to_target),
            _cell(row.time_to_target_s), row.fewest_updates, row.least_time,
        ])
    return buffer.getvalue()


MARKDOWN_HEADER = ("configuration", "seeds", "final val acc", "updates", "samples", "wall time (s)",
                   "worker-s", "resizes", "recoveries", "updates to target", "time to target (s)")


def comparison_markdown(comparison: Comparison, *, title: str = "Growth-ratio comparison",
                        notes: Sequence[str] = ()) -> str:
    """The table a user reads: one section per (optimizer, η₁, B₁) group."""
    lines = [f"## {title}", ""]
    lines += [*notes, ""] if notes else []
    for group in comparison.groups():
        rows = [row for row in comparison.rows if row.configuration.group == group]
        target = comparison.targets.get(group)
        lines.append(f"**{group_label(group)}** — target accuracy "
                     + (f"{target.accuracy:.4f} ({target.source})" if target else "none (no trial finished)"))
        lines.append("")
        lines.append("| " + " | ".join(MARKDOWN_HEADER) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(MARKDOWN_HEADER) - 1)) + "|")
        for row in rows:
            lines.append("| " + " | ".join(_markdown_cells(row)) + " |")
        lines.append("")
    lines += [
        "Means over seeds (± sample standard deviation). *wall time*: from the first epoch's start to "
        "the last epoch's end, worker-group changes included; *worker-s*: Σ live workers × epoch "
        "seconds; *resizes*: planned worker-group changes at stage boundaries; *recoveries*: worker "
        "groups started after a failure. *to target*: mean updates and "
        "wall time at the first epoch whose mean validation accuracy over seeds reaches the target "
        "(*not reached (k/n seeds did)*: the mean never does, k seeds alone do). **bold**: fewest "
        "updates / least wall time to the target in its group.",
    ]
    return "\n".join(lines) + "\n"


def _markdown_cells(row: ComparisonRow) -> list[str]:
    seeds = str(len(row.seeds)) + (f" (+{len(row.unfinished)} unfinished)" if row.unfinished else "")
    if row.accuracy is None:
        return [row.configuration.label, seeds, "no finished trial", *(["-"] * (len(MARKDOWN_HEADER) - 3))]
    if row.updates_to_target is not None and row.time_to_target_s is not None:
        updates = _count_text(row.updates_to_target)
        seconds = f"{row.time_to_target_s:.1f}"
        if row.fewest_updates:
            updates = f"**{updates}** (fewest)"
        if row.least_time:
            seconds = f"**{seconds}** (least)"
    else:
        updates = seconds = f"not reached ({row.seeds_reaching_target}/{len(row.seeds)} seeds did)"
    assert row.updates is not None and row.samples is not None and row.worker_seconds is not None
    return [
        row.configuration.label, seeds, _pm(row.accuracy, ".4f"), _count_text(row.updates),
        _count_text(row.samples), _pm(row.wall_time_s, ".1f"), f"{row.worker_seconds[0]:.1f}",
        f"{row.resizes:g}", f"{row.recoveries:g}", updates, seconds,
    ]


def plot_comparison(comparison: Comparison, histories: Mapping[Configuration, Sequence[History]],
                    output: str | BinaryIO) -> None:
    """Validation accuracy against updates and against wall time, one curve per configuration
    (mean over its finished seeds), one row of plots per group, the target dashed; a PNG written
    to ``output`` (a local file name or a binary file object)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = comparison.groups()
    figure, axes = plt.subplots(len(groups), 2, figsize=(12, 4.2 * len(groups)), squeeze=False)
    ratios = sorted({row.configuration.ratio for row in comparison.rows})
    colours = plt.get_cmap("viridis")
    styles = {"sebs": "-", "ssgd": "--", "constant": ":"}
    markers = {"sebs": "o", "ssgd": "s", "constant": "^"}
    for (by_updates, by_time), group in zip(axes, groups, strict=True):
        for row in comparison.rows:
            configuration = row.configuration
            if configuration.group != group or not histories.get(configuration):
                continue
            updates, seconds, accuracy = mean_curve(histories[configuration])
            colour = colours(ratios.index(configuration.ratio) / max(1, len(ratios) - 1) * 0.85)
            for axis, xs in ((by_updates, updates), (by_time, seconds)):
                axis.plot(xs, accuracy, styles[configuration.kind], color=colour,
                          marker=markers[configuration.kind], markersize=3, markerfacecolor="none",
                          linewidth=1.2, label=configuration.label)
        target = comparison.targets.get(group)
        for axis, xlabel in ((by_updates, "updates"), (by_time, "wall time (s)")):
            if target is not None:
                axis.axhline(target.accuracy, color="grey", linestyle="-.", linewidth=0.8,
                             label=f"target {target.accuracy:.3f}")
            axis.set_xlabel(xlabel)
            axis.set_ylabel("validation accuracy")
            axis.set_title(group_label(group), fontsize=9)
            axis.grid(alpha=0.3)
        by_updates.legend(fontsize=7, loc="lower right")
    figure.suptitle("Validation accuracy by growth ratio (mean over seeds): SEBS solid (o), SSGD dashed "
                    "(s), constant dotted (^)")
    figure.tight_layout()
    figure.savefig(output, format="png", dpi=100)
    plt.close(figure)


def write_comparison(comparison: Comparison,
                     histories: Mapping[Configuration, Sequence[History]],
                     directory: str, *, notes: Sequence[str] = ()) -> dict[str, str]:
    """``comparison.md``, ``comparison.csv`` and ``comparison.png`` in ``directory`` (a local path
    or a URI pyarrow reaches)."""
    paths = {name.rsplit(".", 1)[1]: f"{directory.rstrip('/')}/{name}" for name in COMPARISON_FILES}
    write_bytes(paths["md"], comparison_markdown(comparison, notes=notes).encode())
    write_bytes(paths["csv"], comparison_csv(comparison).encode())
    image = io.BytesIO()
    plot_comparison(comparison, histories, image)
    write_bytes(paths["png"], image.getvalue())
    return paths


def _count_text(value: float) -> str:
    """A mean of counts: ``1,450``, or ``16.5`` when the seeds differ."""
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def _cell(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else repr(value)


def _pair_cells(value: tuple[float, float] | None) -> tuple[str, str]:
    return ("", "") if value is None else (_cell(value[0]), _cell(value[1]))


def _pm(value: tuple[float, float] | None, spec: str) -> str:
    if value is None:
        return "-"
    return f"{value[0]:{spec}} ± {value[1]:{spec}}"
