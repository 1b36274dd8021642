"""Margin heads: cos(theta) between embedding and class centre, a margin on the target logit, times s.

Every head computes in float32 (also under autocast) and touches the target
column only through gather/scatter, so no dense (B, C) one-hot is built. The
forward pass keeps a single (B, C) float32 tensor alive for backward.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from facerec.heads.scale import ScalePolicy

# acos has an infinite derivative at +-1; clamping keeps gradients finite at theta = 0 and pi.
# 1e-7 moves theta by at most ~4.5e-4 rad (0.026 deg) at the ends, far below any margin.
COS_EPS = 1e-7


class MarginHead(nn.Module):
    """Class centres W (C, d); `head(x, labels)` returns s * logits with the margin on the target."""

    def __init__(self, embedding_size: int, num_classes: int, scale: ScalePolicy):
        super().__init__()
        if embedding_size < 1 or num_classes < 2:
            raise ValueError(
                f"head needs embedding_size >= 1 and num_classes >= 2, got {embedding_size}, {num_classes}"
            )
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.embedding_size))
        nn.init.normal_(self.weight, std=0.01)
        self.scale = scale
        scale.bind(self)

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        """f(cos theta) for the target class; the identity means no margin."""
        return cos_target

    def _check(self, embeddings: torch.Tensor) -> None:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"{type(self).__name__} expects embeddings of shape (B, {self.embedding_size}), "
                f"got {tuple(embeddings.shape)}"
            )

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, C) float32 cosines between the embeddings and every class centre."""
        self._check(embeddings)
        return F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float()))

    def target_cosine(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B,) float32 cosine to the own class centre, without the (B, C) matrix."""
        self._check(embeddings)
        centres = F.normalize(self.weight.float()[labels.view(-1)])
        return (F.normalize(embeddings.float()) * centres).sum(dim=1)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            cos = self.cosine(embeddings)
            if labels is None:
                return cos.mul_(self.scale.value)
            labels = labels.view(-1).long()
            target = self.target_cosine(embeddings, labels)
            s = self.scale(cos, labels)
            # The target column is computed from its own (B, d) product rather than gathered
            # from `cos`: gather would keep `cos` alive for backward. So the margin and the
            # scale can overwrite the cosine buffer in place, and the head holds a single
            # (B, C) float32 tensor (plus its gradient) whatever C is.
            return cos.scatter_(1, labels.view(-1, 1), self.target_logit(target).view(-1, 1)).mul_(s)

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}"


class CosFace(MarginHead):
    """Large margin cosine loss (Wang et al. 2018): f = cos(theta) - m."""

    def __init__(self, embedding_size: int, num_classes: int, scale: ScalePolicy, m: float = 0.35):
        super().__init__(embedding_size, num_classes, scale)
        if not 0 <= m < 1:
            raise ValueError(f"CosFace margin m must lie in [0, 1), got {m}")
        self.m = float(m)

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        return cos_target - self.m

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m={self.m}"


class ArcFace(MarginHead):
    """Additive angular margin (Deng et al. 2019): f = cos(theta + m).

    cos(theta + m) starts increasing again once theta + m > pi, which would reward
    moving away from the class centre. Beyond theta > pi - m the target logit
    therefore continues as cos(theta) - m sin(m) (insightface's fallback), keeping f
    monotonically decreasing in theta (with a small downward step at pi - m).
    `easy_margin` instead applies the margin only where cos(theta) > 0.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        scale: ScalePolicy,
        m: float = 0.5,
        easy_margin: bool = False,
    ):
        super().__init__(embedding_size, num_classes, scale)
        if not 0 <= m < math.pi / 2:
            raise ValueError(f"ArcFace margin m must lie in [0, pi/2) radians, got {m}")
        self.m = float(m)
        self.easy_margin = bool(easy_margin)

    def target_logit(self, cos_target: torch.Tensor) -> torch.Tensor:
        cos_t = cos_target.clamp(-1 + COS_EPS, 1 - COS_EPS)
        sin_t = torch.sqrt(1.0 - cos_t * cos_t)
        phi = cos_t * math.cos(self.m) - sin_t * math.sin(self.m)
        if self.easy_margin:
            return torch.where(cos_t > 0, phi, cos_t)
        return torch.where(cos_t > math.cos(math.pi - self.m), phi, cos_t - self.m * math.sin(self.m))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, m={self.m}, easy_margin={self.easy_margin}"
