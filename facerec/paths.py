"""Where things live: the repository root and the real face data (`paths.data_dir` of
conf/paths/default.yaml), for code that runs without the configs (benchmarks, tests, notebooks)."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("FACEREC_DATA", REPO_ROOT.parent / "shared" / "data"))
