"""Open-set 1:N identification by cosine similarity: CMC and TPIR@FPIR (NIST FRVT / IJB-C 1:N).

A probe whose identity has an entry in the gallery is *mated*, any other probe is *non-mated*.
Every probe is searched against the whole gallery (float32 cosine, features L2-normalised here):

- rank (mated probes): an identity scores the best of its gallery entries; a probe's rank is
  1 + the number of OTHER identities scoring >= its own identity (ties count against the mate, so
  a degenerate model that gives every entry the same score never ranks first). Only the best
  `max(ranks)` identities are searched; a mate beyond them has rank inf.
- CMC(r): fraction of mated probes of rank <= r.
- FPIR / TPIR (NIST FRVT 1:N, Grother et al., NISTIR 8238; IJB-C, Maze et al., ICB 2018): a search
  alarms when its top score (over the whole gallery) exceeds the threshold. For a target FPIR the
  threshold is the (k+1)-th highest top score of the N non-mated probes, k = floor(FPIR * N), so
  at most k non-mated searches alarm (exactly k without ties); TPIR is the fraction of mated probes
  with rank 1 whose top score exceeds that threshold. An FPIR below 1 / N is not resolved (None).
  Where insightface's `ijb_1n.py` puts its threshold on probe-to-non-mate *entry* scores of a
  closed set, this is the per-search definition of the IJB-C and FRVT reports.

Search: exact (batched torch matmul + top-k, memory bounded by `batch_size`) up to
`exact_max_gallery` entries, faiss (`IndexFlatIP`, exact as well, from the `facerec[eval]`
extra) beyond; both return the same candidates up to float32 rounding.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from facerec.evaluation.result import ProtocolResult, interval_cell
from facerec.evaluation.scored import ScoredItems, error_after_rejection, rejection_order, weights_or_ones

RANKS = (1, 5, 10, 20)
FPIRS = (1e-3, 1e-2, 1e-1)
SEARCH_MODES = ("auto", "exact", "faiss")
# Beyond this many gallery entries search="auto" uses faiss. benchmarks/identify.py, 2,000 probes, d=512,
# one thread, CPU s exact / faiss: 0.5 / 0.3 at 10^4 entries, 3.7 / 2.9 at 10^5, 42 / 26 at 10^6, but
# faiss holds a normalised copy of the gallery (+1.9 GiB at 10^6) where exact search adds 0.3 GiB.
EXACT_MAX_GALLERY = 100_000
# Exact search scores PROBE_BLOCK probes against a gallery chunk at a time: 2^25 scores = 128 MiB.
BLOCK_SCORES = 2**25
PROBE_BLOCK = 1024
TABLE_RANKS = (1, 5)
TABLE_FPIRS = (1e-2, 1e-1)


@dataclass
class IdentificationResult(ProtocolResult):
    """One gallery's open-set identification: CMC, TPIR@FPIR and the per-probe outcome (see the module docstring)."""

    kind = "identification"

    cmc: dict[int, float]  # rank -> identification rate over mated probes
    tpir_at_fpir: dict[float, float | None]  # None where the set has too few non-mated probes for that FPIR
    thresholds: dict[float, float | None]  # FPIR -> the cosine a top score must exceed
    num_mated: int
    num_non_mated: int
    gallery_size: int  # entries
    num_gallery_ids: int
    search: str  # "exact" or "faiss"
    gallery: str = ""  # what the gallery is, for tables ("G1: 1772 templates", "1480 ids + 4068 distractors")
    notes: list[str] = field(default_factory=list)
    ranks: np.ndarray | None = field(default=None, repr=False)  # (P,) float: 1.. for mated, inf beyond max rank, 0 non-mated
    top_scores: np.ndarray | None = field(default=None, repr=False)  # (P,) best cosine over the gallery
    mated: np.ndarray | None = field(default=None, repr=False)  # (P,) bool
    items: ProbeScores | None = field(default=None, repr=False)

    def summary(self) -> dict[str, float]:
        flat = {f"rank{rank}": rate for rank, rate in self.cmc.items()}
        flat.update({f"tpir@fpir={fpir:.0e}": tpir for fpir, tpir in self.tpir_at_fpir.items() if tpir is not None})
        return flat

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "gallery": self.gallery,
            "cmc": {str(rank): rate for rank, rate in self.cmc.items()},
            "tpir_at_fpir": {f"{fpir:.0e}": tpir for fpir, tpir in self.tpir_at_fpir.items()},
            "thresholds": {f"{fpir:.0e}": t for fpir, t in self.thresholds.items()},
            "num_mated": self.num_mated,
            "num_non_mated": self.num_non_mated,
            "gallery_size": self.gallery_size,
            "num_gallery_ids": self.num_gallery_ids,
            "search": self.search,
            "notes": self.notes,
        }

    def table_row(self, intervals=None) -> dict[str, str]:
        return identification_row(self.gallery, f"{self.num_mated}/{self.num_non_mated}", self.cmc, self.tpir_at_fpir, intervals)

    def curve(self) -> tuple[str, np.ndarray, np.ndarray]:
        depth = max(self.cmc)
        mated_ranks = self.ranks[self.mated]
        ranks = np.arange(1, depth + 1)
        return "cmc", ranks, (mated_ranks[:, None] <= ranks[None, :]).mean(axis=0)


