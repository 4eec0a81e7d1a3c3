#!/usr/bin/env python3
"""Open a qbench report in headless Chromium, offline, and check that it really works.

    python scripts/browser_check.py reports/<sweep>/index.html [--screenshot out.png] [--charts N] [--rows N]

Chromium (Debian's /usr/bin/chromium) runs headless with every network request sent to a proxy that does
not exist, and is driven over the DevTools protocol with a small standard-library websocket client (no
pip dependency). The check fails (exit 1, and ``problems`` in the JSON it prints) when:
  - anything is logged as an error: console.error, an uncaught exception, a failed load;
  - the page asks for anything that is not file:, data:, blob: or about: (it must be self-contained);
  - a JavaScript dialog opens (an alert() from a result string would mean the escaping failed);
  - fewer charts are drawn than the page expects (<main data-expected-charts>, or --charts), a chart is
    empty (no .main-svg) or has no height;
  - the summary table does not have one row per cell (<main data-expected-rows>, or --rows);
  - sorting a numeric column does not sort it;
  - a sweep page has no decision panel, or the panel's script answers otherwise than the report's own rule
    (qbench/report/decision.py's answer under the default budget, in each model's data-expected).
With --budget (repeatable, JSON such as '{"kl_max": 0.3}'), it then types each budget into the panel and records
the answers it gives (``decision_budgets``), for tests that compare them with decision.py.
It saves a screenshot of the first screen (laptop size, 1366x900) and one of the whole page.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional

CHROMIUM = os.environ.get("QBENCH_CHROMIUM", "/usr/bin/chromium")
VIEWPORT = (1366, 900)  # a common laptop screen
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:", "chrome-error:", "devtools:")


def find_chromium() -> Optional[str]:
    for c in (CHROMIUM, shutil.which("chromium"), shutil.which("chromium-browser")):
        if c and os.path.exists(c):
            return c
    return None


# ---------------------------------------------------------------- a minimal websocket client (RFC 6455)


class _WS:
    """Just enough websocket for the DevTools protocol: text frames, masking, fragments, ping/pong."""

    def __init__(self, url: str, timeout: float) -> None:
        assert url.startswith("ws://"), url
        hostport, _, path = url[len("ws://"):].partition("/")
        host, _, port = hostport.partition(":")
        self.sock = socket.create_connection((host, int(port or 80)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            head += chunk
        head, _, self.buf = head.partition(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise ConnectionError(f"websocket handshake refused: {head[:200]!r}")

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buf)))
            if not chunk:
                raise ConnectionError("websocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        head = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def send(self, text: str) -> None:
        self._send_frame(0x1, text.encode())

    def recv(self) -> str:
        parts: List[bytes] = []
        while True:
            b0, b1 = self._read(2)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            data = self._read(n)
            if mask:
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
            if opcode == 0x9:  # ping
                self._send_frame(0xA, data)
                continue
            if opcode == 0x8:
                raise ConnectionError("websocket closed by the browser")
            if opcode in (0x0, 0x1, 0x2):
                parts.append(data)
                if b0 & 0x80:
                    return b"".join(parts).decode()

    def close(self) -> None:
        try:
            self._send_frame(0x8, b"")
        except OSError:
            pass
        self.sock.close()


# ---------------------------------------------------------------- DevTools session


class _CDP:
    def __init__(self, ws_url: str, timeout: float) -> None:
        self.ws = _WS(ws_url, timeout)
        self.next_id = 0
        self.events: List[Dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> Dict[str, Any]:
        self.next_id += 1
        my_id = self.next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self._event(msg)

    def _event(self, msg: Dict[str, Any]) -> None:
        self.events.append(msg)
        if msg["method"] == "Page.javascriptDialogOpening":
            # Dismiss it so that the page goes on; the check fails on the recorded event.
            self.ws.send(json.dumps({"id": 10 ** 9 + len(self.events), "method": "Page.handleJavaScriptDialog",
                                     "params": {"accept": True}}))

    def wait_event(self, name: str, timeout: float) -> bool:
        end = time.time() + timeout
        if any(e["method"] == name for e in self.events):
            return True
        self.ws.sock.settimeout(1.0)
        try:
            while time.time() < end:
                try:
                    msg = json.loads(self.ws.recv())
                except TimeoutError:
                    continue
                if "method" in msg:
                    self._event(msg)
                    if msg["method"] == name:
                        return True
            return False
        finally:
            self.ws.sock.settimeout(None)

    def eval(self, expr: str) -> Any:
        res = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"evaluate failed: {res['exceptionDetails'].get('text')}: {expr[:80]}")
        return res.get("result", {}).get("value")


def _launch(chromium: str, profile: str) -> subprocess.Popen:
    args = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--remote-debugging-port=0", f"--user-data-dir={profile}",
            # Offline: every request goes to a proxy that is not there; loopback too (<-loopback>).
            "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
            "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-sync",
            "--disable-background-networking", "--disable-component-update", "--disable-default-apps",
            "--hide-scrollbars", "--mute-audio", f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}", "about:blank"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _page_ws_url(profile: str, proc: subprocess.Popen, timeout: float) -> str:
    """The websocket of the about:blank page, from the port Chromium wrote to DevToolsActivePort."""
    port_file = Path(profile) / "DevToolsActivePort"
    end = time.time() + timeout
    while not port_file.exists() or not port_file.read_text().strip():
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
        if time.time() > end:
            raise TimeoutError("chromium did not open its DevTools port")
        time.sleep(0.1)
    port = int(port_file.read_text().split()[0])
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore http_proxy for loopback
    while True:
        try:
            targets = json.loads(opener.open(f"http://127.0.0.1:{port}/json/list", timeout=5).read())
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
        except OSError:
            pass
        if time.time() > end:
            raise TimeoutError("chromium has no page target")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    """Stop the Chromium this check started, and its child processes (its own process group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)


