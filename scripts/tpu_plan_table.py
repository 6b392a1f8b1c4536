#!/usr/bin/env python
"""Print the TPU-plan table (artifacts/tpu_plan/README.md) from ``--plan-json`` files, one row per plan.

  python scripts/tpu_plan_table.py artifacts/tpu_plan/*.json
A file holding {"cache": ..., "train": ...} (scripts/plan_tpu_run.py) gives one row per step;
``FILE=note`` puts a note in the row's last column.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dflash_gptoss.planning.cli import TABLE_HEADER, table_row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", metavar="FILE[=NOTE]",
                   help="plan JSON files (--plan-json output); '=NOTE' puts NOTE in the row's last column.")
    args = p.parse_args(argv)
    print(TABLE_HEADER)
    for arg in args.files:
        path, _, note = arg.partition("=")
        if not Path(path).is_file():
            print(f"error: {path} is not a file", file=sys.stderr)
            return 2
        doc = json.loads(Path(path).read_text())
        for plan in ([doc] if "step" in doc else doc.values()):
            print(table_row(plan, note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
