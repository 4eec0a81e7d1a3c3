"""The ``qbench`` command: compose the config with Hydra, check it, and run cells.

    qbench model=tiny method=bf16            one cell
    qbench -m experiment=demo                a sweep (each cell a Hydra job)

Before Hydra starts, :func:`preflight` composes every cell of the sweep and validates it, so bad input (an
unknown method, a mistyped key, a negative batch size, a missing model path) stops the whole sweep with one
line naming the culprit, before any model is loaded and before anything is written under runs/.

Each Hydra job runs one cell in a fresh process of its own (qbench/run/cell_process.py, slots and locks in
qbench/run/slots.py); this module is the command around them: preflight, rounds, the summary line and the exit
status.
"""
from __future__ import annotations

import itertools
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from qbench.config import validate
from qbench.errors import ConfigError
from qbench.run.cell import STOP_SIGNALS, install_stop_handlers, signal_exit_status
from qbench.run.cell_process import run_cell, traceback_to_log_files  # run_cell: each Hydra job of the sweep
from qbench.store.layout import cell_dir as cell_dir_of
from qbench.store.layout import cell_id, sweep_dir_of

log = logging.getLogger("qbench")

_REPO_CONF = Path(__file__).resolve().parents[2] / "conf"


def conf_dir() -> str:
    """conf/ of a source checkout, else the copy packaged as qbench.conf in a wheel."""
    if _REPO_CONF.is_dir():
        return str(_REPO_CONF)
    return str(Path(__file__).resolve().parents[1] / "conf")


# ----------------------------------------------------------------------------------------------- preflight
def _compose(overrides: List[str], config_name: str = "config"):
    from hydra import compose

    return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)


def _one_line(exc: BaseException) -> str:
    """Hydra and OmegaConf errors span lines and chain causes: keep the outer line and the innermost cause's,
    which names the key (e.g. "Key 'batchsizes' not in 'BenchConfig'")."""
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()] or [type(exc).__name__]
    first = lines[0]
    if "Available options in" in text:  # an unknown group option: list the known ones (without 'schema')
        listed = text.split("Available options in", 1)[1].split("Config search path", 1)[0]
        opts = [o for o in listed.split()[1:] if o != "schema"]
        first = f"{first} (known: {', '.join(opts)})"
    inner = exc
    while inner.__cause__ is not None or inner.__context__ is not None:
        inner = inner.__cause__ or inner.__context__
    mark = getattr(inner, "problem_mark", None) or getattr(inner, "context_mark", None)
    if mark is not None:  # malformed YAML: file, line and what the parser choked on
        return f"malformed YAML: {mark.name}, line {mark.line + 1}: {getattr(inner, 'problem', None) or inner}"
    if inner is not exc:
        inner_lines = [ln.strip() for ln in str(inner).splitlines() if ln.strip()]
        full_key = next((ln.split(":", 1)[1].strip() for ln in inner_lines if ln.startswith("full_key:")), "")
        if inner_lines and inner_lines[0] not in first:
            first = f"{first.rstrip('.')}: {inner_lines[0]}" + (f" (key {full_key})" if full_key else "")
    elif "full_key:" in text:
        first += " (key " + text.split("full_key:", 1)[1].splitlines()[0].strip() + ")"
    return first


def sweep_overrides(argv_overrides: List[str], multirun: bool, config_name: str = "config") -> List[List[str]]:
    """Expand the command line and the experiment's ``hydra.sweeper.params`` into one override list per cell,
    in the same way Hydra's basic sweeper does (cartesian product; the command line wins over the config)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    if not multirun:
        return [argv_overrides]
    base = [o for o in argv_overrides if not parser.parse_override(o).is_sweep_override()]
    try:
        cfg = _compose(base, config_name)
    except Exception:
        # a method.* key the default method lacks (each method has its own schema) says nothing about the sweep's
        # axes: read them without it; each cell is composed with it later, and one without the key says so
        cfg = _compose([o for o in base if not o.lstrip("+~").startswith("method.")], config_name)
    params: Dict[str, Any] = {}
    sweeper_params = cfg.hydra.sweeper.get("params") or {}
    for key, value in sweeper_params.items():
        params[key] = parser.parse_override(f"{key}={value}")
    for text in argv_overrides:
        ov = parser.parse_override(text)
        params[ov.get_key_element()] = ov
    axes = []
    for key, ov in params.items():
        if ov.is_sweep_override():
            axes.append([f"{key}={v}" for v in ov.sweep_string_iterator()])
        else:
            axes.append([f"{key}={ov.get_value_element_as_str()}"])
    return [list(combo) for combo in itertools.product(*axes)]


class CellDirs(list):
    """The cells' result directories, and the rounds the sweep asks for (run.rounds; run.round inside a pass)."""

    rounds: int = 1
    in_round: bool = False