def identification_row(gallery: str, probes: str, cmc: dict, tpir_at_fpir: dict, intervals=None) -> dict[str, str]:
    """The table cells every identification result shows (the same headers for all of them)."""
    intervals = intervals or {}
    row = {"gallery": gallery, "probes (mated/non-mated)": probes}
    row.update(
        {f"rank-{rank} (%)": interval_cell(cmc.get(rank), intervals.get(f"rank{rank}"), percent=True) for rank in TABLE_RANKS}
    )
    row.update(
        {
            f"TPIR@FPIR={fpir:.0e} (%)": interval_cell(tpir_at_fpir.get(fpir), intervals.get(f"tpir@fpir={fpir:.0e}"), percent=True)
            for fpir in TABLE_FPIRS
        }
    )
    return row


def fpir_threshold(non_mated_top: np.ndarray, weights: np.ndarray, fpir: float) -> float | None:
    """The cosine a search's top score must exceed so that at most floor(FPIR * N) of the N (weighted)
    non-mated searches alarm: the (k+1)-th highest of their top scores; None where k < 1."""
    order = np.argsort(-non_mated_top, kind="stable")
    cumulative = np.cumsum(weights[order])
    allowed = int(np.floor(fpir * cumulative[-1] + 1e-9)) if len(cumulative) else 0  # 1e-9: 0.29 * 100 is 28.99...
    if allowed < 1:
        return None
    return float(non_mated_top[order][np.searchsorted(cumulative, allowed, side="right")])


