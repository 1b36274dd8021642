"""Margin heads and scale policies: shapes, margin on the target only, s values, the fused loss
(`head.loss`) against gradcheck and plain references, its statistics, and what advances the state."""
from __future__ import annotations

import copy
import math
import pickle
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import REPO_ROOT
from facerec.heads import (
    AdaCos,
    AdaFace,
    ArcFace,
    AutoMarginScale,
    AutoScale,
    CombinedMargin,
    CosFace,
    DynamicScale,
    ElasticFace,
    FixedScale,
    MagFace,
    MarginHead,
    NormFace,
    SphereFace,
    auto_scale,
)

sys.path.insert(0, str(REPO_ROOT / "tests" / "scripts"))
import ddp_partial_fc  # noqa: E402


@pytest.mark.parametrize(
    "num_classes,expected", [(10_575, 13.104), (85_742, 16.064), (93_431, 16.186), (360_232, 18.094)]
)
def test_auto_scale_values(num_classes, expected):
    assert auto_scale(num_classes) == pytest.approx(expected, abs=5e-4)
    assert auto_scale(num_classes) == pytest.approx(math.sqrt(2) * math.log(num_classes - 1))


def test_auto_scale_takes_num_classes_from_its_head():
    head = MarginHead(8, 10_575, CosFace(), AutoScale())
    assert head.scale.value == pytest.approx(13.104, abs=5e-4)
    with pytest.raises(ValueError, match="num_classes=100 but its head has num_classes=10575"):
        MarginHead(8, 10_575, CosFace(), AutoScale(num_classes=100))


# Reference target logits as functions of theta (the test data keep theta < pi - m and m1 theta < pi).
MARGINS = {
    "normface": (NormFace, {}, torch.cos),
    "adacos": (AdaCos, {}, torch.cos),
    "cosface": (CosFace, {"m": 0.35}, lambda t: torch.cos(t) - 0.35),
    "arcface": (ArcFace, {"m": 0.5}, lambda t: torch.cos(t + 0.5)),
    "sphereface": (SphereFace, {"m1": 1.35}, lambda t: torch.cos(1.35 * t)),
    "combined": (CombinedMargin, {"m1": 1.1, "m2": 0.3, "m3": 0.2}, lambda t: torch.cos(1.1 * t + 0.3) - 0.2),
}
# Per-sample margins, changed non-target logits, several centres per class (formulas: their files);
# the same list the 2-process Partial FC script runs.
OTHER_HEADS = {name: spec for name, spec in ddp_partial_fc.HEADS.items() if name not in MARGINS}
HEADS = [*MARGINS, *OTHER_HEADS]
POLICIES = {"fixed": lambda: FixedScale(30.0), "auto_margin": AutoMarginScale, "dynamic": DynamicScale}
every_margin_and_policy = pytest.mark.parametrize("margin,policy", [(m, p) for m in MARGINS for p in POLICIES])
every_head_and_policy = pytest.mark.parametrize("name,policy", [(h, p) for h in HEADS for p in POLICIES])


def make_head(name: str, embedding_size: int, num_classes: int, scale, **overrides) -> nn.Module:
    head_cls, kwargs = MARGINS[name][:2] if name in MARGINS else OTHER_HEADS[name]
    return MarginHead(embedding_size, num_classes, head_cls(**{**kwargs, **overrides}), scale)


def build_head(margin: str, policy: str, seed: int):
    """A 16-d, 10-class head with that margin and policy, its weights drawn from `seed`."""
    torch.manual_seed(seed)
    return make_head(margin, 16, 10, POLICIES[policy]())


def buffers_of(head: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buffer.clone() for name, buffer in head.named_buffers()}


