"""Dataset and evaluation-set configs compose and instantiate; train.py runs on real LFW and ORL."""
from __future__ import annotations

import math

import pytest
from hydra.utils import instantiate

from conftest import CONF_DIR, column, compose_config, read_metrics, run_script
from data_helpers import write_jpeg_folder
from facerec.data import BinVerificationSet, LfwPairs, write_bin
from facerec.data.convert import folder_to_rec
from facerec.data.image_folder import read_identity_list
from facerec.evaluation import PairVerification
from facerec.evaluation.evalsets import compose_evalsets

EVALUATION_SETS = sorted(p.stem for p in (CONF_DIR / "evalset").glob("*.yaml"))
BIN_SETS = {"lfw_bin": "lfw", "cfp_fp": "cfp_fp", "cfp_ff": "cfp_ff", "agedb_30": "agedb_30", "calfw": "calfw",
            "cplfw": "cplfw", "vgg2_fp": "vgg2_fp"}  # config -> file stem in paths.verification_dir


def test_evalset_group_holds_the_expected_sets():
    assert set(EVALUATION_SETS) >= {"lfw", "lfw_devtest", "orl_heldout", "ijbc", "ijbc_1n", "lfw_megaface", *BIN_SETS}


@pytest.mark.parametrize("name", sorted(BIN_SETS))
def test_bin_set_configs_read_from_the_verification_dir(name, tmp_path, jpeg_pair):
    write_bin(tmp_path / f"{BIN_SETS[name]}.bin", jpeg_pair * 2, [True, False])
    cfg = compose_config([f"val_sets=[{name}]", f"paths.verification_dir={tmp_path}"], tmp_path)
    protocol = instantiate(cfg.evalset[name])
    assert isinstance(protocol, PairVerification) and isinstance(protocol.pairs, BinVerificationSet)
    assert protocol.pairs.name == name and len(protocol.pairs.issame) == 2


@pytest.fixture(scope="module")
def jpeg_pair(tmp_path_factory):
    root = write_jpeg_folder(tmp_path_factory.mktemp("jpegs") / "faces", identities=1, per_identity=2)
    return [p.read_bytes() for p in sorted((root / "id00").iterdir())]


def test_lfw_configs_work_out_of_the_box(shared_data, tmp_path):
    for name, pairs in [("lfw", 6000), ("lfw_devtest", 999)]:
        cfg = compose_config([f"val_sets=[{name}]", f"paths.data_dir={shared_data}"], tmp_path)
        pair_set = instantiate(cfg.evalset[name]).pairs
        assert isinstance(pair_set, LfwPairs) and len(pair_set.issame) == pairs


def test_the_hard_synthetic_set_is_the_held_out_set_under_more_nuisance(tmp_path):
    cfg = compose_config(["experiment=s_star", "val_sets=[synthetic_heldout,synthetic_heldout_hard]"], tmp_path)
    easy, hard = cfg.evalset.synthetic_heldout.pairs, cfg.evalset.synthetic_heldout_hard.pairs
    assert (easy.difficulty, hard.difficulty, hard.name) == (cfg.dataset.train.difficulty, 1.5, "synthetic_heldout_hard")
    assert {k: v for k, v in hard.items() if k not in ("difficulty", "name")} == {k: v for k, v in easy.items() if k != "difficulty"}
    easy_pairs, hard_pairs = instantiate(easy), instantiate(hard)
    assert (hard_pairs.pairs == easy_pairs.pairs).all() and (hard_pairs.issame == easy_pairs.issame).all()  # the same pairs
    assert not hard_pairs.image(0).equal(easy_pairs.image(0))  # of the same identities, rendered with more nuisance


@pytest.mark.parametrize(
    "option,num_classes,root",
    [
        ("casia_webface", 10572, "faces_webface_112x112"),
        ("ms1mv2", 85742, "faces_emore"),
        ("ms1mv3", 93431, "ms1m-retinaface-t1"),
        ("glint360k", 360232, "glint360k"),
    ],
)
def test_insightface_dataset_configs(option, num_classes, root, tmp_path):
    cfg = compose_config([f"dataset={option}", "paths.data_dir=/data"], tmp_path)
    assert cfg.dataset.num_classes == cfg.dataset.train.num_classes == num_classes
    assert cfg.dataset.train.root == f"/data/{root}"
    assert list(cfg.val_sets) == list(cfg.dataset.val_sets) == ["lfw_bin", "cfp_fp", "agedb_30"]
    assert cfg.evalset.cfp_fp.pairs.path == "/data/verification/cfp_fp.bin"


