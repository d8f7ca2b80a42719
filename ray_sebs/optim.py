"""The optimizer choice, validated without importing torch (the CLI checks it before Ray starts)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ray_sebs.errors import ConfigError

if TYPE_CHECKING:
    import torch

OPTIMIZERS = ("sgd", "momentum", "adagrad", "adam", "adamw")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
"""``fp32``; or ``bf16``: the forward and the loss under ``torch.autocast`` to bfloat16 (weights,
gradients and optimizer state stay fp32)."""
"""The paper's three (plain SGD, momentum SGD, AdaGrad) plus Adam and AdamW."""

LR_SCALING_OF_OPTIMIZER: dict[str, str] = {
    "sgd": "linear", "momentum": "linear", "adagrad": "linear", "adam": "sqrt", "adamw": "sqrt"}
"""The law tying the learning rate to the batch (``ScheduleConfig.lr_scaling``) that each optimizer
gets by default: the SEBS paper keeps eta/B on SSGD's path for SGD, momentum SGD and AdaGrad
(``linear``); for Adam and AdamW the learning rate goes with the square root of the batch
(``sqrt``; Seesaw, arXiv 2510.14717)."""


def default_lr_scaling(optimizer_name: str) -> str:
    """``linear`` or ``sqrt``: the learning-rate law ``optimizer_name`` gets by default."""
    if optimizer_name not in LR_SCALING_OF_OPTIMIZER:
        raise ConfigError("optimizer", optimizer_name, "unknown optimizer",
                          f"use one of {', '.join(OPTIMIZERS)}")
    return LR_SCALING_OF_OPTIMIZER[optimizer_name]


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer; the paper covers plain SGD, momentum SGD and AdaGrad."""

    name: str = "sgd"
    """``sgd``, ``momentum`` (SGD with momentum), ``adagrad``, ``adam`` or ``adamw``."""
    momentum: float = 0.9
    """Momentum of ``momentum``; ignored by the others."""
    weight_decay: float = 0.0
    """L2 penalty (decoupled for ``adamw``)."""
    clip_grad_norm: float | None = None
    """Largest global L2 norm of the full accumulated gradient of an update (after the all-reduce:
    the mean over all ``B_s`` samples); a larger one is scaled down to it. ``None``: no clipping."""

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError("optimizer", self.name, "unknown optimizer",
                              f"use one of {', '.join(OPTIMIZERS)}")
        if not 0 <= self.momentum < 1:
            raise ConfigError("momentum", self.momentum, "must be in [0, 1)", "use e.g. 0.9")
        if not self.weight_decay >= 0:
            raise ConfigError("weight_decay", self.weight_decay, "must be >= 0", "use e.g. 0 or 1e-4")
        if self.clip_grad_norm is not None and (
                isinstance(self.clip_grad_norm, bool) or not isinstance(self.clip_grad_norm, int | float)
                or not math.isfinite(self.clip_grad_norm) or self.clip_grad_norm <= 0):
            raise ConfigError("clip_grad_norm", self.clip_grad_norm, "must be a finite number > 0",
                              "use e.g. 1.0, or leave it unset for no clipping")

    def build(self, parameters: Any, learning_rate: float) -> torch.optim.Optimizer:
        import torch

        if self.name == "sgd":
            return torch.optim.SGD(parameters, lr=learning_rate, weight_decay=self.weight_decay)
        if self.name == "momentum":
            return torch.optim.SGD(parameters, lr=learning_rate, momentum=self.momentum,
                                   weight_decay=self.weight_decay)
        if self.name == "adagrad":
            return torch.optim.Adagrad(parameters, lr=learning_rate, weight_decay=self.weight_decay)
        if self.name == "adam":
            return torch.optim.Adam(parameters, lr=learning_rate, weight_decay=self.weight_decay)
        return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=self.weight_decay)