@every_margin_and_policy
def test_margin_touches_only_the_target(margin, policy):
    head = build_head(margin, policy, seed=0)
    x = torch.randn(6, 16)
    labels = torch.tensor([0, 3, 9, 3, 5, 1])
    logits = head(x, labels)
    s = head.scale.value  # the current s: the forward pass advances nothing (dynamic: the start)
    plain = head(x)  # no labels: scaled cosines, no margin
    assert logits.shape == plain.shape == (6, 10)
    cos = F.normalize(x) @ F.normalize(head.centres.weight).T
    torch.testing.assert_close(plain, s * cos)
    changed = ~torch.isclose(logits, plain)
    has_margin = margin not in ("normface", "adacos")
    assert torch.equal(changed, F.one_hot(labels, 10).bool() & has_margin)
    theta = torch.acos(cos[torch.arange(6), labels])
    assert (theta < 2.2).all()
    reference = MARGINS[margin][2]
    torch.testing.assert_close(logits[torch.arange(6), labels], s * reference(theta), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", HEADS)
def test_forward_advances_nothing_and_loss_advances_every_buffer(name):
    # uncapped dynamic scale: s moves; AdaFace's EMA, ElasticFace's step and CurricularFace's t too
    head = make_head(name, 16, 10, DynamicScale(max_scale=math.inf))
    x, labels = torch.randn(8, 16) * 5, torch.randint(0, 10, (8,))
    before = buffers_of(head)
    head(x, labels)
    head(x)
    for key, value in buffers_of(head).items():
        assert torch.equal(value, before[key]), key
    head.loss(x, labels)
    changed = {key for key, value in buffers_of(head).items() if not torch.equal(value, before[key])}
    assert changed == set(before)


class HeadLoss(nn.Module):
    """`head.loss` as a module's forward, for torch.func.functional_call."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.head.loss(embeddings, labels)[0]


def loss_of_embeddings_and_centres(head: nn.Module, labels: torch.Tensor):
    """head.loss(x, labels) as a function of (x, W) for gradcheck. Every evaluation starts from the
    head's present buffers: loss() advances them (ElasticFace's step would draw new margins)."""
    module, start = HeadLoss(head), {f"head.{name}": value for name, value in buffers_of(head).items()}

    def loss(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        state = {name: value.clone() for name, value in start.items()}
        return torch.func.functional_call(module, {"head.centres.weight": weight, **state}, (x, labels))

    return loss


class RecomputedForEachBackward(torch.autograd.Function):
    """`loss(*inputs)` (embeddings, centres, ...) whose backward runs loss's forward and hand-written
    backward afresh. The fused backward turns its saved (N, C) buffer into the gradient in place, so a
    graph takes one backward call, and gradcheck makes two (its reentrancy check)."""

    @staticmethod
    def forward(ctx, loss, *inputs):
        ctx.loss = loss
        ctx.save_for_backward(*inputs)
        return loss(*inputs)

    @staticmethod
    def backward(ctx, grad):
        inputs = [tensor.detach().requires_grad_() for tensor in ctx.saved_tensors]
        with torch.enable_grad():
            return None, *torch.autograd.grad(ctx.loss(*inputs), inputs, grad)


def gradcheck(loss, *inputs) -> bool:
    return torch.autograd.gradcheck(lambda *tensors: RecomputedForEachBackward.apply(loss, *tensors), inputs)


@pytest.mark.parametrize("name", HEADS)
def test_fused_loss_passes_gradcheck(name):
    """MarginCrossEntropy's hand-written backward through `head.loss`, in float64, embeddings of
    norms 15..90 (MagFace's margin moves with them; its regulariser is part of the loss)."""
    torch.manual_seed(2)
    # CurricularFace: t fixed at 0.3 through the check (momentum ~0). t's update is detached by
    # design (the official code's no_grad), so a moving t is not a function gradcheck can test.
    overrides = {"momentum": 1e-12} if name == "curricularface" else {}
    head = make_head(name, 5, 7, FixedScale(3.0), **overrides).double()
    if name == "adaface":  # standardised norms inside (-1, 1): the margin differs per sample
        head.margin.batch_mean.fill_(50.0)
        head.margin.batch_std.fill_(20.0)
    if name == "curricularface":
        head.margin.t.fill_(0.3)
    norms = torch.linspace(15, 90, 6, dtype=torch.float64).unsqueeze(1)
    x = (F.normalize(torch.randn(6, 5, dtype=torch.float64)) * norms).requires_grad_()
    weight = torch.randn(len(head.centres.weight), 5, dtype=torch.float64, requires_grad=True)  # rows of any norm
    labels = torch.tensor([0, 3, 6, 3, 5, 1])
    loss = loss_of_embeddings_and_centres(head, labels)
    if name == "adaface":
        # its margin input is the detached norm: a function of the directions at fixed norms
        directions = F.normalize(x.detach()).requires_grad_()
        assert gradcheck(lambda u, w: loss(F.normalize(u) * norms, w), directions, weight)
    else:
        assert gradcheck(loss, x, weight)
    if name == "curricularface":  # the hard-negative branch is exercised
        cos = F.normalize(x) @ F.normalize(weight).T
        target = cos.gather(1, labels.view(-1, 1))
        assert (cos > torch.cos(torch.acos(target) + head.margin.m)).any()


def test_adaface_detaches_its_margin_input_and_magface_does_not():
    # AdaFace: the loss reaches x only through x / |x|, so its gradient is orthogonal to x.
    # MagFace: the margin and the regulariser move the magnitude.
    for head_cls, radial in [(AdaFace, False), (MagFace, True)]:
        torch.manual_seed(0)
        head = MarginHead(8, 10, head_cls(), FixedScale(30.0)).double()
        x = (F.normalize(torch.randn(6, 8, dtype=torch.float64)) * 40).requires_grad_()
        head.loss(x, torch.randint(0, 10, (6,)))[0].backward()
        radial_part = (x.grad * F.normalize(x.detach())).sum(dim=1).abs()
        assert (radial_part > 1e-6).all() if radial else (radial_part < 1e-12).all()


@pytest.mark.parametrize("path", ["loss", "forward"])
@pytest.mark.parametrize("margin", MARGINS)
def test_float32_head_matches_a_float64_dense_one_hot_reference(margin, path):
    head_cls, kwargs, _ = MARGINS[margin]
    torch.manual_seed(1)
    head = MarginHead(12, 30, head_cls(**kwargs), FixedScale(30.0))
    x = torch.randn(5, 12, requires_grad=True)
    labels = torch.tensor([1, 2, 3, 29, 0])
    # the fused training path, and the autograd margin logits
    loss = head.loss(x, labels)[0] if path == "loss" else F.cross_entropy(head(x, labels), labels)
    assert loss.dtype == torch.float32
    loss.backward()
    w = head.centres.weight.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    cos = F.normalize(x64) @ F.normalize(w).T
    one_hot = F.one_hot(labels, 30).double()  # the dense formulation the head avoids
    target = (cos * one_hot).sum(1, keepdim=True)
    reference = F.cross_entropy(30.0 * (cos + one_hot * (head.margin.target_logit(target) - target)), labels)
    reference.backward()
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6 * x64.grad.abs().max().item())
    torch.testing.assert_close(head.centres.weight.grad.double(), w.grad, rtol=1e-4, atol=1e-6 * w.grad.abs().max().item())


