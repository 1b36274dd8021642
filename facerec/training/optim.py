"""Learning-rate schedules: linear warmup, then cosine or polynomial decay, stepped per batch."""
from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

DECAYS = ("cosine", "poly", "constant")


class WarmupDecay:
    """LR multiplier at an optimizer step. A plain object (not a closure) so that
    LambdaLR saves and restores its fields in checkpoints."""

    def __init__(self, total_steps: int, warmup_steps: int, decay: str, power: float, min_lr_ratio: float):
        if decay not in DECAYS:
            raise ValueError(f"optim.scheduler.decay must be one of {DECAYS}, got {decay!r}")
        if total_steps < 1:
            raise ValueError(f"the schedule needs >= 1 training step, got total_steps={total_steps}")
        self.total_steps = int(total_steps)
        self.warmup_steps = min(int(warmup_steps), self.total_steps - 1)
        self.decay = decay
        self.power = float(power)
        self.min_lr_ratio = float(min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.decay == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.decay == "cosine":
            shape = 0.5 * (1 + math.cos(math.pi * progress))
        else:
            shape = (1 - progress) ** self.power
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * shape


def warmup_decay(
    optimizer: Optimizer,
    total_steps: int,
    warmup_fraction: float = 0.05,
    decay: str = "cosine",
    power: float = 2.0,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """LambdaLR over `total_steps` optimizer steps: warmup for a fraction of them, then decay."""
    if not 0 <= warmup_fraction < 1:
        raise ValueError(f"optim.scheduler.warmup_fraction must lie in [0, 1), got {warmup_fraction}")
    warmup_steps = round(warmup_fraction * total_steps)
    return LambdaLR(optimizer, WarmupDecay(total_steps, warmup_steps, decay, power, min_lr_ratio))
