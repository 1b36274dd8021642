"""AdaFace (Kim et al., CVPR 2022): a margin that adapts to image quality through the feature norm.

The embedding norm, detached and standardised by an EMA of the batch mean and std of the norms,
gives each sample a scaler z in [-1, 1] (z = h (|x| - mu) / (sigma + eps), clipped). The target
logit is cos(theta - m z) - (m + m z): high-norm (good) images get an angular margin (ArcFace-like),
low-norm (hard) ones an additive one (CosFace-like) and a smaller overall pull. Formulas and
defaults follow the official `head.py` (m = 0.4, h = 0.333, t_alpha = 0.01, mu starts at 20, sigma at
100, the norm clipped to [0.001, 100], s = 64 there). Two deliberate differences: the batch
statistics are over the global batch under DDP (the official code uses each GPU's own), and only
the target cosine is clamped to [-1 + eps, 1 - eps] (the official head clamps every cosine, which
only matters for non-target cosines beyond 0.999).
The nominal margin (z = 0, what `scale=auto_margin` evaluates) is cos(theta) - m.
"""
from __future__ import annotations

import math

from typing import TYPE_CHECKING

import torch

from facerec.heads.margin import Margin

if TYPE_CHECKING:
    from facerec.heads.centres import ClassCentres

EPS = 1e-3  # the official head's eps: cosine clamp, angle clip and std offset


class AdaFace(Margin):
    def __init__(self, m: float = 0.4, h: float = 0.333, t_alpha: float = 0.01):
        if not (0 <= m < 1 and h > 0 and 0 < t_alpha <= 1):
            raise ValueError(f"AdaFace needs 0 <= m < 1, h > 0 and 0 < t_alpha <= 1; got m={m}, h={h}, t_alpha={t_alpha}")
        super().__init__(m=float(m), h=float(h), t_alpha=float(t_alpha))
        # EMA of the batch's norm mean and std: buffers, so checkpoints keep them and a resume is exact
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    def margin_inputs(self, norms: torch.Tensor, labels: torch.Tensor, centres: ClassCentres, update: bool) -> torch.Tensor:
        """The per-sample margin scaler z (N,), from the detached norms; `update` advances the EMA
        with the global batch's mean and (unbiased) std first, as the official head does."""
        safe_norms = norms.detach().clamp(0.001, 100)
        if update:
            with torch.no_grad():
                batch = centres.batch_rows(safe_norms)
                alpha = self.t_alpha
                self.batch_mean.mul_(1 - alpha).add_(alpha * batch.mean().to(self.batch_mean.dtype))
                self.batch_std.mul_(1 - alpha).add_(alpha * batch.std().to(self.batch_std.dtype))
        scaler = (safe_norms - self.batch_mean) / (self.batch_std + EPS)
        return (scaler * self.h).clamp(-1, 1)

    def target_logit(self, cos_target: torch.Tensor, per_sample: torch.Tensor | None = None) -> torch.Tensor:
        scaler = 0.0 if per_sample is None else per_sample
        theta = cos_target.clamp(-1 + EPS, 1 - EPS).acos()
        theta_m = (theta - self.m * scaler).clamp(EPS, math.pi - EPS)  # g_angular = -m z
        return torch.cos(theta_m) - (self.m + self.m * scaler)  # g_additive = m + m z
