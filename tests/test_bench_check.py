"""scripts/bench_check.py: the spread arithmetic, --summarize over runs from several sessions, and --first-index;
scripts/summarize_runs.py: the compact tables of docs/stability/ that the page's figures are checked against.

No cell is measured here: result.json files are written by hand (the schema's latency section, trimmed to the
figures bench_check reads), and the fresh-process runs are replaced by a fake subprocess.run."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_check():
    spec = importlib.util.spec_from_file_location("bench_check", ROOT / "scripts" / "bench_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_run(runs_dir: Path, index: int, static_tps: float, eager_tps: float = 25.0, status: str = "ok",
              static_values: list | None = None, gpu_uuid: str | None = None, pinned: str | None = None) -> None:
    cell = runs_dir / f"bench_check-{index}" / "tiny__bf16"
    cell.mkdir(parents=True)
    result = {
        "status": status,
        "error": None if status == "ok" else {"type": "OutOfMemoryError", "message": "CUDA out of memory"},
        "metrics": {"latency": {
            "prefill": [{"batch_size": 1, "prompt_tokens": 512, "ttft_ms": {"p50": 30.0, "unit": "ms"}}],
            "decode": [
                {"decode_path": "static", "batch_size": 1,
                 "tokens_per_s": {"p50": static_tps, "unit": "tokens/s", "values": static_values or []},
                 "per_token_ms": {"p50": 1000.0 / static_tps, "unit": "ms"}},
                {"decode_path": "eager", "batch_size": 1, "tokens_per_s": {"p50": eager_tps, "unit": "tokens/s"},
                 "per_token_ms": None},
            ],
            "host_cpu": {"busy_pct": 8.0, "steal_pct": 0.1, "cpu_count": 16, "loadavg_1m": 1.5},
            "gpu_state": {"start": {"gpus": [{"uuid": gpu_uuid}]}} if gpu_uuid else {},
        }} if status == "ok" else {},
        "environment": {"cpu_affinity": {"requested": pinned, "cpus": [2, 3], "applied": pinned is not None}},
    }
    (cell / "result.json").write_text(json.dumps(result))


def test_spread_arithmetic(bench_check):
    rng, cv = bench_check.spread([100.0, 110.0, 90.0, 105.0, 95.0])
    assert rng == pytest.approx(20.0 / 100.0)  # (max - min) / median
    assert cv == pytest.approx((250.0 / 4) ** 0.5 / 100.0)  # sample stdev / mean
    rng, cv = bench_check.spread([4.0, 2.0])  # even count: median is the mean of the middle two
    assert rng == pytest.approx(2.0 / 3.0)
    assert bench_check.spread([7.0]) == (0.0, 0.0)


def test_summarize_orders_runs_numerically(bench_check, tmp_path, capsys):
    for i, tps in [(0, 100.0), (1, 101.0), (2, 99.0), (10, 104.0)]:
        write_run(tmp_path, i, tps)
    assert bench_check.main(["--summarize", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "summarizing 4 runs" in out and "4 of 4 runs succeeded" in out
    row = next(line for line in out.splitlines() if line.startswith("decode static bs=1 tokens/s"))
    # bench_check-10 comes last (numeric order, not '10' < '2'), and the spread is (104 - 99) / 100.5
    assert row.split()[-4:] == ["100", "101", "99", "104"]
    assert f"{5 / 100.5 * 100:6.1f}%" in row
    # a figure missing from one run (eager per-token is null) is not tabulated
    assert "decode eager bs=1 per-token" not in out
    assert "prefill ttft bs=1 prompt=512" in out and "host CPUs 8% busy" in out


def test_failed_run_and_max_spread_exit_1(bench_check, tmp_path, capsys):
    write_run(tmp_path, 0, 100.0)
    write_run(tmp_path, 1, 100.5)
    assert bench_check.main(["--summarize", "--runs-dir", str(tmp_path), "--max-spread", "0.01"]) == 0
    assert bench_check.main(["--summarize", "--runs-dir", str(tmp_path), "--max-spread", "0.001"]) == 1
    out, err = capsys.readouterr()
    assert "above --max-spread" in out and "spread more than 0.1%" in err
    write_run(tmp_path, 2, 0.0, status="error")
    assert bench_check.main(["--summarize", "--runs-dir", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "2 of 3 runs succeeded" in out and "OutOfMemoryError: CUDA out of memory" in err


@pytest.mark.parametrize("argv", [
    ["--repeats", "1", "model=tiny"],  # one fresh set of runs cannot show a spread
    ["--repeats", "3", "model=tiny", "run.sweep=x"],  # run.sweep is bench_check's to set
    ["--summarize"],  # nothing to summarize
])
def test_bad_arguments_exit_2(bench_check, argv, tmp_path):
    with pytest.raises(SystemExit) as exc:
        bench_check.main(argv)
    assert exc.value.code == 2


def test_first_index_adds_runs_to_earlier_ones(bench_check, tmp_path, monkeypatch, capsys):
    write_run(tmp_path, 0, 100.0)
    write_run(tmp_path, 1, 102.0)
    write_run(tmp_path, 5, 500.0)  # numbered above the new runs: not one of "the earlier runs"
    calls = []

    def fake_run(cmd, env=None):  # stands in for the fresh `python -m qbench` process of one run
        calls.append(cmd)
        sweep = next(a for a in cmd if a.startswith("run.sweep=")).split("=", 1)[1]
        write_run(tmp_path, int(sweep.rsplit("-", 1)[1]), 110.0)

        class Done:
            returncode = 0
        return Done()

    monkeypatch.setattr(bench_check.subprocess, "run", fake_run)
    # one new run is allowed when adding to earlier ones; the spread is over all three
    assert bench_check.main(["--repeats", "1", "--first-index", "2", "--runs-dir", str(tmp_path),
                             "model=tiny", "method=bf16"]) == 0
    assert len(calls) == 1 and "run.sweep=bench_check-2" in calls[0] and "run.force=true" in calls[0]
    assert f"run.runs_dir={tmp_path.resolve()}" in calls[0] and "model=tiny" in calls[0]
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("decode static bs=1 tokens/s"))
    assert row.split()[-3:] == ["100", "102", "110"] and "3 of 3 runs succeeded" in out


def test_median_standard_error_and_expected_range(bench_check):
    # |v - 5| of 1..9 is 4 3 2 1 0 1 2 3 4, whose median is 2: SE = 1.2533 * 1.4826 * 2 / sqrt(9)
    assert bench_check.median_standard_error([float(v) for v in range(1, 10)]) == pytest.approx(1.2533 * 1.4826 * 2 / 3)
    # one slow repeat moves the stdev a lot and this estimate not at all
    assert bench_check.median_standard_error([1, 2, 3, 4, 5, 6, 7, 8, 900.0]) == pytest.approx(1.2533 * 1.4826 * 2 / 3)
    assert bench_check.median_standard_error([1.0, 2.0]) is None  # too few to say
    # d2(n), the expected range of n standard normals (tables: 1.128, 1.693, 2.326, 3.078)
    for n, d2 in [(2, 1.128), (3, 1.693), (5, 2.326), (10, 3.078)]:
        assert bench_check.expected_range(n) == pytest.approx(d2, abs=0.001)
    assert bench_check.expected_range(1) == 0.0


def test_sampling_column_and_run_conditions(bench_check, tmp_path, capsys):
    values = [float(v) for v in range(96, 105)]  # median 100, SE 1.2533 * 1.4826 * 2 / 3 in each run
    write_run(tmp_path, 0, 100.0, static_values=values, gpu_uuid="GPU-cf0d8438-c595-5f52", pinned="2-5")
    write_run(tmp_path, 1, 104.0, static_values=[v + 4 for v in values], gpu_uuid="GPU-963e4420-0f24-df29")
    assert bench_check.main(["--summarize", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("decode static bs=1 tokens/s"))
    expected = 1.128 * (1.2533 * 1.4826 * 2 / 3) / 102.0  # d2(2) x rms SE / median of the medians
    assert row.split()[5:8] == [f"{4 / 102 * 100:.1f}%", row.split()[6], f"{expected * 100:.1f}%"]
    # no raw values (or per-token, whose values are correlated steps): no sampling figure
    assert next(line for line in out.splitlines() if line.startswith("decode eager bs=1 tokens/s")).split()[7] == "-"
    assert "bench_check-0: GPU-cf0d8438; pinned to CPUs 2-5; host CPUs 8% busy" in out
    assert "bench_check-1: GPU-963e4420; host CPUs 8% busy" in out


STABILITY = ROOT / "docs" / "stability"
STABILITY_PAGE = (ROOT / "docs" / "stability.md").read_text()


@pytest.fixture(scope="module")
def summarize_runs():
    spec = importlib.util.spec_from_file_location("summarize_runs", ROOT / "scripts" / "summarize_runs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def recorded():
    """The committed runs as data: docs/stability/figures.csv (one row per run and figure) and runs.csv."""
    pd = pytest.importorskip("pandas")
    return pd.read_csv(STABILITY / "figures.csv"), pd.read_csv(STABILITY / "runs.csv")


def spreads(bench_check, figures, group: str, path: str, metric: str = "tokens_per_s") -> tuple:
    """bench_check --summarize's spread, sampling and CIs columns for one decode figure at batch 1, computed
    from the compact table instead of the raw result.json files."""
    rows = figures[(figures.group == group) & (figures.figure == "decode") & (figures.decode_path == path)
                   & (figures.batch_size == 1) & (figures.metric == metric)].sort_values("run_index")
    medians = rows.p50.tolist()
    halves = [None if h != h else h for h in ((rows.ci_high - rows.ci_low) / 2).tolist()]  # NaN: no stored CI
    pct = lambda x: None if x is None else f"{x * 100:.1f}%"
    return (len(medians), pct(bench_check.spread(medians)[0]),
            pct(bench_check.sampling_spread(medians, rows.median_se.tolist())),
            pct(bench_check.ci_spread(medians, halves)))


def test_compact_table_gives_what_summarize_gives_on_the_raw_runs(bench_check, summarize_runs, tmp_path, capsys):
    """The CSV keeps each run's median, its standard error and its CI: the spread columns computed from it equal
    the ones bench_check --summarize prints from the raw result.json files."""
    for i, (tps, values) in enumerate([(100.0, [96.0, 99.0, 100.0, 101.0, 104.0]),
                                       (104.0, [100.0, 103.0, 104.0, 104.5, 108.0]),
                                       (98.0, [97.0, 97.5, 98.0, 99.0, 99.5])]):
        write_run(tmp_path / "runs" / "bf16", i, tps, static_values=values)
    assert bench_check.main(["--summarize", "--runs-dir", str(tmp_path / "runs" / "bf16")]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("decode static bs=1 tokens/s"))
    assert summarize_runs.main([str(tmp_path / "runs"), "--out", str(tmp_path / "csv")]) == 0
    import pandas as pd

    figures = pd.read_csv(tmp_path / "csv" / "figures.csv")
    assert set(figures.group) == {"bf16"} and sorted(set(figures.run_index)) == [0, 1, 2]
    n, spread, sampling, _ = spreads(bench_check, figures, "bf16", "static")
    assert (n, spread, sampling) == (3, row.split()[5], row.split()[7])


@pytest.mark.parametrize("method, static_spread, eager_spread, sampling",
                         [("bf16", "13.9%", "65.5%", "2.4%"), ("fp16", "10.8%", "33.3%", "5.0%")])
def test_the_recorded_h100_runs(bench_check, recorded, method, static_spread, eager_spread, sampling):
    """The committed 8B runs of docs/stability.md (five per method) give the spreads that page quotes."""
    figures, _ = recorded
    assert spreads(bench_check, figures, f"h100_8b/{method}", "static")[:3] == (5, static_spread, sampling)
    assert spreads(bench_check, figures, f"h100_8b/{method}", "eager")[1] == eager_spread
    row = next(line for line in STABILITY_PAGE.splitlines() if line.startswith(f"| {method} | static |"))
    assert f"| {static_spread.replace('%', ' %')} | {sampling.replace('%', ' %')} |" in row


@pytest.mark.parametrize("runs, static_spread", [
    ("h100_8b_affinity/bf16_pinned_gpu-cf0d8438", "1.5%"),
    ("h100_8b_affinity/bf16_alternating_unpinned_gpu-cf0d8438", "7.2%"),
    ("h100_8b_affinity/bf16_alternating_pinned_gpu-cf0d8438", "3.6%"),
    ("h100_8b_affinity/fp16_pinned_gpu-963e4420", "7.6%"),
    ("h100_8b_warmup/bf16_static_warmup6_gpu-e3cc71d9", "5.3%"),
])
def test_the_recorded_lever_runs(bench_check, recorded, runs, static_spread):
    """The pinning and warm-up experiments of docs/stability.md: each group gives the spread the page quotes."""
    assert spreads(bench_check, recorded[0], runs, "static")[1] == static_spread
    assert f"{static_spread.replace('%', ' %')}" in STABILITY_PAGE


@pytest.mark.parametrize("method, affinity, eager_spread, ci_predicted", [
    ("bf16", "null", "40.8%", "12.1%"), ("bf16", "gpu_local", "47.0%", "16.2%"),
    ("bnb_nf4", "null", "39.7%", "22.0%"), ("bnb_nf4", "gpu_local", "13.5%", "13.3%"),
])
def test_the_recorded_h200_bench_check(bench_check, recorded, method, affinity, eager_spread, ci_predicted):
    """Eager decode between fresh H200 processes: the spread and what the runs' own CIs predict."""
    n, spread, _, predicted = spreads(bench_check, recorded[0], f"h200_8b/benchcheck_8b/{method}_affinity_{affinity}",
                                      "eager")
    assert (n, spread, predicted) == (5, eager_spread, ci_predicted)
    row = next(line for line in STABILITY_PAGE.splitlines() if line.startswith(f"| {method} | `{affinity}` |"))
    assert f"| {eager_spread.replace('%', ' %')} | {ci_predicted.replace('%', ' %')} |" in row


