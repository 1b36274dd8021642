"""The sigmoid (one-vs-all) heads, SphereFace2 and UniFace (facerec/heads/binary.py, trained through
the fused loss of binary_loss.py), against plain autograd re-implementations of the official code, in
float64 with a dense one-hot: opensphere's model/head/sphereface2.py (ydwen/opensphere, class
SphereFace2) and CVI-SZU/UniFace's head.py (Unified_Cross_Entropy_Loss), kept line by line so a reader
can check them against the originals. Where facerec departs from them by design (binary.py's module
docstring: the sign of SphereFace2's bias, class centres normalised in the graph, UniFace's logit clamp
not reproduced), a test states the difference exactly.

Also: gradcheck of the fused loss, the float32 path over several row blocks, the scale policies, the
batch statistics, the bias in checkpoints and the inspection logits, and the parameter checks.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_heads import HeadLoss, gradcheck  # the fused backward's gradcheck wrapper

from facerec.heads import (
    AutoMarginScale,
    AutoScale,
    DynamicScale,
    FixedScale,
    MarginHead,
    RelativeScale,
    SphereFace2,
    UniFace,
)
from facerec.heads.binary_loss import EXP_LIMIT
from facerec.heads.blocks import row_block

EXACT = {"rtol": 1e-10, "atol": 1e-12}  # float64 on both sides: only the order of operations differs

# One entry per published variant and one SphereFace2 with every parameter off its default (so each
# reaches the loss): margin class, its arguments, s (opensphere's r = 40, UniFace's s = 64).
VARIANTS = {
    "sphereface2-C": (SphereFace2, {"margin_type": "C"}, 40.0),
    "sphereface2-A": (SphereFace2, {"margin_type": "A"}, 40.0),
    "sphereface2-M": (SphereFace2, {"margin_type": "M", "m": 1.5}, 40.0),  # M multiplies the angle: m > 1
    "sphereface2-C-custom": (SphereFace2, {"margin_type": "C", "lam": 0.6, "m": 0.25, "t": 2.0, "lw": 10.0}, 32.0),
    "uce": (UniFace, {"m": 0.0}, 64.0),
    "uce-m": (UniFace, {"m": 0.4}, 64.0),
    "uce-mb-lambda": (UniFace, {"m": 0.4, "lam": 0.5}, 64.0),
    "uce-mb-r": (UniFace, {"m": 0.4, "r": 3.0}, 64.0),
}
SPHEREFACE2_VARIANTS = [name for name, (margin_cls, _, _) in VARIANTS.items() if margin_cls is SphereFace2]


# ----------------------------------------------------------------------------- the official code
# The published heads written out from their formulas (opensphere's SphereFace2 with its bias added to
# the logits, as there; UniFace's unified cross-entropy with its clamp), dense and with plain autograd.
def similarity(cos, t):
    """SphereFace2's g(cos) = 2 ((1 + cos) / 2)^t - 1."""
    return 2 * ((1 + cos) / 2) ** t - 1


def opensphere_bias(num_class, magn_type, alpha=0.7, r=40.0, m=0.4, t=3.0):
    """SphereFace2's starting bias (added to the logits): the root of the balance
    alpha (1 - sigmoid(a_pos + b)) = (1 - alpha)(C - 1) sigmoid(a_neg + b) for a feature at 90 degrees
    to every centre, a_pos and a_neg the scaled logits of its own and of another class there, with
    the published caps of the margined angle at pi."""
    if magn_type == "C":
        a_pos, a_neg = r * (similarity(0.0, t) - m), r * (similarity(0.0, t) + m)
    else:
        own_angle = min(math.pi, math.pi / 2 + m) if magn_type == "A" else min(math.pi, m * math.pi / 2)
        a_pos, a_neg = r * similarity(math.cos(own_angle), t), r * similarity(0.0, t)
    q = alpha / ((1 - alpha) * (num_class - 1))
    root = math.sqrt((1 - q) ** 2 + 4 * q * math.exp(a_pos - a_neg))
    return math.log(2 * q) - a_neg - math.log(1 - q + root)


