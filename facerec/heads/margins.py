"""Margin heads: cos(theta) between embedding and class centre, a margin on the target logit, times s.

Every head computes in float32 (also under autocast) and touches the target
column only through gather/scatter, so no dense (B, C) one-hot is built. The
training forward holds a single (B, C) float32 tensor and keeps no (B, C)
tensor and no copy of W for backward (`MarginLogits`).

A margin is its target function f(cos theta) (`target_logit`); the non-target
logits are the plain cosines. Every f here except ArcFace's `easy_margin` decreases
monotonically in theta over [0, pi], so moving towards the class centre always
raises the target logit.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from facerec.heads.angles import angle
from facerec.heads.scale import ScalePolicy


class MarginHead(nn.Module):
    """Class centres W (C, d); `head(x, labels)` returns s * logits with the margin on the target.

    Subclasses validate their margin parameters and pass them here as keywords; they
    become attributes before the scale policy is bound, because margin-aware policies
    evaluate `target_logit` when they are bound.
    """

    def __init__(self, embedding_size: int, num_classes: int, scale: ScalePolicy, **margin: float):
        super().__init__()
        if embedding_size < 1 or num_classes < 2:
            raise ValueError(
                f"head needs embedding_size >= 1 and num_classes >= 2, got {embedding_size}, {num_classes}"
            )
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.margin_names = tuple(margin)
        for name, value in margin.items():
            setattr(self, name, value)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.embedding_size))
        nn.init.normal_(self.weight, std=0.01)
        self.scale = scale
        scale.bind(self)

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        """f(cos theta) for the target class."""
        raise NotImplementedError

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, C) float32 cosines between the embeddings and every class centre."""
        check_embeddings(self, embeddings)
        return cosines(F.normalize(embeddings.float()), self.weight.float())[1]

    def target_cosine(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B,) float32 cosine to the own class centre, without the (B, C) matrix."""
        check_embeddings(self, embeddings)
        centres = F.normalize(self.weight.float()[labels.view(-1)])
        return (F.normalize(embeddings.float()) * centres).sum(dim=1)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            if labels is None:
                return self.cosine(embeddings).mul_(self.scale.value)
            check_embeddings(self, embeddings)
            x_hat = F.normalize(embeddings.float())
            return MarginLogits.apply(x_hat, self.weight.float(), labels.view(-1).long(), self)

    def extra_repr(self) -> str:
        margin = "".join(f", {name}={getattr(self, name)}" for name in self.margin_names)
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}{margin}"


class MarginLogits(torch.autograd.Function):
    """s * cos(theta_ij), with the margin's f(cos theta) in the target column j = y_i.

    Written out by hand because autograd's version costs 2-3x a plain linear layer on
    CPU: normalising W (C, d) and the in-place scatter and scale each allocate (C, d)
    or (B, C) tensors in backward. Here the cosines are the product x_hat W^T divided
    by the row norms |w_j| in place; backward rebuilds everything from x_hat, W and the
    norms, and the target column's derivative f'(cos theta_y) (B,).
    """

    @staticmethod
    def forward(ctx, x_hat: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, head: MarginHead):
        norms, cos = cosines(x_hat, weight)
        index = labels.view(-1, 1)
        target = cos.gather(1, index).squeeze(1)
        target_logit, target_slope = target_logit_and_slope(head.target_logit, target)
        s = head.scale(cos, target, labels)  # the policy sees the cosines before the margin
        cos.scatter_(1, index, target_logit.view(-1, 1)).mul_(s)
        ctx.save_for_backward(x_hat, weight, norms, index, target_slope)
        ctx.s = s
        return cos

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x_hat, weight, norms, index, target_slope = ctx.saved_tensors
        # dL/d(x_hat . w_j) = dL/dlogit * s / |w_j|, times f'(cos theta) on the target column
        grad_raw = grad * (ctx.s / norms)
        grad_raw.scatter_(1, index, grad_raw.gather(1, index) * target_slope.view(-1, 1))
        return (*cosine_grads(grad_raw, x_hat, weight, norms), None, None)


def check_embeddings(head: nn.Module, embeddings: torch.Tensor) -> None:
    if embeddings.dim() != 2 or embeddings.shape[1] != head.embedding_size:
        raise ValueError(
            f"{type(head).__name__} expects embeddings of shape (B, {head.embedding_size}), got {tuple(embeddings.shape)}"
        )


def cosines(x_hat: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(|w_j| (C,), cos theta_ij (B, C)) for unit rows x_hat and unnormalised class centres W: the
    product x_hat W^T divided by the row norms in place, so W / |w| is never materialised."""
    norms = torch.linalg.vector_norm(weight, dim=1).clamp_min_(1e-12)  # F.normalize's epsilon
    return norms, torch.mm(x_hat, weight.T).div_(norms)


