#!/usr/bin/env python3
"""Is a cell's latency reproducible? Re-run one cell N times, each in a fresh process, and print the spread.

    python scripts/bench_check.py --repeats 5 model=tiny method=bf16 bench=quick
    make bench-check ARGS="model=tiny method=bf16" N=5

Each run is ``python -m qbench <overrides> run.sweep=bench_check-<i> run.runs_dir=<dir> run.force=true``
(a fresh process: no warm caches, allocator state or compiled graphs carried over). For every median figure of
the cell (prefill TTFT p50 per batch size and prompt length, decode tokens/s and per-token p50 per path and
batch size) it prints the N medians, their spread ((max - min) / median) and their CV across runs, and the
spread that sampling alone would give: each run's median comes from a few repeats, so even a perfectly steady
node spreads by about d2(N) x the median's standard error (d2: the expected range of N standard normals, 2.33
for 5 runs). A spread well above that column is the node (host scheduling, clocks, another lease), not the count
of repeats; a spread near it shrinks with more repeats (bench.min_repeats). The CIs column is the same prediction
from each run's stored 95 % CI of its median (bench.target_ci_pct). Per-token figures get neither column (their
values are the steps of each repeat, correlated within it).
Exit status: 0, or 1 when a run failed or (with --max-spread) a figure spreads more than allowed.

Runs can be split over several sessions (a GPU lease that ends, a job time limit): ``--first-index 3`` numbers
the new runs from 3, and ``--summarize --runs-dir DIR`` runs nothing and prints the spread over every
``DIR/bench_check-*`` run found.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from qbench.measure.stats import percentile
from qbench.measure.stats import summarize as distribution

# (median, unit, standard error of that median or None, half-width of its stored 95 % CI or None)
Figure = Tuple[float, str, Optional[float], Optional[float]]


def figures(result: dict) -> Dict[str, Figure]:
    """(label -> (median, unit, its standard error)) of the cell's latency section."""
    lat = (result.get("metrics") or {}).get("latency") or {}
    out: Dict[str, Figure] = {}

    def add(label: str, dist: dict, independent: bool = True) -> None:
        # per-token values are the steps of each repeat, correlated within it: an i.i.d. standard error would
        # understate their median's, so that figure gets none
        error = median_standard_error(dist.get("values") or []) if independent else None
        ci = dist.get("median_ci") or {}
        half = (ci["high"] - ci["low"]) / 2 if independent and None not in (ci.get("low"), ci.get("high")) else None
        out[label] = (dist["p50"], dist["unit"], error, half)

    for p in lat.get("prefill") or []:
        if p.get("ttft_ms"):
            add(f"prefill ttft bs={p['batch_size']} prompt={p['prompt_tokens']}", p["ttft_ms"])
    for d in lat.get("decode") or []:
        key = f"decode {d['decode_path']} bs={d['batch_size']}"
        if d.get("tokens_per_s"):
            add(f"{key} tokens/s", d["tokens_per_s"])
        if d.get("per_token_ms"):
            add(f"{key} per-token", d["per_token_ms"], independent=False)
    return out


def median_standard_error(values: List[float]) -> Optional[float]:
    """Standard error of the median of these repeats: 1.2533 sigma / sqrt(n), sigma estimated robustly as
    1.4826 x the median absolute deviation, so one slow repeat (kept in the raw values) does not inflate it
    the way it inflates the stdev, just as it barely moves the median. None for fewer than 3 values."""
    if len(values) < 3:
        return None
    mid = _median(values)
    mad = _median([abs(v - mid) for v in values])
    return 1.2533 * 1.4826 * mad / math.sqrt(len(values))


@functools.cache  # one integration per run count, not one per figure
def expected_range(n: int) -> float:
    """d2(n): the expected range (max - min) of n independent standard normal draws, by numerical integration of
    E[range] = integral of 1 - Phi(x)^n - (1 - Phi(x))^n dx (d2(2) = 1.128, d2(5) = 2.326, d2(10) = 3.078)."""
    if n < 2:
        return 0.0
    step, total = 0.001, 0.0
    for i in range(-8000, 8000):
        phi = 0.5 * (1.0 + math.erf((i + 0.5) * step / math.sqrt(2.0)))
        total += 1.0 - phi ** n - (1.0 - phi) ** n
    return total * step


def _median(values: List[float]) -> float:
    return percentile(sorted(values), 50)