def opensphere_logits(x, w, b, y, magn_type, r, m, t):
    """SphereFace2's (B, C) logits r g_m(cos) + b, w (d, C) unit columns as given (opensphere
    renormalises them in place before this), g_m the margined similarity applied as a shift of cos
    that autograd does not see. Returns (logits, one_hot)."""
    cos = F.normalize(x, dim=1) @ w
    one_hot = F.one_hot(y, cos.shape[1]).to(cos.dtype)
    with torch.no_grad():
        if magn_type == "C":
            shifted = similarity(cos, t) + m * (1 - 2 * one_hot)
        else:
            angle = cos.clamp(-1 + 1e-5, 1 - 1e-5).acos()
            own = angle + m if magn_type == "A" else angle * m
            angle = torch.where(one_hot.bool(), own, angle).clamp(1e-5, 3.14159)
            shifted = similarity(angle.cos(), t)
        shift = shifted - cos
    return r * (cos + shift) + b, one_hot


def opensphere_loss(x, w, b, y, magn_type, alpha, r, m, t, lw):
    """SphereFace2's loss: binary cross-entropy of every logit, positives weighted alpha and negatives
    1 - alpha, times lw C / r, averaged over the B x C entries."""
    num_class = w.shape[1]
    logits, one_hot = opensphere_logits(x, w, b, y, magn_type, r, m, t)
    weight = (lw * num_class / r) * (alpha * one_hot + (1 - alpha) * (1 - one_hot))
    return F.binary_cross_entropy_with_logits(logits, one_hot, weight=weight)


def uniface_logits(input, weight, bias, label, m, s):
    """UniFace's positive logits s (cos - m) - b and negative logits s cos - b over every class, with
    its normalisation epsilon. Returns (positive, negative, one_hot), each (B, C)."""
    cos = F.normalize(input, eps=1e-5) @ F.normalize(weight, eps=1e-5).T
    one_hot = F.one_hot(label, weight.shape[0]).bool()
    return s * (cos - m) - bias, s * cos - bias, one_hot


def uniface_loss(input, weight, bias, label, m, s, l):
    """UniFace's loss: log(1 + e^-z) of the clamped positive logit plus l log(1 + e^z) of each clamped
    negative one, summed over the classes, averaged over the batch."""
    positive, negative, one_hot = uniface_logits(input, weight, bias, label, m, s)
    positive_terms = torch.log(1 + torch.exp(-positive.clamp(-s, s)))
    negative_terms = l * torch.log(1 + torch.exp(negative.clamp(-s, s)))
    return torch.where(one_hot, positive_terms, negative_terms).sum(dim=1).mean()


# ------------------------------------------------------- the official code at facerec's settings
def reference_loss(margin, x, weight, b, labels, s):
    """The official loss for facerec's `margin` and s, at facerec's parametrisation: class centres
    `weight` (C, d) normalised in the graph (UniFace's own code does so; opensphere renormalises in
    place instead: see the projection test) and facerec's threshold b (opensphere adds -b)."""
    if isinstance(margin, SphereFace2):
        w = F.normalize(weight, dim=1).T
        return opensphere_loss(x, w, -b, labels, margin.margin_type, margin.lam, s, margin.m, margin.t, margin.lw)
    return uniface_loss(x, weight, b, labels, margin.m, s, margin.lam)


def reference_logits(margin, x, weight, b, labels, s):
    """The official (B, C) logits: s f+ - b on the own class, s f- - b elsewhere."""
    if isinstance(margin, SphereFace2):
        w = F.normalize(weight, dim=1).T
        return opensphere_logits(x, w, -b, labels, margin.margin_type, s, margin.m, margin.t)[0]
    positive, negative, one_hot = uniface_logits(x, weight, b, labels, margin.m, s)
    return torch.where(one_hot, positive, negative)


# ------------------------------------------------------------------------------------ helpers
def make_head(variant, embedding_size, num_classes, dtype=torch.float64):
    margin_cls, kwargs, s = VARIANTS[variant]
    return MarginHead(embedding_size, num_classes, margin_cls(**kwargs), FixedScale(s)).to(dtype)


