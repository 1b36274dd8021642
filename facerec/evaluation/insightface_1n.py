"""IJB 1:N by insightface's convention (`recognition/_evaluation_/ijb/ijb_1n.py`, `evaluation()`).

What ijb_1n.py does, and `insightface_identify` reproduces:

- one gallery: G1 and G2 (IJB-B: S1 and S2) merged, templates L2-normalised, one template per
  subject; the search is closed-set: every probe's subject has exactly one gallery template
  (`gen_mask` raises otherwise; here a ValueError names the subject);
- rank-k: the mate template is among the k best-scoring gallery templates (cosine, float64);
- TPIR@FPIR: the negatives are all P x (G - 1) probe-to-non-mate template scores; the threshold is
  the k-th highest of them, k = ceil(P * FPIR) (P probes, math.ceil of the float product, as
  ijb_1n.py computes it); TPIR is the fraction of probes whose mate score is strictly above the
  threshold, whatever the mate's rank.

This is not NIST's per-search FPIR (facerec.evaluation.identify: the best score of each non-mated
search, galleries searched separately): the two conventions give different numbers for the same
features, and tables must not compare them. The one difference from ijb_1n.py: ties with the mate
count against it (facerec's rule), where ijb_1n.py leaves their order to numpy's unstable argsort.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from facerec.evaluation.identification import BLOCK_SCORES, FPIRS, RANKS, TABLE_FPIRS, IdentificationResult, checked_ranks_fpirs
from facerec.evaluation.scored import ScoredItems, error_after_rejection, rejection_order, weights_or_ones

CONVENTIONS = ("nist", "insightface")


def _unit_rows(name: str, x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or not len(x):
        raise ValueError(f"{name} must be a non-empty (N, d) array, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    bad = np.flatnonzero(~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0))
    if len(bad):
        raise ValueError(f"{name} holds {len(bad)} non-finite or all-zero features (first rows: {bad[:5].tolist()})")
    return x / norms


def mate_entries(gallery_ids: np.ndarray, probe_ids: np.ndarray) -> np.ndarray:
    """(P,) the gallery entry of each probe's subject; ValueError unless each has exactly one (ijb_1n.py's gen_mask)."""
    order = np.argsort(gallery_ids, kind="stable")
    ordered = gallery_ids[order]
    first = np.searchsorted(ordered, probe_ids, side="left")
    count = np.searchsorted(ordered, probe_ids, side="right") - first
    wrong = np.flatnonzero(count != 1)
    if len(wrong):
        subject = probe_ids[wrong[0]]
        raise ValueError(
            f"insightface's 1:N convention is closed-set with one gallery template per subject, but {len(wrong)} probes "
            f"have another count, e.g. subject {subject} with {count[wrong[0]]} gallery templates"
        )
    return order[first]


def insightface_identify(
    gallery,
    gallery_ids,
    probes,
    probe_ids,
    ranks: Sequence[int] = RANKS,
    fpirs: Sequence[float] = FPIRS,
    gallery_name: str = "merged gallery (insightface)",
) -> IdentificationResult:
    """Closed-set 1:N by ijb_1n.py's rules (see the module docstring). gallery (G, d), gallery_ids (G,),
    probes (P, d), probe_ids (P,): features need not be normalised; ids are integers."""
    gallery, probes = _unit_rows("gallery", gallery), _unit_rows("probes", probes)
    if gallery.shape[1] != probes.shape[1]:
        raise ValueError(f"gallery and probes must have the same feature size, got {gallery.shape[1]} and {probes.shape[1]}")
    gallery_ids, probe_ids = np.asarray(gallery_ids), np.asarray(probe_ids)
    if gallery_ids.shape != (len(gallery),) or probe_ids.shape != (len(probes),):
        raise ValueError(
            f"need one id per gallery row ({len(gallery)}) and per probe row ({len(probes)}), "
            f"got shapes {gallery_ids.shape} and {probe_ids.shape}"
        )
    ranks, fpirs = checked_ranks_fpirs(ranks, fpirs)
    mates = mate_entries(gallery_ids, probe_ids)

    num_probes, num_entries = len(probes), len(gallery)
    negatives = num_probes * (num_entries - 1)
    wanted = {fpir: math.ceil(num_probes * fpir) for fpir in fpirs}  # ijb_1n.py: math.ceil(query_num * x)
    # The bootstrap's replicates need more than the `ceil(P x FPIR)` highest: a replicate counts a probe's
    # scores as often as it draws the probe, so keep twice as many (a replicate beyond them is undefined).
    keep = min(2 * max(wanted.values(), default=0), negatives)
    mate_scores = np.empty(num_probes)
    top_scores = np.empty(num_probes)
    probe_ranks = np.empty(num_probes)
    highest, owners = np.empty(0), np.empty(0, dtype=np.int64)  # the `keep` highest non-mate scores so far, their probes
    block = max(1, BLOCK_SCORES // 4 // num_entries)  # float64 scores: 64 MiB a block
    for start in range(0, num_probes, block):
        rows = np.arange(start, min(start + block, num_probes))
        scores = probes[rows] @ gallery.T
        mate = scores[np.arange(len(rows)), mates[rows]]
        scores[np.arange(len(rows)), mates[rows]] = -np.inf
        mate_scores[rows] = mate
        top_scores[rows] = np.maximum(scores.max(axis=1), mate)
        probe_ranks[rows] = 1 + (scores >= mate[:, None]).sum(axis=1)  # ties count against the mate
        if keep:  # the mates' -inf never reach the top `keep` of all blocks: keep <= the finite scores
            pooled = np.concatenate([highest, scores.ravel()])
            pooled_owners = np.concatenate([owners, np.repeat(rows, num_entries)])
            if len(pooled) > keep:
                top = np.argpartition(pooled, len(pooled) - keep)[-keep:]
                pooled, pooled_owners = pooled[top], pooled_owners[top]
            highest, owners = pooled, pooled_owners
    order = np.argsort(-highest, kind="stable")
    highest, owners = highest[order], owners[order]

    cmc = {rank: float(np.mean(probe_ranks <= rank)) for rank in ranks}
    probe_ranks[probe_ranks > ranks[-1]] = np.inf  # IdentificationResult.ranks: inf beyond the deepest rank
    items = InsightfaceProbeScores(probe_ranks, mate_scores, highest, owners, ranks, fpirs)
    subjects, units = np.unique(probe_ids, return_inverse=True)
    items.set_units(np.c_[units, np.full(num_probes, -1)], subjects.astype(str), "identity")
    tpirs, thresholds, notes = {}, {}, []
    for fpir, k in wanted.items():
        if k > negatives:
            tpirs[fpir] = thresholds[fpir] = None
            notes.append(f"TPIR@FPIR={fpir:.0e} needs {k} non-mate scores, the set has {negatives}")
            continue
        thresholds[fpir] = float(highest[k - 1])
        tpirs[fpir] = float(np.mean(mate_scores > thresholds[fpir]))
    notes.insert(
        0,
        "insightface ijb_1n.py convention: one merged gallery, closed set; TPIR@FPIR thresholds at the "
        f"ceil(FPIR x {num_probes})-th highest of the {negatives} probe-to-non-mate template scores, TPIR = probes "
        "whose mate score exceeds it at any rank; not comparable with NIST per-search TPIR@FPIR",
    )
    return IdentificationResult(
        cmc=cmc,
        tpir_at_fpir=tpirs,
        thresholds=thresholds,
        num_mated=num_probes,
        num_non_mated=0,
        gallery_size=num_entries,
        num_gallery_ids=len(np.unique(gallery_ids)),
        search="exact",
        gallery=gallery_name,
        notes=notes,
        ranks=probe_ranks,
        top_scores=top_scores,
        mated=np.ones(num_probes, dtype=bool),
        items=items,
    )


class InsightfaceProbeScores(ScoredItems):
    """The probes of an insightface-convention result (facerec.evaluation.scored): each probe's rank and
    mate score, and the highest probe-to-non-mate scores with their probes. `metrics` recomputes rank-k
    and ijb_1n.py's TPIR@FPIR with probe weights: k = ceil(FPIR x the weighted probe count), the
    threshold the k-th highest non-mate score counting each as often as its probe is weighted
    (undefined where the kept scores do not reach k)."""

    kind = "identification_insightface"

    def __init__(self, ranks, mate_scores, highest, owners, cmc_ranks=RANKS, fpirs=FPIRS):
        super().__init__(len(ranks))
        self.ranks = np.asarray(ranks, dtype=np.float64)
        self.mate_scores = np.asarray(mate_scores, dtype=np.float64)
        self.highest = np.asarray(highest, dtype=np.float64)
        self.owners = np.asarray(owners, dtype=np.int64)
        self.cmc_ranks = tuple(int(rank) for rank in cmc_ranks)
        self.fpirs = tuple(float(fpir) for fpir in fpirs)

    def metrics(self, weights=None) -> dict[str, float | None]:
        w = weights_or_ones(weights, self.num_items)
        total = w.sum()
        flat: dict[str, float | None] = {f"rank{rank}": float(np.sum(w * (self.ranks <= rank)) / total) for rank in self.cmc_ranks}
        counted = np.cumsum(w[self.owners])
        for fpir in self.fpirs:
            k = math.ceil(total * fpir)  # total: an exact integer, the weighted probe count
            if k < 1 or not len(counted) or counted[-1] < k:
                continue
            threshold = self.highest[np.searchsorted(counted, k, side="left")]
            flat[f"tpir@fpir={fpir:.0e}"] = float(np.sum(w * (self.mate_scores > threshold)) / total)
        return flat

    def kind_arrays(self) -> dict[str, np.ndarray]:
        return {
            "ranks": self.ranks, "mate_scores": self.mate_scores, "highest": self.highest, "owners": self.owners,
            "cmc_ranks": np.asarray(self.cmc_ranks), "fpirs": np.asarray(self.fpirs),
        }  # fmt: skip

    @classmethod
    def from_kind_arrays(cls, arrays) -> InsightfaceProbeScores:
        return cls(arrays["ranks"], arrays["mate_scores"], arrays["highest"], arrays["owners"], arrays["cmc_ranks"], arrays["fpirs"])

    def error_versus_reject(self, fractions) -> dict[str, np.ndarray]:
        """FNIR (the mate score not above the threshold) as the lowest-quality probes are rejected, each
        table FPIR's threshold fixed before rejection."""
        order = rejection_order(self.quality, np.ones(self.num_items, dtype=bool))
        curves = {}
        for fpir in TABLE_FPIRS:
            k = math.ceil(self.num_items * fpir)
            if k < 1 or k > len(self.highest):
                continue
            curves[f"FNIR@FPIR={fpir:.0e}"] = error_after_rejection(self.mate_scores[order] <= self.highest[k - 1], fractions)
        return curves
