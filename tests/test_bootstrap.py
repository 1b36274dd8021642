"""Intervals, paired comparisons, per-group results and quality curves on every kind of result
(facerec.evaluation.scored, bootstrap, quality): exact against the results they recompute, calibrated
on simulated score sets with a known answer."""
from __future__ import annotations

import json
from math import erf, sqrt

import numpy as np
import pytest

from facerec.evaluation import identify, verify
from facerec.evaluation.bootstrap import (
    Bootstrap,
    group_membership,
    group_spread,
    intervals,
    mcnemar,
    paired_comparison,
)
from facerec.evaluation.identification import GalleryScores, MultiGalleryResult, ProbeScores
from facerec.evaluation.metric import Evaluation, EmbeddingNorms, ScoringOptions, evaluate_features
from facerec.evaluation.options import read_groups, read_quality
from facerec.evaluation.protocols import PairVerification
from facerec.evaluation.report import format_table, read_scores, write_results, write_scores
from facerec.evaluation.scored import ScoredItems
from facerec.evaluation.templates import TemplateScores, verify_templates
from facerec.evaluation.verification import PairScores
from facerec.data import VerificationSet
from facerec.tools import compare_eval


def pair_result(rng, n=600, d=16, signal=1.0):
    issame = np.arange(n) % 2 == 0
    a = rng.normal(size=(n, d))
    b = np.where(issame[:, None], a * signal + rng.normal(size=(n, d)), rng.normal(size=(n, d)))
    return verify(a, b, issame)


def template_result(rng, images=300, templates=60, pairs=500):
    template_of = np.r_[np.arange(templates), rng.integers(0, templates, images - templates)]
    subject = np.arange(templates) // 3
    features = rng.normal(size=(images, 8)) + 2 * np.eye(8)[subject[template_of] % 8]
    first, second = rng.integers(0, templates, pairs), rng.integers(0, templates, pairs)
    labels = (subject[first] == subject[second]).astype(int)
    labels[:5] = 1 - labels[:5] if labels.sum() == 0 else labels[:5]
    return verify_templates(features, template_of, np.arange(images), np.c_[first, second], labels, fars=(1e-2, 1e-1))


def identification_result(rng, gallery_ids=40, probes=300):
    gallery = rng.normal(size=(gallery_ids, 8))
    probe_ids = rng.integers(0, gallery_ids + 10, probes)  # ids >= gallery_ids are non-mated
    centres = np.r_[gallery, rng.normal(size=(10, 8))]
    return identify(gallery, np.arange(gallery_ids), centres[probe_ids] + 0.8 * rng.normal(size=(probes, 8)), probe_ids, ranks=(1, 5), fpirs=(0.1, 0.3))


def replicated(items: ScoredItems, counts: np.ndarray) -> ScoredItems:
    """The items with item k repeated counts[k] times: what `metrics(counts)` must equal."""
    index = np.repeat(np.arange(items.num_items), counts)
    if isinstance(items, PairScores):
        return PairScores(items.scores[index], items.issame[index], items.folds[index], items.fold_thresholds, items.fars)
    if isinstance(items, TemplateScores):
        return TemplateScores(items.scores[index], items.labels[index], items.fars)
    return ProbeScores(items.ranks[index], items.top_scores[index], items.mated[index], items.cmc_ranks, items.fpirs)


@pytest.mark.parametrize("make", [pair_result, template_result, identification_result])
def test_weighted_metrics_equal_the_result_and_a_replicated_sample(make):
    rng = np.random.default_rng(0)
    result = make(rng)
    assert result.items.metrics() == pytest.approx(result.summary(), abs=1e-12)
    for trial in range(5):
        counts = rng.integers(0, 3, result.items.num_items)
        expected = replicated(result.items, counts).metrics()
        assert result.items.metrics(counts.astype(float)) == pytest.approx(expected, abs=1e-12), trial


def test_multi_gallery_items_recompute_the_mean_and_each_gallery():
    rng = np.random.default_rng(1)
    gallery = rng.normal(size=(30, 8))
    probe_ids = rng.integers(0, 30, 200)
    probes = gallery[probe_ids] + rng.normal(size=(200, 8))
    galleries = {"G1": identify(gallery[:15], np.arange(15), probes, probe_ids, fpirs=(0.1,)),
                 "G2": identify(gallery[15:], np.arange(15, 30), probes, probe_ids, fpirs=(0.1,))}  # fmt: skip
    result = MultiGalleryResult(galleries)
    assert isinstance(result.items, GalleryScores)
    assert result.items.metrics() == pytest.approx(result.summary(), abs=1e-12)
    rebuilt = ScoredItems.from_arrays(result.items.arrays())
    weights = rng.integers(0, 3, 200).astype(float)
    assert rebuilt.metrics(weights) == pytest.approx(result.items.metrics(weights), abs=1e-15)


