"""The models SEBS trains: logistic regression (the convex case), an MLP and a small CNN.

Every model takes the flat ``features`` tensor of :mod:`ray_sebs.data`, shape
``(batch, num_features)``, and returns logits ``(batch, num_classes)``; the CNN reshapes to
``(batch, C, H, W)`` itself. All parameters take part in every forward pass (DDP needs no
``find_unused_parameters``), there is no batch normalization (its statistics would depend on the
per-worker micro-batch, which SEBS changes from stage to stage), and a batch of 0 rows works.

``functools.partial(build_model, name, input_shape, num_classes)`` pickles, so the trainer can
ship it to Ray workers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ray_sebs.errors import ConfigError

MODEL_NAMES: tuple[str, ...] = ("logreg", "mlp", "cnn")
"""Models :func:`build_model` knows."""

CNN_MIN_SIDE = 4
"""Smallest image height and width the CNN accepts: it pools by 2 once, then to a 2x2 grid."""

_CNN_CHANNELS = (16, 32)
_CNN_GRID = 2


def check_model_name(name: str) -> None:
    """Refuse an unknown model name (needs no data, so it runs before Ray starts)."""
    if name not in MODEL_NAMES:
        raise ConfigError("model", name, "is not a known model",
                          f"use one of {', '.join(MODEL_NAMES)}")


def check_model(name: str, input_shape: tuple[int, ...]) -> None:
    """Refuse an unknown model, or a CNN on data that is not image-shaped, before training."""
    check_model_name(name)
    _check_input_shape(input_shape)
    if name == "cnn" and (len(input_shape) != 3 or min(input_shape[1:]) < CNN_MIN_SIDE):
        raise ConfigError("model", name,
                          f"needs image input (C, H, W) with H and W >= {CNN_MIN_SIDE}, but the data "
                          f"has input shape {tuple(input_shape)}",
                          "use mlp or logreg, or give image-shaped data (digits, or --dataset "
                          "synthetic --image-shape 3,32,32)")


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, *,
                hidden_sizes: tuple[int, ...] = (128,)) -> nn.Module:
    """A fresh, randomly initialised model; seed torch first for a reproducible start.

    Args:
        name: ``logreg`` (one linear layer), ``mlp`` (Linear-ReLU layers of ``hidden_sizes``, then
            a linear output) or ``cnn`` (two 3x3 conv layers, pooling to a 2x2 grid, linear).
        input_shape: One example's shape, as :attr:`ray_sebs.data.PreparedData.input_shape`.
        num_classes: Number of outputs (logits).
        hidden_sizes: Widths of the MLP's hidden layers; unused by the other models.
    """
    check_model(name, input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError("num_classes", num_classes, "must be a positive integer",
                          "use the number of classes in the data")
    num_features = math.prod(input_shape)
    if name == "logreg":
        return nn.Sequential(nn.Flatten(), nn.Linear(num_features, num_classes))
    if name == "mlp":
        sizes = _check_hidden_sizes(hidden_sizes)
        layers: list[nn.Module] = [nn.Flatten()]
        width = num_features
        for size in sizes:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, num_classes))
        return nn.Sequential(*layers)
    channels, height, width = input_shape
    return SmallCNN((channels, height, width), num_classes)


class SmallCNN(nn.Module):
    """conv3x3-ReLU-maxpool2, conv3x3-ReLU, adaptive average pool to 2x2, linear.

    Pooling to a 2x2 grid instead of a global average keeps coarse position, which digits and
    the synthetic class patterns need, while the parameter count stays independent of H and W.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        self.input_shape = input_shape
        first, second = _CNN_CHANNELS
        self.features = nn.Sequential(
            nn.Conv2d(input_shape[0], first, kernel_size=3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(first, second, kernel_size=3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(_CNN_GRID),
        )
        self.classifier = nn.Linear(second * _CNN_GRID * _CNN_GRID, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # reshape(-1, ...) is ambiguous for 0 rows; the explicit batch size is not.
        images = features.reshape(features.shape[0], *self.input_shape)
        return self.classifier(self.features(images).flatten(1))


def _check_input_shape(input_shape: Sequence[int]) -> None:
    if isinstance(input_shape, str) or not isinstance(input_shape, Sequence) or not input_shape \
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in input_shape):
        raise ConfigError("input_shape", input_shape, "must be a tuple of positive integers",
                          "use (num_features,) or (C, H, W)")


def _check_hidden_sizes(hidden_sizes: Sequence[int]) -> tuple[int, ...]:
    if isinstance(hidden_sizes, str) or not isinstance(hidden_sizes, Sequence) or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in hidden_sizes):
        raise ConfigError("hidden_sizes", hidden_sizes, "must be a tuple of positive integers",
                          "use e.g. (128,) or (256, 128)")
    return tuple(hidden_sizes)
