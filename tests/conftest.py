"""Shared test set-up: one CPU thread per process, W&B offline, composed real configs."""
from __future__ import annotations

import csv
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
from config_helpers import CONF_DIR, compose_config  # noqa: E402, F401  (tests import compose_config from here)
from facerec.config import register_resolvers  # noqa: E402
from facerec.paths import DATA_DIR, REPO_ROOT  # noqa: E402, F401  (and the paths)

torch.set_num_threads(1)
torch.set_flush_denormal(True)
register_resolvers()

# conf/experiment/smoke.yaml: seconds per run on one CPU thread.
TINY_RUN = ["experiment=smoke"]


def evaluate_set(backbone: torch.nn.Module, protocol, **extract_options):
    """A protocol's evaluation of a backbone in one process: every image embedded once (see
    facerec.evaluation.extract_embeddings for the options), then scored as eval.py and validation score."""
    from facerec.evaluation import evaluate_features, extract_embeddings

    return evaluate_features(protocol, extract_embeddings(backbone, protocol.image_set(), **extract_options))


@pytest.fixture(scope="session")
def ijb_fixture(shared_data) -> Path:
    """The LFW-based IJB-C fixture where conf/evalset/ijbc_fixture*.yaml read it (logs/fixtures/IJBC),
    built by an explicit call (as `facerec-make-fixture` builds it) if it is not there yet."""
    from facerec.tools.make_fixture import make_ijb_fixture

    return make_ijb_fixture(REPO_ROOT / "logs" / "fixtures", "IJBC")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (LFW, ORL). Skipped where absent, except in CI, where it must exist."""
    if not (DATA_DIR / "lfw").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"real face data expected at {DATA_DIR} in CI")
        pytest.skip(f"real face data not found at {DATA_DIR}")
    return DATA_DIR


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """The dir of one finished TINY_RUN epoch (logger=csv), shared by the tests that only read it."""
    run_dir = tmp_path_factory.mktemp("trained_run")
    run_script(["train.py", *TINY_RUN, "trainer.max_epochs=1", "logger=csv", f"hydra.run.dir={run_dir}"])
    return run_dir


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    """The rows of a run's csv/metrics.csv (logger=csv or wandb_csv), as written."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], key: str) -> list[float]:
    """The logged values of one metric, in row order."""
    return [float(row[key]) for row in rows if row.get(key)]


def run_script(
    args: list[str], cwd: Path = REPO_ROOT, timeout: float = 600, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Run a repo script (train.py, eval.py, ...) in a fresh interpreter, with `env` added to this
    process's environment; fail with its output unless it succeeds or `check` is off."""
    result = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result
