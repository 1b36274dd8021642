"""1:N identification: `identify` against brute force and by hand, exact vs faiss search, the protocols."""
from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from facerec.backbones import build
from facerec.evaluation import FolderIdentification, IjbIdentification, extract_embeddings, identification, identify
from facerec.paths import REPO_ROOT
from facerec.tools.make_fixture import make_ijb_fixture


def brute_force(gallery, gallery_ids, probes, probe_ids, ranks, fpirs):
    """Full score matrix, per-identity best scores, ranks counted one probe at a time, and each
    FPIR's threshold found by trying every non-mated top score as the threshold."""
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    p = probes / np.linalg.norm(probes, axis=1, keepdims=True)
    scores = np.float64(p) @ np.float64(g).T
    names = sorted(set(gallery_ids))
    best = np.stack([scores[:, np.asarray(gallery_ids) == name].max(axis=1) for name in names], axis=1)
    probe_ranks, top = [], scores.max(axis=1)
    for row, probe_id in enumerate(probe_ids):
        if probe_id not in names:
            probe_ranks.append(0.0)
            continue
        own = names.index(probe_id)
        rank = 1 + sum(best[row, j] >= best[row, own] for j in range(len(names)) if j != own)
        probe_ranks.append(float(rank) if rank <= max(ranks) else np.inf)
    probe_ranks = np.asarray(probe_ranks)
    mated = np.isin(probe_ids, names)
    cmc = {r: np.mean(probe_ranks[mated] <= r) for r in ranks}
    non_mated_top = top[~mated]
    tpir = {}
    for fpir in fpirs:
        allowed = [t for t in non_mated_top if np.mean(non_mated_top > t) <= fpir]
        threshold = min(allowed)
        tpir[fpir] = np.mean((probe_ranks[mated] == 1) & (top[mated] > threshold))
    return probe_ranks, cmc, tpir


def random_search_set(rng, num_ids=30, dim=16, mated=150, non_mated=50, max_entries=3):
    """Identities at random centres; 1..max_entries gallery entries each; noisy probes."""
    centres = rng.standard_normal((num_ids + non_mated, dim))
    entries = rng.integers(1, max_entries + 1, size=num_ids)
    gallery_ids = np.repeat(np.arange(num_ids), entries)
    gallery = centres[gallery_ids] + 0.9 * rng.standard_normal((len(gallery_ids), dim))
    probe_ids = np.r_[rng.integers(0, num_ids, size=mated), num_ids + np.arange(non_mated)]
    probes = centres[probe_ids] + 0.9 * rng.standard_normal((len(probe_ids), dim))
    scale = rng.uniform(0.5, 3.0, size=(len(probes), 1))  # identify normalises
    return gallery.astype(np.float32), gallery_ids, (probes * scale).astype(np.float32), probe_ids


@pytest.mark.parametrize("search", ["exact", "faiss"])
def test_identify_matches_brute_force(search, monkeypatch):
    # Exact search in blocks of 7 probes x 9 gallery entries: every probe's top 30 merges 7 chunks.
    monkeypatch.setattr(identification, "BLOCK_SCORES", 7 * 9)
    rng = np.random.default_rng(0)
    gallery, gallery_ids, probes, probe_ids = random_search_set(rng)
    ranks, fpirs = (1, 2, 3, 5, 10), (0.02, 0.1, 0.5)
    expected_ranks, cmc, tpir = brute_force(gallery, gallery_ids, probes, probe_ids, ranks, fpirs)
    result = identify(gallery, gallery_ids, probes, probe_ids, ranks=ranks, fpirs=fpirs, search=search, batch_size=7)
    assert result.search == search
    np.testing.assert_array_equal(result.ranks, expected_ranks)
    assert 0.2 < cmc[1] < 0.9 and cmc[10] > cmc[1]  # the data make every rank matter
    assert result.cmc == pytest.approx(cmc, abs=0)
    assert result.tpir_at_fpir == pytest.approx(tpir, abs=0)
    assert (result.num_mated, result.num_non_mated, result.num_gallery_ids) == (150, 50, 30)
    assert result.gallery_size == len(gallery)
    kind, curve_ranks, rates = result.curve()
    assert kind == "cmc" and curve_ranks.tolist() == list(range(1, 11))
    assert rates[[0, 1, 2, 4, 9]] == pytest.approx([cmc[r] for r in ranks])


