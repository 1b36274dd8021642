"""The class-sharded head (Partial FC's class centres): shard layout, one-process equivalence,
unbiased sampling for the sigmoid heads, and two gloo processes against the dense head in one
process on the same global batch (float64)."""
from __future__ import annotations

import sys
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT, compose_config, run_script
from facerec.heads import ArcFace, AutoScale, CosFace, DynamicScale, FixedScale, MarginHead, PartialFC, shard_range
from facerec.training.fit import build_module

sys.path.insert(0, str(REPO_ROOT / "tests" / "scripts"))
import ddp_partial_fc as script  # noqa: E402

TOL = 1e-10


@pytest.mark.parametrize("world_size", [1, 2, 3, 7, 8])
@pytest.mark.parametrize("num_classes", [2, 7, 16, 100_003])
def test_shards_cover_the_classes_once_and_differ_by_at_most_one(num_classes, world_size):
    layout = [shard_range(num_classes, world_size, rank) for rank in range(world_size)]
    assert [start for start, _ in layout] == [sum(count for _, count in layout[:rank]) for rank in range(world_size)]
    counts = [count for _, count in layout]
    assert sum(counts) == num_classes and max(counts) - min(counts) <= 1


@pytest.mark.parametrize("scale", [AutoScale, DynamicScale])
def test_in_one_process_it_computes_what_its_head_computes(scale):
    torch.manual_seed(0)
    sharded = MarginHead(8, 30, CosFace(m=0.35), scale(), centres=PartialFC)
    reference = MarginHead(8, 30, CosFace(m=0.35), scale())
    reference.load_state_dict(sharded.state_dict())
    assert sharded.shard() == []  # one process: nothing for DDP to ignore
    x = torch.randn(16, 8)
    labels = torch.randint(0, 30, (16,))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss, stats = sharded.loss(x1, labels, statistics=True)
    loss.backward()
    expected_loss, expected = reference.loss(x2, labels, statistics=True)
    expected_loss.backward()
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)
    torch.testing.assert_close(sharded.centres.weight.grad, reference.centres.weight.grad, rtol=0, atol=0)
    assert sharded.scale.value == reference.scale.value
    assert stats.keys() == expected.keys()
    for key in stats:
        torch.testing.assert_close(stats[key], expected[key], rtol=0, atol=0)
    torch.testing.assert_close(sharded(x), reference(x))  # no labels: scaled cosines, no margin
    torch.testing.assert_close(sharded(x, labels), reference(x, labels))  # one process: margin logits too


def test_in_one_process_sampling_keeps_every_positive_and_a_fixed_count():
    torch.manual_seed(0)
    head = MarginHead(8, 50, CosFace(), AutoScale(), centres=partial(PartialFC, sample_rate=0.1)).double()
    x = torch.randn(8, 8, dtype=torch.float64)
    labels = torch.tensor([3, 3, 7, 12, 40, 41, 41, 2])
    loss = head.loss(x, labels)[0]
    sampled = head.centres.sampled
    assert len(sampled) == max(int(0.1 * 50), len(labels))  # the batch size here: 8 classes
    assert set(labels.tolist()) <= set(sampled.tolist()) and torch.equal(sampled, sampled.sort().values)
    expected = dense_loss(head, head.centres.weight.detach()[sampled], x, torch.searchsorted(sampled, labels), head.scale.value)
    assert abs(loss.item() - expected.item()) < TOL