def near_their_centres(weight, labels, generator):
    """Embeddings of norm ~5 around their class centres (target cosines mostly 0.3-0.9): where UniFace's
    positive logits stay above its clamp at -s, whose gradient facerec does not reproduce."""
    noise = torch.randn(len(labels), weight.shape[1], generator=generator, dtype=weight.dtype)
    return 3 * F.normalize(weight.detach()[labels]) + noise


def assert_no_uniface_logit_clamped(margin, x, weight, b, labels, s):
    """The premise of a comparison with UniFace's code: none of its logits reaches its clamp [-s, s]."""
    if isinstance(margin, UniFace):
        assert reference_logits(margin, x, weight, b, labels, s).abs().max() < s


def facerec_loss_and_grads(head, x, labels):
    """head.loss and the gradients of (embeddings, class centres, bias)."""
    x = x.detach().requires_grad_()
    loss, _ = head.loss(x, labels)
    return loss.detach(), torch.autograd.grad(loss, [x, head.centres.weight, head.margin.bias])


def assert_float32_close(actual, expected, rtol):
    """float32 against float64, to `rtol` of the largest reference value (small entries carry the
    absolute error of the large ones they are summed with)."""
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def loss_of_embeddings_centres_and_bias(head, labels):
    """head.loss(x, labels) as a function of (x, W, b) for gradcheck."""
    module = HeadLoss(head)

    def loss(x, weight, bias):
        return torch.func.functional_call(module, {"head.centres.weight": weight, "head.margin.bias": bias}, (x, labels))

    return loss


# ------------------------------------------------------------------------------ starting biases
@pytest.mark.parametrize("num_classes", [10, 10_575])
@pytest.mark.parametrize(
    "kwargs,s",
    [
        ({"margin_type": "C"}, 40.0),
        ({"margin_type": "A"}, 40.0),
        ({"margin_type": "A", "m": 2.0}, 40.0),  # pi/2 + m > pi: opensphere's min(pi, .) binds
        ({"margin_type": "M", "m": 1.5}, 40.0),
        ({"margin_type": "M", "m": 2.5}, 40.0),  # m pi/2 > pi
        ({"margin_type": "C", "lam": 0.6, "m": 0.25, "t": 2.0}, 32.0),
    ],
)
def test_sphereface2_starts_from_opensphere_s_bias_negated(kwargs, s, num_classes):
    """facerec subtracts b where opensphere adds it. Both store the bias as a float32 parameter, so the
    head's is opensphere's value negated and rounded to float32, exactly."""
    margin = SphereFace2(**kwargs)
    head = MarginHead(8, num_classes, margin, FixedScale(s))
    official = opensphere_bias(num_classes, margin.margin_type, margin.lam, s, margin.m, margin.t)
    assert margin.initial_bias(num_classes, s) == pytest.approx(-official, rel=1e-12, abs=1e-12)
    assert head.margin.bias.dtype == torch.float32
    assert head.margin.bias.item() == torch.tensor(-official, dtype=torch.float32).item()


@pytest.mark.parametrize("num_classes", [10, 10_575])
@pytest.mark.parametrize("r", [1.0, 0.5, 3.0])
def test_uniface_starts_from_the_official_bias(r, num_classes):
    """nn.init.constant_(self.bias, math.log(out_features*r*10)), into a float32 parameter."""
    head = MarginHead(8, num_classes, UniFace(r=r), FixedScale(64.0))
    assert head.margin.initial_bias(num_classes, 64.0) == pytest.approx(math.log(num_classes * r * 10), rel=1e-12)
    assert head.margin.bias.item() == torch.tensor(math.log(num_classes * r * 10), dtype=torch.float32).item()


