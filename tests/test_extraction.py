"""Embedding extraction (flip test, batching, bf16) and the EvaluationMetric (validation's scoring
path), single- and multi-process, for protocols of every kind."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import REPO_ROOT, evaluate_set, run_script
from facerec.backbones import build
from facerec.data import SyntheticPairs
from facerec.evaluation import EvaluationMetric, PairVerification, embed, extract_embeddings

sys.path.insert(0, str(REPO_ROOT / "tests" / "scripts"))
from ddp_evaluation_metric import protocols_and_backbones  # noqa: E402


@pytest.fixture(scope="module")
def small_set():
    return SyntheticPairs(num_identities=10, images_per_identity=4, num_pairs=40, image_size=32)


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return build("tiny", width=4, input_size=32).eval()


def test_flip_modes(backbone, small_set):
    images = torch.stack([small_set[i][0] for i in range(6)])
    with torch.no_grad():
        plain, flipped = backbone(images), backbone(images.flip(-1))
        torch.testing.assert_close(embed(backbone, images, "none"), plain)
        torch.testing.assert_close(embed(backbone, images, "sum"), plain + flipped)
        torch.testing.assert_close(embed(backbone, images, "concat"), torch.cat([plain, flipped], 1))
    with pytest.raises(ValueError, match=r"flip must be one of \('sum', 'concat', 'none'\), got 'mean'"):
        embed(backbone, images, "mean")


def test_extraction_is_in_index_order_whatever_the_loader_order(backbone, small_set):
    expected = torch.stack([embed(backbone, small_set[i][0][None]).squeeze(0) for i in range(len(small_set))])
    torch.testing.assert_close(extract_embeddings(backbone, small_set, batch_size=7), expected.detach())
    shuffled = DataLoader(small_set, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(extract_embeddings(backbone, shuffled), expected.detach())
    assert extract_embeddings(backbone, small_set, flip="concat").shape == (40, 256)


def test_bf16_embeddings_are_close_to_float32(backbone, small_set):
    backbone.train()  # extraction runs in eval mode and restores the mode it found
    full = extract_embeddings(backbone, small_set)
    half = extract_embeddings(backbone, small_set, bf16=True)
    assert backbone.training
    backbone.eval()
    assert half.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(full, half)
    assert cosine.min() > 0.99


def test_missing_and_nan_embeddings_are_reported(backbone, small_set):
    with pytest.raises(ValueError, match=r"2 of 40 images were never embedded \(first: \[38, 39\]\)"):
        extract_embeddings(backbone, DataLoader(small_set, batch_size=8, sampler=range(38)))  # a loader that stops short

    class NaNOnSomeImages(torch.nn.Module):
        def forward(self, x):
            out = x.flatten(1)[:, :8].clone()
            out[x[:, 0, 0, 0] > 0.5] = float("nan")
            return out

    with pytest.raises(ValueError, match=r"non-finite \(NaN/inf\) embeddings for \d+ of 40 images"):
        extract_embeddings(NaNOnSomeImages(), small_set, device="cpu")


def test_metric_with_repeated_shuffled_rows_equals_evaluate_set(backbone, small_set):
    expected = evaluate_set(backbone, PairVerification(small_set), batch_size=16).result
    table = extract_embeddings(backbone, small_set)
    metric = EvaluationMetric(PairVerification(small_set))
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    order = torch.cat([order, order[:3]])  # a padded shard repeats images
    for chunk in order.split(8):
        metric.update(table[chunk], chunk)
    result = metric.compute().result
    assert result.fold_accuracies == expected.fold_accuracies and result.auc == expected.auc
    metric.reset()
    metric.update(table[:30], torch.arange(30))
    with pytest.raises(ValueError, match="10 of 40 images were never embedded"):
        metric.compute()


def test_two_gloo_processes_gather_before_scoring(tmp_path, ijb_fixture):
    """Each of 2 ranks embeds its DistributedSampler shard of pairs, IJB templates and IJB 1:N images
    (padded: 2 x 53 rows for the pair set's 105 images); both report exactly the single-process result."""
    run_script([str(REPO_ROOT / "tests" / "scripts" / "ddp_evaluation_metric.py"), str(tmp_path), str(ijb_fixture)], timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    embedded = [r["pairs"]["embedded"] for r in ranks]
    assert [len(e) for e in embedded] == [53, 53]
    assert sorted(set(embedded[0]) | set(embedded[1])) == list(range(105))
    assert len(set(embedded[0]) & set(embedded[1])) == 1  # the padding repeats one image on the other rank

    for name, (protocol, backbone) in protocols_and_backbones(str(ijb_fixture)).items():
        single = evaluate_set(backbone, protocol, flip="sum")
        expected = {**single.result.summary(), "embedding_norm": single.norms.mean}
        images = len(protocol.image_set())
        for rank in ranks:
            assert sorted(set(ranks[0][name]["embedded"]) | set(ranks[1][name]["embedded"])) == list(range(images))
            assert rank[name]["summary"].keys() == expected.keys(), name
            for key, value in expected.items():  # float32 embeddings, summed in another order: scores to ~1e-7
                assert rank[name]["summary"][key] == pytest.approx(value, abs=1e-6), (name, key)