def test_recorded_footprints_match_analytic(recorded):
    _, runs = recorded
    ok = runs[runs.status == "ok"]
    assert len(ok) >= 43
    assert (ok.weight_bytes_measured == ok.weight_bytes_analytic).all(), ok[ok.weight_bytes_measured
                                                                           != ok.weight_bytes_analytic].path


def test_static_warmup_transient_in_the_recorded_runs(recorded):
    """With 2 warm-up calls the H100 static path's repeats 4-10 ran 5.7 % faster than 1-3 (21 of 29 runs more than
    3 %); with 6 the step was gone. The page quotes both; the CSV keeps the per-run figure that shows it."""
    figures, _ = recorded
    static = figures[(figures.figure == "decode") & (figures.decode_path == "static")
                     & (figures.metric == "tokens_per_s") & figures.group.str.startswith("h100")]
    two = static[~static.group.str.contains("warmup6")]
    assert (len(two), round(two.late_vs_early_pct.mean(), 1), int((two.late_vs_early_pct > 3).sum())) == (29, 5.7, 21)
    six = static[static.group.str.contains("warmup6")]
    assert abs(six.late_vs_early_pct.mean()) < 0.05
    assert "5.7 %" in STABILITY_PAGE and "21 of 29" in STABILITY_PAGE