# ------------------------------------------------------------------ loss and gradients, float64
@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_and_gradients_match_the_official_formulas_over_sgd_steps(variant):
    """Four SGD steps (lr 0.5) on the class centres and the bias, a fresh batch each step, facerec's
    head and the official formulas each following their own gradients: loss and the gradients of the
    embeddings, centres and bias agree at every step, so the trajectories do too. The centres start
    with norms ~2, not 1: the normalisation in the graph is part of what is compared."""
    generator = torch.Generator().manual_seed(0)
    head = make_head(variant, 16, 10)
    with torch.no_grad():
        head.centres.weight.copy_(0.5 * torch.randn(10, 16, generator=generator, dtype=torch.float64))
    margin, s, lr = head.margin, head.scale.value, 0.5
    weight = head.centres.weight.detach().clone().requires_grad_()
    bias = head.margin.bias.detach().clone().requires_grad_()
    start = (weight.detach().clone(), bias.item())
    for _ in range(4):
        labels = torch.randint(0, 10, (12,), generator=generator)
        x = near_their_centres(weight, labels, generator).requires_grad_()
        assert_no_uniface_logit_clamped(margin, x, weight, bias, labels, s)
        loss, grads = facerec_loss_and_grads(head, x, labels)
        expected = reference_loss(margin, x, weight, bias, labels, s)
        expected_grads = torch.autograd.grad(expected, [x, weight, bias])
        torch.testing.assert_close(loss, expected.detach(), **EXACT)
        for name, grad, expected_grad in zip(["embeddings", "centres", "bias"], grads, expected_grads):
            torch.testing.assert_close(grad, expected_grad, **EXACT, msg=lambda message, name=name: f"{name}: {message}")
        with torch.no_grad():
            for parameter, grad in zip([head.centres.weight, head.margin.bias], grads[1:]):
                parameter.sub_(lr * grad)
            for parameter, grad in zip([weight, bias], expected_grads[1:]):
                parameter.sub_(lr * grad)
    # the steps moved both parameters: later steps compare states the first one did not
    assert (weight - start[0]).abs().max() > 1e-2
    assert abs(bias.item() - start[1]) > 1e-3


@pytest.mark.parametrize("variant", SPHEREFACE2_VARIANTS)
def test_sphereface2_centre_gradient_is_opensphere_s_projected_onto_the_sphere(variant):
    """opensphere renormalises W in place before each forward and differentiates the unit W itself;
    facerec differentiates through W / |w|. At unit rows the two agree on the embeddings and the bias
    (negated) exactly, and facerec's centre gradient is opensphere's with each row's radial component
    removed, g - (g . w) w: the part opensphere's next renormalisation would discard anyway."""
    generator = torch.Generator().manual_seed(1)
    head = make_head(variant, 16, 10)
    with torch.no_grad():
        head.centres.weight.copy_(F.normalize(torch.randn(10, 16, generator=generator, dtype=torch.float64)))
    margin, s = head.margin, head.scale.value
    labels = torch.randint(0, 10, (12,), generator=generator)
    x = near_their_centres(head.centres.weight, labels, generator).requires_grad_()
    unit = head.centres.weight.detach()
    w = unit.T.clone().requires_grad_()  # opensphere's (d, C) layout, unit columns
    b = (-head.margin.bias).detach().clone().requires_grad_()  # opensphere's sign
    official = opensphere_loss(x, w, b, labels, margin.margin_type, margin.lam, s, margin.m, margin.t, margin.lw)
    official_x, official_w, official_b = torch.autograd.grad(official, [x, w, b])
    loss, (grad_x, grad_weight, grad_bias) = facerec_loss_and_grads(head, x, labels)
    torch.testing.assert_close(loss, official.detach(), **EXACT)
    torch.testing.assert_close(grad_x, official_x, **EXACT)
    torch.testing.assert_close(grad_bias, -official_b, **EXACT)
    g = official_w.T
    radial = (g * unit).sum(dim=1, keepdim=True)
    torch.testing.assert_close(grad_weight, g - radial * unit, **EXACT)
    assert radial.abs().max() > 1e-3  # the component removed is not negligible