def probe_outcomes(rng, identities, probes_per_identity, rate, spread):
    """Clustered rank-1 outcomes: identity u's probes hit with probability p_u ~ Beta around `rate`."""
    p = rng.beta(rate * spread, (1 - rate) * spread, identities)
    hits = rng.random((identities, probes_per_identity)) < p[:, None]
    units = np.repeat(np.arange(identities), probes_per_identity)
    return hits.ravel(), units


def probe_items(hits, units) -> ProbeScores:
    n = len(hits)
    items = ProbeScores(np.where(hits, 1.0, 2.0), np.zeros(n), np.ones(n, dtype=bool), (1,), ())
    items.set_units(np.c_[units, np.full(n, -1)], np.unique(units).astype(str), "identity")
    return items


def test_identity_bootstrap_covers_the_true_rate_where_resampling_probes_does_not():
    """200 simulated 1:N sets, 50 identities x 8 probes with identity-level hit rates (true rank-1 0.7):
    the identity bootstrap's 95 % interval covers 0.7 at about the nominal rate; the probe bootstrap,
    which treats one person's probes as independent, covers it far less often."""
    rng = np.random.default_rng(0)
    covered = {"identity": 0, "probe": 0}
    repetitions = 200
    for repetition in range(repetitions):
        hits, units = probe_outcomes(rng, 50, 8, 0.7, spread=4.0)
        by_identity = probe_items(hits, units)
        by_probe = ProbeScores(by_identity.ranks, by_identity.top_scores, by_identity.mated, (1,), ())
        for name, items in (("identity", by_identity), ("probe", by_probe)):
            low, high = intervals(items, Bootstrap(200, seed=repetition))["rank1"]
            covered[name] += low <= 0.7 <= high
    assert 0.90 <= covered["identity"] / repetitions <= 0.99
    assert covered["probe"] / repetitions < 0.80


def test_pair_interval_covers_a_known_auc():
    """Gaussian scores, genuine N(1, 1) and impostor N(0, 1), each pair its own unit: the true AUC is
    Phi(1 / sqrt(2)); 150 simulated sets of 300 pairs, 150 replicates each."""
    rng = np.random.default_rng(1)
    truth = 0.5 * (1 + erf(1 / sqrt(2) / sqrt(2)))
    covered, repetitions = 0, 150
    for repetition in range(repetitions):
        issame = np.arange(300) % 2 == 0
        items = PairScores(rng.normal(size=300) + issame, issame, np.arange(300) % 10, np.zeros(10))
        low, high = intervals(items, Bootstrap(150, seed=repetition))["auc"]
        covered += low <= truth <= high
    assert 0.89 <= covered / repetitions <= 0.99


def test_paired_test_is_calibrated_under_the_null_and_finds_a_real_difference():
    """Two models with the same hit rate on the same clustered probes (a shared per-identity difficulty,
    independent model noise): about 5 % of 200 paired tests reject at 0.05; a 15-point gap is found."""
    rng = np.random.default_rng(2)
    rejections, found = 0, 0
    repetitions = 200
    for repetition in range(repetitions):
        difficulty = np.repeat(rng.normal(size=40), 6)
        units = np.repeat(np.arange(40), 6)
        a = probe_items(difficulty + rng.normal(size=240) > -0.5, units)
        b = probe_items(difficulty + rng.normal(size=240) > -0.5, units)
        p = paired_comparison(a, b, Bootstrap(200, seed=repetition))["rank1"].p_value
        rejections += p < 0.05
        if repetition < 20:
            better = probe_items(difficulty + rng.normal(size=240) > -1.2, units)
            found += paired_comparison(a, better, Bootstrap(200, seed=repetition))["rank1"].resolved
    assert 0.015 <= rejections / repetitions <= 0.10
    assert found >= 18