def test_ci_predicted_spread(bench_check):
    """Two runs whose stored CIs are ±1.96 tok/s around 100 (one standard error of 1): sampling alone spreads
    their medians by d2(2) = 1.128 standard errors, 1.13 % of the median; a run without a CI predicts nothing."""
    assert bench_check.ci_spread([100.0, 100.0], [1.96, 1.96]) == pytest.approx(0.01128, rel=1e-3)
    assert bench_check.ci_spread([100.0, 101.0], [1.96, None]) is None
    from qbench.measure import stats

    dist = stats.summarize([99.0, 100.0, 100.0, 100.0, 100.0, 101.0], "tokens/s")
    figs = bench_check.figures({"metrics": {"latency": {"decode": [
        {"decode_path": "static", "batch_size": 1, "tokens_per_s": dist}]}}})
    assert figs["decode static bs=1 tokens/s"][3] == pytest.approx(1.0)  # (max - min) / 2 of the stored CI


@pytest.mark.parametrize("group, latency_s", [
    ("defaults_32tok_cold", "165.2"), ("defaults_32tok_warm", "81.2"), ("defaults_32tok_warm_2", "83.0"),
    ("compiled_bs1_cold", "78.5"), ("compiled_bs1_cold_2", "80.0"), ("compiled_bs1_warm", "57.5"),
    ("compiled_all_cold_4", "150.6"), ("compiled_all_warm_4", "94.4"),
])
def test_the_recorded_h200_latency_phases(recorded, group, latency_s):
    """The latency phase each H200 table row quotes is that run's latency_s in runs.csv."""
    runs = recorded[1]
    (value,) = runs[runs.group == f"h200_8b/{group}"].latency_s
    assert f"{value:.1f}" == latency_s
    assert any(f"{latency_s} s" in line for line in STABILITY_PAGE.splitlines() if line.startswith(f"| `{group}`"))


