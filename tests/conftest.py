"""Shared test set-up: one CPU thread per process, W&B offline, composed real configs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# One thread per process: libgomp spin-waiting on a busy 2-core machine makes torch 10-40x slower,
# and pytest-xdist runs one test process per core. Set before torch is imported (subprocesses inherit).
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.pop("WANDB_API_KEY", None)

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from facerec.config import register_resolvers  # noqa: E402

torch.set_num_threads(1)
torch.set_flush_denormal(True)
register_resolvers()

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
SHARED_DATA = Path(os.environ.get("FACEREC_DATA", REPO_ROOT.parent / "shared" / "data"))

# conf/experiment/smoke.yaml: seconds per run on one CPU thread.
TINY_RUN = ["experiment=smoke"]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (LFW, ORL). Skipped where absent, except in CI, where it must exist."""
    if not (SHARED_DATA / "lfw").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"real face data expected at {SHARED_DATA} in CI")
        pytest.skip(f"real face data not found at {SHARED_DATA}")
    return SHARED_DATA


def compose_config(overrides: list[str], output_dir: Path, config_name: str = "train"):
    """The real Hydra config, composed as train.py would, with outputs under `output_dir`."""
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
    return cfg


def run_script(args: list[str], cwd: Path = REPO_ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a repo script (train.py, eval.py, ...) in a fresh interpreter; fail with its output."""
    result = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy()
    )
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result
