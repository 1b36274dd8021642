"""The heads of issue 14 (AdaFace, MagFace, ElasticFace, CurricularFace, Sub-center ArcFace) against
independent references, in float64: logits, loss, the gradients of embeddings and class centres, and
the state each head carries from step to step (and through a checkpoint).

The references are written out plainly here, with autograd, after the official code of each method:
mk-minchul/AdaFace head.py, IrvingMeng/MagFace models/magface.py (MagLinear, MagLoss), fdbtrs/ElasticFace
utils/losses.py (ElasticArcFace, ElasticCosFace and their "+" variants), HuangYG123/CurricularFace
head/metrics.py; Sub-center ArcFace is compared with pytorch-metric-learning's SubCenterArcFaceLoss.
"""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import SubCenterArcFaceLoss

from conftest import compose_config
from facerec.heads import (
    AdaFace,
    AutoMarginScale,
    AutoScale,
    CurricularFace,
    DynamicScale,
    ElasticFace,
    FixedScale,
    MagFace,
    MarginHead,
    PartialFC,
    SubCenterArcFace,
    dominant_centres_and_outliers,
)
from facerec.training.fit import build_module

DIM, CLASSES, S = 16, 6, 64.0  # s = 64: the official setting of every one of these methods
EXACT = dict(rtol=1e-10, atol=1e-12)  # float64 throughout: only the order of operations differs


# ---------------------------------------------------------------------------------- test problems
def embeddings_at_angles(
    centres: torch.Tensor, angles: list[float], norms: list[float], generator: torch.Generator
) -> torch.Tensor:
    """(N, d) embeddings at `angles` (radians) from the rows `centres` (N, d), with the given norms:
    each rotated from its centre towards a random direction orthogonal to it."""
    w = F.normalize(centres, dim=1)
    u = torch.randn(w.shape, generator=generator, dtype=w.dtype)
    u = F.normalize(u - (u * w).sum(1, keepdim=True) * w, dim=1)
    theta = torch.tensor(angles, dtype=w.dtype).unsqueeze(1)
    return (torch.cos(theta) * w + torch.sin(theta) * u) * torch.tensor(norms, dtype=w.dtype).unsqueeze(1)