def test_recordio_config_trains_from_a_converted_folder(tmp_path):
    """dataset=recordio end to end: a converted folder, .bin val sets from the converter's own writer."""
    faces = write_jpeg_folder(tmp_path / "faces", identities=6, per_identity=4)
    folder_to_rec(faces, tmp_path / "rec")
    images = [p.read_bytes() for p in sorted(faces.glob("*/*.jpg"))] * 2
    bins = tmp_path / "bins"
    bins.mkdir()
    for stem in ("lfw", "cfp_fp", "agedb_30"):  # 10 folds need >= 10 same and 10 different pairs
        write_bin(bins / f"{stem}.bin", images[:40], [True, False] * 10)
    out = run_script(
        [
            "train.py",
            "dataset=recordio",
            f"dataset.train.root={tmp_path / 'rec'}",
            "dataset.num_classes=6",
            f"paths.verification_dir={bins}",
            "dataset.batch_size=8",
            "dataset.num_workers=2",
            "trainer.max_epochs=1",
            "model.width=4",
            "logger=csv",
            "callbacks.progress_bar.refresh_rate=0",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    for name in ("lfw_bin", "cfp_fp", "agedb_30"):
        assert f"held-out verification {name}: accuracy" in out.stdout


def test_lfw_devtrain_trains_on_real_lfw(shared_data, tmp_path):
    out = run_script(
        [
            "train.py",
            "dataset=lfw_devtrain",
            f"paths.data_dir={shared_data}",
            "trainer.max_steps=3",
            "model.width=4",
            "logger=csv",
            "callbacks.progress_bar.refresh_rate=0",
            f"hydra.run.dir={tmp_path}",
        ]
    )
    assert "held-out verification lfw_devtest: accuracy" in out.stdout
    rows = read_metrics(tmp_path)
    scales = column(rows, "train/s")
    assert scales[0] == pytest.approx(math.sqrt(2) * math.log(4038 - 1), rel=1e-5)  # C = 4,038 DevTrain people
    accuracy = column(rows, "val/lfw_devtest/accuracy")
    assert len(accuracy) == 1 and 0.5 < accuracy[0] <= 1  # even 3 steps beat chance on pixel similarity
    log = (tmp_path / "train.log").read_text()
    assert "pairsDevTest.txt:585: skipped pair" in log and "9525 images of 4038 identities" in log


def test_orl_trains_and_verifies_on_held_out_people(shared_data, tmp_path):
    out = run_script(
        [
            "train.py",
            "dataset=orl",
            f"paths.data_dir={shared_data}",
            "trainer.max_epochs=1",
            "model.width=4",
            "logger=csv",
            "callbacks.progress_bar.refresh_rate=0",
            f"hydra.run.dir={tmp_path}",
        ]
    )
    assert "held-out verification orl_heldout: accuracy" in out.stdout
    assert "finished after 9 steps" in out.stdout  # 300 images of s1..s30, batches of 32


@pytest.mark.parametrize("num_classes", [100, 1000])
def test_lfw_devtest_people_are_scored_only_on_the_people_not_drawn(shared_data, tmp_path, num_classes):
    cfg = compose_config(["dataset=lfw_devtest_people", f"dataset.num_classes={num_classes}", f"paths.data_dir={shared_data}"], tmp_path)
    train_set = instantiate(cfg.dataset.train)
    compose_evalsets(cfg, ["lfw_devtest_untrained"], "val_sets")
    pairs = instantiate(cfg.evalset.lfw_devtest_untrained.pairs)
    devtrain = set(read_identity_list(shared_data / "lfw" / "peopleDevTrain.txt"))
    scored = {pairs.image_identities()[index] for pair in pairs.pairs for index in pair}
    assert len(train_set.people) == num_classes and not set(train_set.people) & (devtrain | scored)
    assert len(pairs.pairs) == 600 and int(pairs.issame.sum()) == 300 and not scored & devtrain
    assert set(pairs.people) | set(train_set.people) == set(read_identity_list(shared_data / "lfw" / "peopleDevTest.txt")) - {"Betsy_Coffin"}
