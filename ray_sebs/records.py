"""Fingerprints kept next to results, so that a resume with other settings is refused.

A run (``sebs_run.json``) and a sweep (``sweep.json``) both record, before their first worker
starts, what must not change when the same ``--name`` runs again: the schedule, the data, the
model. Running the same command resumes; a command whose fingerprint differs is refused with one
line naming what differs, instead of mixing two configurations in one directory. Files go through
:mod:`ray_sebs.storage`, so the record lives wherever the results do (local disk, ``s3://``, ...).

Pure Python apart from that storage: no Ray, no torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from ray_sebs.errors import ConfigError
from ray_sebs.storage import read_json, write_bytes


def read_record(path: str) -> dict[str, Any] | None:
    """The record at ``path``, or ``None`` when there is none yet."""
    return read_json(path)


def write_record(path: str, record: Mapping[str, Any]) -> None:
    """Write the record atomically where the filesystem allows (write, then move)."""
    write_bytes(path, json.dumps(record, indent=2).encode())


def describe_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """What differs between a recorded fingerprint and a new one, ``""`` when they match.

    Nested fields are named with a dot (``schedule.growth_ratio 2.0 -> 3.0``); a model's tensor
    shapes are summarized. Keys that either side lacks (a record of an older ray-sebs, a model
    that could not be fingerprinted, a check made before the data size is known) are not compared.
    """
    changes = []
    for key in sorted(set(old) & set(new)):
        before, after = old[key], new[key]
        if before == after:
            continue
        if key == "model" and isinstance(before, dict) and isinstance(after, dict):
            changes.append(_describe_model_difference(before, after))
        elif isinstance(before, dict) and isinstance(after, dict):
            changes += [f"{key}.{name} {before.get(name)!r} -> {after.get(name)!r}"
                        for name in sorted(set(before) | set(after)) if before.get(name) != after.get(name)]
        else:
            changes.append(f"{key} {before!r} -> {after!r}")
    return ", ".join(changes)


def refuse_other_settings(what: str, name: str, recorded: Mapping[str, Any],
                          fingerprint: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` on ``--name`` when ``recorded`` differs from ``fingerprint``."""
    differences = describe_difference(recorded, fingerprint)
    if differences:
        raise ConfigError("name", name, f"names an existing {what} with other settings: {differences}",
                          f"use the original flags to resume it, or another --name for a new {what}")


def _describe_model_difference(old: Mapping[str, list[int]], new: Mapping[str, list[int]]) -> str:
    def size(shapes: Mapping[str, list[int]]) -> str:
        return f"{len(shapes)} tensors, {sum(math.prod(shape) for shape in shapes.values()):,} values"

    first = next(name for name in sorted({*old, *new}) if old.get(name) != new.get(name))
    return (f"model architecture ({size(old)} -> {size(new)}; {first} "
            f"{old.get(first, 'absent')} -> {new.get(first, 'absent')})")