def test_statistics_on_a_known_batch():
    head = MarginHead(2, 4, CosFace(m=0.0), FixedScale(10.0))
    with torch.no_grad():
        head.centres.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    angle = math.radians(30)
    # sample 0: norm 2, 30 deg from class 0 (60, 150, 120 from the others); sample 1: norm 4,
    # 30 deg from class 1 (120, 60, 150 from the others)
    x = torch.tensor([[2 * math.cos(angle), 2 * math.sin(angle)], [-4 * math.sin(angle), 4 * math.cos(angle)]])
    labels = torch.tensor([0, 1])
    stats = head.loss(x, labels, statistics=True)[1]
    assert set(stats) == {"theta_med", "theta_nontarget", "p_target", "top1", "s", "norm_mean", "norm_std"}
    assert stats["theta_med"].item() == pytest.approx(30.0, abs=1e-3)
    assert stats["theta_nontarget"].item() == pytest.approx((60 + 150 + 120) / 3, abs=1e-3)
    assert stats["top1"].item() == 1.0
    logits = 10 * torch.cos(torch.deg2rad(torch.tensor([30.0, 60.0, 150.0, 120.0])))
    assert stats["p_target"].item() == pytest.approx(torch.softmax(logits, 0)[0].item(), rel=1e-5)
    assert stats["s"].item() == 10.0
    assert stats["norm_mean"].item() == pytest.approx(3.0)
    assert stats["norm_std"].item() == pytest.approx(math.sqrt(2))  # unbiased, as torch.std


def loss_and_step_logits(head: nn.Module, x: torch.Tensor, labels: torch.Tensor):
    """head.loss(x, labels, statistics=True) and the (B, C) margin logits that step used: head(x, y)
    at the state the loss computed them at -- after it where the state moves before the logits
    (dynamic s, AdaFace's EMA, CurricularFace's t), before it for ElasticFace, whose step counts the
    draws already taken."""
    before = head(x, labels)
    loss, stats = head.loss(x, labels, statistics=True)
    return loss, stats, before if isinstance(head.margin, ElasticFace) else head(x, labels)