def test_uniface_clamp_is_not_reproduced():
    """Where UniFace's code clamps (a positive logit below -s: a sample at 170 degrees from its own
    centre), its loss term is the constant ln(1 + e^s) and its gradient zero; facerec evaluates the
    softplus unclamped, so that sample still pulls toward its centre. The loss and the gradients differ
    by exactly that one term, dL/dz = (sigmoid(z) - 1) / B, and by nothing else."""
    basis = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64))[0].T
    centres, spare = basis[:5], basis[5]  # orthonormal centres; a unit vector orthogonal to all of them
    head = make_head("uce-m", 8, 5)
    with torch.no_grad():
        head.centres.weight.copy_(2 * centres)
    margin, s, b = head.margin, head.scale.value, head.margin.bias.detach()
    angle = math.radians(170)
    x = torch.stack([2 * (math.cos(angle) * centres[0] + math.sin(angle) * spare), 3 * centres[1] + spare, 3 * centres[2] - spare])
    x.requires_grad_()
    labels = torch.tensor([0, 1, 2])
    weight = head.centres.weight.detach().clone().requires_grad_()
    logits = reference_logits(margin, x, weight, b, labels, s).detach()
    z = logits[0, 0].clone()
    assert z < -s  # clamped in the official code
    logits[0, 0] = 0.0
    assert logits.abs().max() < s  # and no other logit
    bias = b.clone().requires_grad_()
    official = uniface_loss(x, weight, bias, labels, margin.m, s, margin.lam)
    official_x, official_w, official_b = torch.autograd.grad(official, [x, weight, bias])
    loss, (grad_x, grad_weight, grad_bias) = facerec_loss_and_grads(head, x, labels)
    batch = len(labels)
    torch.testing.assert_close(loss - official.detach(), (F.softplus(-z) - math.log(1 + math.exp(s))) / batch, **EXACT)
    grad_z = (torch.sigmoid(z) - 1) / batch  # facerec's dL/dz at the clamped element; the official 0
    torch.testing.assert_close(grad_bias - official_b, -grad_z, **EXACT)
    x_hat, w_hat, cos = F.normalize(x.detach()[0], dim=0), centres[0], math.cos(angle)
    expected_x = torch.zeros_like(grad_x)
    expected_x[0] = grad_z * s * (w_hat - cos * x_hat) / x.detach()[0].norm()  # d cos / d x
    torch.testing.assert_close(grad_x - official_x, expected_x, **EXACT)
    expected_w = torch.zeros_like(grad_weight)
    expected_w[0] = grad_z * s * (x_hat - cos * w_hat) / 2  # d cos / d w, |w| = 2
    torch.testing.assert_close(grad_weight - official_w, expected_w, **EXACT)
    assert expected_x[0].norm() > 1  # the pull the official code drops is not small


# ------------------------------------------------------------------------------------ gradcheck
@pytest.mark.parametrize(
    "margin",
    [
        SphereFace2(margin_type="C", t=1.0),
        UniFace(m=0.4),
        UniFace(m=0.4, lam=0.5, r=3.0),
    ],
    ids=["sphereface2-C-t1", "uce-m", "uce-mb-lambda-r"],
)
def test_fused_loss_passes_gradcheck(margin):
    """OneVsAllLoss's hand-written backward against finite differences, in (embeddings, centres of
    any norm, bias). SphereFace2 only at t = 1 with the additive margin: there g(cos) - m is cos
    shifted by a constant, so opensphere's gradient (the cosine's, the shift detached) is the loss's
    derivative; at t != 1, or for A and M, it is by design not (the next test covers those)."""
    torch.manual_seed(3)
    head = MarginHead(5, 7, margin, FixedScale(4.0)).double()
    norms = torch.linspace(0.5, 20, 6, dtype=torch.float64).unsqueeze(1)
    x = (F.normalize(torch.randn(6, 5, dtype=torch.float64)) * norms).requires_grad_()
    weight = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, 6, 3, 5, 1])
    assert gradcheck(loss_of_embeddings_centres_and_bias(head, labels), x, weight, bias)


@pytest.mark.parametrize("variant", SPHEREFACE2_VARIANTS)
def test_sphereface2_bias_gradient_passes_gradcheck(variant):
    """The bias enters every logit linearly, so its gradient is the loss's derivative for every
    SphereFace2 type and t (unlike the cosines', see above)."""
    torch.manual_seed(4)
    head = make_head(variant, 5, 7)
    x = torch.randn(6, 5, dtype=torch.float64)
    weight = torch.randn(7, 5, dtype=torch.float64)
    labels = torch.tensor([0, 3, 6, 3, 5, 1])
    loss = loss_of_embeddings_centres_and_bias(head, labels)
    bias = head.margin.bias.detach().clone().requires_grad_()
    assert gradcheck(lambda b: loss(x, weight, b), bias)


