"""Scale policies: how the logit scale s is chosen. This file is where s is computed.

A policy is bound to its head at construction (`policy.bind(head)`), which gives
it the number of classes and the margin's target function, so neither is typed
twice in the configs. `policy.value` is the current s as a float; calling the
policy with the batch's cosines returns the s to multiply the logits with.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class ScalePolicy(nn.Module):
    """Base class. Subclasses implement `value`; adaptive ones also `forward`."""

    num_classes: int | None = None

    def bind(self, head: nn.Module) -> None:
        """Called once by the head that owns this policy."""
        if self.num_classes is not None and self.num_classes != head.num_classes:
            raise ValueError(
                f"{type(self).__name__} was built for num_classes={self.num_classes} but its head has "
                f"num_classes={head.num_classes}; state the class count once (in the dataset config)."
            )
        self.num_classes = head.num_classes

    @property
    def value(self) -> float:
        raise NotImplementedError

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> float:
        """The s for this batch; `cosine` is the (B, C) float32 cosine matrix before the margin."""
        return self.value

    def extra_repr(self) -> str:
        try:
            return f"s={self.value:.4f}"
        except (RuntimeError, TypeError):
            return "unbound"


class FixedScale(ScalePolicy):
    """s from the config (30 and 64 are the usual choices)."""

    def __init__(self, value: float = 30.0):
        super().__init__()
        if not value > 0:
            raise ValueError(f"scale.value must be > 0, got {value}")
        self._value = float(value)

    @property
    def value(self) -> float:
        return self._value


def auto_scale(num_classes: int, theta0: float = math.pi / 4) -> float:
    """Fixed-AdaCos scale s = ln(C - 1) / cos(theta0).

    P(target) = e^{s cos t} / (e^{s cos t} + C - 1) equals 1/2 at t = theta0 with this s,
    so the probability changes fastest (in cos t) where training samples still sit.
    theta0 = pi/4 gives s = sqrt(2) ln(C - 1): 13.104 for C = 10,575.
    """
    if num_classes < 3:
        raise ValueError(f"the auto scale needs num_classes >= 3 (ln(C-1) > 0), got {num_classes}")
    if not 0 < theta0 < math.pi / 2:
        raise ValueError(f"theta0 must lie in (0, pi/2) radians, got {theta0}")
    return math.log(num_classes - 1) / math.cos(theta0)


class AutoScale(ScalePolicy):
    """s = ln(C - 1) / cos(theta0), C taken from the head it is bound to."""

    def __init__(self, theta0: float = math.pi / 4, num_classes: int | None = None):
        super().__init__()
        self.theta0 = float(theta0)
        self.num_classes = num_classes
        if num_classes is not None:
            auto_scale(num_classes, self.theta0)  # validate early

    @property
    def value(self) -> float:
        if self.num_classes is None:
            raise RuntimeError("AutoScale is not bound to a head yet (num_classes unknown)")
        return auto_scale(self.num_classes, self.theta0)