@every_head_and_policy
def test_statistics_and_loss_are_those_of_the_step_logits(name, policy):
    head = build_head(name, policy, seed=1)
    x, labels = torch.randn(7, 16) * 5, torch.randint(0, 10, (7,))  # norms ~20: inside MagFace's range
    loss, stats, logits = loss_and_step_logits(head, x, labels)
    # computed plainly, in float64, from the cosines (the closest centre of each class)
    cos = F.normalize(x.double()) @ F.normalize(head.centres.weight.detach().double()).T
    cos = cos.view(7, 10, head.centres.centres_per_class).amax(dim=2)
    angles = torch.rad2deg(torch.acos(cos))
    target = F.one_hot(labels, 10).bool()
    norms = x.double().norm(dim=1)
    expected = {
        "theta_med": angles[target].median(),
        "theta_nontarget": angles[~target].mean(),
        "p_target": torch.softmax(logits.double(), 1)[target].median(),
        "top1": (cos[target] > cos.masked_fill(target, -math.inf).amax(dim=1)).double().mean(),
        "s": torch.tensor(head.scale.value, dtype=torch.float64),  # the s this step used and set
        "norm_mean": norms.mean(),
        "norm_std": norms.std(),
    }
    regulariser = 0.0
    if name == "magface":
        margin = head.margin
        magnitude = norms.clamp(margin.l_a, margin.u_a)
        regulariser = margin.lambda_g * (magnitude / margin.u_a**2 + 1 / magnitude).mean()
        expected["regulariser"] = regulariser
    assert stats.keys() == expected.keys()
    for key, value in expected.items():
        atol = 1e-3 if key.startswith("theta") else 1e-5  # degrees from float32 cosines
        torch.testing.assert_close(stats[key].double(), value, atol=atol, rtol=1e-5, msg=key)
    torch.testing.assert_close(loss.double(), F.cross_entropy(logits.double(), labels) + regulariser, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["cosface", "curricularface", "subcenter"])
def test_the_loss_reuses_its_buffers_across_steps_and_batch_sizes(name):
    """The loss keeps its (B, C) buffers from step to step: every step, at a new batch size, after a
    forward without backward, or with two graphs alive at once, equals the same step of a head that
    starts without any."""
    torch.manual_seed(3)
    head = make_head(name, 8, 11, FixedScale(5.0)).double()
    weight = head.centres.weight.detach().clone()

    def fresh_step(state, x, labels):
        fresh = make_head(name, 8, 11, FixedScale(5.0)).double()
        fresh.load_state_dict(state)
        return step(fresh, x, labels)

    def step(module, x, labels):
        x = x.clone().requires_grad_()
        module.centres.weight.grad = None
        loss, _ = module.loss(x, labels)
        loss.backward()
        return loss.detach(), x.grad, module.centres.weight.grad

    for batch in (6, 6, 4, 6):
        x, labels = torch.randn(batch, 8, dtype=torch.float64) * 3, torch.randint(0, 11, (batch,))
        state = {key: value.clone() for key, value in head.state_dict().items()}
        for ours, expected in zip(step(head, x, labels), fresh_step(state, x, labels)):
            torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-14)
    assert "cosines" in head.workspace.free and not any("workspace" in key for key in head.state_dict())
    assert copy.deepcopy(head).workspace.free == {} and pickle.loads(pickle.dumps(head)).workspace.free == {}
    reused = head.workspace.free["cosines"].data_ptr()
    x, labels = torch.randn(6, 8, dtype=torch.float64), torch.randint(0, 11, (6,))
    step(head, x, labels)
    assert head.workspace.free["cosines"].data_ptr() == reused  # the same memory, not a new buffer

    with torch.no_grad():  # a forward whose backward never runs keeps its buffers
        head.loss(x, labels)
    state = {key: value.clone() for key, value in head.state_dict().items()}
    for ours, expected in zip(step(head, x, labels), fresh_step(state, x, labels)):
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-14)

    # two graphs alive at once, then one backward through both
    x1, x2 = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    y1, y2 = torch.randint(0, 11, (6,)), torch.randint(0, 11, (6,))
    with torch.no_grad():
        head.centres.weight.copy_(weight)
    state = {key: value.clone() for key, value in head.state_dict().items()}
    head.centres.weight.grad = None
    (head.loss(x1, y1)[0] + head.loss(x2, y2)[0]).backward()
    together = head.centres.weight.grad.clone()
    fresh = make_head(name, 8, 11, FixedScale(5.0)).double()
    fresh.load_state_dict(state)
    separately = step(fresh, x1, y1)[2].clone() + step(fresh, x2, y2)[2]
    torch.testing.assert_close(together, separately, rtol=1e-12, atol=1e-14)
