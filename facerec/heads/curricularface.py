"""CurricularFace (Huang et al., CVPR 2020): hard negatives gain weight as training progresses.

The target logit is ArcFace's cos(theta_y + m). A negative is hard when cos theta_j > cos(theta_y + m);
its logit becomes cos theta_j (t + cos theta_j), where t is an EMA (momentum 0.01) of the batch's
mean target cosine: early (t ~ 0) hard negatives weigh less, later more. t is a buffer (checkpointed)
and, unlike the official code (each GPU's own batch), taken over the global batch under DDP.
Defaults follow the paper (m = 0.5, s = 64 there). The nominal margin is ArcFace's.
"""
from __future__ import annotations

import math

from typing import TYPE_CHECKING

import torch

from facerec.heads.margin import Margin
from facerec.heads.margins import additive_angular

if TYPE_CHECKING:
    from facerec.heads.centres import ClassCentres


class CurricularFace(Margin):
    changes_nontargets = True

    def __init__(self, m: float = 0.5, momentum: float = 0.01):
        if not (0 <= m < math.pi / 2 and 0 < momentum <= 1):
            raise ValueError(f"CurricularFace needs 0 <= m < pi/2 and 0 < momentum <= 1, got m={m}, momentum={momentum}")
        super().__init__(m=float(m), momentum=float(momentum))
        self.register_buffer("t", torch.zeros(()))

    def target_logit(self, cos_target: torch.Tensor, per_sample: torch.Tensor | None = None) -> torch.Tensor:
        return additive_angular(cos_target, self.m)

    def advance(self, target: torch.Tensor, centres: ClassCentres) -> None:
        # as the official code: t moves before this batch's logits use it
        with torch.no_grad():
            mean = centres.batch_rows(target.detach()).mean()
            self.t.mul_(1 - self.momentum).add_(self.momentum * mean.to(self.t.dtype))

    def nontarget_logits(self, cos: torch.Tensor, target: torch.Tensor, out=None):
        target = target.detach().clamp(-1, 1)
        threshold = target * math.cos(self.m) - (1 - target.square()).sqrt() * math.sin(self.m)  # cos(theta_y + m)
        # hard negatives as a 0/1 float (sign of the positive part), and arithmetic instead of `where`:
        # on the CPU a comparison to bool, a `where`, a masked fill or `heaviside` costs 3-20x a float
        # multiply over the same block
        hard = (cos.detach() - threshold.unsqueeze(1)).clamp_(min=0).sign_()
        excess = cos * hard  # cos theta_j on the hard negatives, 0 elsewhere
        shifted = torch.addcmul(excess, hard, self.t.to(cos.dtype) - 1)  # hard: cos + t - 1; else 0
        logits_out, slope_out = out if out is not None else (None, None)
        logits = torch.addcmul(cos, excess, shifted, out=logits_out)  # hard: cos (t + cos); else cos
        slope = torch.add(excess, shifted, out=slope_out).add_(1)  # hard: t + 2 cos; else 1
        return logits, slope
