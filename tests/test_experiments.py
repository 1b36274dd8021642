"""The comparison experiments compose as documented; the Optuna sweeper runs a real study."""
from __future__ import annotations

import math

import pytest
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate

from conftest import TINY_RUN, compose_config, run_script
from facerec.tools import compare
from facerec.training.fit import build_module

SCALES = "fixed,fixed64,auto,auto_margin,dynamic"


def sweeper_params() -> dict:
    return dict(HydraConfig.get().sweeper.params or {})


@pytest.mark.parametrize("experiment", ["scale_sweep", "lfw_view1", "synthetic_large"])
def test_comparison_experiments_sweep_every_scale_and_log_csv(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    assert sweeper_params() == {"scale": SCALES, "seed": "0,1,2"}
    assert set(cfg.logger) == {"wandb", "csv"}  # facerec.tools.compare reads the CSV
    assert cfg.head._target_ == "facerec.heads.CosFace" and cfg.head.m == 0.35


def test_lfw_view1_trains_on_devtrain_and_verifies_on_devtest(tmp_path):
    cfg = compose_config(["experiment=lfw_view1"], tmp_path)
    assert cfg.dataset.train.identities.endswith("lfw/peopleDevTrain.txt") and cfg.dataset.num_classes == 4038
    assert list(cfg.val_sets) == ["lfw_devtest"] and cfg.evalset.lfw_devtest.pairs.pairs.endswith("pairsDevTest.txt")


def test_synthetic_large_has_the_seeds_class_count(tmp_path):
    cfg = compose_config(["experiment=synthetic_large", "scale=auto"], tmp_path)
    module = build_module(cfg)
    assert module.head.num_classes == 10_575 and module.head.centres.weight.shape == (10_575, 128)
    assert module.head.scale.value == pytest.approx(math.sqrt(2) * math.log(10_574))
    assert cfg.model.input_size == cfg.dataset.train.image_size == 48


def test_casia_cosface_is_the_gpu_reference_recipe(tmp_path):
    cfg = compose_config(["experiment=casia_cosface"], tmp_path)
    assert sweeper_params() == {"scale": "fixed,auto"}
    assert cfg.dataset.train._target_ == "facerec.data.RecordDataset" and cfg.dataset.num_classes == 10_572
    assert cfg.dataset.train.root.endswith("faces_webface_112x112") and cfg.dataset.batch_size == 512
    assert (cfg.model.name, cfg.head.m, cfg.optim.optimizer.lr, cfg.trainer.max_epochs) == ("iresnet50", 0.35, 0.1, 30)
    assert (cfg.trainer.accelerator, cfg.trainer.precision) == ("gpu", "bf16-mixed")
    module = build_module(compose_config(["experiment=casia_cosface", "scale=fixed"], tmp_path))
    assert module.head.centres.weight.shape == (10_572, 512) and module.head.scale.value == 30.0


def test_optuna_search_space_composes(tmp_path):
    compose_config([*TINY_RUN, "hparams_search=scale_optuna"], tmp_path)
    sweeper = HydraConfig.get().sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert set(sweeper.params) == {"scale.theta0", "head.m"}
    instantiate(sweeper.sampler)  # the TPE sampler builds


@pytest.mark.slow
def test_optuna_study_maximises_held_out_accuracy(tmp_path):
    sweep = tmp_path / "study"
    run_script(["train.py", "-m", *TINY_RUN, "hparams_search=scale_optuna", "hydra.sweeper.n_trials=2",
                f"hydra.sweep.dir={sweep}"])  # fmt: skip
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(result["best_params"]) == {"scale.theta0", "head.m"}
    assert 0.52 <= result["best_params"]["scale.theta0"] <= 1.05 and 0.2 <= result["best_params"]["head.m"] <= 0.5
    runs, keys = compare.load_runs([sweep])  # the objective is each trial's final val/accuracy_mean
    assert len(runs) == 2 and set(keys) == {"scale.theta0", "head.m"}
    assert result["best_value"] == pytest.approx(max(run.final("val/accuracy_mean") for run in runs))
