#!/usr/bin/env python3
"""Compact tables of a folder of runs: every result.json under RUNS becomes one row of runs.csv, and each of its
timed figures one row of figures.csv, with the fields the docs quote (medians, CIs, spreads' inputs, phase times,
weight bytes, the GPU and host a run had). A raw result.json holds every timed value (~75-150 kB); these keep
what a reader checks a page's figures against, and the raw files stay in git history.

    python scripts/summarize_runs.py RUNS --out DIR [--logs] [--git-prefix PATH]

`--logs` also copies each cell.log to DIR/logs/<path with / as __>.log (a cut cell's log is its only record).
Each row names the run by `path` (its folder under RUNS) and `group` (the folder `scripts/bench_check.py
--summarize --runs-dir` takes: the parent of bench_check-<i>, else the sweep's folder); in a git checkout,
`added_in` is the commit that added the result.json, the commit that produced the figures (with --git-prefix,
looked up at PATH/<path>/result.json in the current repository, for runs restored from its history).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pandas as pd

# A run.rounds cell keeps each round's result under <cell>/rounds/<k>/; bench_check runs are bench_check-<i>/
ROUND_DIR = re.compile(r"/rounds/(\d+)$")
BENCH_CHECK_DIR = re.compile(r"(?:^|/)bench_check-(\d+)/[^/]+$")
# Repeats after the first few of a figure against those few: the warm-up transient the static path showed on H100
EARLY_REPEATS = 3


def locate(path: str) -> Dict[str, Any]:
    """group, run_index and round of a cell folder given relative to RUNS."""
    m = ROUND_DIR.search(path)
    cell_dir = path[: m.start()] if m else path
    b = BENCH_CHECK_DIR.search(cell_dir)
    group = cell_dir[: b.start()] if b else str(Path(cell_dir).parent)
    return {"group": group or ".", "run_index": int(b.group(1)) if b else None,
            "round_dir": int(m.group(1)) if m else None}


def median_standard_error(values: List[float]) -> Optional[float]:
    """scripts/bench_check.py's estimate (1.2533 x 1.4826 x MAD / sqrt(n)), kept with the row because the
    values it needs are not: --summarize's "sampling" column is d2(N) x the rms of it over the runs."""
    if len(values) < 3:
        return None
    s = pd.Series(values)
    mad = (s - s.median()).abs().median()
    return 1.2533 * 1.4826 * mad / len(values) ** 0.5


def late_vs_early_pct(values: List[float]) -> Optional[float]:
    """How much faster (%) the repeats after the first three ran than those three, in timed order."""
    if len(values) <= EARLY_REPEATS:
        return None
    early = sum(values[:EARLY_REPEATS]) / EARLY_REPEATS
    late = values[EARLY_REPEATS:]
    return (sum(late) / len(late) / early - 1) * 100 if early else None


def dist_fields(dist: Dict[str, Any], independent: bool) -> Dict[str, Any]:
    ci = dist.get("median_ci") or {}
    values = dist.get("values") or []
    rounds = dist.get("rounds") or {}
    return {
        "unit": dist.get("unit"), "n": dist.get("n"), "p50": dist.get("p50"), "mean": dist.get("mean"),
        "min": dist.get("min"), "max": dist.get("max"), "cv": dist.get("cv"),
        "ci_low": ci.get("low"), "ci_high": ci.get("high"), "ci_half_width_pct": ci.get("half_width_pct"),
        # per-token values are the steps of each repeat, correlated within it: no i.i.d. standard error
        "median_se": median_standard_error(values) if independent else None,
        "late_vs_early_pct": late_vs_early_pct(values) if independent else None,
        "rounds_medians": ";".join(f"{v:.6g}" for v in rounds.get("medians") or []) or None,
        "rounds_dominated_by": rounds.get("dominated_by"),
    }


