"""python -m facerec.tools.subcenter_outliers: the label-noise candidates of a Sub-center ArcFace run."""
from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from conftest import TINY_RUN, compose_config, run_script
from data_helpers import write_jpeg_folder
from facerec.data import DecodeError, Flip, ImageFolderDataset, NoAugment
from facerec.tools.subcenter_outliers import UnaugmentedImages, find_outliers, main
from facerec.backbones.weights import load_backbone
from facerec.checkpoint_files import load_checkpoint
from facerec.training.fit import build_module

CENTRES = 3  # conf/head/subcenter_arcface.yaml


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def save_untrained_checkpoint(overrides: list[str], tmp_path: Path) -> Path:
    """A checkpoint as train.py writes it (its run config and state_dict) of an untrained module."""
    module = build_module(compose_config(overrides, tmp_path))
    path = tmp_path / "untrained.ckpt"
    torch.save({"facerec_config": module.config, "state_dict": module.state_dict()}, path)
    return path


@pytest.mark.slow  # a training run and the tool, each a fresh interpreter: ~40 s
def test_outliers_of_a_trained_run(tmp_path):
    run_dir = tmp_path / "run"
    run_script(
        ["train.py", *TINY_RUN, "head=subcenter_arcface", "trainer.max_epochs=2", "logger=csv", f"hydra.run.dir={run_dir}"]
    )
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    output = tmp_path / "outliers.csv"
    threshold = 80.0
    out = run_script(
        ["-m", "facerec.tools.subcenter_outliers", f"ckpt_path={ckpt}", f"threshold_deg={threshold}", f"output={output}"]
    )

    rows = read_csv(output)
    assert list(rows[0]) == ["index", "label", "angle_deg", "outlier"]  # synthetic images have no source name
    assert [int(row["index"]) for row in rows] == list(range(20 * 8))  # experiment=smoke: 20 classes x 8 images
    labels = torch.tensor([int(row["label"]) for row in rows])
    assert torch.equal(labels, torch.arange(160) // 8)
    angles = torch.tensor([float(row["angle_deg"]) for row in rows])
    flags = torch.tensor([row["outlier"] == "1" for row in rows])
    assert torch.equal(flags, angles > threshold) and 0 < int(flags.sum()) < len(rows)

    lines = re.findall(r"class (\d+): dominant centre (\d+), (\d+) of (\d+) images", out.stdout)
    printed = {int(c): (int(k), int(n), int(m)) for c, k, n, m in lines}
    assert sorted(printed) == list(range(20))
    for label, (_, outliers, images) in printed.items():
        assert images == 8 and outliers == int(flags[labels == label].sum())
    assert f"{int(flags.sum())} of 160 images lie beyond 80 deg" in out.stdout

    # Independently: each image embedded alone, its angle to the printed dominant centre, and that centre
    # the nearest one for most of the class's images.
    backbone, config = load_backbone(ckpt)
    train_set = instantiate(config["dataset"]["train"])
    with torch.no_grad():
        embeddings = torch.cat([backbone(train_set[i][0].unsqueeze(0)) for i in range(len(train_set))])
    centres = load_checkpoint(ckpt)["state_dict"]["head.centres.weight"].view(20, CENTRES, -1)
    dominant = torch.tensor([printed[label][0] for label in range(20)])
    cos = F.cosine_similarity(embeddings, centres[labels, dominant[labels]])
    torch.testing.assert_close(angles, torch.rad2deg(cos.acos()), rtol=0, atol=2e-3)  # the CSV keeps 4 decimals
    nearest = (F.normalize(centres[labels], dim=2) @ F.normalize(embeddings, dim=1).unsqueeze(2)).squeeze(2).argmax(dim=1)
    votes = torch.zeros(20, CENTRES).index_put_((labels, nearest), torch.ones(160), accumulate=True)
    assert torch.equal(votes.gather(1, dominant.unsqueeze(1)).squeeze(1), votes.amax(dim=1))


def test_csv_names_the_files_of_an_image_folder(tmp_path):
    root = write_jpeg_folder(tmp_path / "faces", identities=3, per_identity=4)
    overrides = ["model=tiny_smoke", "head=subcenter_arcface", "dataset=image_folder", f"dataset.train.root={root}"]
    overrides += ["dataset.num_classes=3", "dataset.train.image_size=32"]
    ckpt = save_untrained_checkpoint(overrides, tmp_path)
    result = find_outliers(ckpt, threshold_deg=60.0, batch_size=5, device="cpu")
    assert result.csv_path == tmp_path / "untrained.ckpt.outliers.csv"
    rows = read_csv(result.csv_path)
    assert list(rows[0]) == ["index", "label", "source", "angle_deg", "outlier"]
    assert [row["source"] for row in rows] == [str(root / f"id{i:02d}" / f"{k}.jpg") for i in range(3) for k in range(4)]
    assert [int(row["label"]) for row in rows] == [i for i in range(3) for _ in range(4)]
    assert [row["outlier"] == "1" for row in rows] == (result.angle_deg > 60).tolist()
    assert ((result.dominant >= 0) & (result.dominant < CENTRES)).all()


def test_images_are_embedded_unflipped_and_never_replaced(tmp_path):
    root = write_jpeg_folder(tmp_path / "faces", identities=2, per_identity=3)
    images = UnaugmentedImages(ImageFolderDataset(root, image_size=32, augment=Flip()))
    plain = ImageFolderDataset(root, image_size=32, augment=NoAugment())
    for index in range(len(plain)):
        image, label, source = images[index]
        assert torch.equal(image, plain[index][0]) and label == plain[index][1]
        assert source == str(root / f"id{index // 3:02d}" / f"{index % 3}.jpg")
    (root / "id01" / "1.jpg").write_bytes(b"not an image")
    with pytest.raises(DecodeError, match=re.escape(str(root / "id01" / "1.jpg"))):
        images[4]


def test_refuses_a_checkpoint_of_another_head(tmp_path):
    ckpt = save_untrained_checkpoint([*TINY_RUN, "head=arcface"], tmp_path)
    with pytest.raises(ValueError, match="its head is facerec.heads.ArcFace, not facerec.heads.SubCenterArcFace"):
        find_outliers(ckpt)


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit, match="Key 'threshold' not in 'Options'"):
        main(["ckpt_path=x.ckpt", "threshold=75"])
    with pytest.raises(SystemExit, match="ckpt_path=<train.py checkpoint"):
        main(["threshold_deg=75"])
    with pytest.raises(SystemExit, match="threshold_deg=abc.*could not be converted to Float"):
        main(["ckpt_path=x.ckpt", "threshold_deg=abc"])