@pytest.mark.parametrize("method, path", [("bf16", "graph"), ("bf16", "static"), ("bf16", "eager"),
                                          ("bnb_nf4", "eager")])
def test_the_recorded_rounds(recorded, method, path):
    """run.rounds=3: the rounds' medians and the combined CI of the page's rounds table."""
    figures = recorded[0]
    (row,) = figures[(figures.path == f"h200_8b/rounds_8b/llama3_1_8b_instruct__{method}")
                     & (figures.decode_path == path) & (figures.metric == "tokens_per_s")].itertuples()
    medians = ", ".join(f"{float(v):.1f}" for v in row.rounds_medians.split(";"))
    line = next(x for x in STABILITY_PAGE.splitlines() if x.startswith(f"| {method} | decode {path} |"))
    assert medians in line and f"{row.p50:.1f} ± " in line and row.rounds_dominated_by in line


@pytest.mark.parametrize("group, method, weight_bytes", [
    ("newmethods_8b", "torchao_int8wo", "9,088,081,920"), ("newmethods_8b", "torchao_int4wo", "5,809,643,520"),
    ("newmethods_8b", "fp8", "9,086,705,664"), ("newmethods_8b_2", "hqq", "6,027,747,328"),
])
def test_the_recorded_new_method_footprints(recorded, group, method, weight_bytes):
    runs = recorded[1]
    (row,) = runs[(runs.group == f"h200_8b/{group}") & (runs.method == method)].itertuples()
    assert f"{row.weight_bytes_measured:,}" == weight_bytes == f"{row.weight_bytes_analytic:,}"
    assert weight_bytes in STABILITY_PAGE
