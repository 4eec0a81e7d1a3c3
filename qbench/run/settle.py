"""The sweep's end: quality comparisons of cells measured before their baseline, made from the two logprob files.

    python -m qbench.run.settle runs/<sweep> [runs/<sweep> ...]

A compared cell whose baseline had not run yet (parallel or SLURM launchers, or the baseline measured by a later
command) stores ``comparison: null`` and its distributions in ``quality_logprobs.npz``. At the end of every
``qbench`` command, every sweep folder the command wrote to is searched for such cells whose baseline's file now
exists (any cell of the folder, not only the command's own: the baseline may be what this command measured), and
:func:`qbench.evaluate.quality.compare_later` fills the comparison into that cell's result.json, with
``comparison_source: "sweep_end"``. The command above does the same for a runs/ folder an older qbench left.

It never fails the sweep: a fault is one warning line and the cell stays without a comparison (the report names
the command above for it). A cell whose lock another process holds (it is being measured again) is left alone:
that process's command settles it at its own end.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

from qbench.run.slots import try_lock
from qbench.store.jsonio import read_result, write_result
from qbench.store.late_quality import SOURCE, baseline_dir, pending_comparisons, waits_for_comparison
from qbench.store.layout import LOCK_FILE, LOGPROBS_FILE, attempt_file, sweep_dir_of

log = logging.getLogger("qbench")


@contextlib.contextmanager
def _cell_held(cell_dir: Path) -> Iterator[bool]:
    """The cell's lock (the one qbench/run/slots.py's cell_lock takes while measuring), if free now: True while
    held. Not waited for: a process holding it is measuring the cell again and writes a new result anyway."""
    f = try_lock(attempt_file(cell_dir, LOCK_FILE))
    if f is None:
        yield False
        return
    try:
        yield True
    finally:
        f.close()


def _why_not(cell_dir: Path, base_dir: Path) -> str:
    """Why compare_later gave nothing: a file it could not read, or what differs between the two files' runs."""
    from qbench.evaluate import quality

    metas = []
    for d in (base_dir, cell_dir):
        data = quality.load(d / LOGPROBS_FILE)
        if data is None:
            return f"{d / LOGPROBS_FILE} is missing or unreadable"
        metas.append(data["meta"])
    differ = quality.identity_mismatch(metas[0], metas[1])
    return "it and the baseline were scored differently (baseline \u2192 this cell: " + "; ".join(differ) + ")"


def settle_cell(sweep_dir: Path, cell: str) -> Tuple[str, str]:
    """Compare one cell against its baseline's file and write the comparison into its result.json. Returns the
    outcome, "settled", "busy" (being measured), "gone" (no longer waiting) or "not made", and why."""
    from qbench.evaluate import quality  # numpy and the quality maths, only once a cell waits

    cell_dir = Path(sweep_dir) / cell
    with _cell_held(cell_dir) as held:
        if not held:
            return "busy", "another process holds its lock"
        result = read_result(cell_dir)  # again, under the lock: a process may have rewritten it meanwhile
        if not waits_for_comparison(result):
            return "gone", "its result.json no longer waits for a comparison"
        assert result is not None
        base_dir = baseline_dir(Path(sweep_dir), cell, result)
        comparison = quality.compare_later(cell_dir, base_dir)
        if comparison is None:
            return "not made", _why_not(cell_dir, base_dir)
        q = result["metrics"]["quality"]
        q["comparison"], q["comparison_source"] = comparison, SOURCE
        write_result(cell_dir, result)
    return "settled", ""


def settle_sweep(sweep_dir: Path) -> Dict[str, List[str]]:
    """Every pending comparison of one sweep folder; cell ids by outcome. A cell not compared is one warning line."""
    outcomes: Dict[str, List[str]] = {}
    for cell in pending_comparisons(sweep_dir):
        try:
            what, why = settle_cell(sweep_dir, cell)
        except Exception as exc:  # a file that breaks the maths or a full disk: the cell stays, the sweep goes on
            what, why = "not made", f"{type(exc).__name__}: {exc}"
        if what == "not made":
            print(f"qbench: warning: {Path(sweep_dir) / cell}: quality comparison not made at the sweep's end: {why}",
                  file=sys.stderr)
        elif what == "busy":
            log.info("%s: being measured by another process; its command compares it at its end", cell)
        outcomes.setdefault(what, []).append(cell)
    return outcomes


def settle(sweep_dirs: Iterable[Path]) -> Optional[str]:
    """Settle every sweep folder given (each once); one line with the count and the seconds it took, or None
    when nothing was pending. Never raises an Exception: the sweep's exit status is its cells'."""
    t0 = time.perf_counter()
    settled, tried = 0, 0
    for sweep_dir in dict.fromkeys(Path(d) for d in sweep_dirs):
        try:
            outcomes = settle_sweep(sweep_dir)
        except Exception as exc:  # the folder itself unreadable: say so, keep the sweep's status
            print(f"qbench: warning: {sweep_dir}: quality comparisons not made at the sweep's end: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        settled += len(outcomes.get("settled", []))
        tried += sum(len(v) for v in outcomes.values())
    if not tried:
        return None
    return f"qbench: {settled} of {tried} late quality comparison(s) made in {time.perf_counter() - t0:.1f} s"


def settle_command(cell_dirs: Iterable[Path]) -> None:
    """The end of a qbench command: settle the sweep folders its cells lie in, print the timing line."""
    line = settle(sweep_dir_of(d) for d in cell_dirs)
    if line:
        print(line, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qbench.run.settle", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dirs", nargs="+", type=Path, help="sweep folders (runs/<sweep>)")
    args = p.parse_args(argv)
    missing = [d for d in args.sweep_dirs if not d.is_dir()]
    if missing:
        print(f"python -m qbench.run.settle: {missing[0]} is not a directory", file=sys.stderr)
        return 2
    print(settle(args.sweep_dirs) or "python -m qbench.run.settle: no pending quality comparison", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
