"""The Routing page as a person uses it: ``make demo DEMO_ARGS=--serve`` in a real headless browser.

One demo run for the module: ``python -m devtools.demo --serve``, as ``make demo`` runs it, routes the demo's
DAGs and keeps its Airflow up. Debian's chromium, driven through its own chromedriver (``make browser`` installs
both), opens Airflow's UI, follows its "Routing" entry and reads the page: every executor's live figures, the
decisions (compared with the routes the demo declares, ``devtools/demo/expected.py``), the fallbacks, the charts,
the task search and a task instance's routing story. It also opens the simulation report the demo wrote
(``simulate --from-db --compare --html``) from its file. Ctrl-C then stops every process of the demo.

A screenshot of the page goes to the test's temporary folder, and to ``docs/routing-page.png`` with
``HYBRID_ROUTER_SCREENSHOT=1``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from demo_processes import processes_using
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from devtools.demo.expected import BURST_TASK, EXPECTED, FUNCTION_MEMORY_MB, MAIN_DAG, MEMORY_DAG, Expected
from devtools.demo.run import MEMORY_TASK, SLOW_TASK
from hybrid_router.router.ui.plugin import RoutingPlugin

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
DEMO_TIMEOUT_S = (
    360  # the demo's runs and report, before it serves (about 2 minutes on an idle 2-core machine)
)
STOP_TIMEOUT_S = 60
PAGE_TIMEOUT_S = 30
WIDTH = 1400  # the screenshot's width, in CSS pixels
SCREENSHOT = REPO / "docs" / "routing-page.png"
# The page's live figures are published on each scheduler heartbeat (about a second): older means not live.
LIVE_WITHIN_S = 30
NAV_VIEW, TASK_VIEW = (
    next(view for view in RoutingPlugin.external_views if view["destination"] == destination)
    for destination in ("nav", "task_instance")
)


# -- the demo, served --------------------------------------------------------------------------------------------


@dataclass
class ServedDemo:
    """``python -m devtools.demo --serve`` running, and its output so far (read by a thread)."""

    proc: subprocess.Popen[str]
    home: Path
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, prefix: str, timeout: float) -> str:
        """The rest of the first output line that starts with ``prefix``; fails if the demo ends first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if line.startswith(prefix):
                    return line[len(prefix) :].strip()
            if self.proc.poll() is not None and not self.reader.is_alive():
                pytest.fail(
                    f"the demo ended ({self.proc.returncode}) before it served:\n{self.output[-6000:]}"
                )
            time.sleep(0.5)
        pytest.fail(f"no {prefix!r} line after {timeout:.0f}s:\n{self.output[-6000:]}")

    def interrupt(self) -> int:
        """Ctrl-C, as in the terminal running ``make demo``; the demo's exit code (killed if it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.reader.join(timeout=10)
        return self.proc.returncode


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedDemo]:
    output = tmp_path_factory.mktemp("routing-page") / "demo-output"
    proc = subprocess.Popen(
        [sys.executable, "-m", "devtools.demo", "--serve", "--output", str(output)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own group: the SIGKILL of last resort reaches nothing else
    )
    served = ServedDemo(proc, output / "airflow-home")
    try:
        yield served
    finally:
        served.interrupt()


@pytest.fixture(scope="module")
def urls(demo: ServedDemo) -> dict[str, str]:
    """The URLs the demo prints once its runs are done: its Routing page's and Airflow UI's."""
    page = demo.wait_for_line("Routing page: ", DEMO_TIMEOUT_S)
    airflow = demo.wait_for_line("Airflow UI: ", 10).split()[0].rstrip("/")
    assert "Every task went where the policy says" in demo.output, demo.output[-6000:]
    return {"page": page, "airflow": airflow}


# -- the browser -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.fail(
            "The Routing page's test drives Debian's chromium and chromedriver: run `make browser` "
            "(`make test` does)",
            pytrace=False,
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # --no-sandbox: chromium's sandbox refuses root (CI) and needs user namespaces most containers lack.
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        f"--window-size={WIDTH},1000",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The driver's path given: Selenium Manager, which would download a browser and a driver, never runs.
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: WebDriver, condition, what: str, timeout: float = PAGE_TIMEOUT_S):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)
    except TimeoutException:
        pytest.fail(f"after {timeout:.0f}s, still not {what} (at {driver.current_url})", pytrace=False)


def _first(selector: str):
    """A wait condition: the first element ``selector`` finds, once there is one."""
    return lambda driver: next(iter(driver.find_elements(By.CSS_SELECTOR, selector)), None)


def _wait_ready(driver: WebDriver) -> None:
    """The page's own signal that every panel loaded: ``body[data-state]`` leaves ``loading``."""
    _wait(
        driver,
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("ready", "error"),
        "ready",
    )
    if driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") != "ready":
        pytest.fail(f"the page shows an error: {driver.find_element(By.ID, 'error').text!r}", pytrace=False)


