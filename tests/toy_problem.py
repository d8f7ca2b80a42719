"""The tiny classification problem the loop tests train on: 6 features, 3 classes, a small MLP.

Shared by the tests that run ``SEBSTrainer`` on a real local Ray, so that their datasets and
models are the same ones.
"""

from __future__ import annotations

import sys

import numpy as np
import ray
import ray.cloudpickle
import torch

# Workers do not have tests/ on their path: ship this module's functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

FEATURES = 6
CLASSES = 3


def make_rows(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(count, FEATURES)).astype(np.float32)
    labels = (features[:, 0] > 0).astype(np.int64) + (features[:, 1] > 1).astype(np.int64)
    return features, labels


def to_dataset(features: np.ndarray, labels: np.ndarray) -> ray.data.Dataset:
    return ray.data.from_items([{"features": f, "label": int(y)}
                                for f, y in zip(features, labels, strict=True)])


def small_model() -> torch.nn.Module:
    torch.manual_seed(1234)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, CLASSES))
