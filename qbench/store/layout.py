"""The run folder: the one owner of cell ids, their parsing, and the name of every file a cell leaves.

runs/<sweep>/<model>__<method>/ holds result.json (and result.prev.json, the one kept before a rerun), cell.log,
quality_logprobs.npz, .attempt/ (the spec the cell process was started with, the SLURM job record, the lock) and,
with run.rounds > 1, rounds/<k>/ with one result.json per round. conf/config.yaml names the same folder through the
``qbench.cell_id`` resolver registered here, so Hydra's output (.hydra/) lands beside the result.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Optional

CELL_SEP = "__"  # model and method names must not contain it: preflight and the report split an id on it
RESULT_FILE = "result.json"
PREVIOUS_RESULT_FILE = "result.prev.json"  # the stored result, set aside before the cell is measured again
CELL_LOG = "cell.log"  # the cell process's log, appended to by every attempt
LOGPROBS_FILE = "quality_logprobs.npz"  # the cell's next-token distributions, for the quality comparison
ATTEMPT_DIR = ".attempt"  # what one attempt leaves for the next: its spec, its SLURM job, its lock
SPEC_FILE = "spec.json"  # the cell process's input: python -m qbench.run.cell <spec.json>
JOB_RECORD = "slurm.json"  # the SLURM job that holds this cell
LOCK_FILE = "lock"  # held by the process that runs the cell
ROUNDS_DIR = "rounds"  # run.rounds: <cell>/rounds/<k>/result.json, combined into <cell>/result.json


class CellName(NamedTuple):
    model: str
    method: str


def cell_name(model: str, method: str) -> str:
    """The cell id of a model and a method's names: the one format (parse_cell_id reads it back)."""
    return f"{model}{CELL_SEP}{method}"


def cell_id(cfg: Any, method_name: Optional[str] = None) -> str:
    """Directory name of one cell under runs/<sweep>/, for a composed config or its plain dict.
    ``method_name``: the same model's cell of another method (the quality baseline's)."""
    return cell_name(cfg["model"]["name"], method_name or cfg["method"]["name"])


def parse_cell_id(cell: str) -> CellName:
    """The model and method of a cell id; a folder name without the separator is all model, no method."""
    model, _, method = cell.partition(CELL_SEP)
    return CellName(model, method)


def round_dir(cell_dir: Path, k: int) -> Path:
    return Path(cell_dir) / ROUNDS_DIR / str(k)


def cell_dir(cfg: Any, method_name: Optional[str] = None) -> Path:
    """Where a cell's result.json goes: runs/<sweep>/<cell>, or its rounds/<k> while a round is measured."""
    run = cfg["run"]
    path = Path(run["runs_dir"]) / run["sweep"] / cell_id(cfg, method_name)
    return round_dir(path, run["round"]) if run.get("round") else path


def sweep_dir_of(cell_dir: Path) -> Path:
    """The sweep folder a cell's (or a round's) result directory lies in."""
    cell_dir = Path(cell_dir)
    return cell_dir.parents[2] if cell_dir.parent.name == ROUNDS_DIR else cell_dir.parent


def result_files(sweep_dir: Path) -> list[Path]:
    """Every cell's result.json in a sweep folder, by cell id (rounds/<k>/ are the cell's parts, not cells)."""
    return sorted(Path(sweep_dir).glob(f"*/{RESULT_FILE}"))


def attempt_file(cell_dir: Path, name: str) -> Path:
    """<cell>/.attempt/<name>: SPEC_FILE, JOB_RECORD or LOCK_FILE."""
    return Path(cell_dir) / ATTEMPT_DIR / name


def register_resolver() -> None:
    """``${qbench.cell_id:}`` in conf/config.yaml: the cell id of the config being composed (hydra.run.dir and
    hydra.sweep.subdir), so Hydra's own folder and the result's are named by this module alone."""
    try:
        from omegaconf import OmegaConf
    except ImportError:  # the report reads results on a laptop that may lack Hydra; nothing composes there
        return
    if not OmegaConf.has_resolver("qbench.cell_id"):
        OmegaConf.register_new_resolver("qbench.cell_id", lambda *, _root_: cell_id(_root_))


# At import, not in an entry point: every process that composes or resumes a cell's config imports this module
# (the CLI, the SLURM launcher's job on its node, tests through the compose API).
register_resolver()
