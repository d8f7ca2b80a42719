"""Errors ray-sebs raises on purpose, and the small checks and texts they share.

Every error of ray-sebs's own is a :class:`SEBSError`, so a caller (the CLI, a Tune trial, a
user's script) catches ray-sebs's refusals by type. Every check that can run before cluster
resources are requested raises :class:`ConfigError`; it carries the offending field and value so
the CLI can name the flag the user typed, and the message always says how to fix it.

This module imports neither Ray nor torch: the plan and the schedule use it.
"""

from __future__ import annotations

import math
import re
from typing import Any


class SEBSError(Exception):
    """Base class of every error ray-sebs raises on purpose."""


class ConfigError(SEBSError, ValueError):
    """A configuration value or an input dataset that ray-sebs refuses, with the fix."""

    def __init__(self, field: str, value: Any, problem: str, fix: str) -> None:
        self.field = field
        self.value = value
        self.problem = problem
        self.fix = fix
        super().__init__(self.describe(field))

    def describe(self, name: str) -> str:
        """The one-line message, naming the field as ``name`` (a flag or an attribute)."""
        return f"{name}={self.value!r}: {self.problem}; {self.fix}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.field, self.value, self.problem, self.fix))


class NonFiniteLossError(SEBSError, RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is the epoch before.

    Raised by the driver (:meth:`ray_sebs.trainer.SEBSTrainer.fit`), not retried: a non-finite
    loss comes back the same way from the same checkpoint.
    """

    def __init__(self, stage: int, update: int, global_batch_size: int, epoch: int,
                 checkpoint: str | None = None, checkpoint_epoch: int | None = None) -> None:
        self.stage = stage
        self.update = update
        self.global_batch_size = global_batch_size
        self.epoch = epoch
        self.checkpoint = checkpoint
        self.checkpoint_epoch = epoch - 1 if checkpoint_epoch is None else checkpoint_epoch
        if checkpoint is not None:
            end = f" (end of epoch {self.checkpoint_epoch})" if self.checkpoint_epoch >= 0 else ""
            last_good = f"the last good checkpoint{end} is {checkpoint}"
        elif self.checkpoint_epoch >= 0:
            last_good = f"the last good checkpoint is the end of epoch {self.checkpoint_epoch}"
        else:
            last_good = "no checkpoint was written before it"
        super().__init__(
            f"non-finite training loss at stage {stage}, update {update} (epoch {epoch}, global "
            f"batch {global_batch_size}); {last_good}. "
            "Lower --lr, check the data for extreme values, or use a smaller --ratio")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.stage, self.update, self.global_batch_size, self.epoch,
                             self.checkpoint, self.checkpoint_epoch))


class InvariantError(SEBSError, RuntimeError):
    """A promise of the training loop was broken: an update that did not use exactly B_s samples,
    a segment that does not start where the plan says, a run that ended short of its plan.

    Never the user's fault and never retried as if it were a flaky worker: it is a bug to report.
    """


class CheckpointError(SEBSError, RuntimeError):
    """A checkpoint that cannot be used for this run: it does not fit the model, or it cannot be
    read. The message names the checkpoint and says what to do."""


def require_int(name: str, value: object, *, minimum: int, fix: str) -> None:
    """Refuse a non-integer (``bool`` included) or an integer below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, value, "must be an integer", fix)
    if value < minimum:
        raise ConfigError(name, value, f"must be >= {minimum}", fix)


def require_seconds(name: str, value: object, *, fix: str) -> None:
    """Refuse anything but a finite number of seconds >= 0 (``bool`` included)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value < 0:
        raise ConfigError(name, value, "must be a finite number of seconds >= 0", fix)


def format_number(value: float) -> str:
    """A number as a person writes it and a parser reads it back: ``2`` for 2.0, ``1.5`` for 1.5;
    ``nan`` and ``inf`` as such."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def root_cause_line(error: BaseException, *, limit: int = 300) -> str:
    """What actually went wrong under a chain of Ray wrappers, in one line.

    Follows Ray Train's ``worker_failures`` (lowest rank first) and ``controller_failure``, Ray
    Core's ``cause``, then ``__cause__`` and ``__context__`` to the innermost error; a ray-sebs
    error on the way is the answer itself. When a message on the way carries a remote traceback
    (a ``RayTaskError``'s, or Ray Train's user-exception wrapper's), the deepest one gives the
    answer: its exception line, ``Type: message``, with the message's further lines joined on (an
    NCCL error says what is wrong on its second line). Ray prints such a traceback under a
    ``ray::Actor.method() (pid=..)`` title instead of ``Traceback (...)``, so the frames are what
    is looked for. Otherwise the first non-blank line of the innermost message is kept (Ray
    appends retry advice after it).
    """
    seen: set[int] = set()
    remote: str | None = None
    while id(error) not in seen and not isinstance(error, SEBSError):
        seen.add(id(error))
        remote = exception_after_traceback(str(error)) or remote
        failures = getattr(error, "worker_failures", None)
        inner = (failures[min(failures)] if isinstance(failures, dict) and failures else None)
        inner = (inner or getattr(error, "controller_failure", None) or getattr(error, "cause", None)
                 or error.__cause__ or error.__context__)
        if not isinstance(inner, BaseException):
            break
        error = inner
    lines = [line.strip() for line in _plain(str(error)).splitlines() if line.strip()]
    if isinstance(error, SEBSError) or remote is None:
        text = lines[0] if lines else type(error).__name__
    else:
        text = remote
    return text if len(text) <= limit else text[: limit - 3] + "..."


_FRAME = re.compile(r'^\s+File "')
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _plain(text: str) -> str:
    """``text`` without terminal colour codes (Ray colours a remote traceback's title)."""
    return _ANSI.sub("", text)


def exception_after_traceback(text: str) -> str | None:
    """The exception a Python traceback in ``text`` ends with, as one line (``Type: message``, its
    further lines joined with spaces); ``None`` when ``text`` has no traceback frames."""
    lines = _plain(text).splitlines()
    last_frame = max((index for index, line in enumerate(lines) if _FRAME.match(line)), default=None)
    if last_frame is None:
        return None
    rest = lines[last_frame + 1:]
    # The frame's source line (and Python 3.11's ^^^ markers) are indented; the exception is not.
    while rest and (not rest[0].strip() or rest[0][:1].isspace()):
        rest.pop(0)
    return " ".join(line.strip() for line in rest if line.strip()) or None
