"""Learning-rate schedules: linear warmup, then cosine or polynomial decay, stepped per batch; past
the planned end (a finished run continued with a larger trainer.max_steps), an optional constant tail."""
from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

DECAYS = ("cosine", "poly", "constant")


class WarmupDecay:
    """LR multiplier at an optimizer step. A plain object (not a closure) so that LambdaLR saves
    and restores its fields in checkpoints (the tail aside: see WarmupDecayLR)."""

    def __init__(self, total_steps: int, warmup_steps: int, decay: str, power: float, min_lr_ratio: float, tail_lr_ratio: float | None = None):
        if decay not in DECAYS:
            raise ValueError(f"optim.scheduler.decay must be one of {DECAYS}, got {decay!r}")
        if total_steps < 1:
            raise ValueError(f"the schedule needs >= 1 training step, got total_steps={total_steps}")
        self.total_steps = int(total_steps)
        self.warmup_steps = min(int(warmup_steps), self.total_steps - 1)
        self.decay = decay
        self.power = float(power)
        self.min_lr_ratio = float(min_lr_ratio)
        if tail_lr_ratio is not None and not tail_lr_ratio >= 0:
            raise ValueError(f"optim.scheduler.tail_lr_ratio must be >= 0 (or null), got {tail_lr_ratio}")
        self.tail_lr_ratio = None if tail_lr_ratio is None else float(tail_lr_ratio)

    def __call__(self, step: int) -> float:
        if step >= self.total_steps and self.tail_lr_ratio is not None:
            return self.tail_lr_ratio
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


class WarmupDecayLR(LambdaLR):
    """LambdaLR over a WarmupDecay. A checkpoint restores the schedule's length and shape (an exact
    resume needs the planned total, not the continuing run's), but not its tail: that is the
    continuing run's setting, so a finished run can be continued past its end at a constant LR."""

    def load_state_dict(self, state_dict: dict) -> None:
        schedule = self.lr_lambdas[0]
        tail = schedule.tail_lr_ratio
        super().load_state_dict(state_dict)
        schedule.tail_lr_ratio = tail
        if self.last_epoch >= schedule.total_steps:
            # past the planned end, the restored optimizer holds the LR the saved run set for this
            # step (its floor, or its own tail): the continuation's first step already runs at its own
            for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base_lr * schedule(self.last_epoch)
            self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def warmup_decay(
    optimizer: Optimizer,
    total_steps: int,
    warmup_fraction: float = 0.05,
    decay: str = "cosine",
    power: float = 2.0,
    min_lr_ratio: float = 0.0,
    tail_lr_ratio: float | None = None,
) -> WarmupDecayLR:
    """LambdaLR over `total_steps` optimizer steps: warmup for a fraction of them, then decay; past
    them, `tail_lr_ratio` x the base LR (None: the decay's last value, min_lr_ratio for cosine/poly)."""
    if not 0 <= warmup_fraction < 1:
        raise ValueError(f"optim.scheduler.warmup_fraction must lie in [0, 1), got {warmup_fraction}")
    warmup_steps = round(warmup_fraction * total_steps)
    return WarmupDecayLR(optimizer, WarmupDecay(total_steps, warmup_steps, decay, power, min_lr_ratio, tail_lr_ratio))
