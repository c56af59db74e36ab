"""The results web UI of `serve-analysis`, loaded in a real headless Chromium.

`serve-analysis` runs as a process on a small synthetic lake with three definitions: a 20-day
sequential experiment, a one-day experiment (one look) and a broken file. Chromium loads every
page; the tests assert what a reader needs: each chart has drawn marks, no two labels of a chart
overlap and none is cut off by the chart's frame (bounding boxes as Chromium laid them out), the
links work and survive a reload, and a phone-width page does not scroll sideways. Screenshots go
to build/screenshots/ (or $TWOFOLD_SCREENSHOTS_DIR), kept as the run's artifacts.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from analysis_worker.synthetic import write_synthetic_lake
from tests.browser import Browser

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "tests" / "data" / "home-ranking-analysis.yaml"  # matches the synthetic lake
SHOTS = Path(os.environ.get("TWOFOLD_SCREENSHOTS_DIR", ROOT / "build" / "screenshots"))
SECRET = "s3cret-for-the-results-ui"

CHARTS_JS = """
(() => {
  const out = [];
  for (const svg of document.querySelectorAll('svg.chart')) {
    const box = svg.getBoundingClientRect();
    const marks = [...svg.querySelectorAll('.mark')].filter(m => {
      const b = m.getBBox(); return b.width > 0 || b.height > 0; }).length;
    const texts = [...svg.querySelectorAll('text')].map(t => {
      const r = t.getBoundingClientRect();
      return {s: t.textContent, l: r.left, r: r.right, t: r.top, b: r.bottom}; });
    const overlaps = [];
    for (let i = 0; i < texts.length; i++) for (let j = i + 1; j < texts.length; j++) {
      const a = texts[i], c = texts[j];
      if (a.l < c.r - 0.5 && c.l < a.r - 0.5 && a.t < c.b - 0.5 && c.t < a.b - 0.5) overlaps.push([a.s, c.s]);
    }
    const clipped = texts.filter(x => x.l < box.left - 0.5 || x.r > box.right + 0.5 ||
                                      x.t < box.top - 0.5 || x.b > box.bottom + 0.5).map(x => x.s);
    out.push({label: svg.getAttribute('aria-label'), marks, overlaps, clipped,
              xticks: [...svg.querySelectorAll('text.xtick')].map(t => t.textContent)});
  }
  return out;
})()
"""


def _definition(name: str, **changes: Any) -> str:
    cfg = yaml.safe_load(EXAMPLE.read_text())
    cfg["name"] = name
    cfg["sequential"]["expected_units"] = 20_000
    cfg.update(changes)
    return yaml.safe_dump(cfg, sort_keys=False)


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read().decode(), dict(reply.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


class Served:
    def __init__(self, proc: subprocess.Popen[bytes], http_port: int, log: Path) -> None:
        self.proc, self.base, self.log = proc, f"http://127.0.0.1:{http_port}", log


def _serve(tmp: Path, lake: Path, experiments: Path, *extra: str) -> Served:
    ready = tmp / f"ready-{time.monotonic_ns()}.json"
    log = tmp / f"serve-{time.monotonic_ns()}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "twofold", "serve-analysis", "--experiments", str(experiments), "--lake", str(lake),
         "--every", "1h", "--threads", "1", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
         "--http-host", "127.0.0.1", "--http-port", "0", "--ready-file", str(ready), "--log-format", "text",
         *extra], cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"serve-analysis did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    return Served(proc, int(json.loads(ready.read_text())["http_port"]), log)


def _stop(served: Served) -> None:
    served.proc.terminate()
    try:
        served.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        served.proc.kill()
        served.proc.wait()


def _wait_computed(served: Served, names: list[str], headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + 120
    pending = list(names)
    while pending and time.monotonic() < deadline:
        pending = [n for n in pending if _get(f"{served.base}/experiments/{n}", headers)[0] != 200]
        time.sleep(0.2)
    assert not pending, f"not computed: {pending}\n{served.log.read_text()[-3000:]}"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("results-web")
    lake = tmp / "lake"
    write_synthetic_lake(lake, exposures=24_000, events=72_000, days=20, seed=5, chunk=100_000)
    experiments = tmp / "experiments"
    experiments.mkdir()
    (experiments / "multi-day.yaml").write_text(_definition("multi-day", end="2026-11-21"))
    (experiments / "one-day.yaml").write_text(_definition("one-day", start="2026-11-05", end="2026-11-06"))
    (experiments / "broken.yaml").write_text("name: broken\nflag: home-ranking\nvariants: {}\n")
    served = _serve(tmp, lake, experiments)
    try:
        _wait_computed(served, ["multi-day", "one-day"])
        yield served
    finally:
        _stop(served)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    b = Browser()
    try:
        yield b
    finally:
        b.close()


def _check_charts(browser: Browser, page: str) -> list[dict[str, Any]]:
    charts = browser.eval(CHARTS_JS)
    assert charts, f"{page}: no charts"
    for chart in charts:
        where = f"{page} / {chart['label']}"
        assert chart["marks"] > 0, f"{where}: nothing drawn"
        assert chart["overlaps"] == [], f"{where}: overlapping labels {chart['overlaps']}"
        assert chart["clipped"] == [], f"{where}: labels cut off by the frame {chart['clipped']}"
        assert len(set(chart["xticks"])) == len(chart["xticks"]), f"{where}: a label twice {chart['xticks']}"
    return charts


def test_every_chart_draws_marks_without_overlapping_or_clipped_labels(site: Served, browser: Browser) -> None:
    for name in ("multi-day", "one-day"):
        browser.resize(1200, 900)
        browser.goto(f"{site.base}/experiments/{name}")
        charts = _check_charts(browser, name)
        labels = {c["label"] for c in charts}
        assert {"cumulative relative effect by day", "daily relative effect", "units per day per variant",
                "z statistic vs sequential bounds"} <= labels, labels
        browser.screenshot(SHOTS / f"report-{name}.png")
    # The one-day experiment: its single date is on the cumulative chart once.
    one = next(c for c in charts if c["label"] == "cumulative relative effect by day")
    assert one["xticks"] == ["Nov 5"]


def test_the_index_lists_every_experiment_and_its_links_work_and_survive_a_reload(site: Served,
                                                                                   browser: Browser) -> None:
    browser.resize(1200, 900)
    browser.goto(f"{site.base}/")
    rows = browser.eval("[...document.querySelectorAll('table tr')].slice(1).map(r => r.innerText)")
    assert any(r.startswith("multi-day") and "ended" in r and "ok" in r for r in rows), rows
    assert any(r.startswith("one-day") for r in rows), rows
    assert "broken" in browser.eval("document.body.innerText")  # the refused definition is reported
    browser.screenshot(SHOTS / "index.png")
    links = browser.eval("[...document.querySelectorAll('a[href]')].map(a => a.href)")
    assert f"{site.base}/experiments/multi-day" in links and f"{site.base}/experiments/one-day/looks" in links
    for link in links:
        status, _, _ = _get(link)
        assert status == 200, link
    browser.goto(f"{site.base}/experiments/multi-day/looks")
    assert browser.eval("document.querySelector('h1').textContent") == "multi-day: looks"
    look = browser.eval("document.querySelector('table a').href")
    browser.goto(look)
    assert "Look 1 of" in browser.eval("document.body.innerText")
    browser.reload()
    assert browser.eval("location.href") == look and "Look 1 of" in browser.eval("document.body.innerText")
    browser.screenshot(SHOTS / "look.png")
    browser.goto(f"{site.base}/experiments/multi-day")
    browser.reload()
    assert browser.eval("document.querySelector('h1').textContent") == "multi-day"
    assert browser.eval("document.querySelectorAll('svg.chart').length") >= 12


def test_pages_are_readable_at_a_phones_width(site: Served, browser: Browser) -> None:
    try:
        browser.resize(390, 844, mobile=True)
        for path, shot in (("/", "phone-index.png"), ("/experiments/multi-day", "phone-report.png")):
            browser.goto(site.base + path)
            width = browser.eval("document.documentElement.scrollWidth")
            assert width <= 391, f"{path}: the page scrolls sideways ({width}px wide)"
            if path != "/":
                for chart in browser.eval("[...document.querySelectorAll('svg.chart')]"
                                          ".map(s => s.getBoundingClientRect().right)"):
                    assert chart <= 390
            browser.screenshot(SHOTS / shot)
    finally:
        browser.resize(1200, 900)


def test_the_ui_is_read_only_and_answers_unknown_pages_with_404(site: Served) -> None:
    assert _get(f"{site.base}/experiments/nope")[0] == 404
    assert _get(f"{site.base}/experiments/multi-day/looks/999")[0] == 404
    assert _get(f"{site.base}/elsewhere")[0] == 404
    request = urllib.request.Request(f"{site.base}/", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 405
    status, body, headers = _get(f"{site.base}/experiments/multi-day/results.json")
    assert status == 200 and json.loads(body)["experiment"] == "multi-day"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    # No external assets: nothing on a page points off the server.
    _, page, _ = _get(f"{site.base}/experiments/multi-day")
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page) and "<script" not in page


def test_client_secrets_are_required_in_the_authorization_header(tmp_path: Path, site: Served) -> None:
    lake = tmp_path / "lake"
    write_synthetic_lake(lake, exposures=2000, events=4000, days=2, seed=1, chunk=100_000)
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    (experiments / "x.yaml").write_text(_definition("x"))
    secrets = tmp_path / "secrets"
    secrets.write_text(f"# one per line\n{SECRET}\nanother\n")
    served = _serve(tmp_path, lake, experiments, "--client-secrets-file", str(secrets))
    try:
        bearer = {"Authorization": f"Bearer {SECRET}"}
        _wait_computed(served, ["x"], bearer)
        status, _, headers = _get(f"{served.base}/experiments/x")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
        assert _get(f"{served.base}/experiments/x?token={SECRET}")[0] == 401  # never in the URL
        assert _get(f"{served.base}/", {"Authorization": "Bearer wrong"})[0] == 401
        basic = base64.b64encode(f"anyone:{SECRET}".encode()).decode()
        assert _get(f"{served.base}/experiments/x", {"Authorization": f"Basic {basic}"})[0] == 200
        assert _get(f"{served.base}/", {"Authorization": "Bearer another"})[0] == 200
        assert _get(f"{served.base}/healthz")[0] == 200
    finally:
        _stop(served)


def test_http_port_minus_one_turns_the_ui_off(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "twofold", "serve-analysis", "--experiments", str(tmp_path), "--lake", str(tmp_path),
         "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--http-port", "-1",
         "--ready-file", str(ready)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert "http_port" not in json.loads(ready.read_text())
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.timeout(300)
def test_the_demo_serves_its_experiment_with_every_chart_and_a_country_breakdown(tmp_path: Path,
                                                                                browser: Browser) -> None:
    """`twofold demo --serve`: the printed address serves the demo's experiment until Ctrl-C."""
    folder = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "twofold", "demo", "--dir", str(folder), "--users", "3000", "--train-rows", "8000",
         "--no-progress", "--serve"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        url = None
        for line in proc.stdout:
            lines.append(line)
            found = re.search(r"this experiment: (http://127\.0\.0\.1:\d+/experiments/[\w-]+)", line)
            url = found.group(1) if found else url
            if "Serving the results until Ctrl-C" in line:
                break
        assert url, "".join(lines)[-3000:]
        # The served document is the scheduled computation over the complete lake.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _get(url)[0] != 200:
            time.sleep(0.5)
        browser.resize(1200, 900)
        browser.goto(url)
        charts = _check_charts(browser, "demo")
        assert any(c["label"] == "home-ranking: relative effect by country" or "by country" in (c["label"] or "")
                   for c in charts), [c["label"] for c in charts]
        assert "Segments" in browser.eval("document.body.innerText")
        browser.screenshot(SHOTS / "demo-report.png")
        browser.goto(url.rsplit("/experiments/", 1)[0] + "/")
        assert "home-ranking" in browser.eval("document.body.innerText")
        browser.screenshot(SHOTS / "demo-index.png")
    finally:
        proc.send_signal(2)  # Ctrl-C
        try:
            rest = proc.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            rest = proc.communicate()[0]
    output = "".join(lines) + (rest or "")
    assert proc.returncode == 0 and "RECOVERED" in output, output[-3000:]
    ready = [json.loads(p.read_text())["pid"] for p in (folder / "logs").glob("*.ready.json")]
    for pid in ready:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"


