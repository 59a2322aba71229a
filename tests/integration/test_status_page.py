"""The operators' status page, in a real browser: headless Chromium (Debian's) driven by
Playwright, against a real server. The numbers on the page must be the pool's own: worker
pids that are the server's real worker processes, request counts equal to what was sent,
memory within a few percent of what psutil measures for those processes.
"""

from __future__ import annotations

import json
import os
import shutil

import psutil
import pytest

from test_serve import Server
from testkit import wait_until

pytestmark = pytest.mark.module_pool

CHROMIUM = "/usr/bin/chromium"
MIB = 1024 * 1024

if not os.path.exists(CHROMIUM):
    pytest.skip(f"no {CHROMIUM} (Debian's chromium package; .ci/run installs it)",
                allow_module_level=True)
sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as playwright:
        # launch_persistent_context gives the fresh user-data dir the probe used
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync"])
        yield context
        context.close()
    shutil.rmtree(profile, ignore_errors=True)


def test_status_page_shows_the_pools_real_numbers(browser):
    server = Server(["--workers", "2", "--api-key", "k3y"])  # the built-in demo model
    try:
        server.wait_ready()
        auth = {"Authorization": "Bearer k3y"}
        body = json.dumps({"inputs": [{"name": "features", "shape": [1, 64],
                                       "datatype": "FP32", "data": [0.5] * 64}]}).encode()
        for _ in range(6):
            assert server.post("/v2/models/demo/infer", body, auth)[0] == 200

        page = browser.new_page()
        page.goto(f"{server.url}/#key=k3y")
        page.wait_for_selector('[data-model="demo"][data-field="ready"]')
        assert page.inner_text('[data-model="demo"][data-field="ready"]') == "ready"

        children = {p.pid: p for p in psutil.Process(server.process.pid).children(
            recursive=True)}
        cells = page.query_selector_all('td[data-model="demo"][data-field="pid"]')
        shown = [int(cell.inner_text()) for cell in cells]
        assert len(shown) == 2 and all(pid in children for pid in shown)

        requests = [int(page.inner_text(f'td[data-pid="{pid}"][data-field="requests"]'))
                    for pid in shown]
        assert sum(requests) == 6  # warm-up calls run before READY and are not requests

        for pid in shown:  # PSS on the page vs psutil now: the same process, within 10 %
            page_pss = mib_of(page.inner_text(f'td[data-pid="{pid}"][data-field="pss"]'))
            real_pss = children[pid].memory_full_info().pss / MIB
            assert abs(page_pss - real_pss) <= 0.1 * real_pss + 1, (pid, page_pss, real_pss)

        status = json.loads(server.get("/status", auth)[2])["models"][0]
        assert mib_of(page.inner_text('[data-model="demo"][data-field="model_bytes"]')) == \
            pytest.approx(status["model_bytes"] / MIB, abs=0.05)
        saved = mib_of(page.inner_text('[data-model="demo"][data-field="saved_bytes"]'))
        assert saved == pytest.approx(status["model_bytes"] / MIB, abs=0.05)  # 2 workers
        assert page.inner_text('[data-model="demo"][data-field="queued"]') == "0"
        assert page.inner_text('[data-model="demo"][data-field="restarts"]') == "0"

        # the page polls: a restart shows up without a reload
        os.kill(shown[0], 9)
        assert wait_until(lambda: page.inner_text(
            '[data-model="demo"][data-field="restarts"]') == "1", 30)
        page.close()
    finally:
        assert server.stop() == 0


def test_charts_of_the_last_minutes_match_the_metrics(browser):
    """The page charts the server's samples (requests/s, p50/p99, queue depth, PSS per
    worker); their latest values are those /metrics gives for the same moment."""
    server = Server(["--workers", "2", "--history-interval", "0.3"])
    try:
        server.wait_ready()
        body = json.dumps({"inputs": [{"name": "features", "shape": [1, 64],
                                       "datatype": "FP32", "data": [0.5] * 64}]}).encode()
        for _ in range(10):
            assert server.post("/v2/models/demo/infer", body)[0] == 200

        def history():
            return json.loads(server.get("/status")[2])["history"].get("demo", [])

        assert wait_until(lambda: history() and history()[-1]["requests_total"] == 10, 30)
        assert any(s["p50_ms"] for s in history()) and any(s["rps"] > 0 for s in history())
        page = browser.new_page()
        page.goto(server.url + "/")
        charts = '.charts[data-model="demo"]'
        assert wait_until(lambda: page.query_selector(charts) is not None and
                          page.get_attribute(charts, "data-requests-total") == "10", 30)
        metrics = server.get("/metrics")[2].decode()
        answered = sum(float(line.split()[-1]) for line in metrics.splitlines()
                       if line.startswith("workerpool_requests_total{") and
                       'model="demo"' in line)
        assert answered == 10
        pss_lines = page.query_selector_all(
            f'{charts} [data-chart="pss"] polyline[data-series]')
        real = {line.split('pid="')[1].split('"')[0]: float(line.split()[-1])
                for line in metrics.splitlines()
                if line.startswith("workerpool_worker_pss_bytes{") and 'model="demo"' in line}
        assert len(pss_lines) == 2 and set(real) == {
            line.get_attribute("data-series") for line in pss_lines}
        for line in pss_lines:  # the page's latest sample and the scrape: within 10 %
            shown = float(line.get_attribute("data-last"))
            assert abs(shown - real[line.get_attribute("data-series")]) <= 0.1 * shown
        queued = page.query_selector(f'{charts} [data-chart="queued"] polyline')
        assert queued.get_attribute("data-last") == "0"
        latency = page.query_selector_all(f'{charts} [data-chart="latency"] polyline')
        assert [line.get_attribute("data-series") for line in latency] == ["p50", "p99"]
        assert all(line.get_attribute("points") for line in latency)  # drawn
        page.close()
    finally:
        assert server.stop() == 0


def test_status_page_without_the_key_says_so(browser):
    server = Server(["--workers", "1", "--api-key", "k3y"])
    try:
        server.wait_ready()
        page = browser.new_page()
        page.goto(server.url + "/")
        assert wait_until(lambda: "API key" in page.inner_text("#error"), 30)
        page.close()
    finally:
        assert server.stop() == 0


def mib_of(text: str) -> float:
    number, unit = text.split()
    assert unit == "MiB"
    return float(number)

