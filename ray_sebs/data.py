"""Datasets for SEBS runs: bundled digits, synthetic classification, and a user's Parquet/CSV.

Importing this module does not import Ray: the CLI plans runs from these sizes before a cluster
exists. Loading functions import Ray Data when called.
"""

from __future__ import annotations

DIGITS_ROWS = 1797
"""Rows in scikit-learn's bundled digits dataset (8x8 images, 10 classes)."""

DEFAULT_VALIDATION_FRACTION = 0.2
"""Share of the rows held out for validation when no validation data is given."""


def split_sizes(total_rows: int, validation_fraction: float) -> tuple[int, int]:
    """(training rows, validation rows) of a seeded split: validation gets
    ``round(total_rows * validation_fraction)`` rows, training the rest."""
    validation_rows = round(total_rows * validation_fraction)
    return total_rows - validation_rows, validation_rows