def test_with_mutual_tls_the_pages_need_a_client_certificate(tmp_path: Path) -> None:
    import ssl

    from tests.tls_certs import issue, make_ca

    ca, ca_key, ca_cert = make_ca()
    server, client = issue(ca_key, ca_cert, "server", server=True), issue(ca_key, ca_cert, "client", server=False)
    files = {}
    for name, data in (("ca.pem", ca.cert), ("server.pem", server.cert), ("server.key", server.key),
                       ("client.pem", client.cert), ("client.key", client.key)):
        files[name] = tmp_path / name
        files[name].write_bytes(data)
    served = _serve(tmp_path, tmp_path, tmp_path, "--tls-cert", str(files["server.pem"]), "--tls-key",
                    str(files["server.key"]), "--tls-client-ca", str(files["ca.pem"]))
    https = served.base.replace("http://", "https://") + "/"
    try:
        anonymous = ssl.create_default_context(cafile=str(files["ca.pem"]))
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(https, timeout=10, context=anonymous).read()
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(served.base + "/", timeout=10).read()  # no plaintext either
        with_cert = ssl.create_default_context(cafile=str(files["ca.pem"]))
        with_cert.load_cert_chain(str(files["client.pem"]), str(files["client.key"]))
        with urllib.request.urlopen(https, timeout=10, context=with_cert) as reply:
            assert reply.status == 200 and "Experiments" in reply.read().decode()
    finally:
        _stop(served)


def test_on_a_free_grpc_port_the_ui_takes_a_free_port_too(tmp_path: Path) -> None:
    """Servers started with --port 0 (tests, the demo) never collide on the fixed default 52053."""
    served = _serve_default_http(tmp_path)
    try:
        port = int(served.base.rsplit(":", 1)[1])
        assert port != 52053 and _get(f"{served.base}/healthz")[0] == 200
    finally:
        _stop(served)


def _serve_default_http(tmp: Path) -> Served:
    ready = tmp / "ready.json"
    log = tmp / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "twofold", "serve-analysis", "--experiments", str(tmp), "--lake", str(tmp),
         "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--http-host", "127.0.0.1",
         "--ready-file", str(ready)], cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if k != "TWOFOLD_HTTP_PORT"})
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.05)
    return Served(proc, int(json.loads(ready.read_text())["http_port"]), log)