# ---------------------------------------------------------------- the check

_PAGE_FACTS = """(() => {
  const main = document.querySelector('main');
  const charts = Array.from(document.querySelectorAll('.qb-chart'));
  return {
    title: document.title,
    ready: document.body.getAttribute('data-charts-ready'),
    expected_charts: main ? parseInt(main.getAttribute('data-expected-charts')) : null,
    expected_rows: main ? parseInt(main.getAttribute('data-expected-rows')) : null,
    charts: charts.length,
    charts_drawn: charts.filter(c => c.classList.contains('js-plotly-plot') && c.querySelector('.main-svg')
                                   && c.getBoundingClientRect().height > 100
                                   && c.querySelectorAll('.main-svg g.trace, .main-svg .heatmaplayer *').length > 0)
                        .map(c => c.id),
    absent_notes: document.querySelectorAll('#charts .absent').length,
    rows: document.querySelectorAll('#summary-table tbody tr').length,
    demo_banner: !!document.getElementById('demo-banner'),
    width: document.documentElement.scrollWidth,
  };
})()"""

# Click the first numeric header (ascending) and read the column back: non-empty values ascending, empties last.
_SORT_CHECK = """(() => {
  const table = document.getElementById('summary-table');
  if (!table) return {col: -1};
  const ths = Array.from(table.querySelectorAll('thead th'));
  const col = ths.findIndex(th => th.getAttribute('data-type') === 'num');
  if (col < 0) return {col: -1};
  ths[col].click();
  const vals = Array.from(table.tBodies[0].rows).map(r => r.cells[col].getAttribute('data-v'));
  return {col: col, header: ths[col].textContent, aria: ths[col].getAttribute('aria-sort'), values: vals};
})()"""


# Each model's answer as the panel's script rendered it (data-answer) and as decision.py expects it under the
# default budget (data-expected); whether the form holds that default budget (data-default-budget); the share link.
_DECISION_FACTS = """(() => {
  const sec = document.getElementById('decision');
  if (!sec) return null;
  const link = document.getElementById('decision-link');
  return {link: link ? link.getAttribute('href') : null, models: Array.from(sec.querySelectorAll('.decision-model')).map(m => ({
    model: m.getAttribute('data-model'),
    default_budget: m.getAttribute('data-default-budget') === 'true',
    expected: JSON.parse(m.getAttribute('data-expected') || 'null'),
    answer: JSON.parse(m.getAttribute('data-answer') || 'null'),
    rows: Array.from(m.querySelectorAll('tbody.answer tr')).map(r => r.textContent.trim()),
    excluded: (m.querySelector('.excluded') || {}).textContent || '',
  }))};
})()"""

