"""Weight EMA (`callbacks=ema`, Lightning's EMAWeightAveraging): the average follows its recursion
over the steps taken and passes over skipped ones; validation, the checkpoints' state_dict, eval.py
and the export use it; under Partial FC each rank averages its own rows and the checkpoint gathers
them. Exact resume with EMA: tests/test_resume.py."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import initialize_config_dir

from conftest import CONF_DIR, TINY_RUN, compose_config, read_metrics, run_script
from facerec.config import instantiate_all
from facerec.evaluation.evaluate import evaluate
from facerec.training.callbacks import WeightEMA
from facerec.backbones.weights import load_backbone
from facerec.training.fit import build_module
from facerec.tools.export import export_checkpoint
from fault_injection import infinite_gradient_at, nonfinite_images_at

DECAY = 0.9  # a horizon of ~10 steps: the smoke run's 20 steps move the average well away from the weights
EMA = ["callbacks=ema", f"callbacks.ema.decay={DECAY}"]
SKIPPED = 5  # the global step whose forward gets NaN images
# the validation set of conf/experiment/smoke.yaml, as eval.py overrides
SMOKE_SET = [
    "+evalset.synthetic_heldout.pairs.num_identities=20",
    "+evalset.synthetic_heldout.pairs.images_per_identity=4",
    "+evalset.synthetic_heldout.pairs.num_pairs=80",
]
SCORES = ["accuracy", "accuracy_std", "auc", "eer", "threshold"]


def every_step(directory: Path) -> str:
    """A ModelCheckpoint keeping the checkpoint of every optimizer step as step<N>.ckpt."""
    return (f"+callbacks.every_step={{_target_:lightning.pytorch.callbacks.ModelCheckpoint,dirpath:'{directory}',"
            "filename:'step{step}',every_n_train_steps:1,save_top_k:-1,auto_insert_metric_name:false}")


def step_checkpoints(directory: Path) -> dict[int, dict]:
    return {int(path.stem[4:]): torch.load(path, weights_only=True) for path in directory.glob("step*.ckpt")}


def assert_recursion(checkpoints: dict[int, dict], skipped: frozenset[int] = frozenset()) -> None:
    """Each step's average from the one before and the step's trained tensors: a copy at the first
    step, then averaged += (1 - decay) (trained - averaged), integer buffers copied; a skipped step
    leaves both the trained tensors and the average as they were."""
    first = min(checkpoints)
    for key, value in checkpoints[first]["state_dict"].items():
        assert torch.equal(value, checkpoints[first]["current_model_state"][key]), key
    for step in sorted(checkpoints)[1:]:
        before, after = checkpoints[step - 1]["state_dict"], checkpoints[step]["state_dict"]
        trained = checkpoints[step]["current_model_state"]
        if step - 1 in skipped:  # the checkpoint after the skipped step (global step N + 1)
            for key, value in before.items():
                assert torch.equal(value, after[key]), (step, key)
            for key, value in checkpoints[step - 1]["current_model_state"].items():
                if "nonfinite" not in key:  # the skip counters do count it
                    assert torch.equal(value, trained[key]), (step, key)
            assert checkpoints[step]["averaging_state"]["n_averaged"] == checkpoints[step - 1]["averaging_state"]["n_averaged"]
            continue
        for key, value in before.items():
            expected = torch.lerp(value, trained[key], 1 - DECAY) if value.is_floating_point() else trained[key]
            assert torch.equal(after[key], expected), (step, key)
    last = checkpoints[max(checkpoints)]
    assert last["averaging_state"]["n_averaged"] == len(checkpoints) - len(skipped)
    assert not any(torch.equal(value, last["current_model_state"][key]) for key, value in last["state_dict"].items() if "weight" in key)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory) -> Path:
    """A smoke run (2 epochs of 10 steps) with EMA, every step's checkpoint, and step 5 skipped."""
    run_dir = tmp_path_factory.mktemp("ema_run")
    run_script(["train.py", *TINY_RUN, *EMA, "logger=csv", f"hydra.run.dir={run_dir}", every_step(run_dir / "steps"),
                nonfinite_images_at(SKIPPED)])
    return run_dir


def evaluate_checkpoint(checkpoint: Path, output_dir: Path) -> dict:
    cfg = compose_config([f"ckpt_path={checkpoint}", *SMOKE_SET], output_dir, config_name="eval")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return evaluate(cfg)["synthetic_heldout"].result


def test_callbacks_ema_adds_the_average_to_the_default_callbacks(tmp_path):
    cfg = compose_config([*TINY_RUN, *EMA], tmp_path)
    assert list(cfg.callbacks) == [*compose_config(TINY_RUN, tmp_path).callbacks, "ema"]
    (ema,) = [callback for callback in instantiate_all(cfg.callbacks) if isinstance(callback, WeightEMA)]
    assert ema.decay == DECAY and ema.update_every_n_steps == 1 and ema.on_module_device
    with pytest.raises(ValueError, match=r"callbacks.ema.decay must lie in \[0, 1\), got 1.0"):
        WeightEMA(decay=1.0)
    with pytest.raises(ValueError, match="callbacks.ema.update_every_n_steps must be >= 1, got 0"):
        WeightEMA(update_every_n_steps=0)


