"""The built-in datasets as numpy arrays: scikit-learn's bundled digits, and synthetic
classification data (flat Gaussian clusters, or image-shaped class patterns for the CNN).

No Ray here, and numpy is imported when called: :mod:`ray_sebs.data` imports this module while
planning. :func:`ray_sebs.data_pipeline.load_arrays` turns the arrays into Ray Datasets.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ray_sebs.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

    from ray_sebs.data import DatasetConfig

# Synthetic flat data: class centres lie on a sphere of this radius, so nearby centres are about
# 4.2 apart in any dimension; with unit noise (difficulty 1) a linear model reaches roughly 85-90%
# accuracy on 10 classes, far above chance but not saturated.
_SYNTHETIC_CENTRE_RADIUS = 3.0
# Synthetic images: class patterns of unit per-pixel RMS that are constant on the cells of a 4x4
# grid. Per-pixel noise is scaled by sqrt(pixels per cell), so the noise on a cell's average is
# `difficulty` whatever the image size: difficulty means the same for 8x8 and for 32x32 images.
_SYNTHETIC_PATTERN_GRID = 4


def synthetic_arrays(config: DatasetConfig) -> tuple[np.ndarray, np.ndarray]:
    """The ``synthetic`` dataset as (features float64 ``(rows, num_features)``, labels int64).

    Deterministic for ``config.seed``. Flat data: Gaussian clusters around class centres on a
    sphere of radius 3, with noise of standard deviation ``synthetic_difficulty``. Image data: a
    random pattern per class and channel, constant on the cells of a 4x4 grid, plus per-pixel
    noise whose average over a cell has standard deviation ``synthetic_difficulty``; flattened in
    ``(C, H, W)`` order. At difficulty 1 a logistic regression reaches about 87% (flat, 10
    classes) and about 97% (1x8x8 images); at 2 about 50% on the flat data.
    """
    import numpy as np

    rng = np.random.default_rng(config.seed)
    rows, classes = config.synthetic_rows, config.synthetic_classes
    # Equal class frequencies, in random order.
    labels = np.arange(rows, dtype=np.int64) % classes
    rng.shuffle(labels)
    if config.synthetic_image_shape is None:
        centres = rng.standard_normal((classes, config.synthetic_features))
        centres *= _SYNTHETIC_CENTRE_RADIUS / np.linalg.norm(centres, axis=1, keepdims=True)
        noise = rng.standard_normal((rows, config.synthetic_features))
        features = centres[labels] + config.synthetic_difficulty * noise
        return features, labels
    channels, height, width = config.synthetic_image_shape
    grid_h, grid_w = min(_SYNTHETIC_PATTERN_GRID, height), min(_SYNTHETIC_PATTERN_GRID, width)
    coarse = rng.standard_normal((classes, channels, grid_h, grid_w))
    # Nearest-neighbour upsampling: each coarse cell becomes a block of pixels.
    row_cells = np.arange(height) * grid_h // height
    col_cells = np.arange(width) * grid_w // width
    patterns = coarse[:, :, row_cells][:, :, :, col_cells]
    rms = np.sqrt((patterns ** 2).mean(axis=(1, 2, 3), keepdims=True))
    patterns /= np.maximum(rms, 1e-12)
    noise = rng.standard_normal((rows, channels, height, width))
    noise_std = config.synthetic_difficulty * math.sqrt(height * width / (grid_h * grid_w))
    images = patterns[labels] + noise_std * noise
    return images.reshape(rows, -1), labels


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (features float64 ``(1797, 64)``, labels int64)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError("dataset_name", "digits", "needs scikit-learn, which is not installed",
                          "pip install 'ray-sebs[digits]', or give a data path") from None
    import numpy as np

    bunch = load_digits()
    return bunch.data.astype(np.float64), bunch.target.astype(np.int64)
