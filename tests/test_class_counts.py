"""dataset.num_classes read from the data (image folders, insightface record folders) when left out,
checked against it when stated, and recorded in the run's saved config and checkpoints."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import compose_config, run_script
from data_helpers import smooth_image, write_image, write_jpeg_folder, write_rec_folder
from facerec.data import ImageFolderDataset, RecordDataset
from facerec.training.fit import build_module, fill_num_classes

SMALL = ["model=tiny", "model.width=4", "dataset.train.image_size=32", "val_sets=[]"]


@pytest.fixture
def faces(tmp_path):
    """3 identities with images (JPEG and PNG), one identity folder without images, one stray file."""
    root = write_jpeg_folder(tmp_path / "faces", identities=3, per_identity=2)
    write_image(root / "id02" / "extra.png", smooth_image(np.random.default_rng(1)))
    (root / "no_images").mkdir()
    (root / "no_images" / "notes.txt").write_text("not an image")
    return root


def test_count_classes_agrees_with_the_datasets(faces, tmp_path):
    assert ImageFolderDataset.count_classes(faces) == ImageFolderDataset(faces).num_classes == 3
    assert ImageFolderDataset.count_classes(faces, identities=["id02", "no_images", "id00"]) == 2
    records = write_rec_folder(tmp_path / "records", identities=4)
    assert RecordDataset.count_classes(records) == RecordDataset(records).num_classes == 4
    (records / "property").write_text("7,112,112")  # header record 0 lists 4 identities: the folder disagrees
    message = f"{records / 'property'} states 7 classes, but header record 0 of {records / 'train.rec'} lists 4 identity records"
    with pytest.raises(ValueError, match=re.escape(message)):
        RecordDataset.count_classes(records)
    with pytest.raises(ValueError, match=re.escape(message)):
        RecordDataset(records, num_classes=7)
    assert RecordDataset(records, num_classes=4).num_classes == 4  # stated as the records hold it: trains, logged


def test_image_folder_without_num_classes_gives_the_head_the_folders_count(faces, tmp_path):
    cfg = compose_config(["dataset=image_folder", f"dataset.train.root={faces}", *SMALL], tmp_path / "run")
    assert OmegaConf.select(cfg, "dataset.num_classes") is None  # conf/dataset/image_folder.yaml leaves it out
    fill_num_classes(cfg)
    module = build_module(cfg)
    assert cfg.dataset.num_classes == module.head.num_classes == 3
    assert module.config["dataset"]["num_classes"] == 3  # saved in checkpoints
    assert instantiate(cfg.dataset).num_classes == 3


def test_recordio_without_num_classes_reads_the_property_file(tmp_path):
    records = write_rec_folder(tmp_path, identities=4)
    cfg = compose_config(["dataset=recordio", f"dataset.train.root={records}", *SMALL], tmp_path / "run")
    fill_num_classes(cfg)
    module = build_module(cfg)
    assert cfg.dataset.num_classes == cfg.dataset.train.num_classes == module.head.num_classes == 4
    assert instantiate(cfg.dataset).train_set.num_classes == 4


def test_a_stated_count_is_checked_against_the_data(faces, tmp_path):
    cfg = compose_config(["dataset=image_folder", f"dataset.train.root={faces}", "dataset.num_classes=5", *SMALL], tmp_path)
    fill_num_classes(cfg)
    assert cfg.dataset.num_classes == 5  # stated: not read, but checked when the data is built
    message = f"dataset.num_classes=5 but {faces} holds 3 identity folders with images; set dataset.num_classes=3"
    with pytest.raises(InstantiationException, match=re.escape(message)):  # Hydra's wrapper of the ValueError
        instantiate(cfg.dataset)
    records = write_rec_folder(tmp_path / "records", identities=4)
    cfg = compose_config(["dataset=recordio", f"dataset.train.root={records}", "dataset.num_classes=5", *SMALL], tmp_path)
    message = f"{records / 'property'} states 4 classes but dataset.num_classes=5; set dataset.num_classes=4"
    with pytest.raises(InstantiationException, match=re.escape(message)):
        instantiate(cfg.dataset)


def test_datasets_whose_count_is_not_in_the_data_still_need_it(tmp_path):
    cfg = compose_config(["dataset=synthetic", "dataset.num_classes=null"], tmp_path)
    with pytest.raises(ValueError, match="dataset.num_classes is not set, and the training set facerec.data.SyntheticIdentities"):
        fill_num_classes(cfg)


def test_folder_without_images_is_refused_when_counting(tmp_path):
    (tmp_path / "faces" / "someone").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found in 1 identity folders"):
        ImageFolderDataset.count_classes(tmp_path / "faces")


def test_train_py_records_the_count_it_read(faces, tmp_path):
    run_dir = tmp_path / "run"
    command = [
        "train.py",
        "dataset=image_folder",
        f"dataset.train.root={faces}",
        *SMALL,
        "~callbacks.best_checkpoint",  # no validation sets: nothing to pick a best checkpoint by
        "dataset.batch_size=4",
        "dataset.num_workers=0",
        "trainer.max_steps=2",
        "logger=csv",
        "callbacks.progress_bar.refresh_rate=0",
    ]
    run_script([*command, f"hydra.run.dir={run_dir}"])
    assert "dataset.num_classes = 3, read from the training data" in (run_dir / "train.log").read_text()
    saved = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"))  # as Hydra saved it, unresolved
    assert saved["dataset"]["num_classes"] == 3
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["facerec_config"]["dataset"]["num_classes"] == 3
    assert checkpoint["state_dict"]["head.centres.weight"].shape[0] == 3
    # a checkpoint resumes only into the class count it was trained with, read or stated
    write_image(faces / "newcomer" / "0.png", smooth_image(np.random.default_rng(2)))
    refused = run_script([*command, f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"], check=False)
    assert refused.returncode != 0 and "dataset.num_classes: checkpoint 3, config 4" in refused.stderr
