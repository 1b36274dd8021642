"""The identity-overlap audit (facerec.tools.overlap), the per-image keys of every protocol
(image_names, image_identities) and eval.py's exclude= (protocol.without), on real LFW files."""
from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import initialize_config_dir
from hydra.utils import instantiate
from torch import nn

from conftest import CONF_DIR, compose_config, run_script
from facerec.backbones import build
from facerec.data import BinVerificationSet, ImageFolderPairs, SyntheticPairs, read_pairs, write_bin
from facerec.data.decode import image_tensor
from facerec.data.image_folder import read_identity_list, scan_folder
from facerec.evaluation import (
    FolderIdentification,
    IjbIdentification,
    IjbVerification,
    PairVerification,
    extract_embeddings,
    verify,
)
from facerec.evaluation.evaluate import evaluate
from facerec.evaluation.exclusion import exclude_images
from facerec.tools.overlap import TrainingImages, audit_overlap, positional_overrides, run


def run_overlap(overrides: list[str], output_dir: Path):
    cfg = compose_config(overrides, output_dir, config_name="overlap")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return run(cfg)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, header: list[str], rows) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def pair_people(path: Path) -> tuple[set[str], set[str]]:
    """(the people, the image keys "Name/Name_NNNN.jpg") of an LFW pairs file."""
    images = {image for pair in read_pairs(path).images for image in pair}
    return {name for name, _ in images}, {f"{name}/{name}_{number:04d}.jpg" for name, number in images}


def lfw_protocol(name: str, tmp_path: Path) -> PairVerification:
    cfg = compose_config([f"eval_sets=[{name}]", "ckpt_path=unused"], tmp_path, config_name="eval")
    return instantiate(cfg.evalset[name])


def identity_features(identities: list[str], dim: int = 32, noise: float = 0.8, seed: int = 0) -> np.ndarray:
    """A feature per image: a random direction per identity plus per-image noise (an informative embedding)."""
    rng = np.random.default_rng(seed)
    names, labels = np.unique(identities, return_inverse=True)
    directions = rng.normal(size=(len(names), dim))
    return (directions[labels] + noise * rng.normal(size=(len(labels), dim))).astype(np.float32)


# ------------------------------------------------------------------ by name, LFW View 2 and View 1
def test_overlap_audit_flags_the_devtrain_people_in_view2_and_none_of_devtest(shared_data, tmp_path):
    """View 2 (pairs.txt) draws from all LFW people, so it shares people with DevTrain: the audit must
    flag exactly those, every one of their images, and none of the DevTest people."""
    lfw = shared_data / "lfw"
    devtrain, devtest = set(read_identity_list(lfw / "peopleDevTrain.txt")), set(read_identity_list(lfw / "peopleDevTest.txt"))
    view2_people, view2_images = pair_people(lfw / "pairs.txt")
    out = run_script(["-m", "facerec.tools.overlap", "lfw_devtrain", "lfw", f"hydra.run.dir={tmp_path}"]).stdout
    assert "lfw: 4281 identities, 7701 images; training: dataset=lfw_devtrain" in out
    assert "by name: 2985 identities\nby embedding: not run" in out and "flagged: 2985 identities, 5415 images" in out

    suspects = read_csv(tmp_path / "suspects.csv")
    flagged = {row["eval_identity"] for row in suspects}
    assert flagged == view2_people & devtrain and len(flagged) == 2985  # of the 4,281 View 2 people
    assert not flagged & devtest
    assert all(row["training_identity"] == row["eval_identity"] and row["cosine"] == "" for row in suspects)
    assert {(row["by_name"], row["by_embedding"]) for row in suspects} == {("1", "0")}  # no model: by name only
    exclude = read_csv(tmp_path / "exclude.csv")
    assert {row["image"] for row in exclude} == {key for key in view2_images if key.split("/")[0] in devtrain}
    assert len(exclude) == 5415 and {row["set"] for row in exclude} == {"lfw"}  # of the 7,701 View 2 images


def test_overlap_audit_of_devtest_against_devtrain_flags_nobody(shared_data, tmp_path):
    report = run_overlap(["train_set=lfw_devtrain", "eval_set=lfw_devtest"], tmp_path)
    assert report.num_eval_identities == 962 and report.num_training_identities == 4038  # 963 less a skipped pair's
    assert report.suspects == [] and read_csv(tmp_path / "exclude.csv") == []


