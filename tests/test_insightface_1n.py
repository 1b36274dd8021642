"""IJB 1:N by insightface's convention (facerec.evaluation.insightface_1n, IjbIdentification(convention=...))
against a plain re-implementation of insightface's recognition/_evaluation_/ijb/ijb_1n.py."""
from __future__ import annotations

import heapq
import math
import shutil

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from facerec.evaluation import IdentificationResult, IjbIdentification, MultiGalleryResult, insightface_1n, pool_templates
from facerec.evaluation.insightface_1n import insightface_identify
from facerec.paths import REPO_ROOT
from facerec.tools.make_fixture import make_ijb_fixture


def ijb_1n_reference(probe_feats, probe_ids, gallery_feats, gallery_ids, ranks, fars):
    """ijb_1n.py's `gen_mask` and `evaluation`, step by step: normalised templates (as its
    image2template_feature returns them), a full argsort per probe for top-k, the mate's score set
    aside, the ceil(P * FAR)-th largest remaining score as threshold, mate scores strictly above it."""
    query = probe_feats / np.sqrt(np.sum(probe_feats**2, -1, keepdims=True))
    gallery = gallery_feats / np.sqrt(np.sum(gallery_feats**2, -1, keepdims=True))
    mask = []
    for query_id in probe_ids:
        pos = [i for i, x in enumerate(gallery_ids) if query_id == x]
        assert len(pos) == 1
        mask.append(pos[0])
    query_num = len(query)
    similarity = np.dot(query, gallery.T)
    top_inds = np.argsort(-similarity)
    topk = {k: sum(mask[i] in top_inds[i, 0:k] for i in range(query_num)) / query_num for k in ranks}
    required_topk = [math.ceil(query_num * x) for x in fars]
    top_sims = similarity.copy()
    pos_sims = []
    for i in range(query_num):
        pos_sims.append(top_sims[i, mask[i]])
        top_sims[i, mask[i]] = -2.0
    pos_sims = np.array(pos_sims)
    neg_sims = heapq.nlargest(max(required_topk), top_sims[np.where(top_sims > -2.0)])
    thresholds = {far: neg_sims[k - 1] for far, k in zip(fars, required_topk)}
    tpir = {far: np.sum(pos_sims > thresholds[far]) / query_num for far in fars}
    return topk, tpir, thresholds


def closed_set(rng, subjects=120, probes=400, dim=24, noise=1.0):
    """One gallery template per subject (ids shuffled, not sorted); probes of random gallery subjects, un-normalised."""
    centres = rng.standard_normal((subjects, dim))
    gallery_ids = rng.permutation(subjects) + 1000
    gallery = centres + noise * rng.standard_normal((subjects, dim))
    pick = rng.integers(0, subjects, size=probes)
    probe_feats = (centres[pick] + noise * rng.standard_normal((probes, dim))) * rng.uniform(0.5, 3, size=(probes, 1))
    return gallery, gallery_ids, probe_feats, gallery_ids[pick]


def test_insightface_rule_matches_ijb_1n_py(monkeypatch):
    monkeypatch.setattr(insightface_1n, "BLOCK_SCORES", 4 * 120 * 7)  # blocks of 7 probes: the running top-k merges
    gallery, gallery_ids, probes, probe_ids = closed_set(np.random.default_rng(0))
    ranks, fars = (1, 5, 10), (0.01, 0.07, 0.1, 0.3)  # 400 * 0.07 = 28.000000000000004: ceil gives 29, as in ijb_1n.py
    topk, tpir, thresholds = ijb_1n_reference(probes, probe_ids, gallery, gallery_ids, ranks, fars)
    result = insightface_identify(gallery, gallery_ids, probes, probe_ids, ranks=ranks, fpirs=fars, gallery_name="merged")

    assert 0.2 < topk[1] < 0.9 and topk[10] > topk[1] and 0 < tpir[0.01] < tpir[0.3] < 1  # nothing trivial
    assert result.cmc == pytest.approx(topk, abs=0)
    assert result.thresholds == pytest.approx(thresholds, rel=1e-12)
    assert result.tpir_at_fpir == pytest.approx(tpir, abs=0)
    assert isinstance(result, IdentificationResult) and result.gallery == "merged"
    assert (result.num_mated, result.num_non_mated, result.gallery_size, result.num_gallery_ids) == (400, 0, 120, 120)
    assert "ceil(FPIR x 400)-th highest of the 47600 probe-to-non-mate template scores" in result.notes[0]
    kind, curve_ranks, rates = result.curve()
    assert kind == "cmc" and rates[[0, 4, 9]] == pytest.approx([topk[r] for r in ranks])