class ProbeScores(ScoredItems):
    """The probes of an identification result: rank, top score and whether mated; units are the
    probes' identities (the gallery is fixed), sides the probe's image or template
    (facerec.evaluation.scored). `metrics` recomputes the CMC and TPIR@FPIR of `identify`."""

    kind = "identification"

    def __init__(self, ranks, top_scores, mated, cmc_ranks=RANKS, fpirs=FPIRS):
        super().__init__(len(ranks))
        self.ranks = np.asarray(ranks, dtype=np.float64)
        self.top_scores = np.asarray(top_scores, dtype=np.float64)
        self.mated = np.asarray(mated, dtype=bool)
        self.cmc_ranks = tuple(int(rank) for rank in cmc_ranks)
        self.fpirs = tuple(float(fpir) for fpir in fpirs)

    def label_array(self) -> np.ndarray:
        return self.mated

    def metrics(self, weights=None) -> dict[str, float | None]:
        w = weights_or_ones(weights, self.num_items)
        mated_weight = w * self.mated
        flat: dict[str, float | None] = {
            f"rank{rank}": float(np.sum(mated_weight * (self.ranks <= rank)) / mated_weight.sum()) for rank in self.cmc_ranks
        }
        rank_one = mated_weight * (self.ranks == 1)
        for fpir in self.fpirs:
            threshold = fpir_threshold(self.top_scores[~self.mated], w[~self.mated], fpir)
            if threshold is not None:
                flat[f"tpir@fpir={fpir:.0e}"] = float(np.sum(rank_one * (self.top_scores > threshold)) / mated_weight.sum())
        return flat

    def kind_arrays(self) -> dict[str, np.ndarray]:
        return {
            "ranks": self.ranks, "top_scores": self.top_scores, "mated": self.mated,
            "cmc_ranks": np.asarray(self.cmc_ranks), "fpirs": np.asarray(self.fpirs),
        }  # fmt: skip

    @classmethod
    def from_kind_arrays(cls, arrays) -> ProbeScores:
        return cls(arrays["ranks"], arrays["top_scores"], arrays["mated"], arrays["cmc_ranks"], arrays["fpirs"])

    def error_versus_reject(self, fractions) -> dict[str, np.ndarray]:
        """FNIR (a mated search not returning its mate at rank 1 above the threshold) against the
        fraction of mated probes rejected for low quality, the threshold fixed before rejection at
        each table FPIR over all non-mated searches (the smallest reachable FPIR, 1 / N, where the
        set has too few)."""
        order = rejection_order(self.quality, self.mated)
        non_mated = self.top_scores[~self.mated]
        if not len(non_mated):  # a closed set (TinyFace): no threshold, the rank-1 miss rate
            return {"rank-1 miss rate": error_after_rejection(self.ranks[order] != 1, fractions)}
        curves = {}
        for fpir in sorted({max(fpir, 1 / len(non_mated)) for fpir in TABLE_FPIRS}, reverse=True):
            threshold = fpir_threshold(non_mated, np.ones(len(non_mated)), fpir)
            errors = ~((self.ranks[order] == 1) & (self.top_scores[order] > threshold))
            curves[f"FNIR@FPIR={fpir:.0e}"] = error_after_rejection(errors, fractions)
        return curves


class GalleryScores(ScoredItems):
    """One probe set's `ProbeScores` in several galleries: the same probes and units, metrics the mean
    over galleries and each gallery's own (`MultiGalleryResult.summary()`)."""

    kind = "galleries"

    def __init__(self, galleries: dict[str, ProbeScores]):
        first = next(iter(galleries.values()))
        super().__init__(first.num_items)
        self.galleries = galleries
        self.set_units(first.units, first.unit_names, first.unit_kind)

    def set_sides(self, sides, image_group) -> None:
        super().set_sides(sides, image_group)
        for items in self.galleries.values():
            items.set_sides(sides, image_group)

    def set_quality(self, image_quality) -> None:
        super().set_quality(image_quality)
        for items in self.galleries.values():
            items.quality = self.quality

    def label_array(self) -> np.ndarray:
        return np.stack([items.mated for items in self.galleries.values()], axis=1)

    def metrics(self, weights=None) -> dict[str, float | None]:
        each = {name: items.metrics(weights) for name, items in self.galleries.items()}
        keys = list(dict.fromkeys(key for metrics in each.values() for key in metrics))
        flat = {key: float(np.mean([m[key] for m in each.values()])) for key in keys if all(key in m for m in each.values())}
        flat.update({f"{name}/{key}": value for name, metrics in each.items() for key, value in metrics.items()})
        return flat

    def kind_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"galleries": np.asarray(list(self.galleries))}
        for name, items in self.galleries.items():
            arrays.update({f"{name}.{key}": value for key, value in items.kind_arrays().items()})
        return arrays

    @classmethod
    def from_kind_arrays(cls, arrays) -> GalleryScores:
        names = [str(name) for name in arrays["galleries"]]
        return cls(
            {name: ProbeScores.from_kind_arrays({k[len(name) + 1 :]: v for k, v in arrays.items() if k.startswith(f"{name}.")}) for name in names}
        )

    def error_versus_reject(self, fractions) -> dict[str, np.ndarray]:
        curves = {name: items.error_versus_reject(fractions) for name, items in self.galleries.items()}
        labels = next(iter(curves.values()))
        return {label: np.mean([c[label] for c in curves.values()], axis=0) for label in labels}