def test_paired_comparison_refuses_different_items_and_mcnemar_counts_discordant_pairs():
    rng = np.random.default_rng(3)
    a, b = pair_result(rng), pair_result(rng, n=500)
    with pytest.raises(ValueError, match="scored different items"):
        paired_comparison(a.items, b.items, Bootstrap(50))
    right_a = np.array([True] * 10 + [False] * 3 + [True] * 5)
    right_b = np.array([False] * 10 + [True] * 3 + [True] * 5)
    test = mcnemar(right_a, right_b)
    assert test["a_right_b_wrong"] == 10 and test["a_wrong_b_right"] == 3
    assert test["p_value"] == pytest.approx(2 * sum(__import__("math").comb(13, k) for k in range(4)) / 2**13)


def erc_reference(scores, genuine, quality, fractions, fmr):
    """A plain loop: the threshold from all impostors, then for each fraction the worst-quality genuine pairs dropped."""
    impostor = sorted(scores[~genuine], reverse=True)
    allowed = int(np.floor(fmr * len(impostor) + 1e-9))
    threshold = impostor[allowed]
    genuine_pairs = sorted(np.flatnonzero(genuine), key=lambda i: (quality[i], i))
    curve = []
    for fraction in fractions:
        kept = genuine_pairs[int(np.floor(fraction * len(genuine_pairs) + 1e-9)):]
        curve.append(sum(scores[i] <= threshold for i in kept) / len(kept) if kept else np.nan)
    return np.array(curve)


def test_error_versus_reject_equals_a_plain_loop():
    rng = np.random.default_rng(4)
    result = pair_result(rng, n=4000)
    items = result.items
    image_quality = rng.random(2 * items.num_items)  # pair k: images k and n + k
    items.set_sides(np.c_[np.arange(items.num_items), items.num_items + np.arange(items.num_items)], np.arange(len(image_quality)))
    items.set_quality(image_quality)
    assert np.array_equal(items.quality, image_quality[items.sides].min(axis=1))
    fractions = np.linspace(0, 0.9, 19)
    curves = items.error_versus_reject(fractions)
    assert list(curves) == ["FNMR@FMR=1e-03", "FNMR@FMR=5e-04"]  # 2,000 impostors: 1e-4 is replaced by 1 / 2,000
    for label, curve in curves.items():
        fmr = float(label.split("=")[1])
        np.testing.assert_allclose(curve, erc_reference(items.scores, items.issame, items.quality, fractions, fmr))
    identification = identification_result(rng)
    probes = identification.items
    probes.set_sides(np.c_[np.arange(probes.num_items), np.full(probes.num_items, -1)], np.arange(probes.num_items))
    probes.set_quality(rng.random(probes.num_items))
    for label, curve in probes.error_versus_reject(fractions).items():
        fpir = float(label.split("=")[1])
        non_mated = np.sort(probes.top_scores[~probes.mated])[::-1]
        threshold = non_mated[int(np.floor(fpir * len(non_mated) + 1e-9))]
        mated = sorted(np.flatnonzero(probes.mated), key=lambda i: (probes.quality[i], i))
        for fraction, value in zip(fractions, curve):
            kept = mated[int(np.floor(fraction * len(mated) + 1e-9)):]
            misses = sum(not (probes.ranks[i] == 1 and probes.top_scores[i] > threshold) for i in kept)
            assert value == pytest.approx(misses / len(kept))


class NamedPairs(VerificationSet):
    """Pairs over images whose identities are known, with the set's own folds."""

    def __init__(self, identities, pairs, issame, folds):
        super().__init__("named", len(identities), pairs, issame, folds)
        self.identities = list(identities)

    def image_identities(self):
        return self.identities

    def image_names(self):
        return [f"{identity}/{index}.jpg" for index, identity in enumerate(self.identities)]