def preflight(argv: List[str], start_preload: bool = False) -> CellDirs:
    """Compose and check every cell the command would run; returns each cell's result directory.

    The command line is read by Hydra's own parser and composed on the search path the app will use, so
    every Hydra spelling (``--config-dir=DIR``, ``--config-dir DIR``, ``-cd DIR``, ``-cn NAME``) gets the
    same checks. ``start_preload`` (the sweep's own command): start run.preload's server as soon as the first cell
    asks for it, so its imports overlap the checks of the rest (qbench/run/preload.py)."""
    from qbench.run import preflight as pf

    pf.register_configs()  # idempotent: callers other than main() (tests, scripts) get the method schemas too
    register_own_plugins()  # the launcher configs they store (qbench_parallel, qbench_slurm), before composing
    args = pf.parse_args(argv)
    try:
        with pf.hydra_context(args, conf_dir(), __file__):
            cells = sweep_overrides(list(args.overrides), bool(args.multirun), args.config_name or "config")
            seen: Dict[str, List[str]] = {}
            dirs = CellDirs()
            rounds = set()
            for cell_overrides in cells:
                try:
                    cfg = _compose(cell_overrides, args.config_name or "config")
                except Exception as exc:
                    line = _one_line(exc)
                    raise ConfigError(line + _foreign_key_hint(line, cell_overrides)) from exc
                validate(cfg)
                if start_preload and not seen and _preloads_here(cfg):
                    from qbench.run import preload

                    preload.start()
                pf.check_cell(cfg)
                _check_hydra_dirs(cfg, bool(args.multirun))
                _check_name_lengths(cfg)
                cid = cell_id(cfg)
                if cid in seen:
                    raise ConfigError(
                        f"two cells of this sweep share the id '{cid}' ({' '.join(seen[cid])} / {' '.join(cell_overrides)}): "
                        "give them different model.name or method.name"
                    )
                seen[cid] = cell_overrides
                dirs.append(cell_dir_of(cfg))
                rounds.add(int(cfg.run.rounds))
            if len(rounds) > 1:
                raise ConfigError(f"run.rounds: cells of one sweep ask for different counts ({sorted(rounds)}); give one")
            dirs.rounds = rounds.pop()
            dirs.in_round = cfg.run.round is not None  # run.round comes from the command line: the same for all
            pf.check_dirs(cfg)
            _check_launcher(cfg)
    except ConfigError:
        raise
    except Exception as exc:  # Hydra / OmegaConf / YAML errors: one line naming the culprit
        line = _one_line(exc)
        raise ConfigError(line + _launcher_hint(line)) from exc
    return dirs


def _preloads_here(cfg: Any) -> bool:
    """Whether this process will fork the cells from run.preload's server: Hydra's basic launcher runs the cells
    from here; the parallel and SLURM launchers' jobs, and a multi-round parent's rounds, start servers of their own."""
    target = str(cfg.hydra.launcher.get("_target_", ""))
    one_pass = int(cfg.run.rounds) == 1 or cfg.run.round is not None
    return bool(cfg.run.preload) and target.endswith(".BasicLauncher") and one_pass


def _hydra_path(cfg: Any, key: str) -> str:
    """The value of a hydra.* path key, resolved where it can be at compose time; an interpolation that only a
    running job can resolve (${hydra.job.num}) reads as one plain folder name, which is what it becomes."""
    import re

    from omegaconf import OmegaConf

    try:
        return str(OmegaConf.select(cfg, key, throw_on_missing=True))
    except Exception:
        section, _, leaf = key.rpartition(".")
        raw = OmegaConf.to_container(OmegaConf.select(cfg, section), resolve=False).get(leaf, "")
        return re.sub(r"\$\{[^}]*\}", "x", str(raw))


