"""Which cells of a sweep folder still wait for their quality comparison (stdlib only, so the report can ask).

A cell measured before its baseline (parallel or SLURM launchers, or the baseline in a later command) writes its
quality section with ``comparison: null`` and keeps its distributions in ``quality_logprobs.npz``. Once the
baseline cell's file exists the comparison can be made from the two files: every ``qbench`` command does so at its
end (qbench/run/settle.py), and ``python -m qbench.run.settle runs/<sweep>`` does it for a folder an older qbench
left behind. The report only reads result.json, so it names that command when a folder still has such cells.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from qbench.store.jsonio import read_json
from qbench.store.layout import LOGPROBS_FILE, cell_name, parse_cell_id, result_files

SOURCE = "sweep_end"  # comparison_source of a comparison made from the two files after the cells ran
SETTLE_COMMAND = "python -m qbench.run.settle"


def waits_for_comparison(result: Optional[Dict[str, Any]]) -> bool:
    """An ok cell compared against a baseline whose quality section has no comparison yet."""
    if not isinstance(result, dict) or result.get("status") != "ok":
        return False
    q = (result.get("metrics") or {}).get("quality")
    return isinstance(q, dict) and q.get("role") == "compared" and not q.get("comparison")


def baseline_dir(sweep_dir: Path, cell: str, result: Dict[str, Any]) -> Path:
    """The baseline's cell folder: the same model's cell of ``quality.baseline_method`` in the same sweep folder
    (looked up here, not through the stored ``baseline_file`` path, so a runs/ folder that moved still works)."""
    q = result["metrics"]["quality"]
    model = result.get("model") or parse_cell_id(cell).model
    return Path(sweep_dir) / cell_name(str(model), str(q.get("baseline_method")))


def pending_comparisons(sweep_dir: Path) -> List[str]:
    """Cell ids of ``sweep_dir`` whose comparison can be made now: they wait for one, and both their own and their
    baseline's logprob files exist."""
    pending = []
    for path in result_files(Path(sweep_dir)):
        result = read_json(path)
        if not waits_for_comparison(result):
            continue
        cell_dir = path.parent
        assert result is not None  # waits_for_comparison said it is a dict
        base = baseline_dir(Path(sweep_dir), cell_dir.name, result)
        if (cell_dir / LOGPROBS_FILE).is_file() and (base / LOGPROBS_FILE).is_file():
            pending.append(cell_dir.name)
    return pending


def pending_line(sweep_dir: Path) -> Optional[str]:
    """One line for the report when ``sweep_dir`` has cells whose comparison was never made (a folder measured by
    an older qbench, or a command that was stopped before its end), else None."""
    pending = pending_comparisons(sweep_dir)
    if not pending:
        return None
    shown = ", ".join(pending[:3]) + (f" and {len(pending) - 3} more" if len(pending) > 3 else "")
    return (f"qbench-report: {len(pending)} cell(s) of {sweep_dir} have no quality comparison yet ({shown}): "
            f"run `{SETTLE_COMMAND} {sweep_dir}` to make it from their logprob files, then build the report again")
