"""Sub-center ArcFace (Deng et al., ECCV 2020): K centres per class; a sample's cosine to a class is
the largest over that class's centres, with ArcFace's margin on the target.

Noisy images of a class gather at non-dominant centres, so after training the images far from
their class's dominant centre are the label-noise candidates: `dominant_centres_and_outliers(head, ...)`
(and `python -m facerec.tools.subcenter_outliers`) lists them, as pytorch-metric-learning's
`SubCenterArcFaceLoss.get_outliers` does. Defaults: K = 3, m = 0.5 (the paper; s = 64 there).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from facerec.heads.margin import Margin
from facerec.heads.margins import additive_angular

if TYPE_CHECKING:
    from facerec.heads.head import MarginHead


class SubCenterArcFace(Margin):
    def __init__(self, m: float = 0.5, centres: int = 3):
        if not 0 <= m < math.pi / 2:
            raise ValueError(f"SubCenterArcFace margin m must lie in [0, pi/2) radians, got {m}")
        if not 1 <= centres <= 255:
            raise ValueError(f"SubCenterArcFace needs 1 <= centres <= 255 per class, got {centres}")
        self.centres_per_class = int(centres)  # the head sizes its class centres from it
        super().__init__(m=float(m), centres=int(centres))

    def target_logit(self, cos_target: torch.Tensor, per_sample: torch.Tensor | None = None) -> torch.Tensor:
        return additive_angular(cos_target, self.m)


@torch.no_grad()
def dominant_centres_and_outliers(
    head: MarginHead, embeddings: torch.Tensor, labels: torch.Tensor, threshold_deg: float = 75.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a (dense) head with K centres per class: (dominant centre of each class (C,), -1 for a class
    without samples; angle in degrees of each sample to its class's dominant centre (N,); outlier mask
    (N,): angle > threshold_deg). A class's dominant centre is the one nearest to most of its samples."""
    labels = labels.view(-1).long()
    k = head.centres.centres_per_class
    centres = F.normalize(head.centres.weight.float(), dim=1).view(head.num_classes, k, -1)
    cos = (centres[labels] @ F.normalize(embeddings.float(), dim=1).unsqueeze(2)).squeeze(2)  # (N, K)
    votes = torch.zeros(head.num_classes, k, dtype=torch.long, device=cos.device)
    votes.index_put_((labels, cos.argmax(dim=1)), torch.ones_like(labels), accumulate=True)
    dominant = torch.where(votes.sum(dim=1) > 0, votes.argmax(dim=1), -1)
    angle_deg = torch.rad2deg(cos.gather(1, dominant[labels].unsqueeze(1)).squeeze(1).clamp(-1, 1).acos())
    return dominant, angle_deg, angle_deg > threshold_deg
