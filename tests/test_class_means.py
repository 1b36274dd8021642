"""head.init=class_means: a new run's class centres start at the normalised mean embedding of each class's
un-augmented training images under the starting backbone (facerec/training/class_means.py)."""
from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from conftest import TINY_RUN, column, compose_config, read_metrics, run_script
from facerec.checkpoint_files import load_checkpoint
from facerec.config import instantiate_all
from facerec.heads import ArcFace, AutoScale, MarginHead, SubCenterArcFace
from facerec.training.fit import build_module, check_resume_compatible

NUM_CLASSES = 20  # the smoke run: 8 images of each of 20 classes, 128-d embeddings
EMBEDDING_SIZE = 128


class CentresAtFirstBatch(L.Callback):
    """The class centres and a copy of the backbone as the first training batch of the fit starts (a
    resumed one too): after head.init has run, before any optimizer step."""

    def __init__(self):
        self.centres = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.centres is None:
            self.centres = pl_module.head.centres.weight.detach().clone()
            self.backbone = copy.deepcopy(pl_module.backbone).eval()


def fit(run_dir, overrides: list[str], ckpt_path=None, module_overrides: list[str] = ()) -> CentresAtFirstBatch:
    """A smoke run (logger=csv) as train.py builds it, trained in this process; the module may be
    built from a config with `module_overrides` on top (a head that does not fit the data)."""
    options = [*TINY_RUN, "logger=csv", "+trainer.limit_val_batches=0", "+trainer.enable_checkpointing=false",
               "+trainer.enable_progress_bar=false", *overrides]
    cfg = compose_config(options, run_dir)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.dataset)
    module = build_module(compose_config([*options, *module_overrides], run_dir) if module_overrides else cfg)
    recorder = CentresAtFirstBatch()
    trainer = instantiate(cfg.trainer, callbacks=[recorder], logger=instantiate_all(cfg.logger))
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return recorder


def test_the_centres_are_the_normalised_class_means_of_the_unaugmented_images(tmp_path):
    # augment=flip: the training batches are flipped at random, the class means must not be
    recorder = fit(tmp_path, ["augment=flip", "head.init=class_means", "trainer.max_steps=1"])
    train_set = instantiate(compose_config([*TINY_RUN, "augment=none"], tmp_path / "plain").dataset.train)
    images, labels = zip(*(train_set[i] for i in range(len(train_set))))
    with torch.no_grad():
        x_hat = F.normalize(recorder.backbone(torch.stack(images)))
    labels = torch.tensor(labels)
    means = F.normalize(torch.stack([x_hat[labels == c].mean(dim=0) for c in range(NUM_CLASSES)]))
    torch.testing.assert_close(F.normalize(recorder.centres), means, rtol=0, atol=1e-5)
    # the norm of the random start's rows, 0.01 sqrt(d): the centres' step size stays the one tuned for it
    norms = torch.linalg.vector_norm(recorder.centres, dim=1)
    torch.testing.assert_close(norms, torch.full((NUM_CLASSES,), 0.01 * math.sqrt(EMBEDDING_SIZE)))
    # logged once: the top-1 of those images against those centres (own class strictly nearest)
    cos = x_hat @ means.T
    own = cos[torch.arange(len(labels)), labels]
    top1 = (own > cos.scatter(1, labels.unsqueeze(1), -2.0).amax(dim=1)).float().mean().item()
    (logged,) = column(read_metrics(tmp_path), "train/init_top1")
    assert logged == pytest.approx(top1) and top1 > 1 / NUM_CLASSES


def test_a_sub_center_head_starts_each_class_s_centres_near_its_mean_and_apart():
    torch.manual_seed(0)
    head = MarginHead(EMBEDDING_SIZE, NUM_CLASSES, SubCenterArcFace(centres=3), AutoScale())
    directions = torch.randn(NUM_CLASSES, EMBEDDING_SIZE)
    full = head.start_centres_at(directions, torch.Generator().manual_seed(1))
    assert torch.equal(full, head.centres.weight)
    centres = F.normalize(full).view(NUM_CLASSES, 3, EMBEDDING_SIZE)
    angles = torch.rad2deg(torch.acos((centres @ F.normalize(directions).unsqueeze(2)).squeeze(2).clamp(max=1)))
    assert 3 < angles.min() and angles.max() < 10  # the noise: a tenth of the row's norm, ~6 degrees
    assert (centres[:, 0] != centres[:, 1]).any(dim=1).all()
    # every class's centres are its own images' nearest: the classes' directions stay apart
    cos = head.cosine(directions)
    assert torch.equal(cos.argmax(dim=1), torch.arange(NUM_CLASSES))
    # the same generator draws the same centres (every rank draws the full matrix)
    again = MarginHead(EMBEDDING_SIZE, NUM_CLASSES, SubCenterArcFace(centres=3), AutoScale())
    assert torch.equal(again.start_centres_at(directions, torch.Generator().manual_seed(1)), full)
    with pytest.raises(ValueError, match=r"expected class directions of shape \(20, 128\), got \(19, 128\)"):
        MarginHead(EMBEDDING_SIZE, NUM_CLASSES, ArcFace(), AutoScale()).start_centres_at(directions[1:], torch.Generator())