def problem(angles: list[float], norms: list[float], seed: int, centres_per_class: int = 1):
    """(class centres (C K, d), embeddings (N, d), labels (N,)): sample i of class i mod C at angles[i]
    from its class's first centre."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(CLASSES * centres_per_class, DIM, generator=generator, dtype=torch.float64)
    labels = torch.arange(len(angles)) % CLASSES
    x = embeddings_at_angles(weight[labels * centres_per_class], angles, norms, generator)
    return weight, x, labels


def float64_head(head, weight: torch.Tensor):
    head.double()
    with torch.no_grad():
        head.centres.weight.copy_(weight)
    return head


def head_step(head, x: torch.Tensor, labels: torch.Tensor):
    """(loss, dL/dx, dL/dW) of one training step through head.loss."""
    x = x.clone().requires_grad_()
    head.centres.weight.grad = None
    loss, _ = head.loss(x, labels)
    loss.backward()
    return loss.detach(), x.grad, head.centres.weight.grad


def reference_step(loss_fn, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    """(loss, dL/dx, dL/dW) of a reference loss_fn(x, weight, labels), by autograd."""
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = loss_fn(x, weight, labels)
    loss.backward()
    return loss.detach(), x.grad, weight.grad


def assert_steps_equal(ours, reference):
    for name, a, b in zip(("loss", "grad of embeddings", "grad of class centres"), ours, reference):
        torch.testing.assert_close(a, b, **EXACT, msg=lambda m, name=name: f"{name}: {m}")


def official_cosines(x: torch.Tensor, weight: torch.Tensor, clamp: float = 0.0) -> torch.Tensor:
    """l2_norm(embeddings) @ l2_norm(kernel), clamped to [-1 + clamp, 1 - clamp] as the official heads do."""
    embeddings = x / torch.linalg.vector_norm(x, dim=1, keepdim=True)
    kernel = weight / torch.linalg.vector_norm(weight, dim=1, keepdim=True)
    cosine = embeddings @ kernel.T
    return cosine.clamp(-1 + clamp, 1 - clamp)


def one_hot(labels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.one_hot(labels, like.shape[1]).to(like.dtype)


# ------------------------------------------------------------------------------------------ AdaFace
ADAFACE_EPS = 1e-3  # the official head's eps


def adaface_reference(x, weight, labels, state: dict, m: float, h: float, t_alpha: float, update: bool = True):
    """mk-minchul/AdaFace head.py, AdaFace.forward: (N, C) scaled logits. The norm is the backbone's
    output norm (its division keeps the gradient; the margin sees it detached). `state` holds the EMA
    buffers batch_mean / batch_std, updated from this batch first when `update`."""
    eps = ADAFACE_EPS
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    cosine = official_cosines(x, weight, clamp=eps)
    safe_norms = torch.clip(norms, min=0.001, max=100).detach()
    if update:
        with torch.no_grad():
            state["batch_mean"] = safe_norms.mean() * t_alpha + (1 - t_alpha) * state["batch_mean"]
            state["batch_std"] = safe_norms.std() * t_alpha + (1 - t_alpha) * state["batch_std"]
    margin_scaler = torch.clip((safe_norms - state["batch_mean"]) / (state["batch_std"] + eps) * h, -1, 1)
    target = one_hot(labels, cosine)
    g_angular = target * (m * margin_scaler * -1)
    theta_m = torch.clip(cosine.acos() + g_angular, min=eps, max=math.pi - eps)
    g_additive = target * (m + m * margin_scaler)
    return (theta_m.cos() - g_additive) * S


# Target angles over the whole range (with h = 2 the first, of a large norm, reaches the clip theta - m z >= eps
# and the last, of a small one, the clip at pi - eps); norms beyond both ends of the [0.001, 100] clip.
ADAFACE_ANGLES = [0.2, 0.5, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.3, 2.6, 3.0]
ADAFACE_NORMS = [
    [150.0, 0.0005, 3.0, 8.0, 12.0, 18.0, 22.0, 30.0, 45.0, 60.0, 80.0, 1.5],
    [120.0, 40.0, 25.0, 5.0, 9.0, 14.0, 16.0, 21.0, 27.0, 33.0, 70.0, 0.5],
]


@pytest.mark.parametrize("m,h,t_alpha", [(0.4, 0.333, 0.01), (0.4, 2.0, 0.5)], ids=["published", "clipped-scaler"])
def test_adaface_matches_the_official_head_over_two_steps(m, h, t_alpha):
    weight, _, labels = problem(ADAFACE_ANGLES, ADAFACE_NORMS[0], seed=0)
    head = float64_head(MarginHead(DIM, CLASSES, AdaFace(m=m, h=h, t_alpha=t_alpha), FixedScale(S)), weight)
    state = {"batch_mean": torch.tensor(20.0, dtype=torch.float64), "batch_std": torch.tensor(100.0, dtype=torch.float64)}
    for step, norms in enumerate(ADAFACE_NORMS):
        x = embeddings_at_angles(weight[labels], ADAFACE_ANGLES, norms, torch.Generator().manual_seed(100 + step))
        # the documented deviation (only the target cosine is clamped) cannot matter on this data
        assert official_cosines(x, weight).abs().max() < 1 - ADAFACE_EPS
        mean_before = state["batch_mean"]

        def reference_loss(x, w, y):
            return F.cross_entropy(adaface_reference(x, w, y, state, m, h, t_alpha), y)

        expected = reference_step(reference_loss, x, weight, labels)
        assert_steps_equal(head_step(head, x, labels), expected)
        assert state["batch_mean"] != mean_before
        torch.testing.assert_close(head.margin.batch_mean, state["batch_mean"], **EXACT)
        torch.testing.assert_close(head.margin.batch_std, state["batch_std"], **EXACT)
        # head(x, y): the logits at the state the step left (its EMA includes this batch), advancing nothing
        with torch.no_grad():
            logits = head(x, labels)
            torch.testing.assert_close(logits, adaface_reference(x, weight, labels, state, m, h, t_alpha, update=False), **EXACT)
        torch.testing.assert_close(F.cross_entropy(logits, labels), expected[0], **EXACT)
        torch.testing.assert_close(head.margin.batch_mean, state["batch_mean"], **EXACT)
    if h > 1:  # the data reach the clip of the margin scaler at both ends
        safe = torch.tensor(ADAFACE_NORMS[1], dtype=torch.float64).clamp(0.001, 100)
        scaler = (safe - state["batch_mean"]) / (state["batch_std"] + ADAFACE_EPS) * h
        assert (scaler > 1).any() and (scaler < -1).any()


# ------------------------------------------------------------------------------------------ MagFace
def magface_reference(x, weight, labels, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0, regulariser=True):
    """IrvingMeng/MagFace models/magface.py: MagLinear.forward (easy_margin=False branch: cos(theta + m)
    with the threshold fallback) and MagLoss (cross-entropy), plus lambda_g * calc_loss_G as run/trainer.py adds it.
    Returns (cross-entropy + regulariser, the (N, C) scaled margin logits)."""
    x_norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp(l_a, u_a)
    ada_margin = (u_m - l_m) / (u_a - l_a) * (x_norm - l_a) + l_m
    cos_m, sin_m = torch.cos(ada_margin), torch.sin(ada_margin)
    cos_theta = official_cosines(x, weight)
    sin_theta = torch.sqrt(1.0 - torch.pow(cos_theta, 2))
    cos_theta_m = cos_theta * cos_m - sin_theta * sin_m
    mm = torch.sin(math.pi - ada_margin) * ada_margin
    threshold = torch.cos(math.pi - ada_margin)
    cos_theta_m = torch.where(cos_theta > threshold, cos_theta_m, cos_theta - mm)
    target = one_hot(labels, cos_theta)
    output = target * (S * cos_theta_m) + (1.0 - target) * (S * cos_theta)
    loss_g = torch.mean(1 / (u_a**2) * x_norm + 1 / x_norm)
    return F.cross_entropy(output, labels) + lambda_g * loss_g, output


# magnitudes beyond both ends of [l_a, u_a] (no gradient through the margin there) and inside; the last two
# targets beyond pi - m(a), where the fallback cos(theta) - m sin(m) applies
MAGFACE_ANGLES = [0.3, 0.6, 0.9, 1.1, 1.3, 1.5, 1.7, 1.9, 2.1, 2.2, 2.7, 2.9]
MAGFACE_NORMS = [5.0, 12.0, 20.0, 35.0, 47.0, 60.0, 75.0, 88.0, 101.0, 140.0, 30.0, 95.0]


def test_magface_matches_the_official_maglinear_and_magloss():
    weight, x, labels = problem(MAGFACE_ANGLES, MAGFACE_NORMS, seed=1)
    head = float64_head(MarginHead(DIM, CLASSES, MagFace(), FixedScale(S)), weight)
    expected = reference_step(lambda x, w, y: magface_reference(x, w, y)[0], x, weight, labels)
    assert_steps_equal(head_step(head, x, labels), expected)
    with torch.no_grad():
        logits = head(x, labels)
        torch.testing.assert_close(logits, magface_reference(x, weight, labels)[1], **EXACT)
        regulariser = head.margin.regulariser(torch.linalg.vector_norm(x, dim=1))
    torch.testing.assert_close(F.cross_entropy(logits, labels) + regulariser, expected[0], **EXACT)


def test_magface_gradient_flows_through_the_magnitude():
    """Inside [l_a, u_a] the embedding's gradient along itself (the only part the cosines cannot
    give) comes from the margin m(a) and the regulariser; the reference without the regulariser
    still has a radial part, and ours is the same."""
    weight, x, labels = problem(MAGFACE_ANGLES, MAGFACE_NORMS, seed=1)
    head = float64_head(MarginHead(DIM, CLASSES, MagFace(lambda_g=0.0), FixedScale(S)), weight)
    _, grad_x, _ = head_step(head, x, labels)
    _, reference_x, _ = reference_step(lambda x, w, y: magface_reference(x, w, y, lambda_g=0.0)[0], x, weight, labels)
    torch.testing.assert_close(grad_x, reference_x, **EXACT)
    radial = (grad_x * F.normalize(x, dim=1)).sum(1)
    inside = (torch.tensor(MAGFACE_NORMS) > 10) & (torch.tensor(MAGFACE_NORMS) < 110)
    assert radial[inside].abs().max() > 1e-3 and radial[~inside].abs().max() < 1e-12


# -------------------------------------------------------------------------------------- ElasticFace
def elastic_draws(seed: int, step: int, count: int, m: float, std: float) -> torch.Tensor:
    """The head's draw (facerec/heads/elasticface.py): N(m, std) from a generator seeded by
    seed * 1_000_003 + step, in float64, one per sample of the (single-process) batch."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.normal(m, std, (count,), generator=generator, dtype=torch.float64)