def _open(driver: WebDriver, url: str) -> None:
    driver.get(url)
    _wait_ready(driver)


def _screenshot(driver: WebDriver, path: Path) -> None:
    """The whole page, ``WIDTH`` pixels wide, as PNG."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    metrics = {"width": WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    try:
        png = driver.get_screenshot_as_png()
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert struct.unpack(">II", png[16:24]) == (WIDTH, height)  # the PNG header's width and height
    path.write_bytes(png)


@pytest.fixture(scope="module")
def page(browser: WebDriver, urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> WebDriver:
    """The Routing page, loaded and photographed."""
    browser.get_log("browser")  # what the browser logged so far is not the page's
    _open(browser, urls["page"])
    shot = tmp_path_factory.mktemp("screenshot") / "routing-page.png"
    _screenshot(browser, shot)
    print(f"screenshot: {shot}")
    if os.environ.get("HYBRID_ROUTER_SCREENSHOT") == "1":
        shutil.copyfile(shot, SCREENSHOT)
    return browser


def _cells(driver: WebDriver, selector: str, cell: str) -> list[str]:
    return [
        row.find_element(By.CSS_SELECTOR, cell).text
        for row in driver.find_elements(By.CSS_SELECTOR, selector)
    ]


def _expected_for(dag_id: str, task_id: str) -> list[Expected]:
    return [e for e in EXPECTED if (e.dag_id, e.task_id) == (dag_id, task_id)]


# -- what a person sees ------------------------------------------------------------------------------------------


def test_airflow_navigation_leads_to_the_routing_page(browser: WebDriver, urls: dict[str, str]):
    browser.get(urls["airflow"] + "/")
    entry = _wait(
        browser,
        _first(f"a[aria-label='{NAV_VIEW['name']}']"),
        "showing the Routing entry in Airflow's navigation",
    )
    assert urlsplit(entry.get_attribute("href")).path == f"/plugin/{NAV_VIEW['url_route']}"
    entry.click()
    frame = _wait(
        browser,
        _first(f"iframe[title='{NAV_VIEW['name']}']"),
        "showing the page inside Airflow's UI",
    )
    assert urlsplit(frame.get_attribute("src")).path == NAV_VIEW["href"]
    browser.switch_to.frame(frame)
    try:
        _wait_ready(browser)
        assert browser.find_elements(By.CSS_SELECTOR, "#decisions-table tbody tr.decision")
    finally:
        browser.switch_to.default_content()


def test_the_page_loads_without_errors(page: WebDriver):
    assert page.title.startswith("Routing")
    assert page.find_element(By.ID, "error").get_attribute("hidden") is not None
    # Uncaught errors and failed requests of the page itself (the browser's own favicon request aside).
    problems = [
        entry["message"]
        for entry in page.get_log("browser")
        if entry["level"] == "SEVERE" and "favicon.ico" not in entry["message"]
    ]
    assert problems == []


def test_live_table_shows_each_executor_of_the_demo_policy_just_published(page: WebDriver):
    from hybrid_router.router.policy import load_policy

    policy = load_policy(REPO / "examples" / "policy.yaml")  # the demo's
    rows = page.find_elements(By.CSS_SELECTOR, "#live-table tbody tr.live-row")
    assert sorted(row.get_attribute("data-executor") for row in rows) == sorted(policy.executors)
    assert len({row.get_attribute("data-scheduler") for row in rows}) == 1  # the demo runs one scheduler
    for row in rows:
        assert "stale" not in row.get_attribute("class").split()
        published = row.find_element(By.CSS_SELECTOR, ".published")
        assert re.fullmatch(r"\d+ s ago", published.text), published.text
        # The page refreshes the live figures every few seconds: the time it shows is now's.
        at = datetime.strptime(published.get_attribute("title"), "%Y-%m-%d %H:%M:%S UTC")
        age = datetime.now(timezone.utc) - at.replace(tzinfo=timezone.utc)
        assert age.total_seconds() < LIVE_WITHIN_S, published.get_attribute("title")
        for cell in (".in-flight", ".capacity", ".waiting"):
            assert row.find_element(By.CSS_SELECTOR, cell).text != ""


def test_decisions_list_each_demo_task_on_the_executor_the_demo_expects(page: WebDriver):
    executors: dict[tuple[str, str], set[str]] = defaultdict(set)
    for row in page.find_elements(By.CSS_SELECTOR, "#decisions-table tbody tr.decision"):
        key = (row.get_attribute("data-dag-id"), row.get_attribute("data-task-id"))
        executors[key].add(row.find_element(By.CSS_SELECTOR, ".executor").text)
        # The rule the demo declares for that task, and why it matched.
        assert row.find_element(By.CSS_SELECTOR, ".rule").text in {e.rule for e in _expected_for(*key)}, key
        assert row.find_element(By.CSS_SELECTOR, ".reasons").text.strip(), key
    # Each run's decision sends the task to the first stop of a route the demo expects for it.
    expected: dict[tuple[str, str], set[str]] = defaultdict(set)
    for e in EXPECTED:
        expected[(e.dag_id, e.task_id)].update(path[0] for path in e.paths)
    assert dict(executors) == dict(expected)


def test_fallbacks_show_the_demo_fallbacks_with_their_reasons_and_the_burst_overflow(page: WebDriver):
    rows = [
        (
            row.get_attribute("data-dag-id"),
            row.get_attribute("data-task-id"),
            row.find_element(By.CSS_SELECTOR, ".kind").text,
            row.find_element(By.CSS_SELECTOR, ".reason").text,
        )
        for row in page.find_elements(By.CSS_SELECTOR, "#fallbacks-table tbody tr.fallback")
    ]
    fallbacks = sorted((dag, task, reason) for dag, task, kind, reason in rows if kind == "fallback")
    declared = sorted((e.dag_id, e.task_id, e.fallback_reason) for e in EXPECTED if e.fallback_reason)
    assert fallbacks == declared
    overflows = {(dag, task) for dag, task, kind, _ in rows if kind == "overflow"}
    assert overflows == {(MAIN_DAG, BURST_TASK)}  # the burst outgrows Lambda's slots; nothing else overflows
    assert {kind for *_, kind, _ in rows} == {"fallback", "overflow"}  # no try ran out of fallbacks


def test_charts_draw_rule_hits_and_fallback_reasons(page: WebDriver):
    hits = page.find_elements(By.CSS_SELECTOR, "#chart-rule-hits svg rect.bar")
    assert hits and all(bar.size["height"] > 0 and bar.size["width"] > 0 for bar in hits)
    # Each bar's tooltip says "rule: hits at time": the hits add up to the decisions listed, rule by rule.
    drawn: Counter[str] = Counter()
    for bar in hits:
        title = bar.find_element(By.TAG_NAME, "title").get_attribute("textContent")
        rule, count = re.fullmatch(r"(.+): (\d+) at .+", title).groups()
        drawn[rule] += int(count)
    assert drawn == Counter(_cells(page, "#decisions-table tbody tr.decision", ".rule"))
    legend = [item.text for item in page.find_elements(By.CSS_SELECTOR, "#chart-rule-hits .legend li")]
    assert sorted(legend) == sorted({e.rule for e in EXPECTED})

    reasons = page.find_elements(By.CSS_SELECTOR, "#chart-fallback-reasons svg rect.bar")
    assert reasons and all(bar.size["width"] > 0 for bar in reasons)
    labels = {
        text.get_attribute("textContent")
        for text in page.find_elements(By.CSS_SELECTOR, "#chart-fallback-reasons svg text")
    }
    declared = {e.fallback_reason for e in EXPECTED if e.fallback_reason}
    assert len(reasons) == len(declared) and declared <= labels


def test_learned_needs_show_the_memory_hogs_death_and_the_need_it_taught(page: WebDriver):
    (row,) = page.find_elements(
        By.CSS_SELECTOR,
        f"#learned-table tbody tr.learned[data-dag-id='{MEMORY_DAG}'][data-task-id='{MEMORY_TASK}']",
    )
    routes = [path for e in _expected_for(MEMORY_DAG, MEMORY_TASK) for path in e.paths]
    died_on = next(path[0] for path in routes if len(path) > 1)  # the run that fell back: out of memory there
    assert f"on {died_on} ({FUNCTION_MEMORY_MB} MB)" in row.text
    need = row.find_element(By.CSS_SELECTOR, ".memory-need").text
    assert re.fullmatch(r"[\d,]+ MB", need) and int(need[:-3].replace(",", "")) > FUNCTION_MEMORY_MB, need
    # The column headed "Runs": one run per executor it ran on.
    headings = [th.text for th in page.find_elements(By.CSS_SELECTOR, "#learned-table thead th")]
    runs = row.find_elements(By.TAG_NAME, "td")[headings.index("Runs")].text
    assert runs == str(sum(len(path) for path in routes))


def test_typing_a_task_id_narrows_decisions_and_fallbacks_to_that_task(page: WebDriver):
    search = page.find_element(By.CSS_SELECTOR, "input#filter-task")
    search.send_keys(SLOW_TASK)

    def narrowed(driver: WebDriver) -> bool:
        tasks = [
            row.get_attribute("data-task-id")
            for row in driver.find_elements(
                By.CSS_SELECTOR, "#decisions-table tr.decision, #fallbacks-table tr.fallback"
            )
        ]
        # Typing may start more than one search; read the tables once the last one is drawn.
        settled = driver.find_element(By.TAG_NAME, "body").get_attribute("data-searching") == "false"
        return settled and bool(tasks) and set(tasks) == {SLOW_TASK}

    _wait(page, narrowed, f"narrowed to {SLOW_TASK}")
    (slow,) = _expected_for(MAIN_DAG, SLOW_TASK)
    assert _cells(page, "#decisions-table tbody tr.decision", ".executor") == [slow.paths[0][0]]
    assert _cells(page, "#fallbacks-table tbody tr.fallback", ".reason") == [slow.fallback_reason]


def _story(driver: WebDriver) -> list[tuple[str, str]]:
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#task-story li.story-event"), "telling a story")
    assert driver.find_element(By.ID, "task-story").is_displayed()
    return [
        (item.get_attribute("data-kind"), item.text)
        for item in driver.find_elements(By.CSS_SELECTOR, "#task-story li.story-event")
    ]


def _check_slow_task_story(story: list[tuple[str, str]]) -> None:
    """The slow task's story: routed to Lambda, timed out there, the same try on Local."""
    (slow,) = _expected_for(MAIN_DAG, SLOW_TASK)
    (path,) = slow.paths
    kinds = [kind for kind, _ in story]
    assert kinds[0] == "decision" and kinds.count("fallback") == 1, story
    decision, fallback = story[0][1], story[kinds.index("fallback")][1]
    assert f"routed to {path[0]} by rule '{slow.rule}'" in decision
    assert f"from {path[0]} ({slow.fallback_reason}" in fallback and f"runs again on {path[1]}" in fallback


