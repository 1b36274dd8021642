"""Scale policies: the auto scale's two criteria, the margin-aware variant, dynamic AdaCos
(hand-computed, checkpointed, synchronised over DDP) and every margin x policy from the configs."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT, TINY_RUN, column, compose_config, read_metrics, run_script
from facerec.heads import (
    ArcFace,
    AutoMarginScale,
    AutoScale,
    CombinedMargin,
    CosFace,
    DynamicScale,
    MarginHead,
    NormFace,
    SphereFace,
    auto_scale,
)
from facerec.training.fit import build_module

CASIA = 10_575
THETA0 = math.pi / 4
HEADS = [
    MarginHead(4, CASIA, NormFace(), AutoScale()),
    MarginHead(4, CASIA, CosFace(m=0.35), AutoScale()),
    MarginHead(4, CASIA, ArcFace(m=0.5), AutoScale()),
    MarginHead(4, CASIA, SphereFace(m1=1.35), AutoScale()),
    MarginHead(4, CASIA, CombinedMargin(), AutoScale()),
]


def target_probability(head, s: float, theta: torch.Tensor) -> torch.Tensor:
    """P(theta) = e^{s f} / (e^{s f} + C - 1), the other classes at 90 degrees."""
    return torch.sigmoid(s * head.margin.target_logit(torch.cos(theta)) - math.log(head.num_classes - 1))


@pytest.mark.parametrize("head", HEADS, ids=lambda h: type(h).__name__)
def test_half_criterion_puts_p_at_one_half_at_theta0(head):
    s = auto_scale(CASIA, THETA0, "half", head.margin.target_logit)
    theta0 = torch.tensor([THETA0], dtype=torch.float64)
    assert target_probability(head, s, theta0).item() == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("head", HEADS, ids=lambda h: type(h).__name__)
def test_inflection_criterion_makes_p_steepest_in_theta_at_theta0(head):
    s = auto_scale(CASIA, THETA0, "inflection", head.margin.target_logit)
    theta = torch.linspace(THETA0 - 0.3, THETA0 + 0.3, 60001, dtype=torch.float64)
    slope = -torch.diff(target_probability(head, s, theta))  # finite differences, independent of the solver
    steepest = (theta[:-1] + theta[1:])[slope.argmax()] / 2
    assert math.degrees(steepest.item()) == pytest.approx(45.0, abs=1e-3)
    assert s < auto_scale(CASIA, THETA0, "half", head.margin.target_logit)  # f'' < 0 at theta0 for all of these


def test_closed_forms_and_the_leads_numbers():
    log_others = math.log(CASIA - 1)
    assert auto_scale(CASIA, criterion="inflection") == pytest.approx(12.79, abs=5e-3)
    cosface = MarginHead(4, CASIA, CosFace(m=0.35), AutoMarginScale())
    assert cosface.scale.value == pytest.approx(log_others / (math.cos(THETA0) - 0.35))
    assert cosface.scale.value == pytest.approx(25.95, abs=5e-3)
    arcface = MarginHead(4, CASIA, ArcFace(m=0.5), AutoMarginScale())
    assert arcface.scale.value == pytest.approx(log_others / math.cos(THETA0 + 0.5))
    # the plain auto scale ignores the margin
    assert MarginHead(4, CASIA, CosFace(m=0.35), AutoScale()).scale.value == pytest.approx(13.104, abs=5e-4)


def test_plain_auto_scale_caps_cosface_below_one_half_beyond_m_0_293():
    # Even at theta = 0, P = sigmoid(s (1 - m) - ln(C - 1)) < 1/2 once (1 - m) sqrt(2) < 1.
    for m, capped in [(0.25, False), (0.35, True)]:
        head = MarginHead(4, CASIA, CosFace(m=m), AutoScale())
        p_best = target_probability(head, head.scale.value, torch.zeros(1, dtype=torch.float64)).item()
        assert (p_best < 0.5) == capped
    assert -math.log(p_best) == pytest.approx(1.14, abs=0.01)  # the loss floor at m = 0.35


def test_bad_scale_settings_fail_clearly():
    with pytest.raises(ValueError, match=r"f = -1.0000 <= 0 at theta0 = 45.0 deg"):
        MarginHead(4, CASIA, SphereFace(m1=4), AutoMarginScale())  # cos(4 * 45 deg) = -1
    with pytest.raises(ValueError, match="scale.criterion must be one of half, inflection; got 'steep'"):
        AutoScale(criterion="steep")
    with pytest.raises(ValueError, match=r"scale.theta0 must lie in \(0, pi/2\)"):
        DynamicScale(theta0=2.0)
    with pytest.raises(RuntimeError, match="not bound"):
        _ = AutoMarginScale().value


def unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def test_dynamic_scale_equals_a_hand_computed_value():
    centres = [0.0, 90.0, 180.0, 270.0]
    head = MarginHead(2, 4, CosFace(m=0.35), DynamicScale(max_scale=math.inf))  # the paper's rule, uncapped
    with torch.no_grad():
        head.centres.weight.copy_(torch.tensor([unit(a) for a in centres]))
    s = math.sqrt(2) * math.log(3)  # the initial s: the auto value for C = 4
    assert head.scale.value == pytest.approx(s)
    # batch 1: median target angle 10 deg < 45 deg; batch 2: 70 deg, capped at theta0 = 45 deg
    for angles, labels in [([10, 100, 200, 60, 275], [0, 1, 2, 0, 3]), ([70, 150, 260], [0, 1, 3])]:
        b = [
            sum(math.exp(s * math.cos(math.radians(a - c))) for j, c in enumerate(centres) if j != y)
            for a, y in zip(angles, labels)
        ]
        theta_med = sorted(abs(a - centres[y]) for a, y in zip(angles, labels))[len(angles) // 2]
        s = math.log(sum(b) / len(b)) / math.cos(math.radians(min(45.0, theta_med)))
        x, y = torch.tensor([unit(a) for a in angles]), torch.tensor(labels)
        loss, stats = head.loss(x, y, statistics=True)  # the training step moves s
        assert head.scale.value == pytest.approx(s, rel=1e-6)
        assert stats["s"].item() == head.scale.value
        torch.testing.assert_close(head(x), s * (x @ head.centres.weight.T))
        logits = head(x, y)  # at the new s: the one this batch's loss used
        torch.testing.assert_close(loss, F.cross_entropy(logits, y))
        assert loss.dtype == logits.dtype == torch.float32


def test_dynamic_scale_is_capped_where_the_uncapped_rule_runs_away():
    # Embeddings crowded together with the class centres (as early in training): every non-target
    # cosine is ~0.9 > cos(45 deg), so ln(B_avg) ~ ln(C-1) + 0.9 s and the paper's rule multiplies
    # s by ~0.9 / 0.71 each step. The default cap keeps it at the starting (auto) value.
    torch.manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(1, 8))
    x = direction + 0.05 * torch.randn(32, 8)
    labels = torch.randint(0, 100, (32,))
    uncapped, capped, capped_at_20 = (
        MarginHead(8, 100, CosFace(), DynamicScale(max_scale=cap)) for cap in (math.inf, None, 20.0)
    )
    start = math.sqrt(2) * math.log(99)
    for head in (uncapped, capped, capped_at_20):
        with torch.no_grad():
            head.centres.weight.copy_(direction + 0.05 * torch.randn(100, 8))
        for _ in range(10):
            head.loss(x, labels)
    assert uncapped.scale.value > 5 * start  # ~1.25x per step
    assert capped.scale.value == pytest.approx(start)
    assert capped_at_20.scale.value == pytest.approx(20.0)
    for bad in (0.0, ".inf"):  # ".inf" is YAML's spelling; Hydra's command line reads `inf`
        with pytest.raises(ValueError, match="scale.max_scale must be a number > 0"):
            DynamicScale(max_scale=bad)


def test_dynamic_scale_stays_finite_at_any_s_and_keeps_s_when_the_rule_has_none():
    torch.manual_seed(0)
    head = MarginHead(8, 1000, NormFace(), DynamicScale(max_scale=math.inf))
    head.scale.s.fill_(500.0)  # exp(500 cos) overflows float32; the log-sum-exp does not
    head.loss(torch.randn(32, 8), torch.randint(0, 1000, (32,)))
    assert math.isfinite(head.scale.value) and head.scale.value > 0
    # two classes, the other one at 180 deg: B_avg = e^{-s} < 1, ln(B_avg) < 0 -> s is kept
    tiny = MarginHead(2, 3, NormFace(), DynamicScale())
    with torch.no_grad():
        tiny.centres.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]]))
    before = tiny.scale.value
    tiny.loss(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    assert tiny.scale.value == before


def test_dynamic_scale_survives_a_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    head = MarginHead(8, 50, CosFace(), DynamicScale(max_scale=math.inf))
    x, labels = torch.randn(16, 8), torch.randint(0, 50, (16,))
    head.loss(x, labels)
    torch.save(head.state_dict(), tmp_path / "head.pt")
    restored = MarginHead(8, 50, CosFace(), DynamicScale(max_scale=math.inf))
    assert restored.scale.value != head.scale.value
    restored.load_state_dict(torch.load(tmp_path / "head.pt", weights_only=True))
    assert restored.scale.value == head.scale.value
    torch.testing.assert_close(restored(x, labels), head(x, labels))
    # and both take the same next step
    torch.testing.assert_close(restored.loss(x, labels)[0], head.loss(x, labels)[0])
    assert restored.scale.value == head.scale.value


def test_dynamic_scale_is_logged_and_checkpointed_by_train_py(tmp_path):
    # the cap raised from the starting value (its default), so s can move both ways here
    overrides = ["trainer.max_epochs=1", "scale=dynamic", "scale.max_scale=100", "logger=csv"]
    run_script(["train.py", *TINY_RUN, *overrides, f"hydra.run.dir={tmp_path}"])
    logged = column(read_metrics(tmp_path), "train/s")
    assert len(logged) == 10 and len(set(logged)) > 1  # one s per step, and it moves
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state["head.scale.s"].item() == pytest.approx(logged[-1], rel=1e-6)


@pytest.mark.slow  # three interpreters importing torch: ~35 s on a busy 2-core machine
def test_ddp_ranks_share_the_dynamic_scale_of_the_global_batch(tmp_path):
    script = REPO_ROOT / "tests" / "scripts" / "ddp_dynamic_scale.py"
    run_script([str(script), str(tmp_path)], timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # bit-identical on both ranks
    spec = importlib.util.spec_from_file_location("ddp_dynamic_scale", script)
    ddp_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ddp_script)
    head, x, labels = ddp_script.problem()
    # one process, the whole batch (DDP averages the two half-batch gradients: the same step)
    history = ddp_script.train(ddp_script.HeadLoss(head), head, x, labels)
    assert ranks[0]["steps"] == pytest.approx(history, rel=1e-5)
    assert len(set(history)) == len(history)  # s moved at every step
    # the statistics of a step are those of the global batch (s included)
    assert ranks[0]["statistics"] == pytest.approx(ddp_script.statistics(head, x, labels), rel=1e-5)


@pytest.mark.parametrize("scale", ["fixed", "fixed64", "auto", "auto_margin", "dynamic"])
@pytest.mark.parametrize("head", ["normface", "adacos", "cosface", "arcface", "sphereface", "combined"])
def test_every_margin_composes_with_every_scale_policy(head, scale, tmp_path):
    cfg = compose_config([*TINY_RUN, f"head={head}", f"scale={scale}"], tmp_path)
    module = build_module(cfg)
    labels = torch.arange(cfg.dataset.num_classes)
    embeddings = torch.randn(len(labels), cfg.model.embedding_size)
    logits = module.head(embeddings, labels)
    assert logits.shape == (len(labels), cfg.dataset.num_classes) and torch.isfinite(logits).all()
    s = module.head.scale.value
    assert s == {"fixed": 30.0, "fixed64": 64.0}.get(scale, s) and s > 0
    # the head's non-target logits are the scaled cosines: the margin and the policy compose
    cos = F.normalize(embeddings) @ F.normalize(module.head.centres.weight).T
    off_target = ~F.one_hot(labels, len(labels)).bool()
    torch.testing.assert_close(logits[off_target], s * cos[off_target])
    # the training path: these logits' cross-entropy (the dynamic s moves first: its own tests)
    loss = module.head.loss(embeddings, labels)[0]
    if scale == "dynamic":
        assert torch.isfinite(loss)
    else:
        torch.testing.assert_close(loss, F.cross_entropy(logits, labels))


def test_the_docs_table_is_the_scripts_output():
    table = run_script(["scripts/scale_table.py"]).stdout.strip()
    assert "| CASIA-WebFace | 10,575 | 13.10 / 12.79 | 25.95 / 25.64 |" in table
    assert table in (REPO_ROOT / "docs" / "research" / "scale.md").read_text()


def test_plot_script_writes_the_figure(tmp_path):
    run_script(["scripts/plot_scale.py", "--out", str(tmp_path / "p.png")])
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_script_runs_and_prints_ratios():
    out = run_script(["benchmarks/heads.py", "--batch", "8", "--dim", "16", "--classes", "50", "--repeats", "1"]).stdout
    assert "| nn.Linear + cross-entropy | " in out and "| adacos + dynamic | " in out and "1.00x" in out
