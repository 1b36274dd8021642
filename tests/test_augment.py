"""Augmentation policies (augment=none|flip|adaface): draws from the sample key alone (bitwise the same
in any worker and after a resume), each AdaFace op at its probability, the flip of before, a real run."""
from __future__ import annotations

import math
import pickle
import sys

import numpy as np
import pytest
import torch

from conftest import compose_config, run_script
from data_helpers import smooth_image, write_jpeg_folder
from facerec.data import FaceDataModule, ImageFolderDataset, SyntheticIdentities
from facerec.data.augment import AdaFaceAugment, Flip, NoAugment
from facerec.data.decode import image_tensor, normalise
from facerec.data.sampling import ResumableSampler, SampleKey, augment_random

pytest.importorskip("albumentations")  # the `augment` extra (installed by `dev`)

IMAGE = smooth_image(np.random.default_rng(0))
ONLY = {  # one AdaFace op at 0.2, the others off
    "crop": dict(crop_p=0.2, low_res_p=0.0, photometric_p=0.0),
    "low_res": dict(crop_p=0.0, low_res_p=0.2, photometric_p=0.0),
    "photometric": dict(crop_p=0.0, low_res_p=0.0, photometric_p=0.2),
}


def keys(count: int, start: int = 0) -> list[SampleKey]:
    """Keys as the sampler makes them: run seed 3, epoch 1."""
    base = (3 * 1_000_003 + 1) << 40
    return [SampleKey(index, base + index) for index in range(start, start + count)]


def test_flip_is_the_flip_training_made_before_policies():
    for key in keys(32):
        assert torch.equal(Flip()(IMAGE, key), normalise(IMAGE, flip=augment_random(key) < 0.5))
    assert sum(Flip().flips(key) for key in keys(32)) not in (0, 32)


def test_none_leaves_images_untouched(tmp_path):
    root = write_jpeg_folder(tmp_path, identities=2, per_identity=3)
    dataset = ImageFolderDataset(root, augment=NoAugment())
    for key in keys(6):
        path = dataset.scan.path(key)
        assert torch.equal(dataset[key][0], image_tensor(path.read_bytes(), 112, str(path)))
    rendered = SyntheticIdentities(4, 2, image_size=24)
    unaugmented = SyntheticIdentities(4, 2, image_size=24, augment=NoAugment())
    assert all(torch.equal(rendered[key][0], unaugmented[key][0]) for key in keys(8))


def test_same_key_gives_the_same_image_and_other_keys_other_images():
    always = AdaFaceAugment(crop_p=1.0, low_res_p=1.0, photometric_p=1.0)
    outputs = [always(IMAGE, key) for key in keys(16)]
    assert len({output.numpy().tobytes() for output in outputs}) == 16
    fresh = pickle.loads(pickle.dumps(always))  # as a DataLoader worker receives it
    copied = pickle.loads(pickle.dumps(keys(16)))
    assert all(torch.equal(fresh(IMAGE, key), output) for key, output in zip(copied, outputs))
    assert all(torch.equal(always(IMAGE, key), output) for key, output in zip(keys(16), outputs))


@pytest.mark.parametrize("op", ONLY)
def test_each_adaface_op_fires_with_probability_0_2(op):
    count = 1500
    policy = AdaFaceAugment(**ONLY[op])
    changed = [not np.array_equal(policy.pixels(IMAGE, key), IMAGE) for key in keys(count)]
    # within 4.5 standard deviations of Binomial(1500, 0.2) (a spurious failure: ~1e-5)
    bound = 4.5 * math.sqrt(count * 0.2 * 0.8)
    assert abs(sum(changed) - 0.2 * count) < bound, (op, sum(changed))


def test_the_ops_are_drawn_independently():
    count = 1500
    policy = AdaFaceAugment()
    unchanged = sum(np.array_equal(policy.pixels(IMAGE, key), IMAGE) for key in keys(count))
    # no op fires with probability 0.8^3 (if one stream decided all three, it would be 0.8)
    assert abs(unchanged - 0.512 * count) < 4.5 * math.sqrt(count * 0.512 * 0.488), unchanged