def _features(name: str, x) -> tuple[np.ndarray, np.ndarray]:
    """(x as C-contiguous float32, its row norms), checked; no normalised copy of a large gallery is made."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or not len(x):
        raise ValueError(f"{name} must be a non-empty (N, d) array, got shape {x.shape}")
    norms = np.sqrt(np.einsum("nd,nd->n", x, x))  # no (N, d) temporary, unlike np.linalg.norm
    bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
    if len(bad):
        raise ValueError(f"{name} holds {len(bad)} non-finite or all-zero features (first rows: {bad[:5].tolist()})")
    return x, norms


def _ids(name: str, ids, n: int, features: str) -> np.ndarray:
    if hasattr(ids, "detach"):
        ids = ids.detach().cpu().numpy()
    ids = np.asarray(ids)
    if ids.shape != (n,):
        raise ValueError(f"{name} must hold one id per row of {features} ({n}), got shape {ids.shape}")
    return ids


def _import_faiss():
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "search='faiss' (and search='auto' beyond exact_max_gallery entries) needs faiss: "
            "pip install 'facerec[eval]' (faiss-cpu)"
        ) from error
    return faiss


def search_exact(
    gallery: np.ndarray, norms: np.ndarray, probes: np.ndarray, k: int, batch_size: int = PROBE_BLOCK
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, entries), each (P, k): the k best cosines of each (unit) probe over the gallery rows
    (divided by their `norms`), descending. Blocks of `batch_size` probes x BLOCK_SCORES / batch_size
    entries keep memory bounded and the matmuls large; each block's top k merges into a running top k."""
    table, inverse_norms = torch.from_numpy(gallery), torch.from_numpy(1 / norms)
    chunk = max(1, BLOCK_SCORES // batch_size)
    scores = np.empty((len(probes), k), dtype=np.float32)
    entries = np.empty((len(probes), k), dtype=np.int64)
    for start in range(0, len(probes), batch_size):
        block = torch.from_numpy(probes[start : start + batch_size])
        best_scores = torch.empty(len(block), 0)
        best_entries = torch.empty(len(block), 0, dtype=torch.int64)
        for first in range(0, len(gallery), chunk):
            cosines = (block @ table[first : first + chunk].T).mul_(inverse_norms[first : first + chunk])
            top = torch.topk(cosines, min(k, cosines.shape[1]), dim=1)
            merged_scores = torch.cat([best_scores, top.values], dim=1)
            merged_entries = torch.cat([best_entries, top.indices + first], dim=1)
            best = torch.topk(merged_scores, min(k, merged_scores.shape[1]), dim=1)
            best_scores, best_entries = best.values, merged_entries.gather(1, best.indices)
        scores[start : start + len(block)] = best_scores.numpy()
        entries[start : start + len(block)] = best_entries.numpy()
    return scores, entries


def search_faiss(gallery: np.ndarray, norms: np.ndarray, probes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, entries), each (P, k): the same as `search_exact`, by a faiss flat inner-product index.
    The index's own copy of the gallery is normalised in place: no second (G, d) copy is made."""
    faiss = _import_faiss()
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    stored = faiss.rev_swig_ptr(index.get_xb(), gallery.size).reshape(gallery.shape)
    chunk = max(1, BLOCK_SCORES // gallery.shape[1])
    for first in range(0, len(gallery), chunk):
        rows = slice(first, first + chunk)
        np.divide(stored[rows], norms[rows, None], out=stored[rows])
    scores, entries = index.search(probes, k)
    return scores, entries.astype(np.int64)


def _first_of_their_id(ids: np.ndarray) -> np.ndarray:
    """(P, k) bool: candidate j is the best-scoring candidate of its identity in row p (rows are
    sorted by score, so that is the id's first appearance; a stable sort keeps the order of equals)."""
    order = np.argsort(ids, axis=1, kind="stable")
    grouped = np.take_along_axis(ids, order, axis=1)
    first_in_group = np.ones(ids.shape, dtype=bool)
    first_in_group[:, 1:] = grouped[:, 1:] != grouped[:, :-1]
    first = np.empty_like(first_in_group)
    np.put_along_axis(first, order, first_in_group, axis=1)
    return first


def checked_ranks_fpirs(ranks, fpirs) -> tuple[list[int], tuple[float, ...]]:
    """(sorted distinct ranks, fpirs), each checked: ranks positive integers, FPIRs in (0, 1)."""
    ranks = sorted({int(rank) for rank in ranks})
    if not ranks or ranks[0] < 1:
        raise ValueError(f"ranks must be positive integers, got {ranks}")
    fpirs = tuple(float(fpir) for fpir in fpirs)
    if any(not 0 < fpir < 1 for fpir in fpirs):
        raise ValueError(f"fpirs must lie in (0, 1), got {fpirs}")
    return ranks, fpirs


def identify(
    gallery,
    gallery_ids,
    probes,
    probe_ids,
    ranks=RANKS,
    fpirs=FPIRS,
    search: str = "auto",
    exact_max_gallery: int = EXACT_MAX_GALLERY,
    batch_size: int | None = None,
) -> IdentificationResult:
    """Open-set identification of `probes` against `gallery` (see the module docstring for the rules).

    gallery: (G, d) features (arrays or tensors, normalised here), gallery_ids: (G,) identity of each
    entry (several entries per id allowed); probes: (P, d), probe_ids: (P,) (ints or strings, compared
    with the gallery's). search: "exact", "faiss" or "auto" (exact up to `exact_max_gallery` entries);
    batch_size: probes per exact-search block (default PROBE_BLOCK; a block's scores take 128 MiB).
    """
    gallery, gallery_norms = _features("gallery", gallery)
    probes, probe_norms = _features("probes", probes)
    probes = probes / probe_norms[:, None]
    if gallery.shape[1] != probes.shape[1]:
        raise ValueError(f"gallery and probes must have the same feature size, got {gallery.shape[1]} and {probes.shape[1]}")
    gallery_ids = _ids("gallery_ids", gallery_ids, len(gallery), "gallery")
    probe_ids = _ids("probe_ids", probe_ids, len(probes), "probes")
    ranks, fpirs = checked_ranks_fpirs(ranks, fpirs)
    if search not in SEARCH_MODES:
        raise ValueError(f"search must be one of {SEARCH_MODES}, got {search!r}")
    if search == "auto":
        search = "exact" if len(gallery) <= exact_max_gallery else "faiss"

    names, codes = np.unique(np.concatenate([gallery_ids, probe_ids]), return_inverse=True)
    gallery_codes, probe_codes = codes[: len(gallery)], codes[len(gallery) :]
    entries_per_id = np.bincount(gallery_codes, minlength=len(names))
    mated = entries_per_id[probe_codes] > 0
    if not mated.any():
        raise ValueError(
            f"none of the {len(probes)} probes has an identity in the gallery ({int((entries_per_id > 0).sum())} ids)"
        )

    # The best `depth` identities lie within the best depth * (most entries of one id) entries.
    depth = ranks[-1]
    k = min(depth * int(entries_per_id.max()), len(gallery))
    if search == "exact":
        scores, entries = search_exact(gallery, gallery_norms, probes, k, batch_size or PROBE_BLOCK)
    else:
        scores, entries = search_faiss(gallery, gallery_norms, probes, k)

    candidate_ids = gallery_codes[entries]
    own = candidate_ids == probe_codes[:, None]
    found = own.any(axis=1)
    mate_score = np.where(found, scores[np.arange(len(probes)), own.argmax(axis=1)], np.inf)
    rivals = (_first_of_their_id(candidate_ids) & ~own & (scores >= mate_score[:, None])).sum(axis=1)
    probe_ranks = np.where(found & (rivals < depth), rivals + 1.0, np.inf)
    probe_ranks[~mated] = 0
    top_scores = scores[:, 0]

    mated_ranks = probe_ranks[mated]
    cmc = {rank: float(np.mean(mated_ranks <= rank)) for rank in ranks}
    non_mated_top = np.sort(top_scores[~mated])[::-1]
    rank_one = mated_ranks == 1
    notes, tpirs, thresholds = [], {}, {}
    for fpir in fpirs:
        allowed = int(np.floor(fpir * len(non_mated_top) + 1e-9))  # 1e-9: 0.29 * 100 is 28.999999999999996
        if allowed < 1:
            tpirs[fpir] = thresholds[fpir] = None
            notes.append(
                f"TPIR@FPIR={fpir:.0e} needs >= {int(np.ceil(1 / fpir))} non-mated probes, the set has {len(non_mated_top)}"
            )
            continue
        thresholds[fpir] = float(non_mated_top[allowed])  # allowed < N as FPIR < 1
        tpirs[fpir] = float(np.mean(rank_one & (top_scores[mated] > thresholds[fpir])))
    return IdentificationResult(
        cmc=cmc,
        tpir_at_fpir=tpirs,
        thresholds=thresholds,
        num_mated=int(mated.sum()),
        num_non_mated=int((~mated).sum()),
        gallery_size=len(gallery),
        num_gallery_ids=int((entries_per_id > 0).sum()),
        search=search,
        gallery=f"{int((entries_per_id > 0).sum())} ids",
        notes=notes,
        ranks=probe_ranks,
        top_scores=top_scores,
        mated=mated,
        items=probe_items(probe_ranks, top_scores, mated, probe_codes, names, ranks, fpirs),
    )


def probe_items(ranks, top_scores, mated, probe_codes, names, cmc_ranks, fpirs) -> ProbeScores:
    """`ProbeScores` whose units are the probes' identities (codes into `names`)."""
    items = ProbeScores(ranks, top_scores, mated, cmc_ranks, fpirs)
    used, units = np.unique(probe_codes, return_inverse=True)
    items.set_units(np.c_[units, np.full(len(units), -1)], names[used].astype(str), "identity")
    return items


@dataclass
class MultiGalleryResult(ProtocolResult):
    """The identification results of one probe set searched in several galleries, and their mean (as the
    IJB-B / IJB-C 1:N tables report it)."""

    kind = "identification"

    galleries: dict[str, IdentificationResult]
    notes: list[str] = field(default_factory=list)
    items: GalleryScores | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.items is None and all(result.items is not None for result in self.galleries.values()):
            self.items = GalleryScores({name: result.items for name, result in self.galleries.items()})

    def _mean(self, metric: str) -> dict:
        values = [getattr(result, metric) for result in self.galleries.values()]
        keys = values[0].keys()
        return {
            key: None if any(v[key] is None for v in values) else float(np.mean([v[key] for v in values])) for key in keys
        }

    @property
    def cmc(self) -> dict[int, float]:
        return self._mean("cmc")

    @property
    def tpir_at_fpir(self) -> dict[float, float | None]:
        return self._mean("tpir_at_fpir")

    def summary(self) -> dict[str, float]:
        flat = {f"rank{rank}": rate for rank, rate in self.cmc.items()}
        flat.update({f"tpir@fpir={fpir:.0e}": tpir for fpir, tpir in self.tpir_at_fpir.items() if tpir is not None})
        for name, result in self.galleries.items():
            flat.update({f"{name}/{key}": value for key, value in result.summary().items()})
        return flat

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "mean": {
                "cmc": {str(rank): rate for rank, rate in self.cmc.items()},
                "tpir_at_fpir": {f"{fpir:.0e}": tpir for fpir, tpir in self.tpir_at_fpir.items()},
            },
            "galleries": {name: result.to_dict() for name, result in self.galleries.items()},
            "notes": self.notes,
        }

    def table_row(self, intervals=None) -> dict[str, str]:
        names = ", ".join(self.galleries)
        probes = ", ".join(f"{name} {r.num_mated}/{r.num_non_mated}" for name, r in self.galleries.items())
        return identification_row(f"mean of {names}", probes, self.cmc, self.tpir_at_fpir, intervals)

    def curve(self) -> tuple[str, np.ndarray, np.ndarray]:
        curves = [result.curve() for result in self.galleries.values()]
        return "cmc", curves[0][1], np.mean([rates for _, _, rates in curves], axis=0)
