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