def elasticface_reference(x, weight, labels, margins, kind: str, plus: bool):
    """fdbtrs/ElasticFace utils/losses.py ElasticArcFace / ElasticCosFace (plus=...): (N, C) scaled
    logits with the given drawn margins. "+": the margins sorted ascending go to the samples sorted by
    target cosine descending (the largest margin to the farthest sample), as the paper states."""
    cos_theta = official_cosines(x, weight)
    if plus:
        order = cos_theta.gather(1, labels.unsqueeze(1)).squeeze(1).detach().argsort(descending=True)
        ranked = torch.empty_like(margins)
        ranked[order] = margins.sort().values
        margins = ranked
    m_hot = one_hot(labels, cos_theta) * margins.unsqueeze(1)
    if kind == "arc":
        return (cos_theta.acos() + m_hot).cos() * S
    return (cos_theta - m_hot) * S


# theta + m_i < pi for every draw here; in no monotonic order, so that assigning the sorted margins by the
# rank permutation and by its inverse differ (they agree whenever it is its own inverse, e.g. sorted data)
ELASTIC_ANGLES = [1.0, 2.35, 0.4, 1.8, 0.2, 1.4, 2.2, 0.6, 1.6, 0.8, 2.0, 1.2]
ELASTIC_VARIANTS = [("arc", 0.5, 0.05, False), ("arc", 0.5, 0.0175, True), ("cos", 0.35, 0.05, False), ("cos", 0.35, 0.025, True)]


