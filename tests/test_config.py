"""Every config option composes and instantiates; bad options fail with Hydra's own message."""
from __future__ import annotations

import pytest
from hydra.utils import instantiate

from conftest import CONF_DIR, TINY_RUN, compose_config, run_script
from facerec.training.fit import build_module

GROUPS = ["dataset", "model", "head", "scale", "optim", "trainer", "logger", "callbacks"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option, tmp_path):
    cfg = compose_config([f"{group}={option}"], tmp_path)
    assert cfg[group] is not None or group in ("callbacks",)
    if group in ("head", "scale", "model", "optim"):
        module = build_module(compose_config([*TINY_RUN, f"{group}={option}"], tmp_path))
        assert module.head.scale.value > 0


@pytest.mark.parametrize("group", ["logger", "callbacks"])
def test_multi_object_groups_instantiate(group, tmp_path):
    from facerec.config import instantiate_all

    for option in options(group):
        cfg = compose_config([f"{group}={option}"], tmp_path)
        objects = instantiate_all(cfg[group])
        assert all(obj is not None for obj in objects)


def test_num_classes_is_stated_once(tmp_path):
    cfg = compose_config([*TINY_RUN, "dataset.num_classes=37"], tmp_path)
    module = build_module(cfg)
    datamodule = instantiate(cfg.dataset)
    assert module.head.num_classes == datamodule.num_classes == len(datamodule.train_set) // 8 == 37


def test_help_lists_the_groups():
    out = run_script(["train.py", "--help"]).stdout
    for group in GROUPS + ["paths", "experiment"]:
        assert f"{group}:" in out, out


def test_unknown_option_lists_the_choices():
    result = run_script(["train.py", "head=nope"], timeout=120, check=False)
    assert result.returncode != 0
    assert "Could not find 'head/nope'" in result.stderr
    assert "arcface" in result.stderr and "cosface" in result.stderr  # Hydra lists the available options
    assert "Traceback" not in result.stderr


def test_inconsistent_settings_fail_before_training(tmp_path):
    import re

    from facerec.training.checks import check_data_and_model

    cases = {
        "model.input_size=64": "TinyNet takes (B, 3, 64, 64) images, got (2, 3, 32, 32)",
    }
    for override, message in cases.items():
        cfg = compose_config([*TINY_RUN, override], tmp_path)
        with pytest.raises(ValueError, match=re.escape(message)):
            check_data_and_model(instantiate(cfg.dataset), build_module(cfg))
