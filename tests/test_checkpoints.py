"""Checkpoints written by train.py rebuild their backbone from the saved config, weights only."""
from __future__ import annotations

import pytest
import torch

from facerec.training.checkpoints import load_backbone


def test_backbone_round_trip_from_a_training_checkpoint(trained_run):
    path = trained_run / "checkpoints" / "last.ckpt"
    backbone, config = load_backbone(path)
    assert config["model"]["name"] == "tiny" and not backbone.training
    state = torch.load(path, weights_only=True)["state_dict"]
    torch.testing.assert_close(backbone.stem[0].weight, state["backbone.stem.0.weight"])
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 128)


def test_non_facerec_and_missing_checkpoints_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_backbone(tmp_path / "nope.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="holds no facerec run config"):
        load_backbone(tmp_path / "other.ckpt")
