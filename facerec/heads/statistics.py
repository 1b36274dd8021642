"""Scale-invariant training diagnostics computed from a head's output.

Raw cross-entropy values are not comparable across different s, so training logs
angles (degrees) and the target probability, which are.
"""
from __future__ import annotations

import math

import torch

from facerec.heads.angles import COS_EPS, angle


@torch.no_grad()
def angular_statistics(
    logits: torch.Tensor, labels: torch.Tensor, target_cosine: torch.Tensor, scale: float
) -> dict[str, torch.Tensor]:
    """Diagnostics for one batch.

    logits: (B, C) scaled logits with the margin on the target (the head's output);
    target_cosine: (B,) cosine to the own class centre, before the margin;
    scale: the s used for `logits`.

    Returns theta_med (median target angle, deg), theta_nontarget (mean angle to the
    other class centres, deg), p_target (median softmax probability of the target
    under the trained logits, margin included) and top1 (fraction of samples whose
    own centre is the nearest one, margin excluded).
    """
    logits = logits.detach().float()
    labels = labels.view(-1, 1).long()
    batch, num_classes = logits.shape
    theta_target = torch.rad2deg(angle(target_cosine.detach().float()))
    log_p = logits.gather(1, labels).squeeze(1) - torch.logsumexp(logits, dim=1)
    # Non-target entries of logits / s are plain cosines; mask the target column out.
    cos = logits / scale
    cos.scatter_(1, labels, -math.inf)
    nearest_other = cos.max(dim=1).values
    cos.scatter_(1, labels, 0.0)  # acos(0) = 90 deg, subtracted below
    angle_sum = cos.clamp_(-1 + COS_EPS, 1 - COS_EPS).acos_().sum(dim=1) - math.pi / 2  # in place: no 2nd (B, C)
    theta_nontarget = torch.rad2deg(angle_sum.sum() / (batch * (num_classes - 1)))
    return {
        "theta_med": theta_target.median(),
        "theta_nontarget": theta_nontarget,
        "p_target": log_p.exp().median(),
        "top1": (target_cosine.detach().float() > nearest_other).float().mean(),
    }