def figure_rows(result: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
    lat = (result.get("metrics") or {}).get("latency") or {}
    one_time = lat.get("one_time") or {}
    first = {("prefill", p.get("batch_size"), None): p.get("first_call_s") for p in one_time.get("prefill") or []}
    first.update({("decode", d.get("batch_size"), d.get("decode_path")): d.get("first_call_s")
                  for d in one_time.get("decode") or []})
    for p in lat.get("prefill") or []:
        if p.get("ttft_ms"):
            yield {"figure": "prefill", "batch_size": p["batch_size"], "prompt_tokens": p["prompt_tokens"],
                   "metric": "ttft_ms", **dist_fields(p["ttft_ms"], True), **precision(p),
                   "first_call_s": first.get(("prefill", p["batch_size"], None)),
                   "compute_bound_fraction": p.get("compute_bound_fraction")}
    for d in lat.get("decode") or []:
        for metric, independent in (("tokens_per_s", True), ("per_token_ms", False)):
            if d.get(metric):
                yield {"figure": "decode", "decode_path": d["decode_path"], "batch_size": d["batch_size"],
                       "prompt_tokens": d.get("prompt_tokens"), "new_tokens": d.get("new_tokens"),
                       "metric": metric, **dist_fields(d[metric], independent), **precision(d),
                       "first_call_s": first.get(("decode", d["batch_size"], d["decode_path"])),
                       "bandwidth_bound_fraction": d.get("bandwidth_bound_fraction"),
                       "measured_bandwidth_bound_fraction": d.get("measured_bandwidth_bound_fraction"),
                       "energy_j_per_token": d.get("energy_j_per_token")}


def precision(row: Dict[str, Any]) -> Dict[str, Any]:
    p = row.get("precision") or {}
    return {k: p.get(k) for k in ("stopped_by", "repeats", "warmup_runs", "timed_s", "warmup_s")}


def gpu_fields(lat: Dict[str, Any]) -> Dict[str, Any]:
    start = (((lat.get("gpu_state") or {}).get("start") or {}).get("gpus") or [{}])[0]
    end = (((lat.get("gpu_state") or {}).get("end") or {}).get("gpus") or [{}])[0]
    host = lat.get("host_cpu") or {}
    bw = lat.get("copy_bandwidth") or {}
    return {
        "gpu_uuid": start.get("uuid"), "sm_clock_start_mhz": start.get("sm_clock_mhz"),
        "sm_clock_end_mhz": end.get("sm_clock_mhz"), "mem_clock_end_mhz": end.get("mem_clock_mhz"),
        "clock_event_reasons": ";".join(start.get("clock_event_reasons") or [] + (end.get("clock_event_reasons") or [])),
        "other_gpu_processes": len(start.get("other_processes") or []) + len(end.get("other_processes") or []),
        "host_busy_pct": host.get("busy_pct"), "host_steal_pct": host.get("steal_pct"),
        "host_cpu_count": host.get("cpu_count"),
        "copy_bandwidth_gb_s": bw["bytes_per_s"] / 1e9 if bw.get("bytes_per_s") else None,
    }


def run_row(result: Dict[str, Any]) -> Dict[str, Any]:
    lat = (result.get("metrics") or {}).get("latency") or {}
    mem = (result.get("metrics") or {}).get("memory") or {}
    env = result.get("environment") or {}
    versions = env.get("versions") or {}
    timings = result.get("timings") or {}
    settings = lat.get("settings") or {}
    affinity = env.get("cpu_affinity") or {}
    err = result.get("error") or {}
    unsupported = [f"{u.get('decode_path')} bs={u.get('batch_size')}: {u.get('reason')}"
                   for u in lat.get("unsupported") or []]
    return {
        "sweep": result.get("sweep"), "cell": result.get("cell"), "method": result.get("method"),
        "status": result.get("status"), "error_class": err.get("class"), "error_message": err.get("message"),
        "round": result.get("round"), "started_at": result.get("started_at"),
        "gpu_name": env.get("gpu_name"), "driver": env.get("driver"), "torch": versions.get("torch"),
        "transformers": versions.get("transformers"), "qbench_git_commit": env.get("qbench_git_commit"),
        "cpu_affinity_requested": affinity.get("requested"), "cpu_affinity_applied": affinity.get("applied"),
        **gpu_fields(lat),
        "wall_time_s": result.get("wall_time_s"), "load_s": timings.get("load_s"),
        "quantize_s": timings.get("quantize_s"), "latency_s": timings.get("latency_s"),
        "rounds_latency_s": ";".join(f"{v:.4g}" for v in (result.get("rounds") or {}).get("latency_s") or []) or None,
        "compile_s": (lat.get("one_time") or {}).get("compile_s"),
        "weight_bytes_measured": mem.get("weight_bytes_measured"),
        "weight_bytes_analytic": mem.get("weight_bytes_analytic"),
        "weight_bytes_quant_state": (mem.get("weight_bytes_by_kind") or {}).get("quant_state"),
        "weight_bytes_read_per_token": mem.get("weight_bytes_read_per_token"),
        "new_tokens": settings.get("new_tokens"), "decode_paths": ";".join(settings.get("decode_paths") or []),
        "compiled_batch_sizes": json.dumps(settings.get("compiled_batch_sizes")),
        "max_time_per_figure_s": settings.get("max_time_per_figure_s"),
        "unsupported": " | ".join(unsupported) or None, "warnings": len(result.get("warnings") or []),
    }


def added_in(path: Path, git_path: Optional[str] = None) -> Optional[str]:
    """The commit that added this file: where it sits in a git checkout, or, for runs restored from history
    outside one, at git_path in the repository of the current directory (None where git cannot say)."""
    cwd, name = (Path.cwd(), git_path) if git_path else (path.parent, path.name)
    try:
        out = subprocess.run(["git", "log", "--diff-filter=A", "--format=%h", "-1", "--", name],
                             cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return out or None


def summarize(runs: Path, git_prefix: Optional[str] = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    run_rows, fig_rows = [], []
    for file in sorted(runs.rglob("result.json")):
        rel = str(file.parent.relative_to(runs))
        try:
            result = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"summarize_runs: {file}: not a readable result.json ({exc})") from exc
        where = {"path": rel, **locate(rel)}
        history = f"{git_prefix}/{rel}/result.json" if git_prefix else None
        run_rows.append({**where, **run_row(result), "added_in": added_in(file, history)})
        fig_rows.extend({**where, "cell": result.get("cell"), "method": result.get("method"), **f}
                        for f in figure_rows(result))
    if not run_rows:
        raise SystemExit(f"summarize_runs: no result.json under {runs}")
    return pd.DataFrame(run_rows), pd.DataFrame(fig_rows)


def copy_logs(runs: Path, out: Path) -> int:
    logs = sorted(runs.rglob("cell.log"))
    for log in logs:
        dest = out / "logs" / (str(log.parent.relative_to(runs)).replace("/", "__") + ".log")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, dest)
    return len(logs)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="folder searched for result.json files (any depth)")
    parser.add_argument("--out", type=Path, required=True, help="where runs.csv and figures.csv go")
    parser.add_argument("--logs", action="store_true", help="also copy every cell.log to OUT/logs/")
    parser.add_argument("--git-prefix", default=None,
                        help="where RUNS sat in this repository's history (e.g. docs/stability), for added_in "
                             "when RUNS was restored outside a checkout")
    args = parser.parse_args(argv)
    if not args.runs.is_dir():
        print(f"summarize_runs: {args.runs} is not a folder", file=sys.stderr)
        return 2
    runs, figures = summarize(args.runs, args.git_prefix)
    args.out.mkdir(parents=True, exist_ok=True)
    for col in [c for c in runs if c.startswith("weight_bytes")]:
        runs[col] = runs[col].astype("Int64")  # exact bytes, also where an error row leaves a gap
    runs.to_csv(args.out / "runs.csv", index=False, float_format="%.8g")
    figures.to_csv(args.out / "figures.csv", index=False, float_format="%.8g")
    logs = copy_logs(args.runs, args.out) if args.logs else 0
    print(f"summarize_runs: {len(runs)} results, {len(figures)} figures, {logs} logs -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