def test_in_one_process_sampling_gives_a_sigmoid_head_the_full_loss_on_average():
    # The mean of 500 independent draws is close to normal (each draw's loss sums the terms of ~35
    # drawn classes over 16 samples), its spread the draws' standard error: an unbiased estimate
    # lies within 5 of them but for a chance of ~6e-7 (the seeds fix the draws). The sampled classes
    # each counted once, as a head without the weights would count them, fall short of the full
    # loss by over 100 standard errors of their own: that check would catch the missing weights.
    x, labels = script.problem(200, 8, 16, seed=5)
    full = script.build_head("sphereface2", "auto", 200, 8)
    head = script.build_head("sphereface2", "auto", 200, 8, sample_rate=0.25)  # the same centres and bias
    weight, draws = head.centres.weight.detach(), 500
    weighted, unweighted = [], []
    with torch.no_grad():
        expected = full.loss(x, labels)[0]
        for draw in range(draws):
            torch.manual_seed(draw)
            weighted.append(head.loss(x, labels)[0])
            sampled = head.centres.sampled
            unweighted.append(binary_loss(head, weight[sampled], x, torch.searchsorted(sampled, labels), head.scale.value))
    assert len(sampled) == 50  # a quarter of the classes
    weighted, unweighted = torch.stack(weighted), torch.stack(unweighted)
    standard_error = weighted.std() / draws**0.5
    assert abs(weighted.mean() - expected) < 5 * standard_error
    assert expected - unweighted.mean() > 100 * unweighted.std() / draws**0.5


def test_checkpoints_are_those_of_an_unsharded_head():
    torch.manual_seed(0)
    keys = set(MarginHead(8, 30, CosFace(), DynamicScale()).state_dict())
    sharded = MarginHead(8, 30, CosFace(), DynamicScale(), centres=PartialFC)
    assert set(sharded.state_dict()) == keys
    other = MarginHead(8, 30, CosFace(), DynamicScale())
    other.load_state_dict(sharded.state_dict())
    sharded.load_state_dict(other.state_dict())


def test_bad_settings_are_named():
    for rate in (0, 1.5):
        with pytest.raises(ValueError, match=rf"sharding.sample_rate must lie in \(0, 1\], got {rate}"):
            MarginHead(8, 30, CosFace(), AutoScale(), centres=partial(PartialFC, sample_rate=rate))
    head = MarginHead(8, 30, CosFace(), AutoScale(), centres=PartialFC)
    with pytest.raises(ValueError, match=r"shape \(B, 8\)"):
        head.loss(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))


def test_the_sharding_config_enables_sharding_on_any_head(tmp_path):
    cfg = compose_config(["sharding=partial_fc", "sharding.sample_rate=0.2", "head=arcface", "scale=dynamic"], tmp_path)
    head = build_module(cfg).head
    assert isinstance(head.margin, ArcFace) and isinstance(head.centres, PartialFC) and head.centres.sample_rate == 0.2
    assert head.num_classes == cfg.dataset.num_classes and isinstance(head.scale, DynamicScale)
    assert "PartialFC(num_classes=500, centres_per_class=1, embedding_size=128, sample_rate=0.2" in repr(head)


# ------------------------------------------------------------- two processes
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("partial_fc")
    run_script([str(REPO_ROOT / "tests" / "scripts" / "ddp_partial_fc.py"), str(out)], timeout=300)
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(script.WORLD_SIZE)], out


def dense_loss(head, weight, x, labels, s):
    """A classic head's unsharded loss over the centres `weight`, in float64 autograd ops."""
    cos = F.normalize(x) @ F.normalize(weight).T
    target = cos.gather(1, labels.view(-1, 1)).squeeze(1)
    return F.cross_entropy(cos.scatter(1, labels.view(-1, 1), head.margin.target_logit(target).view(-1, 1)) * s, labels)


def binary_loss(head, weight, x, labels, s, column_weights=None):
    """A sigmoid head's one-vs-all loss over the centres `weight`, in float64 autograd ops: kappa times
    the batch mean of w+ softplus(-z_iy) + w- sum_{j != y_i} c_j softplus(z_ij), c_j the columns'
    weights (1 where None)."""
    margin = head.margin
    z = margin.logits(F.normalize(x) @ F.normalize(weight).T, labels.view(-1, 1), None, s)
    own = F.one_hot(labels, len(weight)).bool()
    minus_log_p = torch.logaddexp(torch.zeros_like(z), torch.where(own, -z, z))  # softplus, exact at any z
    c = torch.ones(len(weight), dtype=x.dtype) if column_weights is None else column_weights
    side = torch.where(own, margin.positive_weight, margin.negative_weight * c)
    return margin.loss_factor(s) * (side * minus_log_p).sum(dim=1).mean()


