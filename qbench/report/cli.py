"""qbench-report: build the HTML report of a sweep, or of every sweep as one static site.

    qbench-report runs/<sweep> [--out reports]   -> reports/<sweep>/index.html (+ tidy CSV/Parquet), reports/index.html
    qbench-report --all runs [--out reports]     -> every runs/*/ that holds a result, reports/index.html linking them,
                                                    and one reports/assets/plotly.min.js that every page loads

A single report embeds plotly.js (a page copied alone still opens), unless OUT is already a site (it holds
assets/plotly.min.js): then it joins the site and shares that copy. --all shares one copy. --plotlyjs overrides.
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
    p.add_argument("--plotlyjs", choices=("inline", "shared"), default=None,
                   help="embed plotly.js in each page (default for one sweep), or load one shared copy from "
                        "OUT/assets/plotly.min.js (default with --all, or where OUT already has it); both open "
                        "from disk with no network")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from qbench.report import html, site  # lazy: --help stays fast

    root, out = Path(args.path), Path(args.out)
    if not root.is_dir():
        print(f"qbench-report: {root} is not a directory", file=sys.stderr)
        return 2
    if args.all:
        sweeps = site.sweeps_under(root)
        if not sweeps:
            print(f"qbench-report: no sweep with a result under {root}", file=sys.stderr)
            html.write_index(out)
            return 2
    else:
        sweeps = [root]
    shared = (args.plotlyjs or ("shared" if args.all or site.is_site(out) else "inline")) == "shared"

    def report(sweep: Path, e: Exception) -> None:
        why = str(e) if isinstance(e, FileNotFoundError) else f"{sweep}: not built: {type(e).__name__}: {e}"
        print(f"qbench-report: {why}", file=sys.stderr)

    pages, failed = site.build_site(sweeps, out, shared=shared, on_error=report)
    from qbench.store.late_quality import pending_line

    for sweep in sweeps:  # the report no longer compares: it names the command that does
        line = pending_line(sweep)
        if line:
            print(line, file=sys.stderr)
    for page in pages:
        print(page)
    print(out / "index.html")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
