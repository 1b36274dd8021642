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
from facerec.config import compose_config, register_resolvers  # noqa: E402, F401  (tests import compose_config from here)

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


def run_script(args: list[str], cwd: Path = REPO_ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a repo script (train.py, eval.py, ...) in a fresh interpreter; fail with its output."""
    result = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy()
    )
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result