def test_a_decisions_task_link_opens_that_task_instances_routing_story(page: WebDriver, urls: dict[str, str]):
    _open(page, urls["page"])
    link = page.find_element(
        By.CSS_SELECTOR, f"#decisions-table tr.decision[data-task-id='{SLOW_TASK}'] a[href*='run_id=']"
    )
    link.click()
    _wait_ready(page)
    query = parse_qs(urlsplit(page.current_url).query)
    assert query["task_id"] == [SLOW_TASK] and query["run_id"]
    heading = page.find_element(By.CSS_SELECTOR, "#task-story h2").text
    assert f"{MAIN_DAG}.{SLOW_TASK}" in heading and query["run_id"][0] in heading
    _check_slow_task_story(_story(page))


def test_airflow_task_instance_view_shows_its_routing_story(browser: WebDriver, urls: dict[str, str]):
    _open(browser, urls["page"])
    link = browser.find_element(
        By.CSS_SELECTOR, f"#decisions-table tr.decision[data-task-id='{SLOW_TASK}'] a[href*='run_id=']"
    )
    (run_id,) = parse_qs(urlsplit(link.get_attribute("href")).query)["run_id"]
    browser.get(f"{urls['airflow']}/dags/{MAIN_DAG}/runs/{quote(run_id, safe='')}/tasks/{SLOW_TASK}")
    tab = _wait(
        browser,
        _first(f"a[title='{TASK_VIEW['name']}']"),
        "showing the task instance's Routing tab",
    )
    tab.click()
    frame = _wait(
        browser,
        _first(f"iframe[title='{TASK_VIEW['name']}']"),
        "showing the routing story inside Airflow's UI",
    )
    browser.switch_to.frame(frame)
    try:
        _wait_ready(browser)
        _check_slow_task_story(_story(browser))
    finally:
        browser.switch_to.default_content()


