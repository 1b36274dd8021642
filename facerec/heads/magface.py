"""MagFace (Meng et al., CVPR 2021): the ArcFace margin grows with the feature magnitude a = |x|.

m(a) = l_m + (u_m - l_m) (a - l_a) / (u_a - l_a) on a in [l_a, u_a] (a clamped there), and a
regulariser lambda_g g(a) with g(a) = a / u_a^2 + 1 / a pulls magnitudes up, so that a measures
quality. Unlike AdaFace the margin is not detached: the loss moves the magnitude. Defaults follow
the official code (l_a = 10, u_a = 110, l_m = 0.45, u_m = 0.8, lambda_g = 35; s = 64 there), except
past cos theta <= 0: the official MagLinear defaults to easy_margin (no margin there); this head
keeps ArcFace's monotonic continuation cos theta - m sin m beyond theta > pi - m, as every ArcFace
variant here does. Both agree wherever cos theta > 0, where trained samples sit.
The nominal margin (what `scale=auto_margin` evaluates) is m at the middle magnitude, (l_m + u_m) / 2.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from facerec.heads.margin import Margin
from facerec.heads.margins import additive_angular

if TYPE_CHECKING:
    from facerec.heads.centres import ClassCentres


class MagFace(Margin):
    def __init__(
        self,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_m: float = 0.45,
        u_m: float = 0.8,
        lambda_g: float = 35.0,
    ):
        if not (0 < l_a < u_a and 0 <= l_m <= u_m < 1.5 and lambda_g >= 0):
            raise ValueError(
                f"MagFace needs 0 < l_a < u_a, 0 <= l_m <= u_m < 1.5 (radians) and lambda_g >= 0; "
                f"got l_a={l_a}, u_a={u_a}, l_m={l_m}, u_m={u_m}, lambda_g={lambda_g}"
            )
        super().__init__(l_a=float(l_a), u_a=float(u_a), l_m=float(l_m), u_m=float(u_m), lambda_g=float(lambda_g))

    def margin_inputs(self, norms: torch.Tensor, labels: torch.Tensor, centres: ClassCentres, update: bool) -> torch.Tensor:
        return norms.clamp(self.l_a, self.u_a)  # the magnitude a, with its gradient

    def margin(self, magnitude: torch.Tensor | float) -> torch.Tensor | float:
        return (self.u_m - self.l_m) / (self.u_a - self.l_a) * (magnitude - self.l_a) + self.l_m

    def target_logit(self, cos_target: torch.Tensor, per_sample: torch.Tensor | None = None) -> torch.Tensor:
        magnitude = (self.l_a + self.u_a) / 2 if per_sample is None else per_sample
        return additive_angular(cos_target, self.margin(magnitude))

    def regulariser(self, norms: torch.Tensor) -> torch.Tensor:
        magnitude = norms.clamp(self.l_a, self.u_a)
        return self.lambda_g * (magnitude / self.u_a**2 + 1 / magnitude).mean()
