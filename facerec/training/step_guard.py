"""The non-finite step guard: an optimizer step whose loss or gradient is not finite on any rank is
skipped on every rank and leaves the model exactly as it was.

A skipped step must undo what the step's forward passes already changed: a non-finite forward has
written NaN into every BatchNorm's running statistics (and the dynamic s, the margins' EMAs) by the
time the loss shows it. So the guard copies the model's buffers before a step's first micro-batch
(one fused multi-tensor copy), records every micro-batch's loss, and before the optimizer step
decides, over all ranks (each sees only its shard's or its batch's values), whether the step is
finite: if not, it restores the buffers and drops the gradients (optimizers leave a parameter whose
grad is None untouched: no momentum, no weight decay). Under fp16 the GradScaler owns overflowing
gradients: it skips the step and lowers its scale, which is no failure; its decision is made global
here (a class shard's gradients exist on one rank only), and the buffers are restored when it skips.
The skipped steps are counted (buffers: they survive a resume); `max_consecutive` in a row stop the run.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from facerec import distributed, lightning_compat

log = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Raised after too many consecutive steps with a non-finite loss or gradient."""


class NonFiniteStepGuard(nn.Module):
    def __init__(self, max_consecutive: int = 20):
        super().__init__()
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive_nonfinite must be >= 1, got {max_consecutive}")
        self.max_consecutive = int(max_consecutive)
        self.register_buffer("nonfinite_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("consecutive_nonfinite", torch.zeros((), dtype=torch.long))
        self.step_taken = True  # whether the last optimizer step changed the model (the weight EMA averages only those)
        self._losses: list[torch.Tensor] = []  # the detached losses of this optimizer step's micro-batches
        self._saved: list[torch.Tensor] = []

    def start_micro_batch(self, buffers: list[torch.Tensor], first: bool) -> None:
        """Before a micro-batch's forward: at a step's first one, copy the buffers it may change."""
        if len(self._saved) != len(buffers):  # the first step (or a resume mid-step): allocate the copies once
            self._saved = [buffer.clone() for buffer in buffers]
        elif first:  # one fused multi-tensor copy, not one kernel per buffer (hundreds in an IResNet)
            torch._foreach_copy_(self._saved, buffers)
        if first:
            self._losses = []

    def record_loss(self, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach())

    def step_loss(self) -> torch.Tensor:
        """The mean loss of this optimizer step's micro-batches (non-finite if any of them is)."""
        losses = self._losses
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

    def check(
        self,
        trainer,
        optimizer: torch.optim.Optimizer,
        grad_norm: torch.Tensor,
        buffers: list[torch.Tensor],
        describe: Callable[[torch.Tensor], str],
    ) -> bool:
        """Before the optimizer step: whether it goes ahead. `grad_norm`: this rank's total gradient norm;
        `buffers`: the ones copied at the step's start; `describe`: the step and its loss for messages."""
        step_loss = self.step_loss()
        finite = torch.isfinite(step_loss)
        scaler = lightning_compat.gradscaler(trainer)
        if scaler is None:
            finite &= torch.isfinite(grad_norm)
        else:
            found_inf = lightning_compat.found_inf_per_device(scaler, optimizer)
            overflow = distributed.any_rank(sum(v.to(finite.device) for v in found_inf.values()) > 0)
            for value in found_inf.values():
                value.copy_(overflow)
        finite = distributed.all_ranks(finite)
        stepping = finite & ~overflow if scaler is not None else finite
        finite, step_taken = torch.stack([finite, stepping]).tolist()  # one host sync per step, as a GradScaler does
        self.step_taken = step_taken
        if not step_taken:
            with torch.no_grad():
                torch._foreach_copy_(buffers, self._saved)
        if finite:
            self.consecutive_nonfinite.zero_()
        else:
            self._skip(optimizer, describe(step_loss))
        return step_taken

    def _skip(self, optimizer: torch.optim.Optimizer, detail: str) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.nonfinite_steps += 1
        self.consecutive_nonfinite += 1
        log.warning("non-finite loss or gradient, step skipped (%s)", detail)
        if int(self.consecutive_nonfinite) >= self.max_consecutive:
            raise NonFiniteTrainingError(
                f"training stopped: {int(self.consecutive_nonfinite)} consecutive steps had a non-finite loss or "
                f"gradient (last at {detail}). Parameters are unchanged since the last finite step; lower the "
                "learning rate or the scale s, check the data, or raise max_consecutive_nonfinite."
            )
