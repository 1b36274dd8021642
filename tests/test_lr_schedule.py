"""The LR schedule (facerec.training.optim): warmup then decay, and the constant tail a finished run
is continued at (the convergence tail check)."""
from __future__ import annotations

import math

import pytest
import torch

from facerec.training.optim import warmup_decay


def sgd(lr: float = 0.2) -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=lr, momentum=0.9)


def lrs_over(scheduler, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return lrs


def restored(state: dict, total_steps: int, **options):
    """A new optimizer and schedule of `total_steps`, loaded from `state` as Lightning loads them
    (the optimizer first)."""
    optimizer = sgd()
    scheduler = warmup_decay(optimizer, total_steps, warmup_fraction=0.2, **options)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return scheduler


def test_cosine_schedule_warms_up_then_decays_to_its_floor():
    lrs = lrs_over(warmup_decay(sgd(), 10, warmup_fraction=0.2, min_lr_ratio=0.1), 12)
    assert lrs[:3] == pytest.approx([0.2 / 3, 0.4 / 3, 0.2])
    assert lrs[6] == pytest.approx(0.2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8))))
    assert lrs[10:] == pytest.approx([0.02, 0.02])  # past the end: the floor, without a tail


def test_a_restored_schedule_keeps_its_length_and_takes_the_continuing_runs_tail():
    """A checkpoint's schedule resumes with its own planned total (an exact resume), whatever
    total the continuing run's config gives; past that end the LR is the continuation's tail,
    from the first step after the restore."""
    scheduler = warmup_decay(sgd(), 10, warmup_fraction=0.2)
    straight = lrs_over(scheduler, 10)
    state = {"optimizer": scheduler.optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(0.0)  # the cosine's end
    continued = restored(state, 13, tail_lr_ratio=0.25)
    assert continued.lr_lambdas[0].total_steps == 10
    assert lrs_over(continued, 3) == pytest.approx([0.05] * 3)
    assert restored(state, 13).optimizer.param_groups[0]["lr"] == pytest.approx(0.0)  # no tail: the floor

    # mid-schedule, a tail changes nothing: the resumed LRs are the uninterrupted run's
    scheduler = warmup_decay(sgd(), 10, warmup_fraction=0.2)
    lrs_over(scheduler, 4)
    state = {"optimizer": scheduler.optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    assert lrs_over(restored(state, 10, tail_lr_ratio=0.25), 6) == straight[4:]


def test_a_negative_tail_is_refused():
    with pytest.raises(ValueError, match="tail_lr_ratio must be >= 0"):
        warmup_decay(sgd(), 10, tail_lr_ratio=-0.1)


def test_a_continued_run_resumed_without_its_tail_drops_to_the_floor_from_its_first_step():
    scheduler = warmup_decay(sgd(), 10, warmup_fraction=0.2)
    lrs_over(scheduler, 10)
    state = {"optimizer": scheduler.optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    continued = restored(state, 12, tail_lr_ratio=0.25)
    lrs_over(continued, 1)
    state = {"optimizer": continued.optimizer.state_dict(), "scheduler": continued.state_dict()}
    assert lrs_over(restored(state, 13), 2) == pytest.approx([0.0, 0.0])
    assert lrs_over(restored(state, 13, tail_lr_ratio=0.5), 2) == pytest.approx([0.1, 0.1])
