"""The one error type for bad configuration and bad input.

Every check in ray-sebs that can be done before cluster resources are requested raises
:class:`ConfigError`. It carries the offending field and value so the CLI can name the flag the
user typed, and the message always says how to fix it.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
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


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is the epoch before.

    Raised by the driver (:meth:`ray_sebs.trainer.SEBSTrainer.fit`), not retried: a non-finite
    loss comes back the same way from the same checkpoint.
    """

    def __init__(self, stage: int, update: int, global_batch_size: int, epoch: int,
                 checkpoint: str | None = None) -> None:
        self.stage = stage
        self.update = update
        self.global_batch_size = global_batch_size
        self.epoch = epoch
        self.checkpoint = checkpoint
        if checkpoint is not None:
            end = f" (end of epoch {epoch - 1})" if epoch > 0 else ""
            last_good = f"the last good checkpoint{end} is {checkpoint}"
        elif epoch > 0:
            last_good = f"the last good checkpoint is the end of epoch {epoch - 1}"
        else:
            last_good = "no checkpoint was written before it"
        super().__init__(
            f"non-finite training loss at stage {stage}, update {update} (epoch {epoch}, global "
            f"batch {global_batch_size}); {last_good}. "
            "Lower --lr, check the data for extreme values, or use a smaller --ratio")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.stage, self.update, self.global_batch_size, self.epoch,
                             self.checkpoint))