def test_per_group_results_equal_each_group_scored_alone(tmp_path):
    """A pair set over 40 people in two groups (pairs within a group, 10 given folds): per-group results
    from a CSV equal each group's pairs scored alone; the spread and the table follow."""
    rng = np.random.default_rng(5)
    people = [f"person_{k}" for k in range(40)]
    group_of = {name: "north" if k < 25 else "south" for k, name in enumerate(people)}
    identities = np.repeat(people, 4)
    pairs, issame, folds = [], [], []
    for fold in range(10):
        for _ in range(30):
            group = rng.choice(["north", "south"])
            members = [k for k, name in enumerate(people) if group_of[name] == group]
            same = len(pairs) % 2 == 0
            first = rng.choice(members)
            second = first if same else rng.choice([m for m in members if m != first])
            a, b = 4 * first + rng.integers(4), 4 * second + rng.integers(4)
            while a == b:
                b = 4 * second + rng.integers(4)
            pairs.append((a, b)), issame.append(same), folds.append(fold)
    pairs, issame, folds = np.array(pairs), np.array(issame), np.array(folds)
    protocol = PairVerification(NamedPairs(identities, pairs, issame, folds))
    features = rng.normal(size=(160, 8)) + 1.5 * np.eye(8)[np.arange(160) // 4 % 8]
    csv = tmp_path / "groups.csv"
    csv.write_text("identity,group\n" + "".join(f"{name},{group}\n" for name, group in group_of.items()))
    evaluation = evaluate_features(protocol, features, ScoringOptions(Bootstrap(100), read_groups(csv)))
    for group in ("north", "south"):
        members = np.array([group_of[identities[a]] == group for a in pairs[:, 0]])
        kept = features.astype(np.float32)  # as the protocol reads them
        alone = verify(kept[pairs[members, 0]], kept[pairs[members, 1]], issame[members], folds=folds[members])
        assert evaluation.groups["metrics"][group] == pytest.approx(alone.summary(), abs=1e-12)
        assert evaluation.groups["items"][group] == members.sum()
        low, high = evaluation.groups["intervals"][group]["accuracy"]
        assert low <= alone.accuracy <= high
    accuracies = [evaluation.groups["metrics"][g]["accuracy"] for g in ("north", "south")]
    assert evaluation.groups["spread"]["accuracy"]["std"] == pytest.approx(np.std(accuracies))
    errors = 1 - np.array(accuracies)
    assert evaluation.groups["spread"]["accuracy"]["max_min_error_ratio"] == pytest.approx(errors.max() / errors.min())
    table = format_table({"named": evaluation})
    assert "### named by group" in table and "| largest / smallest error |" in table
    # A pair set whose units are pairs (no identities) cannot be grouped; an empty group is an error.
    with pytest.raises(ValueError, match="units are pairs"):
        group_membership(pair_result(rng).items, group_of)
    with pytest.raises(ValueError, match=r"groups \['west'\] of .*groups.csv hold no item"):
        group_membership(evaluation.result.items, {**group_of, "nobody": "west"}, source=str(csv))
    assert group_spread({"a": {"eer": 0.1}, "b": {"eer": 0.2}})["eer"]["max_min_error_ratio"] == pytest.approx(2.0)


def test_quality_file_and_groups_file_errors_name_the_file(tmp_path):
    quality = tmp_path / "quality.csv"
    quality.write_text("image,quality\na.jpg,0.5\nb.jpg,high\n")
    with pytest.raises(ValueError, match=r"quality.csv:3: quality 'high' is not a number"):
        read_quality(quality, ["a.jpg", "b.jpg"], "set")
    quality.write_text("image,quality\na.jpg,0.5\n")
    with pytest.raises(ValueError, match=r"no quality score for 1 images of set, e.g. 'b.jpg'"):
        read_quality(quality, ["a.jpg", "b.jpg"], "set")
    groups = tmp_path / "groups.csv"
    groups.write_text("identity,race\nx,Asian\n")
    with pytest.raises(ValueError, match=r"groups.csv: expected a header with columns \['identity', 'group'\]"):
        read_groups(groups)
    groups.write_text("identity,group\nx,Asian\nx,African\n")
    with pytest.raises(ValueError, match=r"groups.csv:3: identity 'x' is in group 'Asian' and 'African'"):
        read_groups(groups)
    with pytest.raises(ValueError, match="bootstrap.resamples must be 0"):
        Bootstrap(resamples=5)


def test_compare_eval_reads_two_runs_and_marks_resolved_differences(tmp_path, capsys):
    """Two eval.py-style outputs (results.json + scores.npz) of the same pairs: a clearly better model B
    and a copy of A; the tool reports B - A with intervals, p-values and McNemar."""
    rng = np.random.default_rng(6)
    n, d = 1200, 16
    issame = np.arange(n) % 2 == 0
    base = rng.normal(size=(n, d))
    noise = rng.normal(size=(n, d))
    weak = np.where(issame[:, None], base + 1.6 * noise, rng.normal(size=(n, d)))
    strong = np.where(issame[:, None], base + 0.8 * noise, weak)
    for name, second in (("a", weak), ("b", strong), ("a_copy", weak)):
        result = verify(base, second, issame)
        evaluations = {"lfw": Evaluation(result, EmbeddingNorms(1.0, 0.0))}
        folder = tmp_path / name
        folder.mkdir()
        write_scores(evaluations, folder / "scores.npz")
        write_results(evaluations, folder / "results.json", bootstrap={"resamples": 300, "level": 0.95, "seed": 0}, scores="scores.npz")
    assert set(read_scores(tmp_path / "a" / "scores.npz")) == {"lfw"}
    compare_eval.main([str(tmp_path / "a"), str(tmp_path / "b" / "results.json"), "--out", str(tmp_path / "cmp")])
    out = capsys.readouterr().out
    assert "300 paired resamples" in out and "McNemar" in out and "| auc |" in out
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["lfw"]
    assert saved["differences"]["auc"]["difference"] > 0 and saved["differences"]["auc"]["resolved"]
    assert saved["mcnemar"]["a_wrong_b_right"] > saved["mcnemar"]["a_right_b_wrong"]
    compare_eval.main([str(tmp_path / "a"), str(tmp_path / "a_copy")])
    same = capsys.readouterr().out
    assert "| +0.0000 [+0.0000, +0.0000] | 1.000 | no |" in same  # AUC of a model against itself
    with pytest.raises(SystemExit, match="no results.json"):
        compare_eval.main([str(tmp_path / "nowhere"), str(tmp_path / "b")])
    # Several runs a side (seeds), paired by position: the means' difference, runs and people resampled.
    compare_eval.main([f"{tmp_path / 'a'},{tmp_path / 'a_copy'}", f"{tmp_path / 'b'},{tmp_path / 'b'}", "--resamples", "200"])
    seeds = capsys.readouterr().out
    assert "200 two-level resamples (runs and units; 2 runs a side, means)" in seeds
    auc_row = next(line for line in seeds.splitlines() if line.startswith("| auc |"))
    assert auc_row.endswith("| yes |") and f"| +{saved['differences']['auc']['difference']:.4f} [" in auc_row
    with pytest.raises(SystemExit, match="A has 2 runs and B 1"):
        compare_eval.main([f"{tmp_path / 'a'},{tmp_path / 'a_copy'}", str(tmp_path / "b")])


def test_insightface_convention_items_recompute_ijb_1n_rules_on_a_replicated_sample():
    """insightface's TPIR threshold is the ceil(P x FPIR)-th highest probe-to-non-mate score: a probe
    drawn twice counts all its scores twice, as a replicated probe set would."""
    from facerec.evaluation.insightface_1n import insightface_identify

    rng = np.random.default_rng(7)
    gallery = rng.normal(size=(25, 8))
    probe_ids = rng.integers(0, 25, 160)
    probes = gallery[probe_ids] + 1.2 * rng.normal(size=(160, 8))
    result = insightface_identify(gallery, np.arange(25), probes, probe_ids, ranks=(1, 5), fpirs=(0.05, 0.2))
    assert result.items.metrics() == pytest.approx(result.summary(), abs=1e-12)
    for trial in range(5):
        counts = rng.integers(0, 3, 160)
        index = np.repeat(np.arange(160), counts)
        expected = insightface_identify(gallery, np.arange(25), probes[index], probe_ids[index], ranks=(1, 5), fpirs=(0.05, 0.2))
        assert result.items.metrics(counts.astype(float)) == pytest.approx(expected.summary(), abs=1e-12), trial
    assert set(intervals(result.items, Bootstrap(50))) == {"rank1", "rank5", "tpir@fpir=5e-02", "tpir@fpir=2e-01"}


def test_real_sets_resample_people(ijb_fixture, shared_data):
    """IJB 1:1 resamples the subjects its 1:N files name (not templates); a folder's 1:N resamples
    the probes' people by name (what a groups= CSV names); a closed set's quality curve is the rank-1
    miss rate."""
    from facerec.evaluation.protocols import FolderIdentification, IjbVerification

    rng = np.random.default_rng(8)
    templates = IjbVerification(ijb_fixture, "IJBC")
    result = templates.score(rng.normal(size=(len(templates.meta.image_names), 16)).astype(np.float32))
    items = result.items
    assert items.unit_kind == "identity" and len(items.unit_names) == 20  # the fixture's 20 LFW people
    genuine = items.labels
    assert (items.units[genuine, 1] == -1).all() and (items.units[~genuine, 1] >= 0).all()
    folder = FolderIdentification(shared_data / "orl", min_images=2, gallery_images=1, num_distractors=0)
    found = evaluate_features(folder, rng.normal(size=(400, 8)), ScoringOptions(Bootstrap(50)))
    assert found.result.items.unit_names.tolist() == [f"s{k}" for k in sorted(range(1, 41), key=str)]
    assert set(found.intervals) >= {"rank1", "rank5"} and list(found.erc["curves"]) == ["rank-1 miss rate"]