def test_exact_and_faiss_search_agree_on_a_large_gallery():
    rng = np.random.default_rng(1)
    dim, num_ids = 64, 20_000
    gallery = rng.standard_normal((num_ids, dim)).astype(np.float32)
    probe_ids = np.r_[rng.integers(0, num_ids, size=300), num_ids + np.arange(300)]
    probes = rng.standard_normal((600, dim)).astype(np.float32)
    probes[:300] += 0.6 * gallery[probe_ids[:300]] / np.linalg.norm(gallery[probe_ids[:300]], axis=1, keepdims=True) * 8
    exact = identify(gallery, np.arange(num_ids), probes, probe_ids, search="exact", batch_size=4096)  # 3 chunks
    fast = identify(gallery, np.arange(num_ids), probes, probe_ids, search="auto", exact_max_gallery=10_000)
    assert fast.search == "faiss"
    np.testing.assert_array_equal(exact.ranks, fast.ranks)
    np.testing.assert_allclose(exact.top_scores, fast.top_scores, atol=1e-5)
    assert exact.cmc == fast.cmc and exact.tpir_at_fpir == fast.tpir_at_fpir
    assert 0.05 < exact.cmc[1] < 0.95 and exact.tpir_at_fpir[0.01] > 0


def test_tpir_at_fpir_by_hand():
    # 2-d features: gallery a = (1, 0), b = (0, 1); a probe at angle t scores cos t with a, sin t with b.
    angles = np.deg2rad([10, 60, 80, 50, -50])
    mated = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    # non-mated top scores: 0.866 (30 deg), 0.707 (45 deg), and two of exactly 0
    non_mated = np.array([[np.cos(np.pi / 6), 0.5], [1.0, 1.0], [0.0, -1.0], [-1.0, 0.0]])
    probes = 5 * np.concatenate([mated, non_mated])
    probe_ids = list("aabba") + list("ccdd")
    result = identify(np.eye(2), ["a", "b"], probes, probe_ids, ranks=(1, 2), fpirs=(0.1, 0.25, 0.5, 0.75))
    # ranks: 10 deg a wins; 60 deg b (0.866) beats a (0.5) -> 2; 80, 50 deg b wins; -50 deg a wins (top 0.643).
    assert result.ranks.tolist() == [1, 2, 1, 1, 1, 0, 0, 0, 0]
    assert result.cmc == {1: 0.8, 2: 1.0}
    # FPIR 0.25: 1 of 4 non-mated may alarm -> threshold 0.707 (2nd highest): 10, 80, 50 deg pass (3 of 5).
    # FPIR 0.5 -> threshold 0 (3rd): -50 deg (0.643) passes too. FPIR 0.75: the 4th top score ties the 3rd
    # at 0, so only 2 of 4 alarm and TPIR stays 4/5. FPIR 0.1 needs >= 10 non-mated probes.
    assert result.thresholds[0.25] == pytest.approx(np.sqrt(0.5))
    assert result.tpir_at_fpir == {0.1: None, 0.25: 0.6, 0.5: 0.8, 0.75: 0.8}
    assert any("FPIR=1e-01 needs >= 10 non-mated probes" in note for note in result.notes)
    tpir_keys = {"tpir@fpir=2e-01": 0.6, "tpir@fpir=5e-01": 0.8, "tpir@fpir=8e-01": 0.8}  # 0.25 and 0.75 print as 2e-01, 8e-01
    assert result.summary() == {"rank1": 0.8, "rank2": 1.0, **tpir_keys}
    row = result.table_row()
    assert row["rank-1 (%)"] == "80.00" and row["rank-5 (%)"] == "n/a" and row["probes (mated/non-mated)"] == "5/4"


def test_ties_count_against_the_mate():
    # Every gallery entry scores the same: no probe ranks first, whatever the order the search returns.
    result = identify(np.ones((4, 3)), [0, 1, 2, 3], np.ones((2, 3)), [2, 3], ranks=(1, 4))
    assert result.ranks.tolist() == [4, 4] and result.cmc == {1: 0.0, 4: 1.0}


def test_bad_inputs_are_named():
    gallery, probes = np.ones((3, 4)), np.ones((2, 4))
    with pytest.raises(ValueError, match=r"gallery must be a non-empty \(N, d\) array, got shape \(0, 4\)"):
        identify(np.zeros((0, 4)), [], probes, [0, 1])
    with pytest.raises(ValueError, match=r"gallery_ids must hold one id per row of gallery \(3\), got shape \(2,\)"):
        identify(gallery, [0, 1], probes, [0, 1])
    with pytest.raises(ValueError, match=r"probe_ids must hold one id per row of probes \(2\), got shape \(3,\)"):
        identify(gallery, [0, 1, 2], probes, [0, 1, 2])
    with pytest.raises(ValueError, match="the same feature size, got 4 and 5"):
        identify(gallery, [0, 1, 2], np.ones((2, 5)), [0, 1])
    with pytest.raises(ValueError, match=r"probes holds 1 non-finite or all-zero features \(first rows: \[1\]\)"):
        identify(gallery, [0, 1, 2], np.array([[1.0, 0, 0, 0], [np.nan, 0, 0, 0]]), [0, 1])
    with pytest.raises(ValueError, match="none of the 2 probes has an identity in the gallery"):
        identify(gallery, [0, 1, 2], probes, [7, 8])
    with pytest.raises(ValueError, match="search must be one of"):
        identify(gallery, [0, 1, 2], probes, [0, 1], search="hnsw")
    with pytest.raises(ValueError, match=r"fpirs must lie in \(0, 1\)"):
        identify(gallery, [0, 1, 2], probes, [0, 1], fpirs=(1.0,))


