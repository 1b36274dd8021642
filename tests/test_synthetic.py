"""The embedded synthetic identities: deterministic, open-set, balanced folds."""
from __future__ import annotations

import numpy as np
import torch

from facerec.data import SyntheticIdentities, SyntheticPairs


def test_samples_are_deterministic_and_in_range():
    a, b = SyntheticIdentities(10, 4, seed=3), SyntheticIdentities(10, 4, seed=3)
    x, y = a[17]
    assert x.shape == (3, 112, 112) and x.dtype == torch.float32 and y == 4
    assert torch.equal(x, b[17][0])
    assert x.min() >= -1 and x.max() <= 1
    assert not torch.equal(x, SyntheticIdentities(10, 4, seed=4)[17][0])
    assert not torch.equal(a[16][0], a[17][0])  # nuisance differs between samples of one identity


def test_heldout_identities_are_disjoint_from_training():
    train = SyntheticIdentities(5, 2, seed=0)
    heldout = SyntheticPairs(num_identities=5, images_per_identity=2, num_pairs=20, n_folds=2, seed=0)
    train_protos = torch.stack([train.renderer.prototype(i) for i in range(5)])
    held_protos = torch.stack([heldout.renderer.prototype(i) for i in range(5)])
    distance = (train_protos[:, None] - held_protos[None]).abs().flatten(2).mean(-1)
    assert distance.min() > 0.01


def test_pairs_form_balanced_consecutive_folds():
    pairs = SyntheticPairs(num_identities=30, images_per_identity=4, num_pairs=200, n_folds=10, image_size=32)
    assert len(pairs) == 120 and pairs.pairs.shape == (200, 2)
    identity = pairs.pairs // 4
    assert np.array_equal(identity[:, 0] == identity[:, 1], pairs.issame)
    for block in np.split(pairs.issame, 10):
        assert block.sum() == 10
    assert len({tuple(p) for p in pairs.pairs}) == 200
    image, index = pairs[7]
    assert image.shape == (3, 32, 32) and index == 7