def dense_step(name: str, scale: str, s: float | None = None, problem: tuple[torch.Tensor, torch.Tensor] | None = None):
    """The dense head in one process, one step of `head.loss` on the global batch: (head after the
    step, loss, statistics, embedding gradient, regulariser). `s`: run it at that fixed s instead;
    `problem`: that (embeddings, labels) instead of the heads' shared one."""
    head = script.build_head(name, scale, 7, 5)
    if s is not None:
        head.scale = FixedScale(s)
        head.scale.bind(head.num_classes, head.margin)
    x, labels = problem or script.problem(7, 5, script.BATCH, seed=0)
    x = x.clone().requires_grad_()
    loss, stats = head.loss(x, labels, statistics=True)
    loss.backward()
    regulariser = head.margin.regulariser(x.detach().norm(dim=1))
    return head, loss, stats, x.grad, 0.0 if regulariser is None else regulariser.item()


@pytest.mark.parametrize("scale", list(script.SCALES))
@pytest.mark.parametrize("name", list(script.HEADS))
def test_two_ranks_give_the_dense_loss_gradients_statistics_and_state(ranks, name, scale):
    results = [rank["heads"][f"{name}/{scale}"] for rank in ranks[0]]
    dense = dense_step(name, scale)
    # the state after the step (dynamic s, AdaFace's EMA, ElasticFace's step, CurricularFace's t):
    # the same on both ranks, and the dense head's
    for key, value in dense[0].named_buffers():
        assert torch.equal(results[0]["buffers"][key], results[1]["buffers"][key]), key
        if key == "scale.s":  # float32 statistics (the project's rule): s agrees to float32 precision
            assert results[0]["buffers"][key].item() == pytest.approx(value.item(), rel=1e-6)
        else:
            torch.testing.assert_close(results[0]["buffers"][key], value, rtol=0, atol=TOL, msg=key)
    assert results[0]["s"].item() == results[1]["s"].item()
    if scale == "dynamic":  # given the s the ranks used, everything else agrees to float64 precision
        dense = dense_step(name, scale, s=results[0]["s"].item())
    head, loss, stats, grad_x, regulariser = dense
    assert results[0]["s"].item() == head.scale.value
    for result in results:
        # the cross-entropy is the global batch's on every rank; MagFace adds its rank's regulariser
        assert abs(result["loss"].item() - result["regulariser"].item() - (loss.item() - regulariser)) < TOL
        torch.testing.assert_close(result["grad_weight"], head.centres.weight.grad, rtol=0, atol=TOL)
        assert result["statistics"].keys() == stats.keys()
        for key, value in stats.items():
            torch.testing.assert_close(result["statistics"][key].double(), value.double(), rtol=0, atol=TOL, msg=key)
    assert abs(sum(result["loss"].item() for result in results) / script.WORLD_SIZE - loss.item()) < TOL
    # each rank's embeddings get R x dL/dx (DDP divides the backbone's gradients by R)
    torch.testing.assert_close(torch.cat([r["grad_x"] for r in results]) / script.WORLD_SIZE, grad_x, rtol=0, atol=TOL)
    x = script.problem(7, 5, script.BATCH, seed=0)[0]
    torch.testing.assert_close(torch.cat([r["cosine"] for r in results]), head.cosine(x), rtol=0, atol=TOL)