@pytest.mark.parametrize("kind,m,std,plus", ELASTIC_VARIANTS, ids=["arc", "arc+", "cos", "cos+"])
def test_elasticface_matches_the_official_losses_with_the_same_draws(kind, m, std, plus):
    seed = 7
    weight, _, labels = problem(ELASTIC_ANGLES, [1.0] * len(ELASTIC_ANGLES), seed=2)
    head = float64_head(MarginHead(DIM, CLASSES, ElasticFace(m=m, std=std, kind=kind, plus=plus, seed=seed), FixedScale(S)), weight)
    for step in range(2):
        x = embeddings_at_angles(weight[labels], ELASTIC_ANGLES, [3.0] * len(labels), torch.Generator().manual_seed(100 + step))
        margins = elastic_draws(seed, step, len(labels), m, std)
        assert int(head.margin.step) == step
        with torch.no_grad():  # head(x, y) shows this step's draw and takes none
            torch.testing.assert_close(head(x, labels), elasticface_reference(x, weight, labels, margins, kind, plus), **EXACT)
        assert int(head.margin.step) == step

        def reference_loss(x, w, y):
            return F.cross_entropy(elasticface_reference(x, w, y, margins, kind, plus), y)

        expected = reference_step(reference_loss, x, weight, labels)
        assert_steps_equal(head_step(head, x, labels), expected)
        assert int(head.margin.step) == step + 1


