"""Margins against an independent implementation (pytorch-metric-learning) and at the edges, on
both paths: the training loss (`head.loss`, the fused cross-entropy) and the autograd margin
logits (`head(x, labels)`).

pytorch-metric-learning keeps W as (d, C), takes the ArcFace margin in degrees and
builds a dense one-hot mask; our heads keep W as (C, d) and use gather/scatter.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import ArcFaceLoss, CosFaceLoss, LargeMarginSoftmaxLoss
from pytorch_metric_learning.reducers import DoNothingReducer

from facerec.heads import (
    AdaCos,
    ArcFace,
    AutoScale,
    CombinedMargin,
    CosFace,
    FixedScale,
    MarginHead,
    NormFace,
    SphereFace,
)

ALL_MARGINS = [
    (NormFace, {}),
    (AdaCos, {}),
    (CosFace, {"m": 0.35}),
    (ArcFace, {"m": 0.5}),
    (ArcFace, {"m": 0.5, "easy_margin": True}),
    (SphereFace, {"m1": 1.35}),
    (SphereFace, {"m1": 4}),
    (CombinedMargin, {"m1": 1.0, "m2": 0.3, "m3": 0.2}),
]


def margin_id(case) -> str:
    head_cls, params = case
    return head_cls.__name__ + "".join(f"-{k}={v}" for k, v in params.items())


def problem(num_classes=40, embedding_size=16, batch=24, seed=0):
    torch.manual_seed(seed)
    return torch.randn(batch, embedding_size), torch.randint(0, num_classes, (batch,))


def at_angle(centres: torch.Tensor, directions: torch.Tensor, theta: float) -> torch.Tensor:
    """Unit vectors at angle theta from `centres`, turned towards `directions`."""
    w = F.normalize(centres)
    u = F.normalize(directions - (directions * w).sum(1, keepdim=True) * w)
    return math.cos(theta) * w + math.sin(theta) * u


def compare_with_pml(head, pml_loss, x, labels):
    """Per-sample losses (the margin logits) and their mean (the fused loss) equal within 1e-5
    (float32), gradients within float32 accumulation noise.

    W gets unit rows first: its gradient scales with 1 / |w|, and the initial |w| ~ 0.04 would
    magnify float32 rounding 25-fold.
    """
    with torch.no_grad():
        head.centres.weight.copy_(F.normalize(head.centres.weight))
        pml_loss.W.copy_(head.centres.weight.T)
    x_ours, x_pml = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = F.cross_entropy(head(x_ours, labels), labels, reduction="none")
    theirs = pml_loss(x_pml, labels)["loss"]["losses"]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    ours.sum().backward()
    theirs.sum().backward()
    # gradients sum s-scaled terms over the batch: 1e-5 absolute, 1e-4 relative
    torch.testing.assert_close(x_ours.grad, x_pml.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(head.centres.weight.grad, pml_loss.W.grad.T, atol=1e-5, rtol=1e-4)
    # the training path: the mean loss, and its hand-written backward (times N: the sum's gradient)
    x_fused = x.clone().requires_grad_()
    head.centres.weight.grad = None
    fused = head.loss(x_fused, labels)[0]
    torch.testing.assert_close(fused, theirs.mean(), atol=1e-5, rtol=1e-5)
    (fused * len(x)).backward()
    torch.testing.assert_close(x_fused.grad, x_pml.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(head.centres.weight.grad, pml_loss.W.grad.T, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("s", [30.0, 64.0])
def test_cosface_equals_pytorch_metric_learning(s):
    x, labels = problem()
    head = MarginHead(16, 40, CosFace(m=0.35), FixedScale(s))
    pml = CosFaceLoss(num_classes=40, embedding_size=16, margin=0.35, scale=s, reducer=DoNothingReducer())
    compare_with_pml(head, pml, x, labels)
    # without labels: the scaled cosines, no margin
    torch.testing.assert_close(head(x), pml.get_logits(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("s", [30.0, 64.0])
def test_arcface_equals_pytorch_metric_learning(s):
    x, labels = problem(seed=1)
    head = MarginHead(16, 40, ArcFace(m=0.5), FixedScale(s))
    # Move four samples beyond pi - m from their class centre, where the fallback applies.
    x[:4] = at_angle(head.centres.weight[labels[:4]].detach(), x[:4], math.radians(165))
    assert (torch.acos(head.target_cosine(x, labels)[:4]) > math.pi - 0.5).all()
    pml = ArcFaceLoss(num_classes=40, embedding_size=16, margin=math.degrees(0.5), scale=s, reducer=DoNothingReducer())
    compare_with_pml(head, pml, x, labels)


def test_integer_sphereface_equals_pytorch_metric_learning_large_margin_softmax():
    # L-Softmax multiplies the logits by |x| |w|: with unit vectors it is SphereFace's cos(m theta) extension.
    x, labels = problem(seed=2)
    x = F.normalize(x)
    head = MarginHead(16, 40, SphereFace(m1=4), FixedScale(30.0))
    with torch.no_grad():
        head.centres.weight.copy_(F.normalize(head.centres.weight))
    pml = LargeMarginSoftmaxLoss(num_classes=40, embedding_size=16, margin=4, scale=30.0, reducer=DoNothingReducer())
    target_angles = torch.rad2deg(torch.acos(head.target_cosine(x, labels)))
    assert (target_angles > 90).any() and (target_angles < 90).any()  # several pieces of the extension
    with torch.no_grad():
        pml.W.copy_(head.centres.weight.T)
    # L-Softmax's gradient also flows through |x| |w|, so compare the logits' losses only.
    ours = F.cross_entropy(head(x, labels), labels, reduction="none")
    theirs = pml(x, labels)["loss"]["losses"]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head.loss(x, labels)[0], theirs.mean(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", [c for c in ALL_MARGINS if not c[1].get("easy_margin")], ids=margin_id)
def test_target_logit_is_monotonic_in_theta(case):
    # easy_margin is not: it jumps up from -sin(m) to 0 at theta = 90 deg, by its definition.
    head_cls, params = case
    margin = head_cls(**params)
    theta = torch.linspace(0, math.pi, 20001, dtype=torch.float64)
    f = margin.target_logit(torch.cos(theta))
    assert (f[1:] <= f[:-1] + 1e-9).all()


def test_combined_margin_contains_cosface_sphereface_and_arcface():
    cos = torch.cos(torch.linspace(0, math.pi, 1001, dtype=torch.float64))

    def f(margin_cls, **params):
        return margin_cls(**params).target_logit(cos)

    torch.testing.assert_close(f(CombinedMargin, m1=1, m2=0, m3=0.35), f(CosFace, m=0.35), atol=1e-6, rtol=0)
    torch.testing.assert_close(f(CombinedMargin, m1=2.5, m2=0, m3=0), f(SphereFace, m1=2.5))
    below = torch.acos(cos) <= math.pi - 0.5  # beyond, ArcFace has its stepped fallback
    torch.testing.assert_close(f(CombinedMargin, m1=1, m2=0.5, m3=0)[below], f(ArcFace, m=0.5)[below])


@pytest.mark.parametrize("path", ["loss", "forward"])
@pytest.mark.parametrize("case", ALL_MARGINS, ids=margin_id)
def test_gradients_are_finite_at_theta_zero_and_pi(case, path):
    head_cls, params = case
    head = MarginHead(8, 4, head_cls(**params), AutoScale())
    x = torch.cat([head.centres.weight[:2], -head.centres.weight[2:]]).detach().requires_grad_()  # theta = 0, 0, pi, pi
    labels = torch.arange(4)
    loss = head.loss(x, labels)[0] if path == "loss" else F.cross_entropy(head(x, labels), labels)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.centres.weight.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ALL_MARGINS, ids=margin_id)
def test_autocast_gives_float32_logits(case, dtype):
    head_cls, params = case
    head = MarginHead(16, 50, head_cls(**params), FixedScale(30.0))
    x, labels = problem(num_classes=50, batch=8)
    x.requires_grad_()
    reference = head(x, labels)
    reference_loss = head.loss(x, labels)[0]
    with torch.autocast("cpu", dtype=dtype):
        logits = head(x.to(dtype), labels)
        assert logits.dtype == torch.float32
        F.cross_entropy(logits, labels).backward()
        loss = head.loss(x.to(dtype), labels)[0]
        assert loss.dtype == torch.float32
    assert head.centres.weight.grad.dtype == torch.float32 and torch.isfinite(head.centres.weight.grad).all()
    head.centres.weight.grad = None
    loss.backward()
    assert head.centres.weight.grad.dtype == torch.float32 and torch.isfinite(head.centres.weight.grad).all()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    # float32 maths on half-precision inputs: only the input rounding differs
    torch.testing.assert_close(logits, reference, atol=1.5, rtol=0)
    torch.testing.assert_close(loss, reference_loss, atol=0.02, rtol=0)  # measured: at most 0.0045


@pytest.mark.parametrize("head_cls", [NormFace, AdaCos])
def test_heads_without_margin_refuse_margin_parameters(head_cls):
    with pytest.raises(TypeError, match=rf"{head_cls.__name__} has no margin parameters, got m\b"):
        head_cls(m=0.35)


@pytest.mark.parametrize(
    "head_cls,params,message",
    [
        (CosFace, {"m": 1.2}, "CosFace margin m must lie in"),
        (ArcFace, {"m": 2.0}, "ArcFace margin m must lie in"),
        (SphereFace, {"m1": 0.5}, "SphereFace margin m1 must be >= 1"),
        (CombinedMargin, {"m3": -0.1}, "CombinedMargin margins must satisfy"),
    ],
)
def test_out_of_range_margins_are_refused(head_cls, params, message):
    with pytest.raises(ValueError, match=message):
        head_cls(**params)
