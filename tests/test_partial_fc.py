"""The class-sharded head (Partial FC): shard layout, single-process equivalence, and two gloo
processes against dense float64 references on the same global batch."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT, compose_config, run_script
from facerec.heads import AutoScale, CosFace, DynamicScale, PartialFC, ScalePolicy, angular_statistics, shard_range
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
    head = CosFace(8, 30, scale=scale(), m=0.35)
    reference = CosFace(8, 30, scale=scale(), m=0.35)
    reference.load_state_dict(head.state_dict())
    sharded = PartialFC(head)
    x = torch.randn(16, 8)
    labels = torch.randint(0, 30, (16,))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss, stats = sharded.loss(x1, labels, statistics=True)
    loss.backward()
    logits = reference(x2, labels)
    F.cross_entropy(logits, labels).backward()
    expected = angular_statistics(logits, labels, reference.target_cosine(x2, labels), reference.scale.value)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(sharded.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-6)
    assert sharded.scale.value == pytest.approx(reference.scale.value, rel=1e-6)
    assert stats.keys() == expected.keys()
    for key in stats:
        torch.testing.assert_close(stats[key], expected[key], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sharded(x), reference(x))  # no labels: scaled cosines, no margin


def test_checkpoints_are_those_of_an_unsharded_head():
    torch.manual_seed(0)
    head = CosFace(8, 30, scale=DynamicScale())
    keys = set(head.state_dict())
    sharded = PartialFC(head)
    assert set(sharded.state_dict()) == keys
    other = CosFace(8, 30, scale=DynamicScale())
    other.load_state_dict(sharded.state_dict())
    sharded.load_state_dict(other.state_dict())


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="sample_rate"):
        PartialFC(CosFace(8, 30, scale=AutoScale()), sample_rate=0)

    class PerBatch(ScalePolicy):
        value = 30.0

        def forward(self, cosine, target_cosine, labels):
            return cosine.max()

    with pytest.raises(TypeError, match="PerBatch adapts s to each batch"):
        PartialFC(CosFace(8, 30, scale=PerBatch()))
    head = PartialFC(CosFace(8, 30, scale=AutoScale()))
    with pytest.raises(TypeError, match=r"head.loss\(embeddings, labels\)"):
        head(torch.randn(4, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(B, 8\)"):
        head.loss(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))


def test_the_sharding_config_wraps_any_head(tmp_path):
    cfg = compose_config(["sharding=partial_fc", "sharding.sample_rate=0.2", "head=arcface", "scale=dynamic"], tmp_path)
    head = build_module(cfg).head
    assert isinstance(head, PartialFC) and head.sample_rate == 0.2 and head.num_classes == cfg.dataset.num_classes
    assert "ArcFace" in repr(head) and isinstance(head.scale, DynamicScale)


# ------------------------------------------------------------- two processes
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("partial_fc")
    run_script([str(REPO_ROOT / "tests" / "scripts" / "ddp_partial_fc.py"), str(out)], timeout=300)
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(script.WORLD_SIZE)], out


def dense_loss(head, weight, x, labels, s):
    """The unsharded head's loss, in float64 autograd ops."""
    cos = F.normalize(x) @ F.normalize(weight).T
    target = cos.gather(1, labels.view(-1, 1)).squeeze(1)
    return F.cross_entropy(cos.scatter(1, labels.view(-1, 1), head.target_logit(target).view(-1, 1)) * s, labels)


@pytest.mark.parametrize("scale", list(script.SCALES))
@pytest.mark.parametrize("margin", list(script.MARGINS))
def test_two_ranks_give_the_unsharded_loss_and_gradients(ranks, margin, scale):
    results = [rank["heads"][f"{margin}/{scale}"] for rank in ranks[0]]
    head = script.build_head(margin, scale, 7, 5)
    x, labels = script.problem(7, 5, sum(script.UNEVEN), seed=0)
    x.requires_grad_()
    weight = head.weight.detach().clone().requires_grad_()
    s = head.scale.value
    if scale == "dynamic":  # float32 statistics (the project's rule): s agrees to float32 precision
        with torch.no_grad():
            cos = F.normalize(x) @ F.normalize(weight).T
            s = float(head.scale(cos, cos.gather(1, labels.view(-1, 1)).squeeze(1), labels))
        assert results[0]["s"].item() == pytest.approx(s, rel=1e-6)
        s = results[0]["s"].item()  # given s, everything else must agree to float64 precision
    loss = dense_loss(head, weight, x, labels, s)
    loss.backward()
    for result in results:
        assert result["s"].item() == results[0]["s"].item()
        assert abs(result["loss"].item() - loss.item()) < TOL
        torch.testing.assert_close(result["grad_weight"], weight.grad, rtol=0, atol=TOL)
    # each rank's embeddings get R x dL/dx (DDP divides the backbone's gradients by R)
    grad_x = torch.cat([result["grad_x"] for result in results]) / script.WORLD_SIZE
    torch.testing.assert_close(grad_x, x.grad, rtol=0, atol=TOL)


def test_under_ddp_the_backbone_gets_the_gradient_of_the_global_batch(ranks):
    model = script.ddp_model()
    images = script.problem(7, 3, sum(script.UNEVEN), seed=3)[0]
    labels = script.problem(7, 5, sum(script.UNEVEN), seed=0)[1]
    weight = model.head.weight
    dense_loss(model.head, weight, model.backbone(images), labels, model.head.scale.value).backward()
    for rank in ranks[0]:
        torch.testing.assert_close(rank["ddp"]["grad_backbone"], model.backbone.weight.grad, rtol=0, atol=TOL)
        torch.testing.assert_close(rank["ddp"]["grad_weight"], weight.grad, rtol=0, atol=TOL)


def test_sampling_keeps_every_positive_class(ranks):
    x, labels = script.problem(40, 6, 12, seed=4)
    results = [rank["sampled"] for rank in ranks[0]]
    for rank, result in enumerate(results):
        start, count = shard_range(40, script.WORLD_SIZE, rank)
        positives = {c for c in labels.tolist() if start <= c < start + count}
        sampled = set(result["sampled"].tolist())
        assert positives <= sampled <= set(range(start, start + count))
        assert len(sampled) == max(int(script.SAMPLE_RATE * count), len(positives)) < count
    # the loss is the dense one over the sampled classes only
    sampled = torch.cat([result["sampled"] for result in results])
    head = script.build_head("cosface", "auto", 40, 6)
    remapped = torch.searchsorted(sampled, labels)
    expected = dense_loss(head, head.weight.detach()[sampled], x, remapped, head.scale.value)
    for result in results:
        assert abs(result["loss"].item() - expected.item()) < TOL


def test_a_two_rank_checkpoint_resumes_on_one_rank(ranks):
    results, out = ranks
    checkpoint = torch.load(out / "resume.ckpt", weights_only=True)
    head, batches, x_eval = script.resume_problem()
    head.load_state_dict(checkpoint["state_dict"])
    optimizer = script.sgd(head)
    head.shard_optimizer_state(checkpoint["optimizer_states"], param_index=0)
    optimizer.load_state_dict(checkpoint["optimizer_states"][0])
    logits = torch.cat([rank["resume"]["logits"] for rank in results])
    torch.testing.assert_close(head(x_eval), logits, rtol=0, atol=TOL)
    script.step(head, optimizer, *batches[2])  # the momentum was re-sharded too
    for rank in results:
        torch.testing.assert_close(head.weight.detach(), rank["resume"]["weight_after_step"], rtol=0, atol=TOL)