def test_a_class_without_images_and_an_unknown_init_are_named(tmp_path):
    # the data has 20 classes, the head 21: class 20 has no image to take the mean of
    with pytest.raises(ValueError, match=r"1 of the dataset.num_classes=21 classes have no image .*\(class index 20\)"):
        fit(tmp_path / "empty", ["head.init=class_means"], module_overrides=["dataset.num_classes=21"])
    with pytest.raises(ValueError, match=r"head.init='kmeans': expected one of random, class_means"):
        build_module(compose_config([*TINY_RUN, "head.init=kmeans"], tmp_path / "unknown"))


def test_a_resumed_run_keeps_its_checkpoint_s_centres(tmp_path):
    run_script(["train.py", *TINY_RUN, "trainer.max_steps=3", "logger=csv", f"hydra.run.dir={tmp_path / 'first'}"])
    ckpt_path = tmp_path / "first" / "checkpoints" / "last.ckpt"
    checkpoint = load_checkpoint(ckpt_path)
    overrides = ["head.init=class_means", "trainer.max_steps=4"]
    # the checkpoint's run started at random: head.init does not stop it resuming, it is a new run's choice
    check_resume_compatible(compose_config([*TINY_RUN, *overrides], tmp_path), checkpoint, ckpt_path)
    recorder = fit(tmp_path, overrides, ckpt_path=ckpt_path)
    assert torch.equal(recorder.centres, checkpoint["state_dict"]["head.centres.weight"])
    assert not column(read_metrics(tmp_path), "train/init_top1")


@pytest.fixture(scope="module")
def trained_weights(tmp_path_factory):
    """The last.ckpt of a 6-epoch smoke run: a backbone that separates the training classes."""
    run_dir = tmp_path_factory.mktemp("trained_weights")
    run_script(["train.py", *TINY_RUN, "trainer.max_epochs=6", "logger=csv", f"hydra.run.dir={run_dir}"])
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_from_trained_weights_the_first_step_classifies_far_above_chance(trained_weights, tmp_path):
    """The issue's acceptance: fine-tuning from trained weights, head.init=class_means gives the first
    training step a train/top1 above head.init=random's. The first step takes the whole training set
    (160 images), so its top-1 is the set's, not a 16-image batch's."""
    first_top1 = {}
    for init in ("random", "class_means"):
        run_dir = tmp_path / init
        run_script(["train.py", *TINY_RUN, f"model.weights={trained_weights}", f"head.init={init}", "trainer.max_steps=1",
                    "dataset.batch_size=160", "logger=csv", f"hydra.run.dir={run_dir}"])
        first_top1[init] = column(read_metrics(run_dir), "train/top1")[0]
    # measured: 0.48 against 0.17 (chance is 0.05, but the tiny net's embeddings crowd into few
    # directions, which random centres split unevenly)
    assert first_top1["class_means"] > 6 / NUM_CLASSES
    assert first_top1["class_means"] > 2 * first_top1["random"]


@pytest.mark.slow
def test_two_sharded_ranks_fill_the_centres_one_dense_process_fills(tmp_path):
    """Partial FC over 2 processes, each embedding half the images: the full centre matrix in the
    checkpoint is the one a dense single process fills. Sub-center ArcFace (3 centres per class), so
    the centres' noise is the same whichever rank draws it. The learning rate is 0, so the checkpoint
    after one step holds the centres as they were filled."""
    common = [*TINY_RUN, "head=subcenter_arcface", "head.init=class_means", "optim.optimizer.lr=0", "trainer.max_steps=1",
              "logger=csv"]
    two = run_script(
        ["train.py", *common, "trainer=ddp_cpu", "trainer.devices=2", "sharding=partial_fc", f"hydra.run.dir={tmp_path / 'two'}"]
    )
    assert "embedding the 160 training images (world size 2)" in two.stdout + two.stderr
    run_script(["train.py", *common, f"hydra.run.dir={tmp_path / 'one'}"])
    centres = {
        run: torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]["head.centres.weight"]
        for run in ("one", "two")
    }
    assert centres["one"].shape == (3 * NUM_CLASSES, EMBEDDING_SIZE)
    torch.testing.assert_close(centres["two"], centres["one"])
    init_top1 = [column(read_metrics(tmp_path / run), "train/init_top1") for run in ("one", "two")]
    assert init_top1[0] == init_top1[1] and len(init_top1[0]) == 1