# ------------------------------------------------------------------------------------ float32
@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_training_path_matches_the_float64_reference_over_several_row_blocks(variant):
    """B = 300, C = 1000: the forward and backward passes over the (B, C) buffer run in row blocks
    of 2^17 elements on the CPU, 131 rows here, so three blocks, the last a partial one. float32
    against the float64 official formulas: a relative error ~1e-6 (cosines to ~1e-7 times s <= 64,
    sums over 1000 classes), checked at 2e-5."""
    num_rows, num_classes = 300, 1000
    assert -(-num_rows // row_block(num_rows, num_classes, torch.device("cpu"))) == 3
    generator = torch.Generator().manual_seed(5)
    head = make_head(variant, 32, num_classes, torch.float32)
    labels = torch.randint(0, num_classes, (num_rows,), generator=generator)
    x = near_their_centres(head.centres.weight.double(), labels, generator).float()
    margin, s = head.margin, head.scale.value
    weight = head.centres.weight.detach().double().requires_grad_()
    bias = head.margin.bias.detach().double().requires_grad_()
    x64 = x.double().requires_grad_()
    assert_no_uniface_logit_clamped(margin, x64, weight, bias, labels, s)
    expected = reference_loss(margin, x64, weight, bias, labels, s)
    expected_grads = torch.autograd.grad(expected, [x64, weight, bias])
    loss, grads = facerec_loss_and_grads(head, x, labels)
    assert loss.dtype == torch.float32 and all(grad.dtype == torch.float32 for grad in grads)
    assert_float32_close(loss, expected.detach(), 2e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_float32_close(grad, expected_grad, 2e-5)


# ------------------------------------------------------------------------------- scale policies
@pytest.mark.parametrize("margin_cls", [SphereFace2, UniFace])
def test_dynamic_scale_refuses_sigmoid_heads(margin_cls):
    """AdaCos's rule reads the softmax's non-target sum, which a sigmoid head does not have."""
    with pytest.raises(ValueError, match=rf"{margin_cls.__name__} is a sigmoid head.*fixed, auto, auto_margin or relative"):
        MarginHead(8, 100, margin_cls(), DynamicScale())


def test_auto_margin_scale_refuses_default_sphereface2_and_follows_uniface_s_margin():
    """At theta0 = 45 degrees SphereFace2-C's f+ = g(cos 45) - m = 2 ((1 + cos 45) / 2)^3 - 1 - 0.4 is
    negative, so no s puts P(target) at 1/2 there; UniFace's f+ = cos 45 - m gives ln(C - 1) / f+."""
    f = 2 * ((1 + math.cos(math.pi / 4)) / 2) ** 3 - 1 - 0.4
    assert f < 0
    with pytest.raises(ValueError, match=rf"f = {f:.4f} <= 0 at theta0 = 45.0 deg"):
        MarginHead(8, 1000, SphereFace2(), AutoMarginScale())
    head = MarginHead(8, 1000, UniFace(m=0.4), AutoMarginScale())
    assert head.scale.value == pytest.approx(math.log(999) / (math.cos(math.pi / 4) - 0.4), rel=1e-12)


@pytest.mark.parametrize("margin_cls", [SphereFace2, UniFace])
def test_auto_and_relative_scales_are_those_of_a_softmax_head(margin_cls):
    """`auto` ignores the margin: s = sqrt(2) ln(C - 1); `relative` multiplies it by its factor; and
    SphereFace2's starting bias is opensphere's for that s as its r."""
    num_classes = 1000
    auto = math.sqrt(2) * math.log(num_classes - 1)
    head = MarginHead(8, num_classes, margin_cls(), AutoScale())
    assert head.scale.value == pytest.approx(auto, rel=1e-12)
    assert MarginHead(8, num_classes, margin_cls(), RelativeScale(factor=1.5)).scale.value == pytest.approx(1.5 * auto, rel=1e-12)
    if margin_cls is SphereFace2:
        assert head.margin.bias.item() == torch.tensor(-opensphere_bias(num_classes, "C", r=auto), dtype=torch.float32).item()


# ----------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("variant", ["sphereface2-C", "uce-m"])
def test_statistics_of_a_known_batch(variant):
    """Four centres at 0, 90, 180 and 270 degrees in the plane; three samples of class 0 at 10, 30 and
    60 degrees. theta_med = 30; the sample at 60 degrees is nearer class 1 (30 degrees), so top1 = 2/3;
    the angles to the other classes sum to 360 - a per sample, a mean of (1080 - 100) / 9 degrees;
    p_target, here sigmoid(s f+ - b), is largest nearest the centre, so its median is the 30-degree
    sample's, computed by hand from the head's formula for f+."""
    head = MarginHead(2, 4, VARIANTS[variant][0](**VARIANTS[variant][1]), FixedScale(10.0)).double()
    with torch.no_grad():
        head.centres.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    degrees = torch.tensor([10.0, 30.0, 60.0], dtype=torch.float64)
    x = 2 * torch.stack([torch.cos(torch.deg2rad(degrees)), torch.sin(torch.deg2rad(degrees))], dim=1)
    _, stats = head.loss(x, torch.zeros(3, dtype=torch.long), statistics=True)
    assert {"theta_med", "theta_nontarget", "p_target", "top1", "s", "bias", "threshold"} <= set(stats)
    b, s, cos30 = head.margin.bias.item(), 10.0, math.cos(math.radians(30))
    if variant == "uce-m":
        f_positive = cos30 - 0.4
    else:  # g(cos) - m, t = 3, m = 0.4
        f_positive = 2 * ((cos30 + 1) / 2) ** 3 - 1 - 0.4
    expected = {
        "theta_med": 30.0,
        "theta_nontarget": (1080 - 100) / 9,
        "p_target": 1 / (1 + math.exp(-(s * f_positive - b))),
        "top1": 2 / 3,
        "s": s,
        "bias": b,
        "threshold": b / s,
    }
    # top1 is a float32 fraction by design; theta_nontarget to 1e-5 degrees: loss.py's
    # nontarget_angles subtracts pi / 2 as a float32 (`h * (math.pi / 2)`, a bool tensor times a
    # float), 8e-7 degrees off here in float64
    tolerances = {"top1": 1e-7, "theta_nontarget": 1e-5}
    for key, value in expected.items():
        assert stats[key].item() == pytest.approx(value, rel=1e-12, abs=tolerances.get(key, 1e-12)), key


# --------------------------------------------------------------- checkpoints and inspection logits
@pytest.mark.parametrize("margin_cls", [SphereFace2, UniFace])
def test_bias_is_in_the_state_dict_and_round_trips(margin_cls, tmp_path):
    """The learned bias is a parameter of the margin: saved as "margin.bias", restored on load
    (over the starting value a fresh head computes)."""
    head = MarginHead(8, 20, margin_cls(), FixedScale(30.0))
    with torch.no_grad():
        head.margin.bias.fill_(1.25)
    assert set(head.state_dict()) == {"centres.weight", "margin.bias"}
    torch.save(head.state_dict(), tmp_path / "head.pt")
    fresh = MarginHead(8, 20, margin_cls(), FixedScale(30.0))
    assert fresh.margin.bias.item() != 1.25
    fresh.load_state_dict(torch.load(tmp_path / "head.pt"))
    assert fresh.margin.bias.item() == 1.25
    assert torch.equal(fresh.centres.weight, head.centres.weight)


@pytest.mark.parametrize("variant", VARIANTS)
def test_inspection_logits_are_the_official_logits(variant):
    """head(x, labels) is s f - b with f+ on the own column and f- elsewhere: the official code's
    logits (opensphere's r (cos + d_theta) + b, UniFace's positive and negative logits, unclamped)."""
    generator = torch.Generator().manual_seed(6)
    head = make_head(variant, 16, 10)
    labels = torch.randint(0, 10, (12,), generator=generator)
    x = torch.randn(12, 16, generator=generator, dtype=torch.float64)
    bias = head.margin.bias.detach()
    expected = reference_logits(head.margin, x, head.centres.weight.detach(), bias, labels, head.scale.value)
    torch.testing.assert_close(head(x, labels).detach(), expected, **EXACT)


# ------------------------------------------------------------------------------- bad parameters
@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: SphereFace2(margin_type="X"), "margin_type must be one of C, A, M, got 'X'"),
        (lambda: SphereFace2(lam=0.0), r"lam \(the positives' weight\) must lie in \(0, 1\), got 0.0"),
        (lambda: SphereFace2(lam=1.0), r"lam .* must lie in \(0, 1\), got 1.0"),
        (lambda: SphereFace2(lam=1.5), r"lam .* must lie in \(0, 1\), got 1.5"),
        (lambda: UniFace(m=-0.1), r"margin m must lie in \[0, 1\), got -0.1"),
        (lambda: UniFace(m=1.0), r"margin m must lie in \[0, 1\), got 1.0"),
        (lambda: UniFace(lam=0.0), r"lam .* must be > 0, got lam=0.0"),
        (lambda: UniFace(lam=-1.0), r"lam .* must be > 0, got lam=-1.0"),
    ],
)
def test_bad_parameters_raise(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_large_logits_keep_float64_precision():
    """Logits above torch's softplus threshold (20, where it returns z and leaves e^-20 ~ 2e-9 out): the
    loss and the bias gradient still equal log(1 + e^z) and sigmoid(z) to float64 precision, up to
    logits of 80."""
    torch.manual_seed(5)
    head = make_head("uce-m", 8, 6)
    with torch.no_grad():
        head.margin.bias.fill_(-20.0)  # negative logits s cos - b reach 20 to 80 near another class
    labels = torch.tensor([0, 1, 2, 3])
    weight = head.centres.weight.detach()
    x = F.normalize(weight[[1, 2, 3, 4]] + 0.3 * torch.randn(4, 8, dtype=torch.float64)) * 4  # near another class
    z = reference_logits(head.margin, x, weight, head.margin.bias.detach(), labels, head.scale.value)
    negatives = z[~F.one_hot(labels, 6).bool()]
    assert ((negatives > 20) & (negatives < 50)).any() and (negatives > 50).any()
    exact = torch.logaddexp(torch.where(F.one_hot(labels, 6).bool(), -z, z), torch.zeros(())).sum(dim=1).mean()
    loss, (_, _, grad_bias) = facerec_loss_and_grads(head, x, labels)
    assert abs(loss.item() - exact.item()) < 1e-11  # absolute: e^-20 per large logit would show
    expected_bias = -(torch.sigmoid(z) - F.one_hot(labels, 6)).sum() / len(labels)
    torch.testing.assert_close(grad_bias, expected_bias, **EXACT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_beyond_exp_overflow_keep_a_finite_exact_loss(dtype):
    """The negative side's softplus and sigmoid come from one exp(z), which overflows above ~88
    (float32) or ~709 (float64): logits past the clamp (EXP_LIMIT) still give softplus(z) = z and
    sigmoid(z) = 1, and the loss and bias gradient equal the exact ones."""
    torch.manual_seed(6)
    limit = EXP_LIMIT[dtype]
    head = make_head("uce-m", 8, 6, dtype)
    with torch.no_grad():
        head.margin.bias.fill_(-(limit - 10))  # negative logits s cos - b straddle the limit near another class
    labels = torch.tensor([0, 1, 2, 3])
    weight = head.centres.weight.detach()
    x = F.normalize(weight[[1, 2, 3, 4]] + 0.3 * torch.randn(4, 8, dtype=dtype)) * 4
    z = reference_logits(head.margin, x.double(), weight.double(), head.margin.bias.detach().double(), labels, head.scale.value)
    negatives = z[~F.one_hot(labels, 6).bool()]
    assert (negatives > limit + 10).any() and (negatives < limit).any()  # past exp overflow
    exact = torch.logaddexp(torch.where(F.one_hot(labels, 6).bool(), -z, z), torch.zeros((), dtype=torch.float64)).sum(dim=1).mean()
    loss, (grad_x, grad_weight, grad_bias) = facerec_loss_and_grads(head, x, labels)
    assert torch.isfinite(grad_x).all() and torch.isfinite(grad_weight).all()
    rtol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(loss.double(), exact, rtol=rtol, atol=0)
    expected_bias = -(torch.sigmoid(z) - F.one_hot(labels, 6)).sum() / len(labels)
    torch.testing.assert_close(grad_bias.double(), expected_bias, rtol=rtol, atol=rtol)
