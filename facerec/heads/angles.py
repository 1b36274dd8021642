"""Angles from cosines, with gradients that stay finite at theta = 0 and theta = pi."""
from __future__ import annotations

import torch

# d acos(c) / dc = -1 / sqrt(1 - c^2) is infinite at c = +-1. Clamping to [-1 + eps, 1 - eps] keeps it
# finite (at most 2,048 in float32, where 1 - 1e-7 rounds to 1 - 1.19e-7) and moves theta by at most
# 4.9e-4 rad (0.028 deg) at the two ends, far below any margin. Exactly at the ends the clamp passes
# a zero gradient, which is the right one there: theta is at its minimum (maximum).
COS_EPS = 1e-7


def angle(cosine: torch.Tensor) -> torch.Tensor:
    """theta = acos(cos theta) in radians, the cosine clamped by COS_EPS first."""
    return torch.acos(cosine.clamp(-1 + COS_EPS, 1 - COS_EPS))
