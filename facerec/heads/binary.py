"""Sigmoid heads: one binary (one-vs-all) problem per sample and class, with a learned bias, instead of
a softmax over the classes. SphereFace2 (Wen et al., ICLR 2022) and UniFace (Zhou et al., ICCV 2023).

Both train through the one-vs-all loss of binary_loss.py with the logit z = s f(cos theta) - b: f+ on
the sample's own class, f- on the others, b a learned scalar (`bias`, saved in checkpoints), s the
head's scale policy (the papers' r and s). P(target) = sigmoid(s f+(cos theta_y) - b) does not
depend on the other classes: there is no partition function, so `scale=dynamic` (AdaCos's rule,
which reads the softmax's non-target sum) refuses these heads; `auto`, `auto_margin` and `relative`
compute the same s as for a softmax head of C classes (docs/research/scale.md, "Sigmoid heads").

Where this code differs from the official implementations (opensphere's `sphereface2.py`,
CVI-SZU/UniFace's `head.py`), and why:
- b is a threshold subtracted from the logit for both heads: SphereFace2's is the negative of
  opensphere's `b` (which it adds), so the two heads' b / s are on one axis (`threshold`).
- The class centres are normalised in the graph (W / |w|, as every facerec head) instead of being
  renormalised in place before each step: the centres' gradient is opensphere's projected onto the
  sphere; the component removed is the radial one its renormalisation discards.
- UniFace clamps its logits to [-s, s] before the softplus, which zeroes their gradient outside;
  here the softplus keeps its value and gradient there (equal inside, a gradient outside; the loss's
  own clamp at EXP_LIMIT, binary_loss.py, changes no value to the dtype's precision).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from facerec.heads.binary_loss import OneVsAllLoss
from facerec.heads.margin import Margin

if TYPE_CHECKING:
    from facerec.heads.centres import ClassCentres
    from facerec.heads.loss import Workspace
    from facerec.heads.scale import ScalePolicy


class BinaryMargin(Margin):
    """The contract of a sigmoid head's margin: `target_logit` is f+ (the own class),
    `negative_logits` the other classes' logits s f- - b (f- a shift of cos theta whose slope the
    gradient takes as 1; the margin applies s and b itself, so it can fold its own constants into
    that pass), `positive_weight` and `negative_weight` the two sides' weights, `loss_factor(s)` the
    loss's overall factor, and `initial_bias(num_classes, s)` the b it starts from."""

    has_partition_function = False
    positive_weight = 1.0
    negative_weight = 1.0

    def __init__(self, **parameters):
        super().__init__(**parameters)
        self.bias = nn.Parameter(torch.zeros(()))

    def negative_logits(self, cos: torch.Tensor, s: float, bias: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """z = s f-(cos) - b for the other classes, into `out` (the loss passes `cos` itself, one block
        of its buffer) or a new tensor. f- must increase with cos (the loss bounds z by f-(1))."""
        raise NotImplementedError

    def loss_factor(self, s: float) -> float:
        return 1.0

    def initial_bias(self, num_classes: int, s: float) -> float:
        raise NotImplementedError

    def bind(self, num_classes: int, scale: ScalePolicy) -> None:
        with torch.no_grad():
            self.bias.fill_(self.initial_bias(num_classes, scale.value))

    def loss(self, x_hat, weight, columns, per_sample, scale: ScalePolicy, centres: ClassCentres, workspace: Workspace, statistics):
        return OneVsAllLoss.apply(x_hat, weight, columns, self.bias, self, scale, centres, workspace, statistics)

    def logits(self, cos: torch.Tensor, column: torch.Tensor, per_sample: torch.Tensor | None, s: float) -> torch.Tensor:
        """(B, C) binary logits z = s f(cos) - b (f+ on the target column, f- elsewhere)."""
        target = self.target_logit(cos.gather(1, column).squeeze(1)) * s - self.bias
        return self.negative_logits(cos, s, self.bias).scatter(1, column, target.unsqueeze(1))


def similarity_adjustment(cos: torch.Tensor, t: float) -> torch.Tensor:
    """SphereFace2's g(cos) = 2 ((cos + 1) / 2)^t - 1 (t = 1: the identity)."""
    return ((cos + 1) / 2).pow(t) * 2 - 1


class SphereFace2(BinaryMargin):
    """SphereFace2 (Wen et al., ICLR 2022): positives weighted by lam, negatives by 1 - lam, the cosine
    replaced by g(cos) = 2 ((cos + 1) / 2)^t - 1 and the margin m applied on both sides, the loss
    times lw / s. `margin_type`: "C" (additive: g(cos) - m for the own class, g(cos) + m for the
    others), "A" (angular: g(cos(theta + m)) for the own class) or "M" (multiplicative:
    g(cos(m theta))). The adjustment and margin are a shift of cos theta that the gradient does not
    see, as in opensphere (f' = 1). Published defaults: lam = 0.7, m = 0.4, t = 3, lw = 50, r = s = 40.
    """

    MARGIN_TYPES = ("C", "A", "M")

    def __init__(self, margin_type: str = "C", lam: float = 0.7, m: float = 0.4, t: float = 3.0, lw: float = 50.0):
        if margin_type not in self.MARGIN_TYPES:
            raise ValueError(f"SphereFace2 margin_type must be one of {', '.join(self.MARGIN_TYPES)}, got {margin_type!r}")
        if not 0 < lam < 1:
            raise ValueError(f"SphereFace2 lam (the positives' weight) must lie in (0, 1), got {lam}")
        if not m >= 0 or not t > 0 or not lw > 0:
            raise ValueError(f"SphereFace2 needs m >= 0, t > 0 and lw > 0, got m={m}, t={t}, lw={lw}")
        super().__init__(margin_type=margin_type, lam=float(lam), m=float(m), t=float(t), lw=float(lw))
        self.positive_weight, self.negative_weight = self.lam, 1 - self.lam

    def target_logit(self, cos_target: torch.Tensor, per_sample: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            if self.margin_type == "C":
                shifted = similarity_adjustment(cos_target, self.t) - self.m
            else:
                theta = cos_target.clamp(-1 + 1e-5, 1 - 1e-5).acos()
                theta = theta + self.m if self.margin_type == "A" else theta * self.m
                shifted = similarity_adjustment(theta.clamp(1e-5, 3.14159).cos(), self.t)  # opensphere's bounds
            shift = shifted - cos_target
        return cos_target + shift

    def negative_logits(self, cos: torch.Tensor, s: float, bias: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        m = self.m if self.margin_type == "C" else 0.0
        if out is None:
            return (cos + (similarity_adjustment(cos.detach(), self.t) + m - cos.detach())) * s - bias
        # in place, one block of the loss's buffer, in two passes and the scale's:
        # s (g(cos) + m) - b = s 2^(1 - t) (cos + 1)^t - (b + s (1 - m))
        return torch.add(-(bias + s * (1 - m)), out.add_(1).pow_(self.t), alpha=s * 2 ** (1 - self.t), out=out)

    def loss_factor(self, s: float) -> float:
        return self.lw / s

    def initial_bias(self, num_classes: int, s: float) -> float:
        """opensphere's b, negated: the b at which the expected gradients of the two sides balance
        for features at 90 degrees to every centre (the paper's initialisation)."""
        z = self.lam / ((1 - self.lam) * (num_classes - 1))
        g_right = 2 * 0.5**self.t - 1
        if self.margin_type == "C":
            a_positive, a_negative = s * (g_right - self.m), s * (g_right + self.m)
        else:
            theta = min(math.pi, math.pi / 2 + self.m) if self.margin_type == "A" else min(math.pi, self.m * math.pi / 2)
            a_positive, a_negative = s * (2 * ((math.cos(theta) + 1) / 2) ** self.t - 1), s * g_right
        root = math.sqrt((1 - z) ** 2 + 4 * z * math.exp(a_positive - a_negative))
        return -(math.log(2 * z) - a_negative - math.log(1 - z + root))


class UniFace(BinaryMargin):
    """UniFace's unified cross-entropy (Zhou et al., ICCV 2023): one threshold b shared by all
    classes, z+ = s (cos theta_y - m) - b, z- = s cos theta_j - b, negatives weighted by `lam`.
    The variants are settings: UCE m = 0; UCE-m m > 0 (0.4, the default); UCE-mb-lambda lam < 1;
    UCE-mb-r r != 1, which enters the starting bias b0 = ln(10 r C) (as in the official code).
    Published defaults: m = 0.4, lam = 1, r = 1, s = 64.
    """

    def __init__(self, m: float = 0.4, lam: float = 1.0, r: float = 1.0):
        if not 0 <= m < 1:
            raise ValueError(f"UniFace margin m must lie in [0, 1), got {m}")
        if not lam > 0 or not r > 0:
            raise ValueError(f"UniFace lam (the negatives' weight) and r (the bias's start) must be > 0, got lam={lam}, r={r}")
        super().__init__(m=float(m), lam=float(lam), r=float(r))
        self.negative_weight = self.lam

    def target_logit(self, cos_target: torch.Tensor, per_sample: torch.Tensor | None = None) -> torch.Tensor:
        return cos_target - self.m

    def negative_logits(self, cos: torch.Tensor, s: float, bias: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return torch.add(-bias, cos, alpha=s, out=out)

    def initial_bias(self, num_classes: int, s: float) -> float:
        return math.log(10 * self.r * num_classes)
