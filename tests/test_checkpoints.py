"""Checkpoints written by train.py rebuild their backbone from the saved config, weights only; a
checkpoint of the layout before this one still evaluates and resumes."""
from __future__ import annotations

import shutil

import pytest
import torch

from conftest import REPO_ROOT, compose_config, run_script
from facerec.backbones.weights import load_backbone
from facerec.checkpoint_files import load_checkpoint
from facerec.training.fit import build_module


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


# A checkpoint written by the main of 7f1d069, before the head was split into margin, class centres
# and scale and the step guard got a module of its own: `python train.py experiment=smoke head=adaface
# scale=dynamic logger=csv trainer.max_epochs=1` (step 10 of the smoke run, AdaFace's EMAs and the
# dynamic s moved). Its keys: head.weight, head.batch_mean, head.batch_std, head.scale.s, nonfinite_steps.
EARLIER = REPO_ROOT / "tests" / "fixtures" / "checkpoint_7f1d069_adaface_dynamic.ckpt"
EARLIER_RUN = ["experiment=smoke", "head=adaface", "scale=dynamic"]
RENAMED = {
    "head.weight": "head.centres.weight",
    "head.batch_mean": "head.margin.batch_mean",
    "head.batch_std": "head.margin.batch_std",
    "nonfinite_steps": "step_guard.nonfinite_steps",
    "consecutive_nonfinite": "step_guard.consecutive_nonfinite",
}


def test_a_checkpoint_of_the_earlier_layout_loads_every_tensor_into_its_new_place(tmp_path):
    state = load_checkpoint(EARLIER)["state_dict"]
    assert set(RENAMED) <= set(state)
    module = build_module(compose_config(EARLIER_RUN, tmp_path))
    module.load_state_dict(state, strict=True)
    loaded = module.state_dict()
    for key, value in state.items():
        torch.testing.assert_close(loaded[RENAMED.get(key, key)], value, rtol=0, atol=0, msg=key)
    assert module.head.margin.batch_mean.item() != 20.0  # the EMA moved from its start in that run


def test_a_checkpoint_of_the_earlier_layout_evaluates_and_resumes(tmp_path):
    out = run_script(["eval.py", f"ckpt_path={EARLIER}", f"hydra.run.dir={tmp_path / 'eval'}"])
    assert "| synthetic_heldout | 2000 |" in out.stdout
    checkpoint = tmp_path / "earlier.ckpt"
    shutil.copy(EARLIER, checkpoint)  # the resumed run writes beside its own output, not into tests/
    run_script(["train.py", *EARLIER_RUN, "trainer.max_epochs=2", "logger=csv", f"ckpt_path={checkpoint}",
                f"hydra.run.dir={tmp_path / 'resumed'}"])
    log = (tmp_path / "resumed" / "train.log").read_text()
    assert f"resuming from {checkpoint} (step 10)" in log
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 20 and "head.centres.weight" in resumed["state_dict"]