def spread(values: List[float]) -> Tuple[float, float]:
    """((max - min) / median, stdev / mean) of the runs' medians."""
    d = distribution(values, "")
    return ((d["max"] - d["min"]) / d["p50"] if d["p50"] else float("nan"),
            d["cv"] if d["cv"] is not None else float("nan"))


def sampling_spread(medians: List[float], errors: List[Optional[float]]) -> Optional[float]:
    """The (max - min) / median that N runs would show from their repeats' sampling alone: d2(N) x the runs'
    root-mean-square standard error of the median, over the median of the medians. None if a run lacks it."""
    if len(medians) < 2 or any(e is None for e in errors) or not _median(medians):
        return None
    rms = math.sqrt(sum(e * e for e in errors) / len(errors))
    return expected_range(len(medians)) * rms / _median(medians)


def ci_spread(medians: List[float], halves: List[Optional[float]]) -> Optional[float]:
    """The (max - min) / median that the runs' own 95 % CIs predict: each half-width is 1.96 standard errors of
    its median, so N runs whose differences are sampling alone spread by d2(N) x rms(half / 1.96). A spread well
    above it is the node moving between processes, which no count of repeats inside one process can fix."""
    if len(medians) < 2 or any(h is None for h in halves) or not _median(medians):
        return None
    rms = math.sqrt(sum((h / 1.96) ** 2 for h in halves) / len(halves))
    return expected_range(len(medians)) * rms / _median(medians)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", "-n", type=int, default=5, help="fresh-process runs of the cell (default 5)")
    parser.add_argument("--runs-dir", default=None, help="where the runs go (default: a new temporary directory)")
    parser.add_argument("--max-spread", type=float, default=None,
                        help="fail (exit 1) when a figure's (max-min)/median exceeds this, e.g. 0.05")
    parser.add_argument("--first-index", type=int, default=0,
                        help="number the runs from here (bench_check-<i>), to add runs to an earlier --runs-dir")
    parser.add_argument("--summarize", action="store_true",
                        help="run nothing: print the spread over the runs already under --runs-dir")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides naming one cell, e.g. model=tiny method=bf16")
    args = parser.parse_args(argv)
    if args.summarize:
        if not args.runs_dir or not Path(args.runs_dir).is_dir():
            parser.error("--summarize needs --runs-dir naming an existing directory")
        return summarize(Path(args.runs_dir).resolve(), args.max_spread)
    if args.repeats < (2 if args.first_index == 0 else 1):
        parser.error("--repeats must be at least 2 to show a spread (1 when adding to earlier runs)")
    if any(o.startswith(("run.sweep=", "-m", "--multirun")) for o in args.overrides):
        parser.error("give the overrides of one cell; run.sweep and -m are set here")

    runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="qbench-bench-check-")).resolve()
    print(f"bench-check: {args.repeats} runs of [{' '.join(args.overrides)}] under {runs_dir}", flush=True)
    # added to earlier runs: the spread is over those numbered below --first-index and the new ones
    earlier = [p for p in run_dirs(runs_dir) if 0 <= run_index(p) < args.first_index]
    per_run, failed = load_runs(earlier)
    for i in range(args.first_index, args.first_index + args.repeats):
        sweep = f"bench_check-{i}"
        cmd = [sys.executable, "-m", "qbench", *args.overrides, f"run.sweep={sweep}",
               f"run.runs_dir={runs_dir}", "run.force=true"]
        print(f"  run {i + 1}: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, env=os.environ.copy())
        run_figures = load_run(runs_dir / sweep, f"run {i + 1}", proc.returncode)
        if run_figures is None:
            failed = True
        else:
            per_run.append(run_figures)
    return print_spread(per_run, len(earlier) + args.repeats, runs_dir, args.max_spread, failed)


def load_run(sweep_dir: Path, name: str, returncode: int = 0) -> Dict[str, Figure] | None:
    """The figures of one run's single cell, or None (with the reason on stderr) when it failed."""
    results = sorted(sweep_dir.glob("*/result.json"))
    if returncode != 0 or len(results) != 1:
        print(f"  {name}: exit {returncode}, {len(results)} result.json under {sweep_dir} (expected one cell)",
              file=sys.stderr)
        return None
    result = json.loads(results[0].read_text())
    if result.get("status") != "ok":
        err = result.get("error") or {}
        print(f"  {name}: status {result.get('status')}: {err.get('type')}: {err.get('message')}", file=sys.stderr)
        return None
    print(f"  {name}: {run_conditions(result)}", flush=True)
    return figures(result)


def run_conditions(result: dict) -> str:
    """What may differ between runs besides the code: which GPU (runs can span leases or nodes), whether the
    process was pinned to CPUs, and how busy the host was (a launch-bound decode slows down when it is)."""
    latency = (result.get("metrics") or {}).get("latency") or {}
    parts = []
    gpus = (((latency.get("gpu_state") or {}).get("start") or {}).get("gpus")) or []
    if gpus:
        parts.append(",".join(str(g.get("uuid"))[:12] for g in gpus))  # GPU-<first 8 hex>: enough to tell apart
    affinity = (result.get("environment") or {}).get("cpu_affinity") or {}
    if affinity.get("applied"):
        parts.append(f"pinned to CPUs {affinity.get('requested')}")
    host = latency.get("host_cpu") or {}
    if host:
        stolen = "steal not reported" if host["steal_pct"] is None else f"{host['steal_pct']:.1f}% stolen"
        parts.append(f"host CPUs {host['busy_pct']:.0f}% busy, {stolen} "
                     f"({host['cpu_count']} CPUs, load {host['loadavg_1m']})")
    return "; ".join(parts) or "no GPU or host record"


def run_index(sweep_dir: Path) -> int:
    """i of a bench_check-<i> directory (-1 for a name without a number)."""
    suffix = sweep_dir.name.rsplit("-", 1)[1]
    return int(suffix) if suffix.isdigit() else -1


def run_dirs(runs_dir: Path) -> List[Path]:
    """The bench_check-<i> runs under runs_dir, in numeric order (bench_check-10 after bench_check-2)."""
    return sorted(runs_dir.glob("bench_check-*"), key=run_index)


def load_runs(sweeps: List[Path]) -> Tuple[List[Dict[str, Figure]], bool]:
    """The figures of each run that succeeded, and whether any failed."""
    loaded = [load_run(sweep, sweep.name) for sweep in sweeps]
    return [f for f in loaded if f is not None], any(f is None for f in loaded)


def summarize(runs_dir: Path, max_spread: float | None) -> int:
    """The spread over every bench_check-<i> run already under runs_dir (runs from several sessions)."""
    sweeps = run_dirs(runs_dir)
    print(f"bench-check: summarizing {len(sweeps)} runs under {runs_dir}", flush=True)
    per_run, failed = load_runs(sweeps)
    return print_spread(per_run, len(sweeps), runs_dir, max_spread, failed)


def print_spread(per_run: List[Dict[str, Figure]], attempted: int, runs_dir: Path,
                 max_spread: float | None, failed: bool) -> int:
    if not per_run:
        print("bench-check: no run succeeded", file=sys.stderr)
        return 1
    labels = [k for k in per_run[0] if all(k in r for r in per_run)]
    if not labels:
        print("bench-check: the cell has no latency figures (bench.enabled=false?)", file=sys.stderr)
        return 1
    too_wide = []
    width = max(len(k) for k in labels)
    print(f"\n{'figure (median of each run)':<{width}}  {'unit':<9} {'spread':>7} {'cv':>7} {'sampling':>8} "
          f"{'CIs':>7}  values")
    for label in labels:
        values = [r[label][0] for r in per_run]
        unit = per_run[0][label][1]
        rng, cv = spread(values)
        from_sampling = sampling_spread(values, [r[label][2] for r in per_run])
        sampled = "-" if from_sampling is None else f"{from_sampling * 100:.1f}%"
        from_ci = ci_spread(values, [r[label][3] if len(r[label]) > 3 else None for r in per_run])
        predicted = "-" if from_ci is None else f"{from_ci * 100:.1f}%"
        flag = ""
        if max_spread is not None and rng > max_spread:
            too_wide.append(label)
            flag = "  <-- above --max-spread"
        shown = " ".join(f"{v:.4g}" for v in values)
        print(f"{label:<{width}}  {unit:<9} {rng * 100:6.1f}% {cv * 100:6.1f}% {sampled:>8} {predicted:>7}  {shown}{flag}")
    print(f"\n{len(per_run)} of {attempted} runs succeeded; results under {runs_dir}")
    if too_wide:
        print(f"bench-check: {len(too_wide)} figure(s) spread more than {max_spread * 100:.1f}%", file=sys.stderr)
    return 1 if failed or too_wide else 0


if __name__ == "__main__":
    sys.exit(main())
