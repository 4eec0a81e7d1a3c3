"""The fixture reports in a real headless Chromium, offline (scripts/browser_check.py).

Marked `browser`: tests/conftest.py skips them where /usr/bin/chromium (or $QBENCH_CHROMIUM) is absent (install:
apt-get install -y chromium). Set QBENCH_SCREENSHOT_DIR to keep the screenshots; otherwise they go to pytest's
tmp_path.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.browser


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


browser_check = _load("browser_check", ROOT / "scripts" / "browser_check.py")
test_report = _load("qbench_test_report_helpers", Path(__file__).parent / "test_report.py")


EXAMPLES = ROOT / "reports" / "examples" / "runs"


@pytest.fixture(scope="module")
def site_reports(tmp_path_factory):
    """A real sweep (SmolLM2-135M on an H200: quality, accuracy, decode) built as a site: plotly.js shared."""
    from qbench.report import site

    out = tmp_path_factory.mktemp("site")
    site.build_site([EXAMPLES / "gpu_smollm2", EXAMPLES / "cpu_new_methods"], out)
    return out


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Both fixture sweeps built once, with the real plotly.js (the page must work offline as shipped)."""
    from qbench.report import html as H

    out = tmp_path_factory.mktemp("reports")
    for sweep in ("mixed", "demo"):
        H.build_sweep_report(test_report.FIXTURES / sweep, out)
    return out


def _shots(tmp_path: Path) -> Path:
    d = os.environ.get("QBENCH_SCREENSHOT_DIR")
    return Path(d) if d else tmp_path


def test_mixed_report_in_browser(reports, tmp_path):
    shot = _shots(tmp_path) / "report_mixed.png"
    facts = browser_check.check_report(reports / "mixed" / "index.html", screenshot=shot,
                                       expect_charts=5, expect_rows=6, pdf=tmp_path / "mixed.pdf")
    assert facts["problems"] == []
    assert facts["charts"] == 5 and len(facts["charts_drawn"]) == 5 and facts["rows"] == 6
    assert facts["ready"] == "5" and not facts["demo_banner"]
    assert facts["width"] <= 1366 + 1  # nothing overflows a laptop-wide page (the wide table scrolls inside)
    for p in facts["screenshots"]:
        assert Path(p).stat().st_size > 20_000
    assert (tmp_path / "mixed.pdf").read_bytes()[:4] == b"%PDF"


def test_demo_report_in_browser(reports, tmp_path):
    facts = browser_check.check_report(reports / "demo" / "index.html",
                                       screenshot=_shots(tmp_path) / "report_demo.png", expect_charts=2, expect_rows=2)
    assert facts["problems"] == []
    assert facts["demo_banner"] and facts["absent_notes"] == 3


def test_index_page_in_browser(reports):
    # The index has no chart and no summary table: expect exactly that, and no error or network use.
    facts = browser_check.check_report(reports / "index.html", expect_charts=0, expect_rows=0)
    assert facts["problems"] == [] and facts["charts"] == 0 and facts["rows"] == 0


def test_check_catches_a_broken_page(tmp_path):
    """The checker itself fails on console errors, network use, executed content and missing charts."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body data-charts-ready="1"><main data-expected-charts="1" '
                   'data-expected-rows="1"><div class="qb-chart" id="fig-x"></div></main>'
                   '<img src="http://example.invalid/x.png">'
                   '<script>console.error("boom"); alert(1);</script></body></html>')
    facts = browser_check.check_report(bad)
    text = "\n".join(facts["problems"])
    assert "console.error: boom" in text
    assert "network request" in text and "example.invalid" in text
    assert "JavaScript dialog opened" in text
    assert "only 0 of 1 charts drawn" in text
    assert "summary table has 0 rows, expected 1" in text
    assert "no decision panel (#decision)" in text


def _model_answers(decision):
    return [m["answer"] for m in decision["models"]]


def test_decision_panel_follows_the_budget(site_reports, tmp_path):
    """Type budgets into the page: the script's picks change, and equal decision.py's rule for each budget."""
    from qbench.report import decision as D
    from qbench.report import tables as T

    budgets = [{"kl_max": 0.3, "ppl_ratio_max": 1.3}, {"kl_max": 0.015, "strict": True},
               {"kl_max": "", "ppl_ratio_max": "", "acc_drop_pp": "", "strict": False}]
    facts = browser_check.check_report(site_reports / "gpu_smollm2" / "index.html", budgets=budgets,
                                       screenshot=_shots(tmp_path) / "report_decision.png")
    assert facts["problems"] == []  # also: the default answer on load is decision.py's, and plotly loaded from disk
    [default] = _model_answers(facts["decision"])
    assert default["memory"] == ["bnb_int8", "torchao_int8wo"]
    results = T.load_results(EXAMPLES / "gpu_smollm2")
    [model] = D.decision_data(T.summary_rows(results), results)["models"]
    typed = {**D.DEFAULT_BUDGET}
    answers = []
    for b, seen in zip(budgets, facts["decision_budgets"]):
        typed.update({k: (None if v == "" else v) for k, v in b.items()})
        want = D.decide(model, typed)
        [got] = _model_answers(seen)
        assert got == {"memory": want["memory"], "decode": {str(k): v for k, v in want["decode"].items()}}
        answers.append(got["memory"])
    assert answers == [["bnb_nf4"], ["torchao_int8wo"], ["bnb_nf4"]]
    assert "bnb_int8 (KL 0.01541 > 0.015)" in facts["decision_budgets"][1]["models"][0]["excluded"]
    # the share link holds the form's budget; typed budgets add up (the PPL ratio of the first stays)
    assert facts["decision_budgets"][1]["link"] == "#budget&kl_max=0.015&ppl_ratio_max=1.3&acc_drop_pp=2&strict=1"


def test_a_link_opens_the_page_with_its_budget(site_reports):
    """The share link's address (#budget&...) sets the form on load: the answer is the loose budget's."""
    facts = browser_check.check_report(site_reports / "gpu_smollm2" / "index.html",
                                       fragment="#budget&kl_max=0.3&ppl_ratio_max=1.3&acc_drop_pp=&strict=0")
    assert facts["problems"] == []
    [m] = facts["decision"]["models"]
    assert not m["default_budget"] and m["answer"]["memory"] == ["bnb_nf4"]
    assert facts["decision"]["link"] == "#budget&kl_max=0.3&ppl_ratio_max=1.3&acc_drop_pp=&strict=0"


def test_site_pages_share_plotly_and_still_open_offline(site_reports):
    for sweep in ("gpu_smollm2", "cpu_new_methods"):
        page = site_reports / sweep / "index.html"
        assert page.stat().st_size < 1_000_000  # plotly.js (4.6 MB) is not in it
        facts = browser_check.check_report(page)
        assert facts["problems"] == [] and len(facts["charts_drawn"]) == facts["charts"] > 0
    facts = browser_check.check_report(site_reports / "index.html", expect_charts=0, expect_rows=0)
    assert facts["problems"] == []
