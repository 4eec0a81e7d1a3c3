"""qbench-report: build the HTML report of a sweep, or of every sweep.

    qbench-report runs/<sweep> [--out reports]   -> reports/<sweep>/index.html (+ tidy CSV/Parquet), reports/index.html
    qbench-report --all runs [--out reports]     -> every runs/*/ that holds a result, then reports/index.html
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qbench-report", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a sweep directory (runs/<sweep>), or with --all the runs directory")
    p.add_argument("--all", action="store_true", help="build every sweep under PATH and the index")
    p.add_argument("--out", default="reports", help="reports directory (default: reports)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from qbench.report import html  # lazy: --help stays fast

    root, out = Path(args.path), Path(args.out)
    if not root.is_dir():
        print(f"qbench-report: {root} is not a directory", file=sys.stderr)
        return 2
    if args.all:
        sweeps = sorted(d for d in root.iterdir() if d.is_dir() and any(d.glob("*/result.json")))
        if not sweeps:
            print(f"qbench-report: no sweep with a result under {root}", file=sys.stderr)
            html.write_index(out)
            return 2
    else:
        sweeps = [root]
    failed = 0
    for sweep in sweeps:
        try:
            page = html.build_sweep_report(sweep, out)
        except FileNotFoundError as e:
            print(f"qbench-report: {e}", file=sys.stderr)
            failed += 1
            continue
        except Exception as e:  # one sweep that cannot be built must not cost the others (--all)
            print(f"qbench-report: {sweep}: not built: {type(e).__name__}: {e}", file=sys.stderr)
            failed += 1
            continue
        print(page)
    print(html.write_index(out))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