# Types a budget into the panel's form (keys missing from it keep their value; null empties the field) and fires
# the events a reader's typing would; then the answers are read back with _DECISION_FACTS.
_SET_BUDGET = """((b) => {
  const form = document.getElementById('decision-budget');
  for (const [k, v] of Object.entries(b)) {
    const el = form.elements[k];
    if (el.type === 'checkbox') { el.checked = !!v; } else { el.value = v === null ? '' : String(v); }
    el.dispatchEvent(new Event(el.type === 'checkbox' ? 'change' : 'input', {bubbles: true}));
  }
  return true;
})"""


def _decision_problems(decision: Optional[Dict[str, Any]], sweep_page: bool) -> List[str]:
    if decision is None:
        return ["no decision panel (#decision)"] if sweep_page else []
    out = []
    for m in decision["models"]:
        if m["answer"] is None:
            out.append(f"decision panel of {m['model']!r}: the script gave no answer")
        elif m["default_budget"] and m["expected"] is not None and _answer(m["answer"]) != _answer(m["expected"]):
            out.append(f"decision panel of {m['model']!r}: the script answers {m['answer']}, the report's rule "
                       f"{m['expected']}")
    return out


def _answer(a: Dict[str, Any]) -> Dict[str, Any]:
    """The comparable part of an answer: the picks, in order (decode keys as strings, as JSON has them)."""
    return {"memory": list(a.get("memory") or []), "decode": {str(k): list(v) for k, v in (a.get("decode") or {}).items()}}


def _sorted_ok(values: List[str]) -> bool:
    nums = [float(v) for v in values if v not in ("", None)]
    first_empty = next((i for i, v in enumerate(values) if v in ("", None)), len(values))
    return nums == sorted(nums) and all(v in ("", None) for v in values[first_empty:])


def _event_problems(events: List[Dict[str, Any]]) -> List[str]:
    """What the browser reported while the page ran: errors, network use, dialogs."""
    problems: List[str] = []
    for e in events:
        m, p = e["method"], e.get("params", {})
        if m == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            problems.append(f"uncaught exception: {d.get('text')} {d.get('exception', {}).get('description', '')}"[:500])
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            problems.append(f"console.{p['type']}: {args}"[:500])
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            en = p["entry"]
            problems.append(f"log error ({en.get('source')}): {en.get('text')} {en.get('url', '')}"[:500])
        elif m == "Network.requestWillBeSent":
            req_url = p.get("request", {}).get("url", "")
            if not req_url.startswith(LOCAL_SCHEMES):
                problems.append(f"network request (the page must be self-contained): {req_url[:200]}")
        elif m == "Page.javascriptDialogOpening":
            problems.append(f"a JavaScript dialog opened ({p.get('type')}: {p.get('message')!r}): "
                            "result content was executed")
    return problems