def test_elasticface_plus_gives_the_largest_margins_to_the_farthest_samples():
    weight, x, labels = problem(ELASTIC_ANGLES, [1.0] * len(ELASTIC_ANGLES), seed=2)
    head = float64_head(MarginHead(DIM, CLASSES, ElasticFace(kind="cos", m=0.35, std=0.05, plus=True), FixedScale(S)), weight)
    column = labels.unsqueeze(1)
    with torch.no_grad():
        target = official_cosines(x, weight).gather(1, column).squeeze(1)
        margins = target - head(x, labels).gather(1, column).squeeze(1) / S  # ElasticFace-Cos: s (cos - m_i)
    assert torch.equal(margins[target.argsort(descending=True)], margins.sort().values)
    torch.testing.assert_close(margins.sort().values, elastic_draws(0, 0, len(labels), 0.35, 0.05).sort().values, **EXACT)


def test_elasticface_draws_are_reproducible_and_resume_from_a_state_dict():
    weight, x, labels = problem(ELASTIC_ANGLES, [2.0] * len(ELASTIC_ANGLES), seed=3)

    def build(seed):
        return float64_head(MarginHead(DIM, CLASSES, ElasticFace(seed=seed), FixedScale(S)), weight)
    first, second, other_seed = build(5), build(5), build(6)
    with torch.no_grad():
        assert torch.equal(first(x, labels), second(x, labels))  # same seed and step: same margins
        assert not torch.equal(first(x, labels), other_seed(x, labels))
        for _ in range(3):
            first.loss(x, labels)
        assert int(first.margin.step) == 3
        assert not torch.equal(first(x, labels), second(x, labels))  # another step, another draw
        buffer = io.BytesIO()
        torch.save(first.state_dict(), buffer)
        buffer.seek(0)
        second.load_state_dict(torch.load(buffer, weights_only=True))
        assert int(second.margin.step) == 3
        for _ in range(2):  # the resumed head continues the same stream of draws
            assert torch.equal(second(x, labels), first(x, labels))
            assert torch.equal(second.loss(x, labels)[0], first.loss(x, labels)[0])


# ----------------------------------------------------------------------------------- CurricularFace
def curricularface_reference(x, weight, labels, state: dict, m: float = 0.5, update: bool = True):
    """HuangYG123/CurricularFace head/metrics.py, CurricularFace.forward: (N, C) scaled logits; `state`
    holds t, moved (0.01) towards the batch's mean target cosine before the hard logits use it."""
    cos_theta = official_cosines(x, weight)
    target_logit = cos_theta.gather(1, labels.unsqueeze(1))
    sin_theta = torch.sqrt(1.0 - torch.pow(target_logit, 2))
    cos_theta_m = target_logit * math.cos(m) - sin_theta * math.sin(m)
    mask = cos_theta > cos_theta_m
    final_target_logit = torch.where(target_logit > math.cos(math.pi - m), cos_theta_m, target_logit - math.sin(math.pi - m) * m)
    if update:
        with torch.no_grad():
            state["t"] = target_logit.mean() * 0.01 + (1 - 0.01) * state["t"]
    logits = torch.where(mask, cos_theta * (state["t"] + cos_theta), cos_theta)
    return logits.scatter(1, labels.unsqueeze(1), final_target_logit) * S


CURRICULAR_ANGLES = [0.3, 0.5, 0.7, 0.9, 1.1, 1.3, 1.5, 1.7, 1.9, 2.1, 2.3, 2.8]  # the last beyond pi - m: the fallback