# -- the simulation report the demo wrote -------------------------------------------------------------------------


# Each drawn segment of a chart: its value and its width as the browser laid it out (CSS pixels, unrounded).
SEGMENTS_JS = """
return Array.from(document.querySelectorAll('svg.chart')).map(chart => ({
    metric: chart.dataset.metric,
    width: chart.getBoundingClientRect().width,
    height: chart.getBoundingClientRect().height,
    segments: Array.from(chart.querySelectorAll('rect[data-value]')).map(rect => ({
        value: parseFloat(rect.dataset.value), width: rect.getBoundingClientRect().width})),
}));
"""


def test_the_simulation_report_renders_offline_with_charts_drawn_to_scale(
    browser: WebDriver, urls: dict[str, str], demo: ServedDemo, tmp_path_factory: pytest.TempPathFactory
):
    """``simulate --from-db --compare --html``, as the demo ran it on its history, opened from the file."""
    report = demo.home.parent / "simulate.html"
    browser.get_log("browser")  # what the browser logged so far is not the report's
    browser.get(report.as_uri())
    charts = {chart["metric"]: chart for chart in browser.execute_script(SEGMENTS_JS)}
    assert set(charts) == {"cost_usd", "task_hours", "start_latency_s", "fallbacks"}
    for metric, chart in charts.items():
        assert chart["width"] > 0 and chart["height"] > 0, metric
        drawn = [s for s in chart["segments"] if s["value"] > 0]
        # too_slow timed out on lambda: the demo's policy expects a fallback there (each chart has bars)
        assert drawn, metric
        # Drawn to scale: every segment's width over its value is the chart's one scale (sub-pixel ones aside).
        scales = [s["width"] / s["value"] for s in drawn if s["width"] >= 4]
        assert scales and max(scales) <= min(scales) * 1.02, (metric, chart["segments"])
    # Offline: the document fetched nothing (no script, style sheet, font or image), and logged no error.
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    assert [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"] == []
    summary = browser.find_element(By.CSS_SELECTOR, "table.summary").text
    assert "examples/policy.yaml" in summary and "policy-one-size.yaml" in summary
    _screenshot(browser, tmp_path_factory.mktemp("simulation") / "simulate.png")


def test_ctrl_c_stops_the_demo_and_every_process_it_started(demo: ServedDemo, urls: dict[str, str]):
    code = demo.interrupt()
    assert code == 0, demo.output[-3000:]  # the demo's own verdict: every task went where it should
    assert "stopping every process the demo started" in demo.output
    assert processes_using(demo.home) == []
