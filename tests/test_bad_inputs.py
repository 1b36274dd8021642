"""Every bad input in the catalogue (tests/bad_inputs.py) gets a clear error or a counted, logged skip,
and docs/guide/reliability.md shows what each one does."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from bad_inputs import CASES, outcome
from conftest import REPO_ROOT


@pytest.mark.parametrize("bad", CASES, ids=[c.run.__name__ for c in CASES])
def test_bad_input_is_refused_or_skipped_clearly(bad, tmp_path):
    if bad.error is None:
        report = bad.run(tmp_path)
        assert re.search(bad.match, report), report
    else:
        with pytest.raises(bad.error, match=bad.match):
            bad.run(tmp_path)


def test_reliability_doc_lists_every_case_with_its_current_outcome():
    doc = (REPO_ROOT / "docs" / "guide" / "reliability.md").read_text()
    table = subprocess.run(
        [sys.executable, "scripts/reliability_table.py", "--print"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert table.strip() in doc, "docs/guide/reliability.md is stale: run python scripts/reliability_table.py"
    assert all(c.description in doc for c in CASES)


def test_outcome_hides_the_temporary_folder(tmp_path):
    assert "<tmp>" in outcome(next(c for c in CASES if c.run.__name__ == "missing_ckpt"), tmp_path)