def _check_hydra_dirs(cfg: Any, multirun: bool) -> None:
    """Hydra's output folder of a job (where .hydra/ and cli.log go) must lie under run.runs_dir: a
    hydra.sweep.subdir of ../../x, or a hydra.run.dir / hydra.sweep.dir elsewhere, would write outside it."""
    runs = Path(str(cfg.run.runs_dir)).expanduser().resolve()
    if multirun:
        keys = ("hydra.sweep.dir", "hydra.sweep.subdir")
        where = Path(_hydra_path(cfg, keys[0])).expanduser() / _hydra_path(cfg, keys[1])
    else:
        keys = ("hydra.run.dir",)
        where = Path(_hydra_path(cfg, keys[0])).expanduser()
    resolved = where.resolve()
    if resolved != runs and runs not in resolved.parents:
        raise ConfigError(f"{' / '.join(keys)}: '{where}' is outside run.runs_dir '{runs}'; Hydra would write "
                          f".hydra/ and cli.log there (keep these keys under run.runs_dir)")


def _check_name_lengths(cfg: Any) -> None:
    """A folder name longer than the filesystem takes (NAME_MAX, 255 bytes on most) would fail only when the
    cell's folder is made, after preflight: refuse it here, naming the key."""
    runs = Path(str(cfg.run.runs_dir)).expanduser()
    probe = runs
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        name_max = os.pathconf(probe, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    for key, name in (("run.sweep", str(cfg.run.sweep)), ("model.name / method.name", cell_id(cfg))):
        if len(name.encode()) > name_max:
            raise ConfigError(f"{key}: the folder name '{name[:40]}…' is {len(name.encode())} bytes; the filesystem "
                              f"of '{runs}' takes at most {name_max}")


def _foreign_key_hint(line: str, cell_overrides: List[str]) -> str:
    """Each method's schema holds only its own keys, so a key set for a whole sweep (method.group_size=64 over
    fp32,awq) fails at the methods that lack it: say which cell, and how to set a key for one method only.
    ``line``: the error's one line, whose outer part names the key and whose innermost cause says "not in"."""
    if "not in" not in line or "method." not in line:
        return ""
    method = next((o.split("=", 1)[1] for o in cell_overrides if o.startswith("method=")), "?")
    return (f": method '{method}' has no such key (each method takes only its own keys); set it for one method "
            "in conf/method_tuning/<experiment>__<method>.yaml, or sweep that method alone")


SUBMITIT_LAUNCHERS = ("hydra_plugins.qbench_launcher.parallel_launcher.",
                      "hydra_plugins.qbench_launcher.slurm_launcher.")


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that is missing; a module set to None in sys.modules
        return False


def _quiet_missing_submitit() -> None:
    """Hydra imports every module under hydra_plugins when it starts and warns about each that fails to import:
    without the slurm extra qbench's parallel and SLURM launchers cannot, which is expected (choosing one is a
    one-line error at preflight, _check_launcher), so that warning is not shown on every sweep."""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning,
                            message=r"\s*Error importing 'hydra_plugins\.qbench_launcher\.(parallel|slurm)_launcher'"
                                    r"[\s\S]*hydra_submitit_launcher")


def _submitit_missing() -> bool:
    return not (_has_module("submitit") and _has_module("hydra_plugins.hydra_submitit_launcher"))


SUBMITIT_HINT = "needs hydra-submitit-launcher, not installed here: pip install 'qbench[slurm]' or make install"


def _launcher_hint(line: str) -> str:
    """The parallel and SLURM launcher configs are stored by plugin modules that import hydra-submitit-launcher:
    without it Hydra reports only that their config could not be loaded."""
    if ("hydra/launcher/qbench_parallel" in line or "hydra/launcher/qbench_slurm" in line) and _submitit_missing():
        return f" (this launcher {SUBMITIT_HINT})"
    return ""