def test_curricularface_matches_the_official_head_over_two_steps():
    weight, _, labels = problem(CURRICULAR_ANGLES, [1.0] * len(CURRICULAR_ANGLES), seed=4)
    head = float64_head(MarginHead(DIM, CLASSES, CurricularFace(), FixedScale(S)), weight)
    state = {"t": torch.tensor(0.0, dtype=torch.float64)}
    for step in range(3):
        generator = torch.Generator().manual_seed(100 + step)
        x = embeddings_at_angles(weight[labels], CURRICULAR_ANGLES, [2.0 + step] * len(labels), generator)
        cos = official_cosines(x, weight)
        target = cos.gather(1, labels.unsqueeze(1))
        hard = (cos > torch.cos(target.acos() + 0.5)).sum() - len(labels)
        assert hard > 0  # the data have hard negatives, so t reaches the loss
        expected = reference_step(lambda x, w, y: F.cross_entropy(curricularface_reference(x, w, y, state), y), x, weight, labels)
        assert_steps_equal(head_step(head, x, labels), expected)
        torch.testing.assert_close(head.margin.t, state["t"], **EXACT)
        with torch.no_grad():  # the logits at the t the step left, which head(x, y) does not move
            torch.testing.assert_close(head(x, labels), curricularface_reference(x, weight, labels, state, update=False), **EXACT)
        torch.testing.assert_close(head.margin.t, state["t"], **EXACT)
    assert state["t"] != 0


# ------------------------------------------------------------------------------- Sub-center ArcFace
def pml_subcenter(weight: torch.Tensor, m: float, centres: int) -> SubCenterArcFaceLoss:
    """pytorch-metric-learning's loss holding our centres: its W (d, C K) is our weight transposed
    (column j K + k is class j's centre k, as our rows); its margin is in degrees."""
    loss = SubCenterArcFaceLoss(num_classes=CLASSES, embedding_size=DIM, margin=math.degrees(m), scale=S, sub_centers=centres)
    loss.W = torch.nn.Parameter(weight.T.clone())
    return loss


@pytest.mark.parametrize("centres", [1, 3])
def test_subcenter_arcface_matches_pytorch_metric_learning(centres):
    # target angles to the class's first centre below pi - m, so no sample is at ArcFace's fallback
    angles = [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2, 0.5, 1.5, 2.1]
    weight, x, labels = problem(angles, [4.0] * len(angles), seed=5, centres_per_class=centres)
    head = float64_head(MarginHead(DIM, CLASSES, SubCenterArcFace(m=0.5, centres=centres), FixedScale(S)), weight)
    reference = pml_subcenter(weight, 0.5, centres)
    target_cos = reference.get_cosine(x).gather(1, labels.unsqueeze(1))
    assert (target_cos.acos() < math.pi - 0.5 - 0.05).all()
    x_leaf = x.clone().requires_grad_()
    expected_loss = reference(x_leaf, labels)
    expected_loss.backward()
    assert_steps_equal(head_step(head, x, labels), (expected_loss.detach(), x_leaf.grad, reference.W.grad.T))
    with torch.no_grad():
        torch.testing.assert_close(head(x), reference.get_logits(x), **EXACT)  # scaled cosines, closest centre
        torch.testing.assert_close(F.cross_entropy(head(x, labels), labels), expected_loss.detach(), **EXACT)


def test_dominant_centres_and_outliers_match_pytorch_metric_learning():
    """Per class, most samples near one centre, some near another and a few far from all: the
    dominant centre and the outliers (angle to it beyond the threshold) of pml's get_outliers."""
    centres = 3
    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(CLASSES * centres, DIM, generator=generator, dtype=torch.float64)
    labels, rows, angles = [], [], []
    for label in range(CLASSES - 1):  # the last class has no samples
        dominant = label % centres
        near = [(dominant, 0.3), (dominant, 0.5), (dominant, 0.7), (dominant, 1.2)]
        for k, angle in [*near, ((dominant + 1) % centres, 0.4), ((dominant + 2) % centres, 0.6)]:
            labels.append(label)
            rows.append(label * centres + k)
            angles.append(angle)
    labels = torch.tensor(labels)
    x = embeddings_at_angles(weight[rows], angles, [3.0] * len(rows), generator)
    head = float64_head(MarginHead(DIM, CLASSES, SubCenterArcFace(centres=centres), FixedScale(S)), weight)
    for threshold in (75.0, 40.0):
        dominant, angle_deg, outliers = dominant_centres_and_outliers(head, x, labels, threshold_deg=threshold)
        expected_outliers, dominant_vectors = pml_subcenter(weight, 0.5, centres).get_outliers(x, labels, threshold=threshold)
        assert dominant.tolist() == [label % centres for label in range(CLASSES - 1)] + [-1]
        for label in range(CLASSES - 1):
            torch.testing.assert_close(weight[label * centres + dominant[label]], dominant_vectors[:, label], rtol=0, atol=0)
        assert outliers.nonzero().view(-1).tolist() == sorted(expected_outliers.tolist())
        assert 0 < int(outliers.sum()) < len(labels)
        cos_to_dominant = F.cosine_similarity(x, weight[labels * centres + dominant[labels]])
        torch.testing.assert_close(angle_deg.double(), torch.rad2deg(cos_to_dominant.acos()), rtol=0, atol=1e-4)


