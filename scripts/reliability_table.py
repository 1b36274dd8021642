"""Write the table of bad inputs in docs/guide/reliability.md by running every case of tests/bad_inputs.py.

    python scripts/reliability_table.py           # rewrite the table in docs/guide/reliability.md
    python scripts/reliability_table.py --print   # print it only
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DOC = REPO_ROOT / "docs" / "guide" / "reliability.md"
BEGIN, END = "<!-- bad-inputs:begin -->", "<!-- bad-inputs:end -->"


def table() -> str:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from bad_inputs import CASES, outcome

    rows = ["| area | bad input | what happens |", "|---|---|---|"]
    for bad in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            result = outcome(bad, Path(tmp)).replace("|", "\\|")
        kind = "refused" if bad.error else "tolerated"
        rows.append(f"| {bad.category} | {bad.description} | **{kind}**: `{result}` |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print", action="store_true", help="print the table instead of writing the doc")
    args = parser.parse_args()
    text = table()
    if args.print:
        print(text)
        return
    doc = DOC.read_text()
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    DOC.write_text(doc[:start] + "\n" + text + "\n" + doc[end:])
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
