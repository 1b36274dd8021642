"""Scale policies: how the logit scale s is chosen. This file is where s is computed.

A policy is bound to its head at construction (`policy.bind(num_classes, margin)`),
which gives it the number of classes and the margin's target function f, so neither
is typed twice in the configs. `policy.value` is the current s as a float;
`policy.step(...)`, called by the loss with the batch's cosines, returns the s to
multiply this step's logits with.

The theory (docs/research/scale.md): with the other C - 1 classes at 90 degrees, the target
probability as a function of the target angle is

    P(theta) = e^{s f(theta)} / (e^{s f(theta)} + C - 1) = sigmoid(s f(theta) - ln(C - 1)),

and s is chosen so that P is steepest at theta0, where training samples still sit.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from facerec.heads.angles import angle
from facerec.heads.blocks import row_block

if TYPE_CHECKING:
    from facerec.heads.centres import ClassCentres
    from facerec.heads.margin import Margin

CRITERIA = ("half", "inflection")


class ScalePolicy(nn.Module):
    """Base class. Subclasses implement `value`; adaptive ones override `step`, which the loss calls
    every training step."""

    num_classes: int | None = None

    def bind(self, num_classes: int, margin: Margin) -> None:
        """Called once by the head that owns this policy, with its class count and margin."""
        if self.num_classes is not None and self.num_classes != num_classes:
            raise ValueError(
                f"{type(self).__name__} was built for num_classes={self.num_classes} but its head has "
                f"num_classes={num_classes}; state the class count once (in the dataset config)."
            )
        self.num_classes = num_classes

    @property
    def value(self) -> float:
        raise NotImplementedError

    def step(
        self, cosine: torch.Tensor, labels: torch.Tensor, target_cosine: torch.Tensor, centres: ClassCentres
    ) -> float | torch.Tensor:
        """The s of a training step. cosine: this process's (N, m) columns before the margin; labels:
        each row's target column, -1 where another rank holds it; target_cosine: (N,) over all shards;
        centres: the head's class centres (their reductions over shards and the global batch)."""
        return self.value

    def extra_repr(self) -> str:
        try:
            return f"s={self.value:.4f}"
        except RuntimeError:
            return "unbound"


class FixedScale(ScalePolicy):
    """s from the config (30 and 64 are the usual choices)."""

    def __init__(self, value: float = 30.0):
        super().__init__()
        if not value > 0:
            raise ValueError(f"scale.value must be > 0, got {value}")
        self._value = float(value)

    @property
    def value(self) -> float:
        return self._value


def _check_scale_args(num_classes: int | None, theta0: float, criterion: str = "half") -> None:
    if num_classes is not None and num_classes < 3:
        raise ValueError(f"an automatic scale needs num_classes >= 3 (ln(C-1) > 0), got {num_classes}")
    if not 0 < theta0 < math.pi / 2:
        raise ValueError(f"scale.theta0 must lie in (0, pi/2) radians, got {theta0}")
    if criterion not in CRITERIA:
        raise ValueError(f"scale.criterion must be one of {', '.join(CRITERIA)}; got {criterion!r}")


def _target_derivatives(target_logit: Callable, theta0: float) -> tuple[float, float, float]:
    """f, df/dtheta, d2f/dtheta2 at theta0 (autograd in float64), f = target_logit(cos theta)."""
    theta = torch.tensor([theta0], dtype=torch.float64, requires_grad=True)
    f = target_logit(torch.cos(theta))
    (df,) = torch.autograd.grad(f.sum(), theta, create_graph=True)
    (d2f,) = torch.autograd.grad(df.sum(), theta)
    return f.item(), df.item(), d2f.item()