# --------------------------------------------------------------------- every head, every scale policy
NEW_HEADS = {  # (class, arguments, the nominal target logit f(theta) each docstring states)
    "adaface": (AdaFace, {}, lambda t: math.cos(t) - 0.4),
    "magface": (MagFace, {}, lambda t: math.cos(t + (0.45 + 0.8) / 2)),
    "elasticface_arc": (ElasticFace, {"kind": "arc"}, lambda t: math.cos(t + 0.5)),
    "elasticface_arc_plus": (ElasticFace, {"kind": "arc", "std": 0.0175, "plus": True}, lambda t: math.cos(t + 0.5)),
    "elasticface_cos": (ElasticFace, {"kind": "cos", "m": 0.35}, lambda t: math.cos(t) - 0.35),
    "elasticface_cos_plus": (ElasticFace, {"kind": "cos", "m": 0.35, "std": 0.025, "plus": True}, lambda t: math.cos(t) - 0.35),
    "curricularface": (CurricularFace, {}, lambda t: math.cos(t + 0.5)),
    "subcenter_arcface": (SubCenterArcFace, {}, lambda t: math.cos(t + 0.5)),
}
POLICIES = {"fixed": lambda: FixedScale(30.0), "auto": AutoScale, "auto_margin": AutoMarginScale, "dynamic": DynamicScale}


@pytest.mark.parametrize("name,policy", [(n, p) for n in NEW_HEADS for p in POLICIES])
def test_every_new_head_trains_with_every_scale_policy(name, policy):
    head_cls, kwargs, nominal = NEW_HEADS[name]
    classes = 10
    torch.manual_seed(0)
    head = MarginHead(DIM, classes, head_cls(**kwargs), POLICIES[policy]())
    expected_s = {
        "fixed": 30.0,
        "auto": math.sqrt(2) * math.log(classes - 1),
        "auto_margin": math.log(classes - 1) / nominal(math.pi / 4),
    }
    if policy in expected_s:
        assert head.scale.value == pytest.approx(expected_s[policy], rel=1e-12)
    for step in range(3):
        x = (torch.randn(8, DIM) * 6).requires_grad_()  # norms ~24: inside AdaFace's and MagFace's ranges
        labels = torch.randint(0, classes, (8,))
        head.centres.weight.grad = None
        loss, stats = head.loss(x, labels, statistics=True)
        loss.backward()
        assert torch.isfinite(loss), (step, loss)
        assert torch.isfinite(x.grad).all() and torch.isfinite(head.centres.weight.grad).all()
        assert all(torch.isfinite(value).all() for value in stats.values()), stats
        assert float(stats["s"]) == pytest.approx(head.scale.value) and head.scale.value > 0
        if policy in expected_s:
            assert head.scale.value == pytest.approx(expected_s[policy], rel=1e-12)


# ------------------------------------------------------------------------------ checkpoint round trip
STATEFUL = {
    "adaface": (lambda: MarginHead(DIM, CLASSES, AdaFace(), DynamicScale()), ("margin.batch_mean", "margin.batch_std")),
    "curricularface": (lambda: MarginHead(DIM, CLASSES, CurricularFace(), FixedScale(S)), ("margin.t",)),
    "elasticface_arc_plus": (lambda: MarginHead(DIM, CLASSES, ElasticFace(std=0.0175, plus=True, seed=3), FixedScale(S)), ("margin.step",)),
}