def target_logit_and_slope(target_logit: Callable, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """f(cos theta_y) and f'(cos theta_y) of a margin's target function, both detached."""
    with torch.enable_grad():
        target_leaf = target.detach().requires_grad_()
        logit = target_logit(target_leaf)
        (slope,) = torch.autograd.grad(logit.sum(), target_leaf)
    return logit.detach(), slope


def cosine_grads(
    grad_raw: torch.Tensor, x_hat: torch.Tensor, weight: torch.Tensor, norms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of x_hat and W from grad_raw = dL/d(x_hat . w_j) (B, C)."""
    grad_x_hat = grad_raw @ weight
    grad_weight = grad_raw.T @ x_hat
    # Through w / |w|: remove from each row its component along w (the normalisation's
    # Jacobian), in place, 256 rows at a time: a block stays in cache between its dot
    # products and its update, where whole (C, d) passes cost 2x as much.
    for w, g, n in zip(weight.split(256), grad_weight.split(256), norms.split(256)):
        g.addcmul_(w, (torch.linalg.vecdot(w, g) / n.square()).unsqueeze(1), value=-1)
    return grad_x_hat, grad_weight


class NormFace(MarginHead):
    """No margin (Wang et al. 2017): f = cos(theta); softmax on scaled cosines."""

    def __init__(self, embedding_size: int, num_classes: int, scale: ScalePolicy, **margin: float):
        if margin:
            raise TypeError(
                f"{type(self).__name__} has no margin parameters, got {', '.join(sorted(margin))}; "
                "remove them or choose a margin head (cosface, arcface, sphereface, combined)"
            )
        super().__init__(embedding_size, num_classes, scale)

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        return cos_target


class AdaCos(NormFace):
    """AdaCos (Zhang et al. 2019): no margin; the method is this head with `scale=dynamic`."""


class CosFace(MarginHead):
    """Large margin cosine loss (Wang et al. 2018): f = cos(theta) - m."""

    def __init__(self, embedding_size: int, num_classes: int, scale: ScalePolicy, m: float = 0.35):
        if not 0 <= m < 1:
            raise ValueError(f"CosFace margin m must lie in [0, 1), got {m}")
        super().__init__(embedding_size, num_classes, scale, m=float(m))

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        return cos_target - self.m


class ArcFace(MarginHead):
    """Additive angular margin (Deng et al. 2019): f = cos(theta + m).

    cos(theta + m) starts increasing again once theta + m > pi, which would reward
    moving away from the class centre. Beyond theta > pi - m the target logit
    therefore continues as cos(theta) - m sin(m) (the standard fallback of insightface
    and pytorch-metric-learning), keeping f monotonically decreasing in theta (with a
    small downward step at pi - m). `easy_margin` instead applies the margin only
    where cos(theta) > 0.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        scale: ScalePolicy,
        m: float = 0.5,
        easy_margin: bool = False,
    ):
        if not 0 <= m < math.pi / 2:
            raise ValueError(f"ArcFace margin m must lie in [0, pi/2) radians, got {m}")
        super().__init__(embedding_size, num_classes, scale, m=float(m), easy_margin=bool(easy_margin))

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        theta = angle(cos_target)
        with_margin = torch.cos(theta + self.m)
        if self.easy_margin:
            return torch.where(cos_target > 0, with_margin, cos_target)
        return torch.where(theta <= math.pi - self.m, with_margin, cos_target - self.m * math.sin(self.m))


def monotonic_cos(phi: torch.Tensor) -> torch.Tensor:
    """cos(phi) on [0, pi], continued past pi as (-1)^k cos(phi) - 2k for phi in [k pi, (k + 1) pi].

    The continuation of SphereFace (Liu et al. 2017, eq. 6): continuous and decreasing
    for every phi >= 0, so a margin that pushes the angle beyond pi stays monotonic.
    """
    k = torch.floor(phi / math.pi)
    return (1 - 2 * torch.remainder(k, 2)) * torch.cos(phi) - 2 * k


class CombinedMargin(MarginHead):
    """Combined margin (insightface): f = cos(m1 theta + m2) - m3, monotonic past m1 theta + m2 = pi.

    m1 = 1, m2 = 0 is CosFace; m2 = m3 = 0 is SphereFace. With m1 = 1, m3 = 0 it equals
    ArcFace for theta <= pi - m2 and continues beyond by `monotonic_cos` (continuous)
    rather than ArcFace's stepped fallback. Defaults: insightface's MS1M/Glint360K recipe.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        scale: ScalePolicy,
        m1: float = 1.0,
        m2: float = 0.3,
        m3: float = 0.2,
    ):
        if not (m1 >= 1 and 0 <= m2 < math.pi / 2 and 0 <= m3 < 1):
            raise ValueError(
                f"CombinedMargin margins must satisfy m1 >= 1, 0 <= m2 < pi/2 (radians), 0 <= m3 < 1; "
                f"got m1={m1}, m2={m2}, m3={m3}"
            )
        super().__init__(embedding_size, num_classes, scale, m1=float(m1), m2=float(m2), m3=float(m3))

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        return monotonic_cos(self.m1 * angle(cos_target) + self.m2) - self.m3


class SphereFace(MarginHead):
    """Multiplicative angular margin (Liu et al. 2017) on normalised features: f = cos(m1 theta).

    Continued past m1 theta = pi by `monotonic_cos`. m1 may be an integer (4 in the paper,
    with unnormalised features and annealing) or real; the default 1.35 is insightface's
    setting for normalised features and a scale s.
    """

    def __init__(self, embedding_size: int, num_classes: int, scale: ScalePolicy, m1: float = 1.35):
        if not m1 >= 1:
            raise ValueError(f"SphereFace margin m1 must be >= 1, got {m1}")
        super().__init__(embedding_size, num_classes, scale, m1=float(m1))

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        return monotonic_cos(self.m1 * angle(cos_target))