def auto_scale(
    num_classes: int,
    theta0: float = math.pi / 4,
    criterion: str = "half",
    target_logit: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """The s at which P(theta) = sigmoid(s f(theta) - ln(C - 1)) is steepest at theta0.

    target_logit: the margin's f as a function of cos theta (None: f = cos theta, no margin).
    criterion "half": P(theta0) = 1/2, i.e. s = ln(C - 1) / f(theta0) -- the inflection of P
    as a function of the logit f. No margin and theta0 = pi/4 give the fixed-AdaCos scale
    sqrt(2) ln(C - 1) (13.104 for C = 10,575); CosFace gives ln(C - 1) / (cos theta0 - m).
    criterion "inflection": the root of d2P/dtheta2 at theta0, the steepest point in the
    angle itself. d2P/dtheta2 = s P (1 - P) [f'' + s f'^2 (1 - 2P)], so where f'' < 0 this s
    is a little smaller than the "half" one (12.79 vs 13.10 for no margin, C = 10,575).
    """
    _check_scale_args(num_classes, theta0, criterion)
    log_others = math.log(num_classes - 1)
    f, df, d2f = _target_derivatives(target_logit or (lambda cos: cos), theta0)
    if f <= 0:
        raise ValueError(
            f"the margin's target logit is f = {f:.4f} <= 0 at theta0 = {math.degrees(theta0):.1f} deg, "
            "so P(target) < 1/C there for every s; choose a smaller theta0 or margin"
        )
    s_half = log_others / f
    if criterion == "half":
        return s_half

    def curvature(s: torch.Tensor) -> torch.Tensor:  # the sign of d2P/dtheta2 at theta0
        return d2f + s * df**2 * (1 - 2 * torch.sigmoid(s * f - log_others))

    # Scan (0, 4 s_half] for sign changes and bisect the last one. The last root is the steep
    # middle of the sigmoid; a smaller one (P ~ 1/C) is the inflection of its exponential tail.
    grid = torch.linspace(0, 4 * s_half, 4097, dtype=torch.float64)[1:]
    sign = curvature(grid) > 0
    crossings = (sign[:-1] & ~sign[1:]).nonzero()
    if len(crossings) == 0:
        raise ValueError(
            f"P(theta) has no inflection at theta0 = {math.degrees(theta0):.1f} deg for this margin; "
            "use scale.criterion=half"
        )
    low, high = grid[crossings[-1, 0]], grid[crossings[-1, 0] + 1]
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if curvature(middle) > 0 else (low, middle)
    return float((low + high) / 2)


class AutoScale(ScalePolicy):
    """s = ln(C - 1) / cos(theta0) (criterion "half"), C from the head; the margin is ignored."""

    margin_aware = False

    def __init__(self, theta0: float = math.pi / 4, criterion: str = "half", num_classes: int | None = None):
        super().__init__()
        self.theta0 = float(theta0)
        self.criterion = criterion
        self.num_classes = num_classes
        _check_scale_args(num_classes, self.theta0, criterion)  # fail at build time, not at bind
        self._value: float | None = None

    def bind(self, num_classes: int, margin: Margin) -> None:
        super().bind(num_classes, margin)
        target_logit = margin.target_logit if self.margin_aware else None
        self._value = auto_scale(self.num_classes, self.theta0, self.criterion, target_logit)

    @property
    def value(self) -> float:
        if self._value is None:
            raise RuntimeError(f"{type(self).__name__} is not bound to a head yet (num_classes unknown)")
        return self._value

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, theta0={math.degrees(self.theta0):.1f} deg, criterion={self.criterion}"


class AutoMarginScale(AutoScale):
    """Margin-aware auto scale: P(theta) with the margin's own target logit f is steepest at theta0.

    Criterion "half": s = ln(C - 1) / f(theta0): CosFace ln(C - 1) / (cos theta0 - m) (25.95
    for C = 10,575, m = 0.35), ArcFace ln(C - 1) / cos(theta0 + m). "inflection": computed
    numerically from f's derivatives (see `auto_scale`).
    """

    margin_aware = True


class RelativeScale(AutoScale):
    """A fixed s stated as a multiple of the auto scale: s = factor * ln(C - 1) / cos(theta0) (the
    plain `scale=auto` value, no margin). For sweeps over s at several class counts
    (`experiment=s_star`): one grid of factors gives every C the same span around its own auto
    value, and C still comes from the head. Once bound, s is constant, as with `FixedScale`."""

    def __init__(self, factor: float = 1.0, theta0: float = math.pi / 4, criterion: str = "half", num_classes: int | None = None):
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < math.inf:
            raise ValueError(f"scale.factor must be a finite number > 0 (s = factor x the auto scale), got {factor!r}")
        super().__init__(theta0, criterion, num_classes)
        self.factor = float(factor)

    def bind(self, num_classes: int, margin: Margin) -> None:
        super().bind(num_classes, margin)
        self._value *= self.factor

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, factor={self.factor:.4g}"


class DynamicScale(ScalePolicy):
    """Dynamic AdaCos (Zhang et al. 2019): s_t = ln(B_avg) / cos(min(theta0, theta_med)).

    B_avg is the batch mean of sum_{j != y_i} exp(s_{t-1} cos theta_ij) (the non-target
    part of the softmax denominator at the previous s), theta_med the median target angle.
    Both are taken over the global batch under DDP, so every rank uses the same s. s starts
    at the auto value sqrt(2) ln(C - 1) (theta0 = pi/4) and is a buffer, so checkpoints keep it.
    `value` is the s used by the last forward pass.

    s never exceeds `max_scale` (default: the starting value). The rule feeds s_{t-1} back into
    B_avg: while the batch's non-target cosines exceed cos(min(theta0, theta_med)), as when
    embeddings still crowd together early in training, ln(B_avg) grows faster than s and s grows
    geometrically (measured on LFW DevTrain with CosFace m = 0.35: s -> 6.9e13 by step 159, then NaN).
    In the regime the rule was derived for (other classes at or beyond 90 degrees) ln(B_avg) <=
    ln(C - 1), so s stays at or below its start and the cap never binds. `max_scale=inf` is the
    paper's unbounded rule.

    The reductions are split so that every head, dense or class-sharded, makes them global the
    same way (`step`): `nontarget_log_sums` covers the classes this process holds (the class centres
    combine the shards' values by a log-sum-exp), `update` applies the rule to the statistics of the
    whole batch.
    """

    def __init__(self, theta0: float = math.pi / 4, num_classes: int | None = None, max_scale: float | None = None):
        super().__init__()
        self.theta0 = float(theta0)
        self.num_classes = num_classes
        _check_scale_args(num_classes, self.theta0)
        if max_scale is not None and not (isinstance(max_scale, (int, float)) and max_scale > 0):
            raise ValueError(f"scale.max_scale must be a number > 0 (inf: no cap; null: the starting value), got {max_scale!r}")
        self.max_scale = max_scale
        self.register_buffer("s", torch.tensor(math.nan))

    def bind(self, num_classes: int, margin: Margin) -> None:
        if not margin.has_partition_function:
            raise ValueError(
                f"scale=dynamic (AdaCos) sets s from the softmax's sum over the non-target classes; "
                f"{type(margin).__name__} is a sigmoid head, whose P(target) has no such sum. "
                "Use scale=fixed, auto, auto_margin or relative (docs/research/scale.md, 'Sigmoid heads')"
            )
        super().bind(num_classes, margin)
        start = auto_scale(self.num_classes, self.theta0)
        self.s_max = start if self.max_scale is None else float(self.max_scale)
        self.s.fill_(min(start, self.s_max))

    @property
    def value(self) -> float:
        if self.num_classes is None:
            raise RuntimeError("DynamicScale is not bound to a head yet (num_classes unknown)")
        return float(self.s)

    def step(
        self, cosine: torch.Tensor, labels: torch.Tensor, target_cosine: torch.Tensor, centres: ClassCentres
    ) -> torch.Tensor:
        log_sums = centres.log_sum_exp_over_shards(self.nontarget_log_sums(cosine, labels))
        rows = centres.batch_rows(torch.stack([log_sums, target_cosine.detach().to(log_sums.dtype)], dim=1))
        return self.update(rows[:, 0], rows[:, 1])

    @torch.no_grad()
    def nontarget_log_sums(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B,) ln sum_{j != y_i} exp(s cos theta_ij) over the columns of `cosine`, at the current s.

        A label < 0 says that the row's class is not among the columns (a class-sharded head: it
        lives on another rank), so every column counts. A log-sum-exp in float32, so no overflow
        at any s. It runs over blocks of rows holding ~2^17 cosines: their temporaries stay in
        cache, where one (B, C) temporary made it ~2x slower (on a GPU: a fixed number of blocks).
        """
        rows = row_block(*cosine.shape, cosine.device)
        sums = []
        for cos, y in zip(cosine.detach().split(rows), labels.split(rows)):
            logits = cos.float() * self.s
            # the own class's column to -inf where the row holds it: a masked scatter, where
            # indexing by (y >= 0).nonzero() would cost a host sync per block on a GPU
            column = y.clamp(min=0).unsqueeze(1)
            held = (y >= 0).unsqueeze(1)
            logits.scatter_(1, column, torch.where(held, -math.inf, logits.gather(1, column)))
            sums.append(torch.logsumexp(logits, dim=1))
            del logits  # before the next block's copy
        return torch.cat(sums)

    @torch.no_grad()
    def update(self, log_sums: torch.Tensor, target_cosine: torch.Tensor) -> torch.Tensor:
        """Set and return s_t from the whole batch's per-sample log sums and target cosines."""
        log_b_avg = torch.logsumexp(log_sums.float(), dim=0) - math.log(log_sums.numel())
        theta_med = angle(target_cosine.float()).median()
        s = log_b_avg / torch.cos(theta_med.clamp(max=self.theta0))
        # ln(B_avg) <= 0 only if the other classes sit far beyond 90 degrees (a handful of
        # classes): the rule has no positive s then, so the last one is kept.
        s = torch.where(s > 0, s, self.s).clamp(max=self.s_max)
        self.s.copy_(s)
        return s

    def extra_repr(self) -> str:
        cap = "" if self.num_classes is None else f", max_scale={self.s_max:.4g}"
        return f"{super().extra_repr()}, theta0={math.degrees(self.theta0):.1f} deg{cap}"