def test_the_crop_keeps_a_box_in_place_and_zeroes_the_rest():
    policy = AdaFaceAugment(crop_p=1.0, low_res_p=0.0, photometric_p=0.0)
    for key in keys(20):
        out = policy.pixels(IMAGE, key)
        kept = (out == IMAGE).all(-1)
        rows, cols = np.flatnonzero(kept.any(1)), np.flatnonzero(kept.any(0))
        box = np.zeros_like(kept)
        box[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = True
        assert (kept == box).all() and (out[~box] == 0).all()
        assert 0.2 * 112 * 112 * 0.9 <= box.sum() and 0.75 * 0.9 <= len(cols) / len(rows) <= 4 / 3 / 0.9


@pytest.mark.parametrize("size", [112, 32])
def test_outputs_are_network_input(size):
    policy = AdaFaceAugment(crop_p=0.5, low_res_p=0.5, photometric_p=0.5)
    image = smooth_image(np.random.default_rng(1), size, size)
    for key in keys(24):
        out = policy(image, key)
        assert out.shape == (3, size, size) and out.dtype == torch.float32
        assert out.min() >= -1.0 and out.max() <= 1.0
    rendered = SyntheticIdentities(4, 2, image_size=24, augment=policy)
    assert all(rendered[key][0].shape == (3, 24, 24) and rendered[key][0].abs().max() <= 1 for key in keys(8))


def test_synthetic_flip_mirrors_the_rendered_image():
    plain = SyntheticIdentities(4, 2, image_size=24)
    flipping = SyntheticIdentities(4, 2, image_size=24, augment=Flip())
    mirrored = [torch.equal(flipping[key][0], plain[key][0].flip(-1)) for key in keys(8)]
    assert mirrored == [Flip().flips(key) for key in keys(8)]


def test_loader_workers_and_a_resume_see_the_same_augmentation(tmp_path):
    root = write_jpeg_folder(tmp_path, identities=2, per_identity=6)
    dataset = ImageFolderDataset(root, augment=AdaFaceAugment(crop_p=0.5, low_res_p=0.5, photometric_p=0.5))
    plain = ImageFolderDataset(root, augment=NoAugment())

    def epoch(workers: int, skip_batches: int = 0) -> list[torch.Tensor]:
        loader = FaceDataModule(2, dataset, batch_size=4, num_workers=workers, seed=3).train_dataloader()
        loader.load_state_dict({"epoch": 1, "batches": skip_batches, "batch_size": 4, "world_size": 1})
        return [images for images, _ in loader]

    straight = epoch(0)
    assert len(straight) == 3
    assert all(torch.equal(a, b) for a, b in zip(straight, epoch(2), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(straight[1:], epoch(2, skip_batches=1), strict=True))
    sampler = ResumableSampler(dataset, seed=3)
    sampler.set_epoch(1)
    images = torch.cat(straight)
    augmented = [
        not (torch.equal(image, plain[key][0]) or torch.equal(image, plain[key][0].flip(-1)))
        for image, key in zip(images, sampler)
    ]
    assert any(augmented)  # the ops ran: the check above compared augmented images


def test_flip_needs_no_albumentations_and_adaface_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "albumentations", None)  # as if not installed
    assert torch.equal(Flip()(IMAGE, keys(1)[0]), normalise(IMAGE, flip=Flip().flips(keys(1)[0])))
    with pytest.raises(ImportError, match=r"augment=adaface needs albumentations: pip install 'facerec\[augment\]'"):
        AdaFaceAugment()


def test_bad_settings_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"augment.crop_p must be a probability in \[0, 1\], got 1.5"):
        AdaFaceAugment(crop_p=1.5)
    with pytest.raises(ValueError, match=r"augment.low_res_scale must be \[low, high\]"):
        AdaFaceAugment(low_res_scale=[0.5, 2.0])
    with pytest.raises(ValueError, match=r"augment.contrast must be >= 0"):
        AdaFaceAugment(contrast=-0.1)
    with pytest.raises(TypeError, match=r"ImageFolderDataset: augment must be an augmentation policy .*got bool True"):
        ImageFolderDataset(write_jpeg_folder(tmp_path, identities=2, per_identity=1), augment=True)


@pytest.mark.parametrize(
    "overrides,policy",
    [
        ([], NoAugment),  # the synthetic default: its renderer flips already
        (["dataset=lfw_devtrain"], Flip),  # every other dataset: the flip, as before
        (["dataset=lfw_devtrain", "augment=adaface"], AdaFaceAugment),
        (["augment=adaface"], AdaFaceAugment),
        (["dataset=recordio", "dataset.train.root=/data", "augment=none"], NoAugment),
    ],
)
def test_the_augment_group_reaches_the_training_set(overrides, policy, tmp_path):
    from hydra.utils import instantiate

    cfg = compose_config(overrides, tmp_path)
    assert type(instantiate(cfg.dataset.train.augment)) is policy


def test_train_py_with_adaface_on_lfw(shared_data, tmp_path):
    out = run_script(
        [
            "train.py",
            "augment=adaface",
            "dataset=lfw_devtrain",
            f"paths.data_dir={shared_data}",
            "dataset.num_workers=2",
            "trainer.max_steps=3",
            "model.width=4",
            "logger=csv",
            "callbacks.progress_bar.refresh_rate=0",
            f"hydra.run.dir={tmp_path}",
        ]
    )
    assert "held-out verification lfw_devtest: accuracy" in out.stdout
    assert "finished after 3 steps" in out.stdout
    saved = (tmp_path / ".hydra" / "config.yaml").read_text()
    assert "_target_: facerec.data.augment.AdaFaceAugment" in saved and "photometric_p: 0.2" in saved
