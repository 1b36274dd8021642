"""IJB template verification: pooling, scores and both TAR rules against plain loops and sklearn;
the IJB reader's errors; the protocol end to end on the LFW-based fixture."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf
from sklearn.metrics import roc_auc_score, roc_curve

import facerec.evaluation.templates as templates_module
from facerec.backbones import build
from facerec.data.ijb import read_ijb_meta
from facerec.evaluation import IjbIdentification, IjbVerification
from facerec.evaluation import extract_embeddings, pool_templates, verify_templates
from facerec.evaluation.templates import TEMPLATE_FARS, template_scores
from facerec.paths import REPO_ROOT
from facerec.tools.make_fixture import main as make_fixture_main
from facerec.tools.make_fixture import make_ijb_fixture


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    return make_ijb_fixture(tmp_path_factory.mktemp("ijb"), "IJBC")


@pytest.fixture
def copy_root(fixture_root, tmp_path):
    """A private copy of the fixture a test may break."""
    return shutil.copytree(fixture_root, tmp_path / "IJBC")


def loop_pooling(features, templates, medias, faceness, keep_norms, fusion):
    """The plain per-template loop of arcface_torch's eval_ijbc.py, written independently."""
    x = np.asarray(features, np.float64)
    if not keep_norms:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    if faceness is not None:
        x = x * np.asarray(faceness, np.float64)[:, None]
    ids = sorted(set(templates.tolist()))
    pooled = []
    for t in ids:
        members = [i for i in range(len(x)) if templates[i] == t]
        if fusion == "mean":
            groups = {}
            for i in members:
                groups.setdefault(medias[i], []).append(x[i])
            total = sum(np.mean(group, axis=0) for group in groups.values())
        else:
            total = sum(x[i] for i in members)
        pooled.append(total / np.linalg.norm(total))
    return np.array(ids), np.array(pooled)


def arcface_nearest_rule(labels, scores, far):
    """arcface_torch: sklearn roc_curve, flipped, min over (|fpr - far|, index)."""
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    _, index = min(zip(abs(fpr - far), range(len(fpr))))
    return tpr[index]


def strict_rule(labels, scores, far):
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return tpr[fpr <= far].max()


def random_set(rng, n=600, num_templates=50, d=8):
    """Images of `num_templates` templates; 4,000 random pairs over them repeat (<= 1,275 distinct
    pairs) with random labels, so tied scores of both labels exercise the TAR rules' tie handling."""
    template_ids = rng.choice(np.arange(1, 10_000), num_templates, replace=False)
    templates = template_ids[np.r_[np.arange(num_templates), rng.integers(0, num_templates, n - num_templates)]]
    medias = rng.integers(0, 6, n)
    features = rng.normal(size=(n, d)).astype(np.float32) * rng.uniform(0.2, 3, (n, 1)).astype(np.float32)
    pairs = rng.choice(template_ids, (4000, 2))
    labels = (rng.random(4000) < 0.3).astype(int)
    return features, templates, medias, rng.uniform(0, 1, n), pairs, labels


@pytest.mark.parametrize("keep_norms, fusion, use_faceness", [
    (True, "mean", True), (False, "mean", True), (True, "mean", False), (True, "norm_weighted", True),
])
def test_pooling_matches_a_plain_loop(keep_norms, fusion, use_faceness):
    features, templates, medias, faceness, _, _ = random_set(np.random.default_rng(0))
    faceness = faceness if use_faceness else None
    ids, pooled = pool_templates(features, templates, medias, faceness, keep_norms, fusion, chunk=97)
    loop_ids, loop_pooled = loop_pooling(features, templates, medias, faceness, keep_norms, fusion)
    np.testing.assert_array_equal(ids, loop_ids)
    np.testing.assert_allclose(pooled, loop_pooled, atol=1e-12)


def test_scores_and_both_tar_rules_match_sklearn():
    features, templates, medias, faceness, pairs, labels = random_set(np.random.default_rng(1))
    result = verify_templates(features, templates, medias, pairs, labels, faceness=faceness, block=16)
    ids, pooled = loop_pooling(features, templates, medias, faceness, True, "mean")
    row = {t: k for k, t in enumerate(ids)}
    expected = np.array([pooled[row[a]] @ pooled[row[b]] for a, b in pairs])
    np.testing.assert_allclose(result.scores, expected, atol=1e-12)
    # The ROC is computed on our scores, so the rules are compared on identical inputs.
    for far in TEMPLATE_FARS:
        assert result.tar_at_far[far] == arcface_nearest_rule(labels, result.scores, far)
        if far * (labels == 0).sum() >= 1:
            assert result.tar_at_far_strict[far] == strict_rule(labels, result.scores, far)
        else:
            assert result.tar_at_far_strict[far] is None
    fpr, tpr, _ = roc_curve(labels, result.scores)
    np.testing.assert_array_equal(result.fpr, fpr)
    np.testing.assert_array_equal(result.tpr, tpr)
    assert result.auc == pytest.approx(roc_auc_score(labels, result.scores), abs=1e-12)
    assert len(np.unique(result.scores)) < len(result.scores) / 2  # ties were exercised


