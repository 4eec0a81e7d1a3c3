"""One static site for many sweeps: reports/<sweep>/index.html each, reports/index.html linking them, and one
shared copy of plotly.js in reports/assets/ that every page loads by a relative path.

Why shared: plotly.js is 4.6 MB; embedded in each page, a folder of ten sweeps carries it ten times. Why still
relative: the site must open from disk (file://) and from any static host, with no network. A single report
(``qbench-report runs/<sweep>``) keeps plotly.js embedded by default, since a page copied alone off a node must
still open, unless the reports folder is already a site (it holds assets/plotly.min.js): then it joins it, so that
rebuilding one sweep of a published site does not embed 4.6 MB again. ``--plotlyjs`` decides either way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Tuple

from qbench.report import html
from qbench.store import layout

ASSETS = "assets"
PLOTLY_FILE = "plotly.min.js"
PLOTLY_SRC = f"../{ASSETS}/{PLOTLY_FILE}"  # from reports/<sweep>/index.html


def write_plotly_asset(out_root: Path, plotlyjs: Optional[str] = None) -> Path:
    """reports/assets/plotly.min.js, the plotly.js of the installed plotly; rewritten only when it differs (so a
    rebuild leaves the file, and its timestamp, alone). ``plotlyjs`` overrides the library (tests only)."""
    path = Path(out_root) / ASSETS / PLOTLY_FILE
    text = html.get_plotlyjs() if plotlyjs is None else plotlyjs  # html's: what its pages would embed
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".js.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)  # a page being opened meanwhile never loads half a library
    return path


def is_site(out_root: Path) -> bool:
    """``out_root`` already shares plotly.js (an earlier --all built it): a sweep built into it should join."""
    return (Path(out_root) / ASSETS / PLOTLY_FILE).is_file()


def sweeps_under(runs_root: Path) -> List[Path]:
    """Every runs/<sweep>/ that holds at least one result, by name."""
    return sorted(d for d in Path(runs_root).iterdir() if d.is_dir() and any(layout.result_files(d)))


def build_sweep(sweep_dir: Path, out_root: Path, shared: bool, plotlyjs: Optional[str] = None) -> Path:
    """One sweep's report: plotly.js embedded, or (``shared``) loaded from the site's assets folder."""
    if shared:
        write_plotly_asset(out_root, plotlyjs)
        return html.build_sweep_report(sweep_dir, out_root, plotly_src=PLOTLY_SRC)
    return html.build_sweep_report(sweep_dir, out_root, plotlyjs=plotlyjs)


def build_site(sweep_dirs: List[Path], out_root: Path, shared: bool = True, plotlyjs: Optional[str] = None,
               on_error: Optional[Callable[[Path, Exception], None]] = None) -> Tuple[List[Path], int]:
    """Builds every sweep's report, then the index. Returns the pages built and how many sweeps failed: one
    sweep that cannot be built must not cost the others (``on_error`` hears why)."""
    pages, failed = [], 0
    for sweep in sweep_dirs:
        try:
            pages.append(build_sweep(sweep, out_root, shared, plotlyjs))
        except Exception as e:
            failed += 1
            if on_error:
                on_error(sweep, e)
    html.write_index(Path(out_root))
    return pages, failed