def _check_launcher(cfg: Any) -> None:
    """A SLURM sweep started where there is no SLURM would fail only after submitting, and the parallel and SLURM
    launchers without the slurm extra would fail only once the sweep starts: say so up front."""
    import shutil

    target = str(cfg.hydra.launcher.get("_target_", ""))
    if target.startswith(SUBMITIT_LAUNCHERS) and _submitit_missing():
        raise ConfigError(f"hydra/launcher={'slurm' if 'slurm' in target else 'parallel'} {SUBMITIT_HINT}")
    if target.endswith("SlurmLauncher") and shutil.which("sbatch") is None:
        raise ConfigError("hydra/launcher=slurm: sbatch is not on PATH (start the sweep on a SLURM login node)")


# ----------------------------------------------------------------------------------------------- summary
def summary_counts(cell_dirs: List[Path], since: float) -> Dict[str, int]:
    """Counts over this command's cells only (other cells of the same sweep folder are not its business):
    ran = a result written since ``since``; failed = ran and not ok; error = ends with an error result."""
    from qbench.store.jsonio import read_result
    from qbench.store.layout import RESULT_FILE

    counts = {"cells": len(cell_dirs), "ran": 0, "skipped": 0, "failed": 0, "ok": 0, "error": 0, "missing": 0}
    for cell_dir in cell_dirs:
        path = Path(cell_dir) / RESULT_FILE
        result = read_result(cell_dir)
        if result is None:
            counts["missing"] += 1
            continue
        ok = result.get("status") == "ok"
        counts["ok"] += ok
        counts["error"] += not ok
        if path.stat().st_mtime >= since:
            counts["ran"] += 1
            counts["failed"] += not ok
        else:
            counts["skipped"] += 1
    return counts


def _sweep_dirs(cell_dirs: List[Path]) -> List[str]:
    """The sweep folders the command's cells lie in, each once, in order."""
    return list(dict.fromkeys(str(sweep_dir_of(d)) for d in cell_dirs))


def summary_line(cell_dirs: List[Path], since: float) -> str:
    c = summary_counts(cell_dirs, since)
    where = ", ".join(_sweep_dirs(cell_dirs))
    extra = f", {c['missing']} without a result" if c["missing"] else ""
    return (
        f"qbench: {where}: {c['cells']} cells: ran {c['ran']}, skipped {c['skipped']}, failed {c['failed']}"
        f"{extra} ({c['ok']} ok, {c['error']} error)"
    )


def report_hint(cell_dirs: List[Path]) -> Optional[str]:
    """The command that turns this sweep's results into its report, printed after the summary line."""
    sweeps = _sweep_dirs(cell_dirs)
    if not sweeps:
        return None
    return "qbench: report: " + "; ".join(f"qbench-report {s}" for s in sweeps) + " (-> reports/<sweep>/index.html)"


def end_of_command(cell_dirs: List[Path], since: float, last: bool = True) -> int:
    """The command's last lines and its exit status. ``last``: the command's own end (not one pass of run.rounds,
    whose combined results come later): comparisons left for the sweep's end are made, and the report is named."""
    line = summary_line(cell_dirs, since)  # counted first: a result.json that gets its comparison did not run
    if last:
        _settle_late_quality(cell_dirs, since)
    print(line, flush=True)
    hint = report_hint(cell_dirs) if last else None
    if hint:
        print(hint, flush=True)
    return exit_status(cell_dirs, since)


def exit_status(cell_dirs: List[Path], since: float) -> int:
    """1 when any cell of this command ends without an ok result (failed now, or skipped as failed)."""
    c = summary_counts(cell_dirs, since)
    return 1 if c["error"] or c["missing"] else 0


# ----------------------------------------------------------------------------------------------- rounds
def run_rounds(argv: List[str], cell_dirs: CellDirs, started: float) -> int:
    """run.rounds=N: the whole sweep N times in a row (A B C, A B C, ...), each pass a qbench command of its own
    with run.round=k (every cell in a fresh process, skip-if-done per round), then each cell's rounds combined
    into its result.json (qbench/run/rounds.py). Accuracy and quality run in round 1 only."""
    from qbench.run import rounds

    os.environ[ROUNDS_PARENT_ENV] = str(os.getpid())  # each round's process stops when this one dies
    try:
        for k in range(1, cell_dirs.rounds + 1):
            extra = [f"run.round={k}"] + ([] if k == 1 else ["eval.enabled=false"])
            print(f"qbench: round {k} of {cell_dirs.rounds}", flush=True)
            # A stop signal here kills the round's process (subprocess.call does); its cell process then gets
            # SIGTERM from the kernel (cell.die_with_parent) and stops as under the round's own sweep
            rc = subprocess.call([sys.executable, "-m", "qbench", *argv, *extra])
            if rc in [signal_exit_status(s) for s in STOP_SIGNALS]:
                print("qbench: interrupted; finished rounds are kept, the next start goes on", file=sys.stderr)
                return rc
    finally:
        os.environ.pop(ROUNDS_PARENT_ENV, None)
    for cell_dir in cell_dirs:
        rounds.combine(cell_dir, cell_dirs.rounds)
    return end_of_command(cell_dirs, started)  # settles after combine, which rewrote result.json from round 1


