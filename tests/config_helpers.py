"""The real configs of the entry points, composed in-process: for tests, and for the benchmarks that
build from the configs (they put tests/ on their path)."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from facerec.config import register_resolvers
from facerec.evaluation.evalsets import compose_evalsets
from facerec.paths import REPO_ROOT
from facerec.training.fit import compose_val_sets

CONF_DIR = REPO_ROOT / "conf"


def compose_config(overrides: list[str], output_dir: str | Path, config_name: str = "train") -> DictConfig:
    """The real config of a repo entry point (conf/), composed as `python <config_name>.py` would
    compose it, with outputs under `output_dir` and the evaluation sets it names (val_sets,
    eval_sets) composed from conf/evalset/ as the entry point composes them."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
        with open_dict(cfg):
            cfg.paths.root_dir = str(REPO_ROOT)
            cfg.paths.output_dir = str(output_dir)
            cfg.hydra.runtime.output_dir = str(output_dir)
            cfg.hydra.job.override_dirname = ",".join(overrides)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]  # as in a real run: the task sees its config, `${hydra:...}` reads HydraConfig
        if config_name == "train":
            compose_val_sets(cfg)
        elif "eval_sets" in cfg:
            compose_evalsets(cfg, cfg.eval_sets, "eval_sets")
    return cfg