def test_dense_and_gathered_scoring_agree_with_plain_dot_products(monkeypatch):
    rng = np.random.default_rng(3)
    unit = rng.normal(size=(300, 16))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    gathered, gather = [], templates_module._gathered_scores

    def counting_gather(features, first, second, batch):
        gathered.append(len(first))
        return gather(features, first, second, batch)

    monkeypatch.setattr(templates_module, "_gathered_scores", counting_gather)
    for num_pairs, gathers in ((20, True), (50_000, False)):  # sparse blocks gather, dense ones multiply
        gathered.clear()
        first, second = rng.integers(0, 300, num_pairs), rng.integers(0, 300, num_pairs)
        expected = np.array([unit[i] @ unit[j] for i, j in zip(first, second)])
        np.testing.assert_allclose(template_scores(unit, first, second, batch=7, block=256), expected, atol=1e-13)
        assert sum(gathered) == (num_pairs if gathers else 0)


def test_verify_templates_rejects_bad_input():
    features, templates, medias, faceness, pairs, labels = random_set(np.random.default_rng(2))
    with pytest.raises(ValueError, match=r"name a template with no images, first: pair 3 = \[\d+, 99999\]"):
        verify_templates(features, templates, medias, np.r_[pairs[:3], [[pairs[3, 0], 99999]], pairs[4:]], labels)
    with pytest.raises(ValueError, match="labels must be 0 .* or 1"):
        verify_templates(features, templates, medias, pairs, labels * 2)
    with pytest.raises(ValueError, match="both classes"):
        verify_templates(features, templates, medias, pairs, np.zeros(4000, int))
    with pytest.raises(ValueError, match="keep_norms=False would discard them"):
        verify_templates(features, templates, medias, pairs, labels, keep_norms=False, fusion="norm_weighted")
    bad = features.copy()
    bad[7] = np.nan
    with pytest.raises(ValueError, match=r"first rows: \[7\]"):
        verify_templates(bad, templates, medias, pairs, labels)
    with pytest.raises(ValueError, match=r"faceness must hold one value per image \(600\)"):
        verify_templates(features, templates, medias, pairs, labels, faceness=faceness[:-1])


def test_fixture_is_deterministic_and_well_formed(fixture_root, tmp_path):
    again = make_ijb_fixture(tmp_path, "IJBC")
    for path in sorted((fixture_root / "meta").iterdir()):
        assert (again / "meta" / path.name).read_text() == path.read_text(), path.name
    meta = read_ijb_meta(fixture_root)
    assert len(np.unique(meta.templates)) == 60 and meta.labels.sum() == 20 * 3  # 3 templates of each of 20 people
    truth = json.loads((fixture_root / "fixture_truth.json").read_text())["images"]
    assert sorted(truth) == sorted(meta.image_names)
    def template_subject(part):
        return np.loadtxt(fixture_root / "meta" / f"ijbc_1N_{part}.csv", delimiter=",", skiprows=1, usecols=(0, 1), dtype=int)

    gallery = [template_subject("gallery_G1"), template_subject("gallery_G2")]
    probes = template_subject("probe_mixed")
    subjects = [set(g[:, 1]) for g in gallery]
    assert not subjects[0] & subjects[1] and set(probes[:, 1]) == subjects[0] | subjects[1]
    assert set(probes[:, 0]).isdisjoint(set(gallery[0][:, 0]) | set(gallery[1][:, 0]))