# ----------------------------------------------------------------------------------------------- help
def help_groups(conf: Optional[str] = None) -> str:
    """The config groups of conf/ and their options, one group a line: what ``qbench --help`` lists. Read
    from the folder, so a new YAML shows up by itself; the typed schemas registered as ``schema`` in every
    group are plumbing, not options."""
    root = Path(conf or conf_dir())
    lines = []
    for group in sorted(p for p in root.rglob("*") if p.is_dir() and any(p.glob("*.yaml"))):
        options = sorted(f.stem for f in group.glob("*.yaml") if f.stem != "schema")
        name = group.relative_to(root).as_posix()
        lines.append(f"  {name + ':':<18}{', '.join(options)}")
    return "\n".join(lines)


def register_help() -> None:
    """The resolver conf/config.yaml's hydra.help.template calls to list the groups."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("qbench_help_groups", lambda: help_groups(), replace=True)


# ----------------------------------------------------------------------------------------------- entry
OWN_PLUGINS = ("hydra_plugins.qbench_launcher.sweeper", "hydra_plugins.qbench_launcher.slurm_launcher",
               "hydra_plugins.qbench_launcher.parallel_launcher")


def register_own_plugins() -> None:
    """Put qbench's own Hydra plugins into Hydra's registry by name. Hydra finds plugins by listing the
    ``hydra_plugins`` namespace, and an editable install (pip install -e) maps that namespace through an import
    hook that imports but cannot list: run as the ``qbench`` console script, Hydra then misses the sweeper that
    conf/config.yaml names and refuses it as "Unknown plugin class", and the launcher configs these modules store
    (conf/hydra/launcher/parallel.yaml's and slurm.yaml's defaults) as "Could not load". Idempotent."""
    import importlib
    import inspect

    from hydra.core.plugins import Plugins
    from hydra.plugins.plugin import Plugin

    registry = Plugins.instance().class_name_to_class
    for name in OWN_PLUGINS:
        try:
            module = importlib.import_module(name)
        except ImportError:  # the SLURM and parallel launchers need hydra-submitit-launcher (the slurm extra)
            continue
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Plugin) and cls.__module__ == name:
                registry.setdefault(f"{name}.{cls.__name__}", cls)


def _hydra_app() -> None:
    import hydra

    register_own_plugins()
    @hydra.main(version_base="1.3", config_path=conf_dir(), config_name="config")
    def app(cfg: Any) -> str:
        return run_cell(cfg)

    app()


def _print_cfg(argv: List[str]) -> int:
    """``--cfg`` with ``-m``: Hydra shows one job's config only; print every cell's config instead."""
    from omegaconf import OmegaConf

    from qbench.run import preflight as pf

    args = pf.parse_args(argv)
    name = args.config_name or "config"
    with pf.hydra_context(args, conf_dir(), __file__):
        for cell_overrides in sweep_overrides(list(args.overrides), True, name):
            cfg = _compose(cell_overrides, name)
            part = cfg.hydra if args.cfg == "hydra" else cfg
            if args.cfg == "job":
                part = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
            if args.package:
                part = OmegaConf.select(part, args.package)
            print(f"# cell: {' '.join(cell_overrides)}")
            print(OmegaConf.to_yaml(part, resolve=bool(args.resolve)) if hasattr(part, "keys") else part)
    return 0


def _info_only(args: Any) -> bool:
    return bool(args.help or args.hydra_help or args.cfg or args.info or args.shell_completion
                or getattr(args, "version", False))


ROUNDS_PARENT_ENV = "QBENCH_ROUNDS_PARENT"  # set by run_rounds: the pid of the command that runs the rounds


def _stopped_exit(exc: KeyboardInterrupt, cell_dirs: List[Path], started: float, what: str) -> None:
    """A stop signal ended the sweep: one line, the summary line, and the shell's status for that signal."""
    signum = getattr(exc, "signum", signal.SIGINT)
    print(f"\nqbench: interrupted by {signal.Signals(signum).name}; {what}", file=sys.stderr)
    print(summary_line(cell_dirs, started), file=sys.stderr)
    sys.exit(signal_exit_status(signum))


