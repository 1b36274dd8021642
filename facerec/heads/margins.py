"""The classic margins: one target function f(cos theta) shared by every sample.

The non-target logits are the plain cosines. Every f here except ArcFace's `easy_margin`
decreases monotonically in theta over [0, pi], so moving towards the class centre always raises
the target logit. The heads with per-sample margins, changed non-target logits or several
centres per class have a file each (adaface.py, magface.py, elasticface.py, curricularface.py,
subcenter.py); every margin trains through `MarginHead.loss` (head.py) with any scale policy and
any class sharding.
"""
from __future__ import annotations

import math

import torch

from facerec.heads.angles import angle
from facerec.heads.margin import Margin


class NormFace(Margin):
    """No margin (Wang et al. 2017): f = cos(theta); softmax on scaled cosines."""

    def __init__(self, **margin: float):
        if margin:
            raise TypeError(
                f"{type(self).__name__} has no margin parameters, got {', '.join(sorted(margin))}; "
                "remove them or choose a margin head (cosface, arcface, sphereface, combined)"
            )
        super().__init__()

    def target_logit(self, cos_target: torch.Tensor, per_sample: torch.Tensor | None = None) -> torch.Tensor:
        return cos_target


class AdaCos(NormFace):
    """AdaCos (Zhang et al. 2019): no margin; the method is this head with `scale=dynamic`."""


class CosFace(Margin):
    """Large margin cosine loss (Wang et al. 2018): f = cos(theta) - m."""

    def __init__(self, m: float = 0.35):
        if not 0 <= m < 1:
            raise ValueError(f"CosFace margin m must lie in [0, 1), got {m}")
        super().__init__(m=float(m))

    def target_logit(self, cos_target: torch.Tensor, per_sample: torch.Tensor | None = None) -> torch.Tensor:
        return cos_target - self.m


class ArcFace(Margin):
    """Additive angular margin (Deng et al. 2019): f = cos(theta + m).

    cos(theta + m) starts increasing again once theta + m > pi, which would reward
    moving away from the class centre. Beyond theta > pi - m the target logit
    therefore continues as cos(theta) - m sin(m) (the standard fallback of insightface
    and pytorch-metric-learning), keeping f monotonically decreasing in theta (with a
    small downward step at pi - m). `easy_margin` instead applies the margin only
    where cos(theta) > 0.
    """

    def __init__(self, m: float = 0.5, easy_margin: bool = False):
        if not 0 <= m < math.pi / 2:
            raise ValueError(f"ArcFace margin m must lie in [0, pi/2) radians, got {m}")
        super().__init__(m=float(m), easy_margin=bool(easy_margin))

    def target_logit(self, cos_target: torch.Tensor, per_sample: torch.Tensor | None = None) -> torch.Tensor:
        return additive_angular(cos_target, self.m, self.easy_margin)


def additive_angular(cos_target: torch.Tensor, m: float | torch.Tensor, easy_margin: bool = False) -> torch.Tensor:
    """ArcFace's f = cos(theta + m), continued as cos(theta) - m sin(m) beyond theta > pi - m (see
    ArcFace); m a float or a per-sample (N,) tensor (ElasticFace, MagFace)."""
    theta = angle(cos_target)
    with_margin = torch.cos(theta + m)
    if easy_margin:
        return torch.where(cos_target > 0, with_margin, cos_target)
    return torch.where(theta <= math.pi - m, with_margin, cos_target - m * torch.sin(torch.as_tensor(m, dtype=cos_target.dtype)))


def monotonic_cos(phi: torch.Tensor) -> torch.Tensor:
    """cos(phi) on [0, pi], continued past pi as (-1)^k cos(phi) - 2k for phi in [k pi, (k + 1) pi].

    The continuation of SphereFace (Liu et al. 2017, eq. 6): continuous and decreasing
    for every phi >= 0, so a margin that pushes the angle beyond pi stays monotonic.
    """
    k = torch.floor(phi / math.pi)
    return (1 - 2 * torch.remainder(k, 2)) * torch.cos(phi) - 2 * k


class CombinedMargin(Margin):
    """Combined margin (insightface): f = cos(m1 theta + m2) - m3, monotonic past m1 theta + m2 = pi.

    m1 = 1, m2 = 0 is CosFace; m2 = m3 = 0 is SphereFace. With m1 = 1, m3 = 0 it equals
    ArcFace for theta <= pi - m2 and continues beyond by `monotonic_cos` (continuous)
    rather than ArcFace's stepped fallback. Defaults: insightface's MS1M/Glint360K recipe.
    """

    def __init__(self, m1: float = 1.0, m2: float = 0.3, m3: float = 0.2):
        if not (m1 >= 1 and 0 <= m2 < math.pi / 2 and 0 <= m3 < 1):
            raise ValueError(
                f"CombinedMargin margins must satisfy m1 >= 1, 0 <= m2 < pi/2 (radians), 0 <= m3 < 1; "
                f"got m1={m1}, m2={m2}, m3={m3}"
            )
        super().__init__(m1=float(m1), m2=float(m2), m3=float(m3))

    def target_logit(self, cos_target: torch.Tensor, per_sample: torch.Tensor | None = None) -> torch.Tensor:
        return monotonic_cos(self.m1 * angle(cos_target) + self.m2) - self.m3


class SphereFace(Margin):
    """Multiplicative angular margin (Liu et al. 2017) on normalised features: f = cos(m1 theta).

    Continued past m1 theta = pi by `monotonic_cos`. m1 may be an integer (4 in the paper,
    with unnormalised features and annealing) or real; the default 1.35 is insightface's
    setting for normalised features and a scale s.
    """

    def __init__(self, m1: float = 1.35):
        if not m1 >= 1:
            raise ValueError(f"SphereFace margin m1 must be >= 1, got {m1}")
        super().__init__(m1=float(m1))

    def target_logit(self, cos_target: torch.Tensor, per_sample: torch.Tensor | None = None) -> torch.Tensor:
        return monotonic_cos(self.m1 * angle(cos_target))