def test_reader_errors_name_the_file_and_line(copy_root):
    pairs = copy_root / "meta" / "ijbc_template_pair_label.txt"
    text = pairs.read_text()
    pairs.write_text(text + "424242 " + text.split()[0] + " 0\n")
    with pytest.raises(ValueError, match=rf"{pairs}:1771: template 424242 has no images"):
        read_ijb_meta(copy_root)
    pairs.write_text(text.replace("\n", "\n1 2\n", 1))
    with pytest.raises(ValueError, match=rf"{pairs}:2: expected 'template_id template_id label' \(3 values\), got 2"):
        read_ijb_meta(copy_root)
    pairs.write_text(text)

    landmarks = copy_root / "meta" / "ijbc_name_5pts_score.txt"
    rows = landmarks.read_text().splitlines()
    landmarks.write_text("\n".join([*rows[:4], " ".join(rows[4].split()[:-2]), *rows[5:]]) + "\n")
    with pytest.raises(ValueError, match=rf"{landmarks}:5: expected 'image_name x1 .* faceness' \(12 values\), got 10"):
        read_ijb_meta(copy_root)
    landmarks.write_text("\n".join(rows) + "\n")

    (copy_root / "loose_crop" / "7.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{landmarks}:7: image not found: .*loose_crop/7.jpg"):
        read_ijb_meta(copy_root)

    tid_mid = copy_root / "meta" / "ijbc_face_tid_mid.txt"
    tid_rows = tid_mid.read_text().splitlines()
    tid_mid.write_text("\n".join([tid_rows[1], tid_rows[0], *tid_rows[2:]]) + "\n")
    with pytest.raises(ValueError, match=rf"{landmarks}:1: image '1.jpg', but image 1 of .* is '2.jpg'"):
        read_ijb_meta(copy_root, check_images=False)


def test_protocol_end_to_end_with_a_tiny_backbone(fixture_root):
    torch.manual_seed(0)
    protocol = IjbVerification(fixture_root, "IJBC")
    images = protocol.image_set()
    image, index = images[5]
    assert image.shape == (3, 112, 112) and image.dtype == torch.float32 and index == 5
    assert -1 <= image.min() < image.max() <= 1
    backbone = build("tiny", embedding_size=32).eval()
    features = extract_embeddings(backbone, images, flip="sum", device="cpu", batch_size=64).numpy()
    result = protocol.score(features)
    assert result.kind == "templates" and result.num_templates == 60 and result.num_pairs == 1770
    assert list(result.table_row()) == ["templates", "pairs", *(f"TAR@FAR={far:.0e} (%)" for far in TEMPLATE_FARS), "AUC"]
    assert 0 <= result.auc <= 1 and set(result.summary()) >= {"auc", "tar@far=1e-04", "tar_strict@far=1e-03"}
    assert any("arcface_torch's rule" in note for note in result.notes)
    json.dumps(result.to_dict())
    kind, fpr, tpr = result.curve()
    assert kind == "roc" and fpr[0] == 0 and fpr[-1] == 1 and len(fpr) == len(tpr)
    with pytest.raises(ValueError, match=r"expected \(153, d\) features"):
        protocol.score(features[:-1])


def test_the_fixture_is_built_by_its_command_and_read_by_its_configs(tmp_path, capsys):
    config = OmegaConf.load(REPO_ROOT / "conf" / "evalset" / "ijbc_fixture.yaml")
    config = OmegaConf.merge({"paths": {"log_dir": str(tmp_path)}}, {"protocol": config})
    with pytest.raises(Exception, match=rf"no IJB set at {tmp_path}/fixtures/IJBC: .*facerec-make-fixture --out {tmp_path}/fixtures"):
        instantiate(config.protocol)  # a protocol never builds its data: the error says how
    assert not (tmp_path / "fixtures").exists()
    make_fixture_main(["--out", str(tmp_path / "fixtures")])
    assert f"the IJBC fixture is in {tmp_path / 'fixtures' / 'IJBC'}" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "fixtures").iterdir()] == ["IJBC"]  # written under a temporary name, renamed
    protocol = instantiate(config.protocol)
    assert isinstance(protocol, IjbVerification) and len(protocol.image_set()) == 153
    written = (tmp_path / "fixtures" / "IJBC" / "meta" / "ijbc_face_tid_mid.txt").stat().st_mtime_ns
    make_ijb_fixture(tmp_path / "fixtures", "IJBC")  # an existing fixture is kept as it is
    assert (tmp_path / "fixtures" / "IJBC" / "meta" / "ijbc_face_tid_mid.txt").stat().st_mtime_ns == written
    for name in ("ijbc", "ijbb"):
        real = yaml.safe_load((REPO_ROOT / "conf" / "evalset" / f"{name}.yaml").read_text())
        assert real["root"] == f"${{paths.data_dir}}/IJB_release/{name.upper()}" and real["dataset"] == name.upper()


def test_an_ijbb_fixture_has_the_ijbb_galleries(tmp_path, shared_data):
    root = make_ijb_fixture(tmp_path, "IJBB", num_templates=12)
    assert sorted(p.name for p in (root / "meta").glob("*_1N_*.csv")) == [
        "ijbb_1N_gallery_S1.csv", "ijbb_1N_gallery_S2.csv", "ijbb_1N_probe_mixed.csv"
    ]
    assert set(IjbIdentification(root, "IJBB").sets) == {"probe_mixed", "gallery_S1", "gallery_S2"}