def test_missing_faiss_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'facerec\[eval\]'"):
        identify(np.eye(3), [0, 1, 2], np.eye(3), [0, 1, 5], search="faiss")


def test_folder_protocol_on_lfw_with_a_tiny_backbone(shared_data):
    root = shared_data / "lfw" / "aligned_112"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())[:80]
    protocol = FolderIdentification(root, names, non_mated_identities=3, num_distractors=10, image_size=32)
    split = protocol.split
    torch.manual_seed(0)
    features = extract_embeddings(build("tiny", width=4, input_size=32), protocol.image_set(), batch_size=64).numpy()
    result = protocol.score(features)

    # Rebuild the protocol from its file lists alone: the gallery holds one image of each enrolled
    # person and of each distractor; every other image of an enrolled or non-mated person is a probe.
    person = np.array([path.parent.name for path in split.paths])
    gallery_people, probe_people = person[split.gallery], person[split.probes]
    assert len(gallery_people) == len(set(gallery_people)) and not set(split.gallery) & set(split.probes)
    distractors = set(gallery_people) - set(probe_people)
    non_mated = set(probe_people) - set(gallery_people)
    assert len(distractors) == 10 and len(non_mated) == 3
    assert all(len(list((root / name).iterdir())) == 1 for name in distractors)
    expected = identify(features[split.gallery], gallery_people, features[split.probes], probe_people)
    assert result.cmc == expected.cmc and result.tpir_at_fpir == expected.tpir_at_fpir
    assert (result.num_mated, result.num_non_mated) == (expected.num_mated, expected.num_non_mated)
    assert result.num_non_mated == sum(np.isin(probe_people, list(non_mated)))
    assert result.kind == "identification" and result.gallery == f"{split.num_enrolled} ids + 10 distractors"
    assert result.to_dict()["cmc"].keys() == {"1", "5", "10", "20"} and split.description in result.notes

    with pytest.raises(ValueError, match=r"expected \(\d+, d\) features, one per image of image_set\(\), got shape \(3, 8"):
        protocol.score(np.ones((3, 8)))
    with pytest.raises(ValueError, match=r"num_distractors=999, but the identities of .* < 2 images holds \d+ identities"):
        FolderIdentification(root, names, num_distractors=999)


def test_folder_protocol_takes_distractors_from_another_folder(shared_data):
    root = shared_data / "lfw" / "aligned_112"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())[:40]
    protocol = FolderIdentification(root, names, num_distractors=4, distractor_root=shared_data / "orl", image_size=32)
    split = protocol.split
    distractor_files = [split.paths[i] for i in split.gallery[split.gallery_ids < 0]]
    assert len(distractor_files) == 4 and all(path.suffix == ".pgm" for path in distractor_files)
    image, index = protocol.image_set()[int(split.gallery[-1])]
    assert image.shape == (3, 32, 32) and index == split.gallery[-1]


@pytest.fixture(scope="module")
def ijb_root(tmp_path_factory, shared_data):
    return make_ijb_fixture(tmp_path_factory.mktemp("ijb_1n"), "IJBC")


def loop_templates(features, meta, faceness):
    """arcface_torch's pooling, one template at a time: faceness-weighted features, mean per media, summed."""
    pooled = {}
    for t in np.unique(meta.templates):
        rows = np.flatnonzero(meta.templates == t)
        weighted = np.float64(features[rows]) * faceness[rows, None]
        medias = meta.medias[rows]
        pooled[t] = sum(weighted[medias == m].mean(axis=0) for m in np.unique(medias))
    return pooled