@pytest.mark.parametrize("scale", script.BINARY_SCALES)
@pytest.mark.parametrize("name", list(script.BINARY_HEADS))
def test_two_ranks_give_a_sigmoid_head_s_dense_loss_gradients_and_bias_gradient(ranks, name, scale):
    results = [rank["binary"][f"{name}/{scale}"] for rank in ranks[0]]
    x, labels = script.binary_problem()
    head, loss, stats, grad_x, _ = dense_step(name, scale, problem=(x, labels))
    # neither all answers certain nor all hopeless: P(target) between 1% and 99% for some samples
    with torch.no_grad():
        p_target = torch.sigmoid(head(x, labels).gather(1, labels.view(-1, 1)))
    assert ((p_target > 0.01) & (p_target < 0.99)).sum() >= 2
    # the dense head computes the one-vs-all loss and its bias gradient
    reference = binary_loss(head, head.centres.weight, x, labels, head.scale.value)
    assert abs(reference.item() - loss.item()) < TOL
    assert abs(torch.autograd.grad(reference, head.margin.bias)[0].item() - head.margin.bias.grad.item()) < TOL
    for result in results:
        assert result["s"].item() == head.scale.value and result["bias"].item() == head.margin.bias.item()
        assert abs(result["loss"].item() - loss.item()) < TOL  # the global batch's on every rank
        # the bias's full gradient on every rank (its negative part summed over the shards), which
        # DDP's average then leaves as it is
        assert abs(result["grad_bias"].item() - head.margin.bias.grad.item()) < TOL
        torch.testing.assert_close(result["grad_weight"], head.centres.weight.grad, rtol=0, atol=TOL)
        assert result["statistics"].keys() == stats.keys() >= {"bias", "threshold", "p_target"}
        for key, value in stats.items():
            torch.testing.assert_close(result["statistics"][key].double(), value.double(), rtol=0, atol=TOL, msg=key)
    torch.testing.assert_close(torch.cat([r["grad_x"] for r in results]) / script.WORLD_SIZE, grad_x, rtol=0, atol=TOL)
    torch.testing.assert_close(torch.cat([r["cosine"] for r in results]), head.cosine(x), rtol=0, atol=TOL)


def test_a_sharded_head_leaves_its_rows_out_of_ddp_and_refuses_the_logits_path(ranks):
    for rank in ranks[0]:
        assert rank["shard"]["ignored"] == ["centres.weight"]
        assert "MarginHead is class-sharded: call head.loss(embeddings, labels)" in rank["shard"]["refusal"]


def test_a_sharded_head_gives_its_cosines_with_grad_mode_on(ranks):
    # inference outside no_grad (the centres require grad) must not break the collective
    assert [rank["inference_with_grad"] for rank in ranks[0]] == ["", ""]


def assert_ddp_gives_the_dense_gradients(results: list[dict], model) -> None:
    """Every parameter's gradient on every rank after DDP is the dense model's on the global batch."""
    model(*script.ddp_problem()).backward()  # one process, the global batch: the dense head
    for result in results:
        assert result.keys() == {key for key, _ in model.named_parameters()}
        for key, parameter in model.named_parameters():
            torch.testing.assert_close(result[key], parameter.grad, rtol=0, atol=TOL, msg=key)


def test_under_ddp_the_backbone_gets_the_gradient_of_the_global_batch(ranks):
    model = script.ddp_model("magface")
    norms = model.backbone(script.ddp_problem()[0]).norm(dim=1)
    margin = model.head.margin
    assert ((norms > margin.l_a) & (norms < margin.u_a)).sum() >= script.BATCH // 2  # MagFace's magnitude moves
    assert_ddp_gives_the_dense_gradients([rank["ddp"] for rank in ranks[0]], model)


def test_under_ddp_a_sigmoid_head_s_bias_gets_the_gradient_of_the_global_batch(ranks):
    # the bias stays in DDP's all-reduce: each rank holds the full gradient, and their average is it
    model = script.ddp_model("uniface")
    assert_ddp_gives_the_dense_gradients([rank["binary_ddp"] for rank in ranks[0]], model)
    assert abs(model.head.margin.bias.grad.item()) > 0.01  # not a vanishing gradient that any sum would match


