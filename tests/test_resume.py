"""Kill-and-resume: a run preempted by SIGTERM and resumed with ckpt_path=last ends exactly where
an uninterrupted run ends (weights bitwise, logged metrics identical)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fault_injection import signal_at
from conftest import TINY_RUN, read_metrics, run_script

RUN = [*TINY_RUN, "trainer.max_epochs=3", "trainer.deterministic=true", "logger=wandb_csv", "model.dropout=0.2"]
# dynamic uncapped: capped at its start, s would sit there in a run this short and prove nothing;
# adaface: every augmentation draw (crop, low resolution, jitter, flip) from the sample keys
SETUPS = {
    "fixed": ["scale=fixed"],
    "dynamic": ["scale=dynamic", "scale.max_scale=inf"],
    "adaface": ["scale=fixed", "augment=adaface"],
    # weight EMA: the checkpoints' state_dict holds the average, the trained tensors are beside it
    "ema": ["scale=fixed", "callbacks=ema", "callbacks.ema.decay=0.9"],
    # a sigmoid head: its learned bias is a parameter with optimizer state, resumed where it was
    "uniface": ["scale=fixed", "head=uniface"],
    # LoRA adapters under weight EMA: the checkpoints hold the merged backbones, the adapted forms beside them
    "lora_ema": ["scale=fixed", "finetune=lora", "callbacks=ema", "callbacks.ema.decay=0.9"],
}


def metrics_by_step(run_dir: Path) -> dict[tuple[str, str], str]:
    return {(row["step"], key): value for row in read_metrics(run_dir) for key, value in row.items() if value and key != "step"}


@pytest.mark.slow
@pytest.mark.parametrize("setup", SETUPS)
def test_sigterm_then_resume_matches_an_uninterrupted_run(setup, tmp_path):
    overrides = [*RUN, *SETUPS[setup]]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script(["train.py", *overrides, f"hydra.run.dir={straight}"])
    # 10 steps per epoch: step 13 is mid-epoch, after a validation and an epoch boundary
    out = run_script(["train.py", *overrides, f"hydra.run.dir={resumed}", signal_at(13)])
    assert "held-out verification" not in out.stdout  # it stopped early
    first = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["global_step"] == 14
    run_script(["train.py", *overrides, f"hydra.run.dir={resumed}", "ckpt_path=last"])

    final_straight = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    final_resumed = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert final_resumed["global_step"] == final_straight["global_step"] == 30
    for key, value in final_straight["state_dict"].items():
        assert torch.equal(value, final_resumed["state_dict"][key]), key
    if setup == "lora_ema":
        for name in ("state_dict", "current_model_state"):
            kept = final_straight["finetune_training_state"][name]
            assert any(".lora_B." in key for key in kept) and not any("lora" in key for key in final_straight[name])
            for key, value in kept.items():
                assert torch.equal(value, final_resumed["finetune_training_state"][name][key]), (name, key)
    if setup in ("ema", "lora_ema"):  # the preemption checkpoint holds step 14's average, whichever callback ran first
        assert first["averaging_state"]["n_averaged"] == 14 and final_straight["averaging_state"]["n_averaged"] == 30
        for name in ("current_model_state", "averaging_state"):
            for key, value in final_straight[name].items():
                assert torch.equal(value, final_resumed[name][key]), (name, key)
        assert not torch.equal(final_straight["state_dict"]["backbone.stem.0.weight"], final_straight["current_model_state"]["backbone.stem.0.weight"])
    assert metrics_by_step(straight) == metrics_by_step(resumed)
    logged_s = {value for (_, key), value in metrics_by_step(straight).items() if key == "train/s"}
    assert len(logged_s) == (30 if setup == "dynamic" else 1)  # the dynamic s moved every step: its restore counts
    assert final_resumed["wandb_run_id"] == first["wandb_run_id"]  # the same W&B run continues
    # the resumed run kept the original config and saved its own next to it
    assert (resumed / ".hydra" / "config.yaml").exists() and list((resumed / ".hydra").glob("resumed_*/config.yaml"))


def test_flips_follow_the_sample_key_in_any_process(tmp_path):
    import pickle

    from data_helpers import write_jpeg_folder
    from facerec.data import FaceDataModule, ImageFolderDataset
    from facerec.data.augment import NoAugment
    from facerec.data.sampling import ResumableSampler, SampleKey

    dataset = ImageFolderDataset(write_jpeg_folder(tmp_path, identities=2, per_identity=4))
    sampler = ResumableSampler(dataset, seed=3)
    sampler.set_epoch(1)
    keys = list(sampler)
    assert sorted(keys) == list(range(8)) and all(isinstance(k, SampleKey) for k in keys)
    copied = pickle.loads(pickle.dumps(keys))  # as DataLoader workers receive them
    assert all(torch.equal(dataset[a][0], dataset[b][0]) for a, b in zip(keys, copied))
    plain = ImageFolderDataset(tmp_path, augment=NoAugment())
    mirrored = [torch.equal(dataset[k][0], plain[k][0].flip(-1)) for k in keys]
    assert 0 < sum(mirrored) < 8  # the key decides: some flipped, some not

    def batches(workers: int) -> list[torch.Tensor]:
        loader = FaceDataModule(2, dataset, batch_size=4, num_workers=workers, seed=3).train_dataloader()
        loader.sampler.set_epoch(1)
        return [images for images, _ in loader]

    assert all(torch.equal(a, b) for a, b in zip(batches(0), batches(2)))


def test_a_finished_run_continued_past_its_end_holds_the_tail_lr(tmp_path):
    """The convergence tail check: a copy of a finished run, resumed with more steps and
    optim.scheduler.tail_lr_ratio, keeps its logged history, does not re-run a step, and trains on at
    tail_lr_ratio x the base LR from its first new step."""
    overrides = [*TINY_RUN, "trainer.max_epochs=2", "logger=csv"]
    run, tail = tmp_path / "run", tmp_path / "tail"
    run_script(["train.py", *overrides, f"hydra.run.dir={run}"])
    shutil.copytree(run, tail)
    out = run_script(["train.py", *overrides, "trainer.max_epochs=3", "optim.scheduler.tail_lr_ratio=0.25", f"ckpt_path={tail}/checkpoints/last.ckpt"])
    assert f"output: {tail}" in out.stdout
    base_lr = OmegaConf.load(run / ".hydra" / "config.yaml").optim.optimizer.lr
    before = [(row["step"], row["train/lr"]) for row in read_metrics(run) if row.get("train/lr")]
    after = [(row["step"], row["train/lr"]) for row in read_metrics(tail) if row.get("train/lr")]
    assert [step for step, _ in before] == [str(step) for step in range(20)]
    assert after[:20] == before and [step for step, _ in after[20:]] == [str(step) for step in range(20, 30)]
    assert all(float(lr) == pytest.approx(0.25 * base_lr) for _, lr in after[20:])
    assert torch.load(tail / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 30
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 20  # the original is untouched
