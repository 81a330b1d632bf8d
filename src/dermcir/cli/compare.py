"""``dermcir compare RUN_DIR ... --out FILE.md``: the paper's rows beside every measured run, with a bar chart."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``compare`` sub-command."""
    p = sub.add_parser("compare", help="compare runs with the paper's reported rows (Markdown table + bar chart PNG)")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders holding a results.json")
    p.add_argument("--out", required=True, type=Path, help="Markdown file to write; the chart goes beside it (.png)")
    p.add_argument("--title", default="Case retrieval on Derm7pt: paper vs measured", help="heading and chart title")
    p.set_defaults(handler=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from dermcir.evaluation.compare import write_comparison

    md, png = write_comparison(args.runs, args.out, title=args.title)
    print(md)
    print(png)
    return 0
