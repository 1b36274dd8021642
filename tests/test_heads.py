"""Margin heads and scale policies: shapes, margin on the target only, s values, float32 logits."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from facerec.heads import ArcFace, AutoScale, CosFace, FixedScale, angular_statistics, auto_scale


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


@pytest.mark.parametrize("head_cls,kwargs", [(CosFace, {"m": 0.35}), (ArcFace, {"m": 0.5})])
def test_margin_touches_only_the_target(head_cls, kwargs):
    torch.manual_seed(0)
    head = head_cls(16, 10, scale=FixedScale(30.0), **kwargs)
    x = torch.randn(6, 16)
    labels = torch.tensor([0, 3, 9, 3, 5, 1])
    logits = head(x, labels)
    plain = head(x)  # no labels: scaled cosines, no margin
    assert logits.shape == plain.shape == (6, 10)
    cos = F.normalize(x) @ F.normalize(head.weight).T
    torch.testing.assert_close(plain, 30.0 * cos)
    changed = ~torch.isclose(logits, plain)
    assert torch.equal(changed, F.one_hot(labels, 10).bool())
    target = cos[torch.arange(6), labels]
    expected = target - 0.35 if head_cls is CosFace else torch.cos(torch.acos(target) + 0.5)
    torch.testing.assert_close(logits[torch.arange(6), labels], 30.0 * expected, rtol=1e-5, atol=1e-5)


def test_arcface_target_logit_is_monotonic_in_theta():
    head = ArcFace(4, 3, scale=FixedScale(1.0), m=0.5)
    theta = torch.linspace(0, math.pi, 2001)
    f = head.target_logit(torch.cos(theta))
    assert (f[1:] <= f[:-1] + 1e-6).all()


def test_bf16_autocast_gives_float32_logits_and_gradients():
    head = CosFace(16, 50, scale=FixedScale(64.0))
    x = torch.randn(8, 16, requires_grad=True)
    labels = torch.randint(0, 50, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(x.bfloat16(), labels)
        assert logits.dtype == torch.float32
        F.cross_entropy(logits, labels).backward()
    assert head.weight.grad.dtype == torch.float32 and torch.isfinite(head.weight.grad).all()


def test_in_place_forward_gives_the_same_gradients_as_a_dense_reference():
    torch.manual_seed(1)
    head = CosFace(12, 30, scale=FixedScale(30.0), m=0.35).double()
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, 2, 3, 29, 0])
    # head computes in float32; compare against a float32 dense one-hot reference
    head = head.float()
    xf = x.detach().float().requires_grad_()
    loss = F.cross_entropy(head(xf, labels), labels)
    loss.backward()
    w = head.weight.detach().clone().requires_grad_()
    xr = x.detach().float().requires_grad_()
    cos = F.normalize(xr) @ F.normalize(w).T
    ref = F.cross_entropy(30.0 * (cos - 0.35 * F.one_hot(labels, 30)), labels)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(xf.grad, xr.grad)
    torch.testing.assert_close(head.weight.grad, w.grad)


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