def test_the_first_two_words_are_train_set_and_eval_set():
    expected = ["train_set=lfw_devtrain", "eval_set=lfw", "ckpt_path=x"]
    assert positional_overrides(["lfw_devtrain", "lfw", "ckpt_path=x"]) == expected
    assert positional_overrides(["train_set=a", "eval_set=b", "far=0.01"]) == ["train_set=a", "eval_set=b", "far=0.01"]
    assert positional_overrides(["a", "--cfg", "job"]) == ["train_set=a", "--cfg", "job"]


# ------------------------------------------------------------------ by embedding
class OracleEmbedder(nn.Module):
    """A test embedder that knows each person: it recognises an image exactly (its row sums, which a
    horizontal flip leaves alone, looked up among the known images') and returns its person's random
    direction plus that image's own noise. An informative embedding by construction, so the audit
    must find the people a training folder shares with the evaluation set whatever the folders are
    called; no trained model is needed for that."""

    def __init__(self, files: list[Path], people: list[str], dim: int = 256, noise: float = 0.6, seed: int = 0):
        super().__init__()
        rng = np.random.default_rng(seed)
        names, labels = np.unique(people, return_inverse=True)
        directions = rng.normal(size=(len(names), dim))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        jitter = rng.normal(size=(len(files), dim))
        jitter *= noise / np.linalg.norm(jitter, axis=1, keepdims=True)
        self.register_buffer("features", torch.from_numpy(directions[labels] + jitter).float())
        self.register_buffer("keys", torch.stack([self.row_sums(image_tensor(f.read_bytes(), 112, str(f))) for f in files]))

    @staticmethod
    def row_sums(images: torch.Tensor) -> torch.Tensor:
        return images.sum(dim=-1).flatten(-2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        nearest = torch.cdist(self.row_sums(images), self.keys).argmin(dim=1)
        return self.features[nearest]


def test_embedding_audit_flags_exactly_the_people_a_training_folder_shares(shared_data, tmp_path):
    """A training folder holds 5 DevTest people under other names, 5 DevTrain people under their own,
    and a folder named after a DevTest person that holds a DevTrain person's images. Audited against
    lfw_devtest (962 people), the embedding audit must flag exactly the 5 renamed people and the name
    audit exactly the namesake. far=1e-5 per identity: 0.01 of the 957 other people are expected to be
    flagged by chance (the 462,241 impostor pairs resolve no rate that small, so the threshold is their
    maximum, and a chance flag needs one of ~10,500 comparisons above it: about 2 %; the seeds are fixed)."""
    lfw = shared_data / "lfw"
    images = lfw / "aligned_112"
    protocol = lfw_protocol("lfw_devtest", tmp_path)
    devtest_people = sorted(set(protocol.image_identities()))
    shared, namesake = devtest_people[100:105], devtest_people[200]
    outsiders = read_identity_list(lfw / "peopleDevTrain.txt")[:6]
    train = tmp_path / "train"
    copies = {f"renamed_{k}": person for k, person in enumerate(shared)}
    copies.update({person: person for person in outsiders[:5]}, **{namesake: outsiders[5]})
    for folder, person in copies.items():
        shutil.copytree(images / person, train / folder)

    files = sorted({*protocol.pairs.paths, *(f for p in copies.values() for f in (images / p).iterdir())})
    oracle = OracleEmbedder(files, [f.parent.name for f in files])

    def embed(data, description):
        return extract_embeddings(oracle, data, flip="sum", batch_size=256).numpy()

    report = audit_overlap(TrainingImages.of_scan(scan_folder(train), str(train)), protocol, "lfw_devtest", embed, far=1e-5)
    flagged = {s.eval_identity: s for s in report.suspects}
    assert set(flagged) == {*shared, namesake}
    for k, person in enumerate(shared):
        assert flagged[person].by_embedding and not flagged[person].by_name
        assert flagged[person].training_identity == f"renamed_{k}" and flagged[person].cosine > 0.8
    assert flagged[namesake].by_name and not flagged[namesake].by_embedding
    assert flagged[namesake].cosine < report.threshold < 0.5
    assert report.impostor_pairs == 962 * 961 // 2 and report.comparison_far == pytest.approx(1e-5 / 11)
    assert report.notes == [
        f"{report.impostor_pairs} impostor pairs do not resolve a rate of 9.1e-07: the threshold is their maximum"
    ]
    keys = protocol.image_names()
    assert sorted(key for key, _ in report.exclude) == sorted(k for k in keys if k.split("/")[0] in flagged)


# ------------------------------------------------------------------ exclude=
def test_scoring_lfw_with_an_exclude_csv_equals_removing_the_pairs_by_hand(shared_data, tmp_path):
    protocol = lfw_protocol("lfw", tmp_path)
    keys, identities = protocol.image_names(), protocol.image_identities()
    devtrain = set(read_identity_list(shared_data / "lfw" / "peopleDevTrain.txt"))
    dropped = {key for key, person in zip(keys, identities) if person in devtrain}
    rows = [(key, "lfw" if n % 2 else "") for n, key in enumerate(sorted(dropped))]  # the set column may be empty
    path = write_csv(tmp_path / "exclude.csv", ["image", "set", "why"], [(*row, "DevTrain") for row in rows])
    excluded = exclude_images({"lfw": protocol}, path)["lfw"]

    features = identity_features(identities)
    kept = np.array([key not in dropped for key in keys])
    assert excluded.image_names() == [key for key in keys if key not in dropped] and len(excluded.image_set()) == kept.sum()
    result = excluded.score(features[kept])

    pairs = protocol.pairs
    left = kept[pairs.pairs].all(axis=1)
    first, second = features[pairs.pairs[left, 0]], features[pairs.pairs[left, 1]]
    by_hand = verify(first, second, pairs.issame[left], folds=pairs.folds[left])
    assert 0 < left.sum() < 6000 and result.num_pairs == left.sum()
    assert result.accuracy == by_hand.accuracy and result.auc == by_hand.auc and result.eer == by_hand.eer
    assert result.fold_accuracies == by_hand.fold_accuracies and result.tar_at_far == by_hand.tar_at_far
    note = f"exclude={path}: {len(dropped)} of {len(keys)} images dropped; {6000 - left.sum()} of 6000 pairs dropped"
    assert result.notes[-1].startswith(note)


def test_an_unknown_key_in_the_exclude_csv_is_an_error_naming_the_file_and_key(tmp_path):
    protocols = {"synthetic_heldout": PairVerification(SyntheticPairs(10, 4, 40, n_folds=2, image_size=32))}
    unknown = write_csv(tmp_path / "unknown.csv", ["image"], [["synthetic_heldout#3"], ["Nobody/Nobody_0001.jpg"]])
    message = f"exclude={unknown}:3: image 'Nobody/Nobody_0001.jpg' is no image of any evaluated set"
    with pytest.raises(ValueError, match=re.escape(message)):
        exclude_images(protocols, unknown)
    restricted = write_csv(tmp_path / "restricted.csv", ["image", "set"], [["synthetic_heldout#99", "synthetic_heldout"]])
    message = f"exclude={restricted}:2: image 'synthetic_heldout#99' is no image of set 'synthetic_heldout'"
    with pytest.raises(ValueError, match=re.escape(message)):
        exclude_images(protocols, restricted)
    other_set = write_csv(tmp_path / "other.csv", ["image", "set"], [["Aaron/Aaron_0001.jpg", "lfw"]])
    with pytest.raises(ValueError, match=r"other.csv:2: set 'lfw' is not evaluated"):
        exclude_images(protocols, other_set)
    with pytest.raises(ValueError, match="a column 'image'"):
        exclude_images(protocols, write_csv(tmp_path / "header.csv", ["file"], [["x"]]))


def test_eval_py_exclude_rescores_without_the_listed_images(tmp_path):
    weights = tmp_path / "backbone.pth"
    torch.manual_seed(0)
    torch.save(build(name="tiny", embedding_size=16, width=8, input_size=32).state_dict(), weights)
    model = ["model=tiny", "model.embedding_size=16", "model.width=8", "model.input_size=32", f"weights={weights}"]
    heldout = ["+evalset.synthetic_heldout.pairs.num_identities=20", "+evalset.synthetic_heldout.pairs.images_per_identity=4",
               "+evalset.synthetic_heldout.pairs.num_pairs=80"]  # fmt: skip
    exclude = write_csv(tmp_path / "exclude.csv", ["image"], [[f"synthetic_heldout#{i}"] for i in range(8)])
    out = tmp_path / "out"
    evaluations = evaluate_in_process([*model, *heldout, f"exclude={exclude}"], out)
    result = evaluations["synthetic_heldout"].result
    pairs = SyntheticPairs(20, 4, 80, image_size=32).pairs
    assert result.num_pairs == (pairs >= 8).all(axis=1).sum() < 80
    notes = json.loads((out / "results.json").read_text())["sets"]["synthetic_heldout"]["notes"]
    assert any(note.startswith(f"exclude={exclude}: 8 of 80 images dropped; ") for note in notes)


def evaluate_in_process(overrides: list[str], output_dir: Path):
    cfg = compose_config(overrides, output_dir, config_name="eval")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return evaluate(cfg)


# ------------------------------------------------------------------ every protocol names its images
def lfw_folder(root: Path, people: list[str], shared_data: Path) -> Path:
    for person in people:
        shutil.copytree(shared_data / "lfw" / "aligned_112" / person, root / person)
    return root


def check_without(protocol, drop: list[str]):
    """`without` leaves the other images in order, and the reduced protocol scores features of them."""
    keys = protocol.image_names()
    reduced = protocol.without(drop, "test")
    assert reduced.image_names() == [key for key in keys if key not in set(drop)]
    assert len(reduced.image_set()) == len(keys) - len(set(drop))
    identities = reduced.image_identities() or reduced.image_names()
    result = reduced.score(identity_features(identities, seed=1))
    assert result.notes[-1].startswith(f"test: {len(set(drop))} of {len(keys)} images dropped; ")
    return reduced, result


def test_every_protocol_names_its_images_and_leaves_them_out(shared_data, tmp_path, ijb_fixture):
    synthetic = PairVerification(SyntheticPairs(10, 4, 40, n_folds=2, image_size=32, name="syn"))
    assert synthetic.image_names()[:2] == ["syn#0", "syn#1"] and synthetic.image_identities()[4] == "syn#identity1"
    check_without(synthetic, ["syn#0", "syn#5"])

    lfw = lfw_protocol("lfw_devtest", tmp_path)
    assert lfw.image_names()[0] == f"{lfw.image_identities()[0]}/{lfw.pairs.paths[0].name}"
    check_without(lfw, lfw.image_names()[:30])

    people = ["Aaron_Peirsol", "Abdullah_Gul", "Adrien_Brody", "Al_Gore", "Alan_Greenspan", "Albert_Costa"]
    folder = lfw_folder(tmp_path / "folder", people, shared_data)
    pairs = PairVerification(ImageFolderPairs(folder, num_pairs=40, n_folds=2))
    assert pairs.image_names()[0] == "Aaron_Peirsol/Aaron_Peirsol_0001.jpg" and pairs.image_identities()[0] == "Aaron_Peirsol"
    check_without(pairs, pairs.image_names()[:3])

    jpegs = [(folder / "Al_Gore" / f"Al_Gore_000{i}.jpg").read_bytes() for i in (1, 2, 3, 4)]
    write_bin(tmp_path / "tiny.bin", jpegs, [True, False])
    binary = PairVerification(BinVerificationSet(tmp_path / "tiny.bin"))
    assert binary.image_names() == ["tiny#0", "tiny#1", "tiny#2", "tiny#3"] and binary.image_identities() is None
    reduced = binary.without(["tiny#3"])
    assert reduced.image_names() == ["tiny#0", "tiny#1", "tiny#2"] and len(reduced.pairs.pairs) == 1

    megaface = FolderIdentification(folder, min_images=2, gallery_images=1)
    keys, identities = megaface.image_names(), megaface.image_identities()
    assert sorted(keys) == sorted(f"{p}/{f.name}" for p in people for f in (folder / p).iterdir())
    assert identities == [key.split("/")[0] for key in keys]
    gallery = [keys[i] for i in megaface.split.gallery[:2]]
    reduced, _ = check_without(megaface, [*gallery, keys[megaface.split.probes[0]]])
    assert len(reduced.split.gallery) == len(megaface.split.gallery) - 2
    assert len(reduced.split.probes) == len(megaface.split.probes) - 1

    ijb = IjbVerification(ijb_fixture)
    meta = ijb.meta
    assert ijb.image_names() == meta.image_names and ijb.image_identities() is None
    template = meta.templates[0]
    members = [name for name, t in zip(meta.image_names, meta.templates) if t == template]
    reduced, _ = check_without(ijb, members)
    assert not (reduced.meta.template_pairs == template).any() and (meta.template_pairs == template).any()
    one_n = IjbIdentification(ijb_fixture)
    subjects = one_n.image_identities()
    assert subjects is not None and len(set(subjects)) == 20  # the fixture's 20 people
    reduced, _ = check_without(one_n, members)
    assert template not in np.concatenate([ids for ids, _ in reduced.sets.values()])