def test_sampling_keeps_every_positive_class_and_a_fixed_count(ranks):
    x, labels = script.problem(40, 6, 12, seed=4)
    results = [rank["sampled"] for rank in ranks[0]]
    for rank, result in enumerate(results):
        start, count = shard_range(40, script.WORLD_SIZE, rank)
        positives = {c for c in labels.tolist() if start <= c < start + count}
        sampled = set(result["sampled"].tolist())
        assert positives <= sampled <= set(range(start, start + count))
        # max(rate x shard, global batch) classes, capped at the shard: no count of the positives
        assert len(sampled) == min(count, max(int(script.SAMPLE_RATE * count), len(labels))) < count
    # the loss is the dense one over the sampled classes only
    sampled = torch.cat([result["sampled"] for result in results])
    head = script.build_head("cosface", "auto", 40, 6)
    remapped = torch.searchsorted(sampled, labels)
    expected = dense_loss(head, head.centres.weight.detach()[sampled], x, remapped, head.scale.value)
    for result in results:
        assert abs(result["loss"].item() - expected.item()) < TOL


def test_sampled_sigmoid_losses_weight_each_drawn_class_by_its_inverse_chance(ranks):
    x, labels = script.problem(40, 6, 12, seed=4)
    results = [rank["binary_sampled"] for rank in ranks[0]]
    for rank, result in enumerate(results):
        count = shard_range(40, script.WORLD_SIZE, rank)[1]
        positive = torch.isin(result["sampled"], labels)
        keep, positives = len(positive), positive.sum().item()
        assert positives < keep < count  # drawn classes, and classes left out
        # each of the count - positives others is drawn with chance (keep - positives) / (count - positives)
        expected = torch.where(positive, 1.0, torch.tensor((count - positives) / (keep - positives), dtype=torch.float64))
        torch.testing.assert_close(result["weights"], expected, rtol=0, atol=TOL)
    # the loss is the dense one over the sampled classes, the drawn ones weighted
    sampled = torch.cat([result["sampled"] for result in results])
    head = script.build_head("uniface_mb", "auto", 40, 6)
    weights = torch.cat([result["weights"] for result in results])
    expected = binary_loss(head, head.centres.weight.detach()[sampled], x, torch.searchsorted(sampled, labels), head.scale.value, weights)
    for result in results:
        assert abs(result["loss"].item() - expected.item()) < TOL


def test_a_two_rank_checkpoint_resumes_on_one_rank(ranks):
    results, out = ranks
    checkpoint = torch.load(out / "resume.ckpt", weights_only=True)
    head, batches, x_eval = script.resume_problem()
    head.load_state_dict(checkpoint["state_dict"])
    assert head.margin.t.item() != 0  # CurricularFace's t came with the checkpoint
    optimizer = script.sgd(head)
    head.shard_optimizer_state(checkpoint["optimizer_states"], param_index=0)
    optimizer.load_state_dict(checkpoint["optimizer_states"][0])
    logits = torch.cat([rank["resume"]["logits"] for rank in results])
    torch.testing.assert_close(head(x_eval), logits, rtol=0, atol=TOL)
    script.step(head, optimizer, *batches[2])  # the momentum was re-sharded too
    for rank, result in enumerate(results):
        after = result["resume"]["state_after_step"]
        assert after.keys() == head.state_dict().keys()
        for key, value in head.state_dict().items():
            if key == "centres.weight":  # the full rows on rank 0, which writes checkpoints; its own rows elsewhere
                start, count = shard_range(head.num_classes, script.WORLD_SIZE, rank) if rank else (0, head.num_classes)
                value = value[start : start + count]
            torch.testing.assert_close(value, after[key], rtol=0, atol=TOL, msg=key)