def test_ijb_1n_protocol_on_the_fixture(ijb_root):
    config = OmegaConf.load(REPO_ROOT / "conf" / "evalset" / "ijbc_fixture_1n.yaml")
    config.root = str(ijb_root)
    protocol = instantiate(config)
    assert isinstance(protocol, IjbIdentification)
    torch.manual_seed(0)
    backbone = build("tiny", width=4, input_size=112)
    features = extract_embeddings(backbone, protocol.image_set(), batch_size=64).numpy()
    result = protocol.score(features)

    pooled = loop_templates(features, protocol.meta, protocol.meta.faceness)
    meta_dir = ijb_root / "meta"
    def templates_and_subjects(part):  # insightface's reader; the csv has one row per image
        table = np.loadtxt(meta_dir / f"ijbc_1N_{part}.csv", dtype=np.int64, delimiter=",", skiprows=1, usecols=(0, 1))
        return np.unique(table, axis=0)

    probes = templates_and_subjects("probe_mixed")
    for gallery in ("G1", "G2"):
        entries = templates_and_subjects(f"gallery_{gallery}")
        ranks, cmc, tpir = brute_force(
            np.stack([pooled[t] for t in entries[:, 0]]), entries[:, 1].tolist(),
            np.stack([pooled[t] for t in probes[:, 0]]), probes[:, 1].tolist(), (1, 5, 10, 20), (0.1,),
        )
        got = result.galleries[gallery]
        assert (got.num_mated, got.num_non_mated, got.gallery_size) == (20, 20, 10)
        assert got.cmc == pytest.approx(cmc, abs=1e-12) and got.tpir_at_fpir[0.1] == pytest.approx(tpir[0.1], abs=1e-12)
        assert got.tpir_at_fpir[0.01] is None
    assert result.cmc[1] == pytest.approx((result.galleries["G1"].cmc[1] + result.galleries["G2"].cmc[1]) / 2)
    assert result.summary()["G2/rank5"] == result.galleries["G2"].cmc[5]
    assert result.table_row()["gallery"] == "mean of G1, G2" and result.table_row()["TPIR@FPIR=1e-02 (%)"] == "n/a"
    assert result.kind == "identification" and set(result.to_dict()["galleries"]) == {"G1", "G2"}
    kind, curve_ranks, rates = result.curve()
    assert kind == "cmc" and rates[0] == pytest.approx(result.cmc[1]) and len(curve_ranks) == 20


def test_ijb_1n_csv_errors_name_file_and_line(ijb_root, tmp_path):
    root = shutil.copytree(ijb_root, tmp_path / "IJBC")
    probe_csv = root / "meta" / "ijbc_1N_probe_mixed.csv"
    header, *rows = probe_csv.read_text().splitlines()
    template, subject, *rest = rows[0].split(",")

    def broken(lines, error, match):
        probe_csv.write_text("\n".join(lines) + "\n")
        with pytest.raises(error, match=match):
            IjbIdentification(root)

    csv_name = "ijbc_1N_probe_mixed.csv"
    broken(["FILENAME,TEMPLATE_ID", *rows], ValueError, rf"{csv_name}:1: expected a header starting 'TEMPLATE_ID,SUBJECT_ID'")
    bad_id = "x12,3,img/1.jpg"
    broken([header, rows[0], bad_id], ValueError, rf"{csv_name}:3: expected integer TEMPLATE_ID,SUBJECT_ID first, got '{bad_id}'")
    other = ",".join([template, str(int(subject) + 1000), *rest])
    message = rf"{csv_name}:3: template {template} has subject {int(subject) + 1000} here but {subject} on line 2"
    broken([header, rows[0], other], ValueError, message)
    message = rf"{csv_name}: 1 templates have no images in .*ijbc_face_tid_mid.txt, e.g. template 987654321"
    broken([header, "987654321,1,img/1.jpg"], ValueError, message)
    probe_csv.write_text("\n".join([header, *rows]) + "\n")
    landmarks = root / "meta" / "ijbc_name_5pts_score.txt"
    first, second, *others = landmarks.read_text().splitlines()
    landmarks.write_text("\n".join([second, first, *others]) + "\n")
    with pytest.raises(ValueError, match=rf"ijbc_name_5pts_score.txt:1: image '{second.split()[0]}', but image 1 of .* same order"):
        IjbIdentification(root)
    landmarks.write_text("\n".join([first, second, *others]) + "\n")
    probe_csv.unlink()
    with pytest.raises(FileNotFoundError, match="IJB 1:N protocol file not found: .*ijbc_1N_probe_mixed.csv"):
        IjbIdentification(root)


def test_lfw_megaface_config_runs_on_the_shared_data(shared_data):
    config = OmegaConf.load(REPO_ROOT / "conf" / "evalset" / "lfw_megaface.yaml")
    config.root = str(shared_data / "lfw" / "aligned_112")
    protocol = instantiate(config)
    counts = [len(list(p.iterdir())) for p in (shared_data / "lfw" / "aligned_112").iterdir() if p.is_dir()]
    searchable, singles = sum(c >= 2 for c in counts), sum(c == 1 for c in counts)
    split = protocol.split
    assert split.num_enrolled == searchable - 200 and split.num_distractors == singles
    assert len(split.gallery) == searchable - 200 + singles
    assert len(split.paths) == sum(counts)  # every image is enrolled, a probe or a distractor
