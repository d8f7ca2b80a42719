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