def _fault_exit(exc: Exception, cell_dirs: List[Path], started: float) -> None:
    """A fault of Hydra's own after preflight (its job folder or log file on a full disk, a path of the wrong
    type): one line and the summary line, exit 1; the traceback goes to the log file where there is one."""
    from qbench.store.rows import error_message

    traceback_to_log_files("sweep")
    print(f"qbench: error: {type(exc).__name__}: {error_message(exc)}", file=sys.stderr)
    print(summary_line(cell_dirs, started), file=sys.stderr)
    sys.exit(1)


def _settle_late_quality(cell_dirs: List[Path], started: float) -> None:
    """Quality comparisons of cells measured before their baseline, made now from the two files
    (qbench/run/settle.py); it warns instead of failing, and a stop signal stops it like the sweep."""
    from qbench.run.settle import settle_command

    try:
        settle_command(cell_dirs)
    except KeyboardInterrupt as exc:
        _stopped_exit(exc, cell_dirs, started, "cells with a result.json finished; python -m qbench.run.settle "
                                               "makes the comparisons left")


def main(argv: Optional[List[str]] = None) -> None:
    from qbench.run import preflight as pf

    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_missing_submitit()
    pf.register_configs()
    register_own_plugins()  # before any compose: --cfg, --help and preflight read the launcher configs too
    register_help()
    os.environ.setdefault("QBENCH_COMMAND", "qbench " + " ".join(shlex.quote(a) for a in argv))
    started = time.time()
    try:
        args = pf.parse_args(argv)
        if args.multirun and (args.info or args.shell_completion):
            raise ConfigError("--info and --shell-completion take no -m: drop -m")
        if args.multirun and args.cfg:
            sys.exit(_print_cfg(argv))
        cell_dirs = [] if _info_only(args) else preflight(argv, start_preload=True)
    except ConfigError as exc:
        print(f"qbench: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # Hydra / OmegaConf while printing configs: one line
        print(f"qbench: error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    if _info_only(args):
        sys.argv = [sys.argv[0]] + argv
        _hydra_app()
        return
    print(f"qbench: {len(cell_dirs)} cell(s) checked", flush=True)
    install_stop_handlers()  # SIGTERM and SIGHUP stop the sweep as Ctrl-C does, and reach the cell process
    logging.raiseExceptions = False  # a log line the disk refuses is dropped, not printed as a traceback
    if os.environ.get(ROUNDS_PARENT_ENV, "").isdigit():
        from qbench.run.cell import die_with_parent

        die_with_parent(int(os.environ[ROUNDS_PARENT_ENV]))
    if cell_dirs.rounds > 1 and not cell_dirs.in_round:
        try:
            sys.exit(run_rounds(argv, cell_dirs, started))
        except KeyboardInterrupt as exc:
            _stopped_exit(exc, cell_dirs, started, "finished rounds are kept, the next start goes on")
    sys.argv = [sys.argv[0]] + argv
    os.environ["HYDRA_FULL_ERROR"] = "1"  # a fault escaping Hydra reaches _fault_exit instead of Hydra's traceback
    try:
        _hydra_app()
    except KeyboardInterrupt as exc:
        _stopped_exit(exc, cell_dirs, started, "cells with a result.json finished, the rest run on the next start")
    except Exception as exc:
        _fault_exit(exc, cell_dirs, started)
    # a round's pass leaves the sweep's end to run_rounds, after the rounds are combined
    sys.exit(end_of_command(cell_dirs, started, last=not cell_dirs.in_round))


if __name__ == "__main__":
    main()
