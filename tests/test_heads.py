"""Margin heads and scale policies: shapes, margin on the target only, s values, float32 logits."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from facerec.heads import (
    AdaCos,
    ArcFace,
    AutoMarginScale,
    AutoScale,
    CombinedMargin,
    CosFace,
    DynamicScale,
    FixedScale,
    MarginLogits,
    NormFace,
    SphereFace,
    angular_statistics,
    auto_scale,
)


@pytest.mark.parametrize(
    "num_classes,expected", [(10_575, 13.104), (85_742, 16.064), (93_431, 16.186), (360_232, 18.094)]
)
def test_auto_scale_values(num_classes, expected):
    assert auto_scale(num_classes) == pytest.approx(expected, abs=5e-4)
    assert auto_scale(num_classes) == pytest.approx(math.sqrt(2) * math.log(num_classes - 1))


def test_auto_scale_takes_num_classes_from_its_head():
    head = CosFace(8, 10_575, scale=AutoScale())
    assert head.scale.value == pytest.approx(13.104, abs=5e-4)
    with pytest.raises(ValueError, match="num_classes=100 but its head has num_classes=10575"):
        CosFace(8, 10_575, scale=AutoScale(num_classes=100))


# Reference target logits as functions of theta (the test data keep theta < pi - m and m1 theta < pi).
MARGINS = {
    "normface": (NormFace, {}, torch.cos),
    "adacos": (AdaCos, {}, torch.cos),
    "cosface": (CosFace, {"m": 0.35}, lambda t: torch.cos(t) - 0.35),
    "arcface": (ArcFace, {"m": 0.5}, lambda t: torch.cos(t + 0.5)),
    "sphereface": (SphereFace, {"m1": 1.35}, lambda t: torch.cos(1.35 * t)),
    "combined": (CombinedMargin, {"m1": 1.1, "m2": 0.3, "m3": 0.2}, lambda t: torch.cos(1.1 * t + 0.3) - 0.2),
}
POLICIES = {"fixed": lambda: FixedScale(30.0), "auto_margin": AutoMarginScale, "dynamic": DynamicScale}
every_margin_and_policy = pytest.mark.parametrize("margin,policy", [(m, p) for m in MARGINS for p in POLICIES])


def build_head(margin: str, policy: str, seed: int):
    """A 16-d, 10-class head with that margin and policy, its weights drawn from `seed`."""
    head_cls, kwargs, _ = MARGINS[margin]
    torch.manual_seed(seed)
    return head_cls(16, 10, scale=POLICIES[policy](), **kwargs)


@every_margin_and_policy
def test_margin_touches_only_the_target(margin, policy):
    head = build_head(margin, policy, seed=0)
    x = torch.randn(6, 16)
    labels = torch.tensor([0, 3, 9, 3, 5, 1])
    logits = head(x, labels)
    s = head.scale.value  # the s of that forward pass (dynamic: updated by it)
    plain = head(x)  # no labels: scaled cosines, no margin
    assert logits.shape == plain.shape == (6, 10)
    cos = F.normalize(x) @ F.normalize(head.weight).T
    torch.testing.assert_close(plain, s * cos)
    changed = ~torch.isclose(logits, plain)
    has_margin = margin not in ("normface", "adacos")
    assert torch.equal(changed, F.one_hot(labels, 10).bool() & has_margin)
    theta = torch.acos(cos[torch.arange(6), labels])
    assert (theta < 2.2).all()
    reference = MARGINS[margin][2]
    torch.testing.assert_close(logits[torch.arange(6), labels], s * reference(theta), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("margin", MARGINS)
def test_hand_written_backward_passes_gradcheck(margin):
    head_cls, kwargs, _ = MARGINS[margin]
    torch.manual_seed(2)
    head = head_cls(5, 7, scale=FixedScale(3.0), **kwargs)
    x_hat = F.normalize(torch.randn(6, 5, dtype=torch.float64)).requires_grad_()
    weight = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)  # rows of any norm
    labels = torch.tensor([0, 3, 6, 3, 5, 1])
    assert torch.autograd.gradcheck(MarginLogits.apply, (x_hat, weight, labels, head))


@pytest.mark.parametrize("margin", MARGINS)
def test_float32_head_matches_a_float64_dense_one_hot_reference(margin):
    head_cls, kwargs, _ = MARGINS[margin]
    torch.manual_seed(1)
    head = head_cls(12, 30, scale=FixedScale(30.0), **kwargs)
    x = torch.randn(5, 12, requires_grad=True)
    labels = torch.tensor([1, 2, 3, 29, 0])
    loss = F.cross_entropy(head(x, labels), labels)
    loss.backward()
    w = head.weight.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    cos = F.normalize(x64) @ F.normalize(w).T
    one_hot = F.one_hot(labels, 30).double()  # the dense formulation the head avoids
    target = (cos * one_hot).sum(1, keepdim=True)
    reference = F.cross_entropy(30.0 * (cos + one_hot * (head.target_logit(target) - target)), labels)
    reference.backward()
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6 * x64.grad.abs().max().item())
    torch.testing.assert_close(head.weight.grad.double(), w.grad, rtol=1e-4, atol=1e-6 * w.grad.abs().max().item())


def test_angular_statistics_on_a_known_batch():
    head = CosFace(2, 4, scale=FixedScale(10.0), m=0.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    angle = math.radians(30)
    x = torch.tensor([[math.cos(angle), math.sin(angle)]])  # 30 deg from class 0, 60 from class 1
    labels = torch.tensor([0])
    stats = angular_statistics(head(x, labels), labels, head.target_cosine(x, labels), head.scale.value)
    assert stats["theta_med"].item() == pytest.approx(30.0, abs=1e-3)
    assert stats["theta_nontarget"].item() == pytest.approx((60 + 150 + 120) / 3, abs=1e-3)
    assert stats["top1"].item() == 1.0
    logits = 10 * torch.cos(torch.deg2rad(torch.tensor([30.0, 60.0, 150.0, 120.0])))
    assert stats["p_target"].item() == pytest.approx(torch.softmax(logits, 0)[0].item(), rel=1e-5)


@every_margin_and_policy
def test_angular_statistics_hold_for_every_margin_and_policy(margin, policy):
    head = build_head(margin, policy, seed=1)
    x, labels = torch.randn(7, 16), torch.randint(0, 10, (7,))
    logits = head(x, labels)
    stats = angular_statistics(logits, labels, head.target_cosine(x, labels), head.scale.value)
    angles = torch.rad2deg(torch.acos(F.normalize(x) @ F.normalize(head.weight).T))
    target = F.one_hot(labels, 10).bool()
    torch.testing.assert_close(stats["theta_med"], angles[target].median(), atol=1e-3, rtol=0)
    torch.testing.assert_close(stats["theta_nontarget"], angles[~target].mean(), atol=1e-3, rtol=0)
    torch.testing.assert_close(stats["p_target"], torch.softmax(logits, 1)[target].median())