@pytest.mark.parametrize("name", STATEFUL)
def test_checkpoint_round_trip_keeps_the_head_state(name):
    build, buffers = STATEFUL[name]
    torch.manual_seed(0)
    batches = [(torch.randn(8, DIM) * 10, torch.randint(0, CLASSES, (8,))) for _ in range(3)]
    uninterrupted = build()
    initial = {key: value.clone() for key, value in uninterrupted.state_dict().items()}
    for x, labels in batches[:2]:
        uninterrupted.loss(x, labels)
    saved = io.BytesIO()
    torch.save(uninterrupted.state_dict(), saved)
    saved.seek(0)
    resumed = build()
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    for key in buffers:
        assert not torch.equal(uninterrupted.state_dict()[key], initial[key]), key  # the state moved
        assert torch.equal(resumed.state_dict()[key], uninterrupted.state_dict()[key]), key
    x, labels = batches[2]
    assert torch.equal(resumed.loss(x, labels)[0], uninterrupted.loss(x, labels)[0])
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


# ----------------------------------------------------------------------------------------- configs
NEW_CONFIGS = ["adaface", "magface", "elasticface_arc", "elasticface_cos", "curricularface", "subcenter_arcface"]


@pytest.mark.parametrize("name", NEW_CONFIGS)
def test_new_head_configs_build_and_train(name, tmp_path):
    cfg = compose_config([f"head={name}"], tmp_path)
    dense = build_module(cfg).head
    sharded = build_module(compose_config([f"head={name}", "sharding=partial_fc"], tmp_path)).head
    sampled = build_module(compose_config([f"head={name}", "sharding=partial_fc", "sharding.sample_rate=0.1"], tmp_path)).head
    assert type(dense.margin).__name__ == cfg.head._target_.rsplit(".", 1)[1]
    assert dense.num_classes == cfg.dataset.num_classes and dense.embedding_size == cfg.model.embedding_size
    assert isinstance(sharded.centres, PartialFC) and sampled.centres.sample_rate == 0.1
    sharded.load_state_dict(dense.state_dict())
    sampled.load_state_dict(dense.state_dict())
    torch.manual_seed(0)
    x = torch.randn(32, dense.embedding_size) * 6
    labels = torch.randint(0, dense.num_classes, (32,))
    dense_loss = dense.loss(x, labels)[0]
    assert torch.isfinite(dense_loss)
    torch.testing.assert_close(sharded.loss(x, labels)[0], dense_loss)  # sample_rate 1 on one process: the dense loss
    sampled_loss = sampled.loss(x, labels)[0]
    assert torch.isfinite(sampled_loss) and len(sampled.centres.sampled) == max(int(0.1 * dense.num_classes), len(labels))


def test_subcenter_arcface_sends_the_gradient_of_equal_centres_to_the_first():
    """Centres duplicated within a class (a K = 1 checkpoint repeated into K = 3) are at equal
    cosines: the gradient goes to the first of them, as torch.max's does, and not to all three (they
    would then move alike and stay equal for ever)."""
    angles = [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2, 0.5]
    single, x, labels = problem(angles, [4.0] * len(angles), seed=7)
    weight = single.repeat_interleave(3, dim=0)  # each class's centre three times
    head = float64_head(MarginHead(DIM, CLASSES, SubCenterArcFace(m=0.5, centres=3), FixedScale(S)), weight)

    def first_of_equal_centres(x, w, y):
        cos = (F.normalize(x) @ F.normalize(w).T).view(len(x), CLASSES, 3).max(dim=2).values
        target = cos.gather(1, y.view(-1, 1))
        logits = cos.scatter(1, y.view(-1, 1), torch.cos(target.clamp(-1, 1).acos() + 0.5))
        return F.cross_entropy(S * logits, y)

    ours = head_step(head, x, labels)
    assert_steps_equal(ours, reference_step(first_of_equal_centres, x, weight, labels))
    grad = ours[2].view(CLASSES, 3, DIM)
    assert grad[:, 0].abs().sum() > 0 and grad[:, 1:].abs().sum() == 0