def check_report(html_path: Path, screenshot: Optional[Path] = None, expect_charts: Optional[int] = None,
                 expect_rows: Optional[int] = None, chromium: Optional[str] = None, pdf: Optional[Path] = None,
                 timeout: float = 90.0, budgets: Optional[List[Dict[str, Any]]] = None,
                 fragment: str = "") -> Dict[str, Any]:
    """Run the check; returns the facts found and ``problems`` (empty when the page passes). ``fragment`` is
    appended to the page's address (e.g. a decision budget: '#budget&kl_max=0.3')."""
    chromium = chromium or find_chromium()
    if not chromium:
        raise FileNotFoundError("chromium not found (apt-get install -y chromium)")
    url = Path(html_path).resolve().as_uri() + fragment
    problems: List[str] = []
    with tempfile.TemporaryDirectory(prefix="qbench-chromium-") as profile:
        proc = _launch(chromium, profile)
        try:
            cdp = _CDP(_page_ws_url(profile, proc, timeout), timeout)
            for domain in ("Page", "Runtime", "Log", "Network"):
                cdp.call(f"{domain}.enable")
            cdp.call("Emulation.setDeviceMetricsOverride", width=VIEWPORT[0], height=VIEWPORT[1],
                     deviceScaleFactor=1, mobile=False)
            cdp.events.clear()
            cdp.call("Page.navigate", url=url)
            if not cdp.wait_event("Page.loadEventFired", timeout):
                problems.append(f"page did not finish loading in {timeout:.0f} s")
            end = time.time() + timeout
            facts = cdp.eval(_PAGE_FACTS)
            # Wait for the page's own "drawn" flag, when it has charts to draw.
            while facts["ready"] is None and (facts["charts"] or facts["expected_charts"]) and time.time() < end:
                time.sleep(0.25)
                facts = cdp.eval(_PAGE_FACTS)
            cdp.wait_event("__settle__", 1.0)  # collect late console messages
            if screenshot:
                screenshot = Path(screenshot)
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                cdp.eval("window.scrollTo(0, 0)")
                shot = cdp.call("Page.captureScreenshot", format="png")
                screenshot.write_bytes(base64.b64decode(shot["data"]))
                size = cdp.call("Page.getLayoutMetrics")["cssContentSize"]
                full = cdp.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                                clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
                full_path = screenshot.with_name(screenshot.stem + "_full" + screenshot.suffix)
                full_path.write_bytes(base64.b64decode(full["data"]))
                facts["screenshots"] = [str(screenshot), str(full_path)]
            facts["decision"] = cdp.eval(_DECISION_FACTS)
            facts["decision_budgets"] = []
            for b in budgets or []:  # after the default answer was read: each budget changes the page
                cdp.eval(f"{_SET_BUDGET}({json.dumps(b)})")
                facts["decision_budgets"].append(cdp.eval(_DECISION_FACTS))
            facts["sort"] = cdp.eval(_SORT_CHECK)  # after the screenshots: it reorders the table
            if pdf:
                data = cdp.call("Page.printToPDF", printBackground=False)["data"]
                Path(pdf).write_bytes(base64.b64decode(data))
                facts["pdf"] = str(pdf)
            cdp.wait_event("__settle__", 0.5)
            events = list(cdp.events)
            cdp.ws.close()
        finally:
            _stop(proc)

    problems += _event_problems(events)
    want_charts = expect_charts if expect_charts is not None else facts.get("expected_charts")
    want_rows = expect_rows if expect_rows is not None else facts.get("expected_rows")
    if (facts["charts"] or want_charts) and facts.get("ready") in (None, "error"):
        problems.append(f"charts never finished drawing (data-charts-ready={facts.get('ready')!r})")
    if want_charts is None or facts["charts"] != want_charts:
        problems.append(f"{facts['charts']} chart containers, expected {want_charts}")
    if len(facts["charts_drawn"]) != facts["charts"]:
        problems.append(f"only {len(facts['charts_drawn'])} of {facts['charts']} charts drawn: {facts['charts_drawn']}")
    if want_rows is None or facts["rows"] != want_rows:
        problems.append(f"summary table has {facts['rows']} rows, expected {want_rows}")
    problems += _decision_problems(facts.get("decision"), sweep_page=bool(want_rows))
    s = facts.get("sort") or {}
    if s.get("col", -1) >= 0 and (s.get("aria") != "ascending" or not _sorted_ok(s.get("values", []))):
        problems.append(f"sorting column {s.get('header')!r} did not sort it: {s.get('values')}")
    facts.update({"url": url, "expected_charts_checked": want_charts, "expected_rows_checked": want_rows,
                  "n_events": len(events), "problems": problems})
    return facts


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("html", type=Path)
    p.add_argument("--screenshot", type=Path, help="PNG of the first screen; <name>_full.png is the whole page")
    p.add_argument("--pdf", type=Path, help="also print the page to this PDF (print CSS)")
    p.add_argument("--charts", type=int, help="charts expected (default: the page's data-expected-charts)")
    p.add_argument("--rows", type=int, help="summary rows expected (default: the page's data-expected-rows)")
    p.add_argument("--chromium", help=f"browser binary (default {CHROMIUM})")
    p.add_argument("--timeout", type=float, default=90.0)
    p.add_argument("--budget", action="append", type=json.loads, default=[],
                   help='a budget to type into the decision panel, as JSON: \'{"kl_max": 0.3, "strict": true}\'')
    p.add_argument("--fragment", default="", help="appended to the page's address, e.g. '#budget&kl_max=0.3'")
    a = p.parse_args(argv)
    facts = check_report(a.html, a.screenshot, a.charts, a.rows, a.chromium, a.pdf, a.timeout, a.budget, a.fragment)
    print(json.dumps(facts, indent=1))
    if facts["problems"]:
        print("browser check FAILED:\n  " + "\n  ".join(facts["problems"]), file=sys.stderr)
        return 1
    print(f"browser check ok: {facts['charts']} charts drawn, {facts['rows']} table rows, no console error, "
          "no network request", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