def test_insightface_rule_is_closed_set():
    gallery, probes = np.eye(3), np.eye(3)[[0, 1]]
    with pytest.raises(ValueError, match="closed-set with one gallery template per subject.*subject 9 with 0 gallery"):
        insightface_identify(gallery, [1, 2, 3], probes, [1, 9])
    with pytest.raises(ValueError, match="subject 2 with 2 gallery templates"):
        insightface_identify(gallery, [1, 2, 2], probes, [1, 2])


@pytest.fixture(scope="module")
def ijb_root(tmp_path_factory, shared_data):
    return make_ijb_fixture(tmp_path_factory.mktemp("ijb_insightface"), "IJBC")


def test_ijb_fixture_by_both_conventions(ijb_root):
    config = OmegaConf.load(REPO_ROOT / "conf" / "evalset" / "ijbc_fixture_1n.yaml")
    config.root = str(ijb_root)
    assert config.convention == "nist"
    nist = instantiate(config)
    insightface = instantiate(OmegaConf.merge(config, {"convention": "insightface"}))
    assert OmegaConf.load(REPO_ROOT / "conf" / "evalset" / "ijbc_1n.yaml").convention == "nist"

    # Image features with subject structure: a centre per subject plus noise, so the ranks are not all chance.
    meta, sets = insightface.meta, insightface.sets
    subject_of = {int(t): int(s) for ids, subjects in sets.values() for t, s in zip(ids, subjects)}
    rng = np.random.default_rng(0)
    centres = {s: rng.standard_normal(16) for s in set(subject_of.values())}
    features = np.stack([centres[subject_of[int(t)]] + 1.5 * rng.standard_normal(16) for t in meta.templates])
    result = insightface.score(features.astype(np.float32))

    # The reference pools with the same code (pooling is not what the convention changes) and merges the
    # galleries from the csv files as ijb_1n.py reads them.
    template_ids, pooled = pool_templates(features.astype(np.float32), meta.templates, meta.medias, **insightface.pooling())

    def read_csv(part):
        table = np.loadtxt(ijb_root / "meta" / f"ijbc_1N_{part}.csv", dtype=str, skiprows=1, delimiter=",")
        return table[:, 0].astype(int), table[:, 1].astype(int)

    g1, g2, probe = read_csv("gallery_G1"), read_csv("gallery_G2"), read_csv("probe_mixed")
    gallery_templates, first = np.unique(np.r_[g1[0], g2[0]], return_index=True)
    gallery_subjects = np.r_[g1[1], g2[1]][first]
    probe_templates, first = np.unique(probe[0], return_index=True)
    probe_subjects = probe[1][first]
    topk, tpir, thresholds = ijb_1n_reference(
        pooled[np.searchsorted(template_ids, probe_templates)], probe_subjects,
        pooled[np.searchsorted(template_ids, gallery_templates)], gallery_subjects, (1, 5, 10), (0.01, 0.1),
    )  # fmt: skip
    assert (result.num_mated, result.gallery_size) == (40, 20)
    assert {r: result.cmc[r] for r in (1, 5, 10)} == pytest.approx(topk, abs=0)
    assert {f: result.tpir_at_fpir[f] for f in (0.01, 0.1)} == pytest.approx(tpir, abs=0)
    assert {f: result.thresholds[f] for f in (0.01, 0.1)} == pytest.approx(thresholds, rel=1e-12)
    assert 0 < topk[1] < 1
    assert result.table_row()["gallery"] == result.to_dict()["gallery"] == "G1+G2 merged (insightface)"

    by_nist = nist.score(features.astype(np.float32))
    assert isinstance(by_nist, MultiGalleryResult) and by_nist.table_row()["gallery"] == "mean of G1, G2"
    assert by_nist.galleries["G1"].num_non_mated == 20  # each gallery alone is open-set


def test_convention_is_checked(ijb_root, tmp_path):
    with pytest.raises(ValueError, match=r"convention must be one of \('nist', 'insightface'\), got 'arcface'"):
        IjbIdentification(ijb_root, convention="arcface")
    # A probe subject in neither gallery: the merged search is not closed-set, refused before any embedding.
    root = shutil.copytree(ijb_root, tmp_path / "IJBC")
    probe_csv = root / "meta" / "ijbc_1N_probe_mixed.csv"
    header, *rows = probe_csv.read_text().splitlines()
    template = rows[0].split(",")[0]
    moved = [",".join([t, "424242", *rest]) if t == template else row for row in rows for t, _, *rest in [row.split(",")]]
    probe_csv.write_text("\n".join([header, *moved]) + "\n")
    IjbIdentification(root)  # nist: an unmatched probe is non-mated
    with pytest.raises(ValueError, match=r"meta \(ijbc_1N_probe_mixed.csv, ijbc_1N_gallery_G1.csv, .*subject 424242 with 0"):
        IjbIdentification(root, convention="insightface")