def test_the_average_follows_the_steps_taken_and_passes_over_a_skipped_one(ema_run):
    checkpoints = step_checkpoints(ema_run / "steps")
    assert sorted(checkpoints) == list(range(1, 21))
    assert checkpoints[20]["current_model_state"]["step_guard.nonfinite_steps"] == 1
    assert_recursion(checkpoints, skipped=frozenset({SKIPPED}))
    # the checkpoint the run ends with holds the last average (and the trained tensors beside it)
    last = torch.load(ema_run / "checkpoints" / "last.ckpt", weights_only=True)
    for name in ("state_dict", "current_model_state"):
        assert all(torch.equal(value, checkpoints[20][name][key]) for key, value in last[name].items()), name


def test_validation_best_eval_and_export_use_the_average(ema_run, tmp_path):
    (best,) = [path for path in (ema_run / "checkpoints").glob("best-*.ckpt")]
    checkpoint = torch.load(best, weights_only=True)
    average = step_checkpoints(ema_run / "steps")[checkpoint["global_step"]]["state_dict"]
    assert all(torch.equal(value, average[key]) for key, value in checkpoint["state_dict"].items())
    backbone, _ = load_backbone(best)  # what eval.py and facerec.export read
    weights = {f"backbone.{key}": value for key, value in backbone.state_dict().items()}
    assert all(torch.equal(value, average[key]) for key, value in weights.items())

    # the validation that chose `best` scored the average: eval.py on it gives the logged numbers
    (validation,) = [row for row in read_metrics(ema_run) if row.get("val/accuracy_mean") and int(row["epoch"]) == checkpoint["epoch"]]
    averaged = evaluate_checkpoint(best, tmp_path / "averaged")
    for key in SCORES:
        assert getattr(averaged, key) == pytest.approx(float(validation[f"val/synthetic_heldout/{key}"]), abs=1e-6), key
    # which the trained tensors of that step do not give
    trained_checkpoint = tmp_path / "trained.ckpt"
    torch.save({**checkpoint, "state_dict": checkpoint["current_model_state"]}, trained_checkpoint)
    trained = evaluate_checkpoint(trained_checkpoint, tmp_path / "trained")
    assert any(getattr(trained, key) != pytest.approx(getattr(averaged, key), abs=1e-6) for key in SCORES)

    exported = export_checkpoint(best, format="torchscript", output_path=tmp_path / "model.pt")
    images = torch.randn(4, 3, 32, 32)
    trained_backbone, _ = load_backbone(trained_checkpoint)
    with torch.no_grad():
        embeddings = torch.jit.load(str(exported.model_path))(images)
        torch.testing.assert_close(embeddings, backbone(images))
        assert not torch.allclose(embeddings, trained_backbone(images), atol=1e-3)


def test_a_step_the_gradscaler_skips_is_not_averaged_in(tmp_path):
    """An fp16 overflow at step 3 (the GradScaler skips it; no failure, not counted). On a CPU
    Lightning's 16-mixed runs without a scaler, so the plugin is given one, as on a GPU."""
    plugin = ("+trainer.plugins=[{_target_:lightning.pytorch.plugins.MixedPrecision,precision:16-mixed,device:cpu,"
              "scaler:{_target_:torch.amp.GradScaler,device:cpu}}]")
    run_script(["train.py", *TINY_RUN, *EMA, "trainer.max_epochs=1", "logger=csv", "trainer.precision=null", plugin,
                f"hydra.run.dir={tmp_path}", every_step(tmp_path / "steps"), infinite_gradient_at(3)])
    checkpoints = step_checkpoints(tmp_path / "steps")
    assert checkpoints[10]["current_model_state"]["step_guard.nonfinite_steps"] == 0
    assert_recursion(checkpoints, skipped=frozenset({3}))


def test_resuming_without_the_average_continues_from_the_trained_weights(tmp_path):
    module = build_module(compose_config(TINY_RUN, tmp_path))
    average = module.state_dict()
    trained = {key: value + 1 if value.is_floating_point() else value for key, value in average.items()}
    # on_load_checkpoint reads only the trainer's callbacks; WeightEMA restores both copies itself
    for callbacks, continued in [([WeightEMA()], average), ([], trained)]:
        module._trainer = SimpleNamespace(callbacks=callbacks)
        checkpoint = {"state_dict": average, "current_model_state": trained, "averaging_state": {}}
        module.on_load_checkpoint(checkpoint)
        assert checkpoint["state_dict"] is continued  # what Lightning then loads into the module


@pytest.mark.slow
def test_under_partial_fc_each_rank_averages_its_rows_and_the_checkpoint_gathers_them(tmp_path):
    run_script(["train.py", *TINY_RUN, *EMA, "sharding=partial_fc", "trainer=ddp_cpu", "trainer.devices=2", "logger=csv",
                f"hydra.run.dir={tmp_path}", every_step(tmp_path / "steps")])
    checkpoints = step_checkpoints(tmp_path / "steps")
    assert sorted(checkpoints) == list(range(1, 11))  # 160 images, 16 per batch and rank, 2 epochs
    for checkpoint in checkpoints.values():  # both shards' rows, of the average and of the trained head
        assert checkpoint["state_dict"]["head.centres.weight"].shape == checkpoint["current_model_state"]["head.centres.weight"].shape == (20, 128)
    # the gathered average is the average of the gathered rows: each rank averaged its own shard
    assert_recursion(checkpoints)
