"""`verify` against independent computations (scikit-learn, brute force) and against theory."""
from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sklearn_roc_curve
from sklearn.metrics.pairwise import paired_cosine_distances
from sklearn.model_selection import KFold, StratifiedKFold

from facerec.evaluation import make_folds, verify

TOL = 1e-9


def embeddings_with_scores(scores: np.ndarray, dim: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of random-length, randomly rotated embeddings whose cosine similarities are `scores`."""
    n = len(scores)
    u = rng.standard_normal((n, dim))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    w = rng.standard_normal((n, dim))
    w -= np.sum(w * u, axis=1, keepdims=True) * u  # orthogonal to u
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    v = scores[:, None] * u + np.sqrt(1 - scores[:, None] ** 2) * w
    return u * rng.uniform(0.5, 3.0, (n, 1)), v * rng.uniform(0.5, 3.0, (n, 1))


def view2_like_pairs(rng: np.random.Generator, n_folds: int = 10, per_class: int = 60, ties: bool = False):
    """n_folds consecutive blocks of `per_class` same then `per_class` different pairs (the View 2 layout)."""
    issame = np.tile(np.r_[np.ones(per_class, bool), np.zeros(per_class, bool)], n_folds)
    scores = np.tanh(np.where(issame, 0.4, 0.0) + 0.25 * rng.standard_normal(len(issame)))
    if not ties:
        return *embeddings_with_scores(scores, 16, rng), issame
    # Many exactly equal scores, across classes too (cuts between equal scores are not
    # realisable): every pair repeats one of 25 embedding pairs, same pairs favouring high scores.
    templates = embeddings_with_scores(np.linspace(-0.6, 0.8, 25), 16, rng)
    choice = np.clip(np.round(12 + 8 * np.where(issame, 0.5, -0.5) + 5 * rng.standard_normal(len(issame))), 0, 24)
    return templates[0][choice.astype(int)], templates[1][choice.astype(int)], issame


def brute_force_threshold(scores: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """Try every midpoint between distinct scores (and one beyond each end); lowest best threshold."""
    distinct = np.unique(scores)
    candidates = np.r_[distinct[0] - 0.5, (distinct[1:] + distinct[:-1]) / 2, distinct[-1] + 0.5]
    accuracy = ((scores[None, :] > candidates[:, None]) == issame[None, :]).mean(axis=1)
    best = int(np.argmax(accuracy))
    return float(candidates[best]), float(accuracy[best])


def reference(emb1, emb2, issame, splits, fars):
    """The LFW protocol computed independently: scikit-learn scores, ROC, AUC and folds, brute-force thresholds."""
    scores = 1.0 - paired_cosine_distances(np.float64(emb1), np.float64(emb2))  # sklearn keeps float32 as float32
    fold_accuracies, fold_thresholds = [], []
    for train, test in splits:
        threshold, _ = brute_force_threshold(scores[train], issame[train])
        fold_thresholds.append(threshold)
        fold_accuracies.append(np.mean((scores[test] > threshold) == issame[test]))
    fpr, tpr, _ = sklearn_roc_curve(issame, scores, drop_intermediate=False)
    fnr = 1 - tpr
    eer = np.interp(0.0, fpr - fnr, fpr)  # fpr - fnr rises strictly along the curve
    tar = {far: tpr[fpr <= far].max() for far in fars}
    return dict(
        accuracy=np.mean(fold_accuracies),
        accuracy_std=np.std(fold_accuracies),
        fold_accuracies=fold_accuracies,
        fold_thresholds=fold_thresholds,
        auc=roc_auc_score(issame, scores),
        eer=eer,
        tar=tar,
        fpr=fpr,
        tpr=tpr,
    )


def assert_agrees(result, expected):
    for key in ["accuracy", "accuracy_std", "auc", "eer"]:
        assert abs(getattr(result, key) - expected[key]) < TOL, key
    np.testing.assert_allclose(result.fold_accuracies, expected["fold_accuracies"], rtol=0, atol=TOL)
    np.testing.assert_allclose(result.fold_thresholds, expected["fold_thresholds"], rtol=0, atol=TOL)
    np.testing.assert_allclose(result.fpr, expected["fpr"], rtol=0, atol=TOL)
    np.testing.assert_allclose(result.tpr, expected["tpr"], rtol=0, atol=TOL)
    for far, tar in expected["tar"].items():
        assert abs(result.tar_at_far[far] - tar) < TOL, far


@pytest.mark.parametrize("ties", [False, True])
def test_consecutive_folds_agree_with_sklearn_and_brute_force(ties):
    rng = np.random.default_rng(1)
    emb1, emb2, issame = view2_like_pairs(rng, ties=ties)
    fars = (1e-1, 1e-2)
    result = verify(emb1, emb2, issame, n_folds=10, fars=fars)
    assert result.fold_policy == "consecutive" and result.notes == []
    expected = reference(emb1, emb2, issame, KFold(n_splits=10).split(emb1), fars)
    assert_agrees(result, expected)
    assert 0.6 < result.accuracy < 0.95  # the test data are neither trivial nor chance


def test_given_stratified_folds_agree_with_sklearn_and_brute_force():
    rng = np.random.default_rng(2)
    emb1, emb2, issame = view2_like_pairs(rng)
    splits = list(StratifiedKFold(n_splits=10, shuffle=True, random_state=0).split(emb1, issame))
    folds = np.empty(len(issame), dtype=int)
    for fold, (_, test) in enumerate(splits):
        folds[test] = fold
    result = verify(emb1, emb2, issame, folds=folds, fars=(1e-1,))
    assert result.fold_policy == "given"
    assert_agrees(result, reference(emb1, emb2, issame, splits, (1e-1,)))


def test_torch_inputs_give_the_numpy_result():
    rng = np.random.default_rng(3)
    emb1, emb2, issame = view2_like_pairs(rng)
    expected = verify(emb1, emb2, issame)
    result = verify(torch.from_numpy(emb1), torch.from_numpy(emb2), torch.from_numpy(issame))
    assert result.accuracy == expected.accuracy and result.auc == expected.auc


def test_gaussian_scores_give_the_analytic_accuracy_auc_eer_and_tar():
    """Same-pair scores ~ N(+mu, sigma), different ~ N(-mu, sigma), d' = 2 mu / sigma:
    the optimal threshold (0) gives accuracy = Phi(d'/2) = 1 - EER, AUC = Phi(d'/sqrt 2),
    TAR at FAR f = Phi(d' - z_{1-f}). Tolerance: 4 standard errors of the estimates."""
    n_per_class, mu, sigma = 20_000, 0.1, 0.1
    d = 2 * mu / sigma
    rng = np.random.default_rng(4)
    issame = np.tile(np.r_[np.ones(1000, bool), np.zeros(1000, bool)], 20)
    scores = np.where(issame, mu, -mu) + sigma * rng.standard_normal(len(issame))
    emb1, emb2 = embeddings_with_scores(scores, 8, rng)
    result = verify(emb1, emb2, issame, fars=(1e-1, 1e-2))
    assert result.fold_policy == "consecutive"

    phi = NormalDist()
    accuracy = phi.cdf(d / 2)
    se_accuracy = np.sqrt(accuracy * (1 - accuracy) / (2 * n_per_class))
    assert abs(result.accuracy - accuracy) < 4 * se_accuracy
    assert abs(result.eer - (1 - accuracy)) < 4 * np.sqrt(2) * se_accuracy  # FAR and FRR each from one class
    auc = phi.cdf(d / np.sqrt(2))
    assert abs(result.auc - auc) < 4 * np.sqrt(auc * (1 - auc) / n_per_class)  # a bound on AUC's error
    for far in (1e-1, 1e-2):
        z = phi.inv_cdf(1 - far)  # threshold in units of sigma above the different-pair mean
        tar = phi.cdf(d - z)
        # Delta method: TAR's own binomial error plus the error of the estimated FAR quantile.
        density_ratio = phi.pdf(z - d) / phi.pdf(z)
        se = np.sqrt(tar * (1 - tar) / n_per_class + density_ratio**2 * far * (1 - far) / n_per_class)
        assert abs(result.tar_at_far[far] - tar) < 4 * se, far


def test_same_pairs_listed_first_get_seeded_stratified_folds():
    """View 1 (pairsDevTest.txt) lists its 500 same pairs, then 500 different: consecutive blocks
    would each hold one class, so folds are stratified, seeded and reported."""
    rng = np.random.default_rng(5)
    issame = np.r_[np.ones(500, bool), np.zeros(500, bool)]
    scores = np.where(issame, 0.5, 0.1) + 0.2 * rng.standard_normal(1000)
    emb1, emb2 = embeddings_with_scores(np.tanh(scores), 8, rng)
    result = verify(emb1, emb2, issame, n_folds=10, seed=3)
    assert result.fold_policy == "stratified(seed=3)"
    assert "block 0" in result.notes[0] and "100 same and 0 different" in result.notes[0]
    folds, policy, _ = make_folds(issame, 10, seed=3)
    assert policy == "stratified(seed=3)"
    for fold in range(10):
        assert issame[folds == fold].sum() == 50 and (~issame[folds == fold]).sum() == 50
    np.testing.assert_array_equal(folds, make_folds(issame, 10, seed=3)[0])  # seeded: reproducible
    assert not np.array_equal(folds, make_folds(issame, 10, seed=4)[0])
    splits = [(np.flatnonzero(folds != f), np.flatnonzero(folds == f)) for f in range(10)]
    assert_agrees(result, reference(emb1, emb2, issame, splits, (1e-1, 1e-2)))


def test_uneven_classes_never_give_a_one_class_fold():
    issame = np.r_[np.ones(13, bool), np.zeros(987, bool)]
    folds, policy, _ = make_folds(issame, 10)
    assert policy.startswith("stratified")
    assert all(issame[folds == f].any() and (~issame[folds == f]).any() for f in range(10))


def test_tar_needs_enough_different_pairs():
    rng = np.random.default_rng(6)
    emb1, emb2, issame = view2_like_pairs(rng, per_class=30)  # 300 different pairs
    result = verify(emb1, emb2, issame)
    assert result.tar_at_far[1e-2] is not None
    assert result.tar_at_far[1e-3] is None and result.tar_at_far[1e-4] is None
    assert any("TAR@FAR=1e-03 needs >= 1000 different pairs, the set has 300" in note for note in result.notes)
    assert "tar@far=1e-03" not in result.summary() and "tar@far=1e-02" in result.summary()


def test_bad_input_is_refused_with_a_clear_error():
    rng = np.random.default_rng(7)
    emb1, emb2, issame = view2_like_pairs(rng)
    nan = emb1.copy()
    nan[3, 0], nan[17, 5] = np.nan, np.inf
    with pytest.raises(ValueError, match=r"emb1 holds non-finite values \(NaN/inf\) in 2 embeddings \(first rows: \[3, 17\]\)"):
        verify(nan, emb2, issame)
    with pytest.raises(ValueError, match=r"same shape, got \(1200, 16\) and \(1200, 8\)"):
        verify(emb1, emb2[:, :8], issame)
    with pytest.raises(ValueError, match=r"one label per pair \(1200\), got shape \(1199,\)"):
        verify(emb1, emb2, issame[:-1])
    with pytest.raises(ValueError, match="booleans"):
        verify(emb1, emb2, issame * 2)
    zero = emb2.copy()
    zero[5] = 0
    with pytest.raises(ValueError, match="emb2 holds 1 all-zero embeddings"):
        verify(emb1, zero, issame)
    with pytest.raises(ValueError, match="given fold 0 holds 0 same and 600 different pairs"):
        verify(emb1, emb2, issame, folds=np.where(issame, np.arange(1200) % 9 + 1, 0))
    with pytest.raises(ValueError, match="10 folds need >= 10 same and >= 10 different pairs, got 5 same"):
        verify(emb1[:15], emb2[:15], np.r_[np.ones(5, bool), np.zeros(10, bool)])
