"""The operator's console in a real browser (issue 19): Debian's chromium
driven by Selenium against a real daemon running jobs. One database, one
daemon and one browser for the whole module, to keep it fast."""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import pulsed
from tests.pg import create_database, drop_database, unique_name, wait_until
from tests.system.daemon import Daemon, free_port

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the dev extra) is missing")
from selenium.common.exceptions import (NoAlertPresentException,  # noqa: E402
                                        NoSuchElementException, StaleElementReferenceException)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                 reason="needs chromium and chromium-driver (apt)")]
TOKEN = "console-test-secret"
WAIT_S = 30.0


@pytest.fixture(scope="module")
def db(admin_dsn: str, template_db: str) -> Iterator[str]:
    name = unique_name("pulse_console")
    yield create_database(admin_dsn, name, template=template_db)
    drop_database(admin_dsn, name)


@pytest.fixture(scope="module")
def daemon(db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    port = free_port()
    running = Daemon(tmp_path_factory.mktemp("console"), db, node_id="node-console", workers=1,
                     config={"api": {"enabled": True, "listen": f"127.0.0.1:{port}",
                                     "tokens": [f"ops:{TOKEN}"]},
                             "worker": {"handlers": ["tests.system.jobs",
                                                     "tests.system.console_jobs"]}})
    running.url = f"http://127.0.0.1:{port}"
    running.start()
    try:
        running.wait_ready(workers=1, timeout=30)
        yield running
    finally:
        running.kill_all()


@pytest.fixture(scope="module")
def conn(db: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db, autocommit=True) as connection:
        yield connection


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1400,1100", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options,
                              service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def state_of(conn: psycopg.Connection, job_id: int) -> str | None:
    row = conn.execute("SELECT state::text FROM pulse_jobs WHERE id = %s", (job_id,)).fetchone()
    return row[0] if row else None


def open_console(browser: Any, daemon: Daemon, query: str = "") -> None:
    browser.get(f"{daemon.url}/console{query}")
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#jobs tbody"), timeout=WAIT_S,
               message="the job table never showed")


def use_token(browser: Any, token: str) -> None:
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()
    wait_until(lambda: browser.find_element(By.ID, "who").text == "acting as ops",
               timeout=WAIT_S, message="the token was never accepted")


def accept_confirm(browser: Any) -> str:
    def alert() -> Any:
        try:
            return browser.switch_to.alert
        except NoAlertPresentException:
            return None
    box = wait_until(alert, timeout=WAIT_S, message="no confirmation was asked")
    text = box.text
    box.accept()
    return text


def table_ids(browser: Any) -> list[int]:
    # Read in one script: the page re-renders the table as it refreshes.
    return browser.execute_script(
        "return [...document.querySelectorAll('#jobs tbody tr')].map(r => +r.dataset.id)")


def click(browser: Any, selector: str) -> None:
    """Click what `selector` finds, again if a re-render replaced it meanwhile."""
    def clicked() -> bool:
        try:
            browser.find_element(By.CSS_SELECTOR, selector).click()
            return True
        except (StaleElementReferenceException, NoSuchElementException):
            return False
    wait_until(clicked, timeout=WAIT_S, message=f"could not click {selector}")


def test_the_page_shows_the_cluster_and_draws_the_charts(browser, daemon, conn, tmp_path):
    ids = [pulsed.enqueue(conn, "work", {}) for _ in range(30)]
    wait_until(lambda: all(state_of(conn, i) == "completed" for i in ids), timeout=WAIT_S,
               message=f"the jobs never ran; log:\n{daemon.log_tail()}")
    # The leader's rollup writes a bucket once it has ended (10 s).
    wait_until(lambda: conn.execute("SELECT sum(completed) FROM pulse_stats WHERE queue = '*'"
                                    ).fetchone()[0], timeout=WAIT_S,
               message=f"the rollup never wrote; log:\n{daemon.log_tail()}")
    open_console(browser, daemon)
    wait_until(lambda: "node-console (leader)" in browser.find_element(By.ID, "cluster").text,
               timeout=WAIT_S, message="the cluster view never showed the leader")

    def completed_series() -> Any:
        lines = browser.find_elements(By.CSS_SELECTOR, 'polyline[data-series="completed"]')
        return lines and lines[0].get_attribute("points").strip()
    with urllib.request.urlopen(f"{daemon.url}/console/cluster.json", timeout=10) as reply:
        (node,) = json.load(reply)["nodes"]
    worker = next(p for p in node["processes"] if p["role"] == "worker")
    assert node["leader"] and node["alive"]
    assert worker["rss_mb"] > 0 and worker["restarts"] == 0 and worker["running"] == 0
    points = wait_until(completed_series, timeout=WAIT_S, message="no throughput series drawn")
    assert len(points.split()) >= 1
    heading = browser.find_element(By.CSS_SELECTOR, "#charts .chart .now").text
    assert heading.startswith("completed ") and "no data" not in heading
    assert browser.find_elements(By.CSS_SELECTOR, 'polyline[data-series="p50"]')
    shot = os.environ.get("PULSE_CONSOLE_SCREENSHOT")  # docs/console.png is made this way
    browser.save_screenshot(shot or str(tmp_path / "console.png"))


def test_a_filter_narrows_the_list(browser, daemon, conn):
    failed = pulsed.enqueue(conn, "fail_first", {}, max_attempts=1)
    wait_until(lambda: state_of(conn, failed) == "failed", timeout=WAIT_S,
               message="the job never failed")
    open_console(browser, daemon)
    assert len(table_ids(browser)) > 1
    Select(browser.find_element(By.NAME, "state")).select_by_value("failed")
    browser.find_element(By.NAME, "type").send_keys("fail_first")
    browser.find_element(By.CSS_SELECTOR, "#filters button[type=submit]").click()
    wait_until(lambda: failed in table_ids(browser) and len(table_ids(browser)) == 1,
               timeout=WAIT_S, message=f"the list was not narrowed: {table_ids(browser)}")
    assert browser.find_element(By.ID, "job-count").text.startswith("1 ")


def test_retry_of_a_failed_job_from_the_page_runs_it_again(browser, daemon, conn):
    failed = pulsed.enqueue(conn, "fail_first", {"n": "retry"}, max_attempts=1)
    wait_until(lambda: state_of(conn, failed) == "failed", timeout=WAIT_S,
               message="the job never failed")
    open_console(browser, daemon, "?state=failed")
    use_token(browser, TOKEN)
    wait_until(lambda: failed in table_ids(browser), timeout=WAIT_S, message="job not listed")
    click(browser, f'#jobs tr[data-id="{failed}"] a')
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, '[data-job-action="retry"]'),
               timeout=WAIT_S, message="the job page never opened")
    assert "first attempt fails on purpose" in browser.find_element(By.ID, "job-detail").text
    click(browser, '[data-job-action="retry"]')
    assert "retry 1 job" in accept_confirm(browser)
    wait_until(lambda: state_of(conn, failed) == "completed", timeout=WAIT_S,
               message=f"the retried job never completed: {state_of(conn, failed)}")


def test_a_bulk_cancel_by_filter_cancels_exactly_the_matching_jobs(browser, daemon, conn):
    matching = [pulsed.enqueue(conn, "noop", {}, queue="console-later", delay=3600)
                for _ in range(5)]
    other_queue = [pulsed.enqueue(conn, "noop", {}, queue="console-other", delay=3600)
                   for _ in range(3)]
    other_type = [pulsed.enqueue(conn, "work", {}, queue="console-later", delay=3600)
                  for _ in range(2)]
    open_console(browser, daemon)
    use_token(browser, TOKEN)
    browser.find_element(By.NAME, "queue").send_keys("console-later")
    browser.find_element(By.NAME, "type").send_keys("noop")
    browser.find_element(By.CSS_SELECTOR, "#filters button[type=submit]").click()
    wait_until(lambda: sorted(table_ids(browser)) == sorted(matching), timeout=WAIT_S,
               message="the filter did not show the matching jobs")
    click(browser, '#bulk [data-bulk="cancel"]')
    assert accept_confirm(browser).startswith("cancel 5 matching jobs")
    wait_until(lambda: "cancel: 5 of 5 jobs (by ops)" in browser.find_element(By.ID, "message").text,
               timeout=WAIT_S, message="no result shown")
    assert {state_of(conn, i) for i in matching} == {"cancelled"}
    assert {state_of(conn, i) for i in other_queue + other_type} == {"scheduled"}


def test_without_a_token_the_page_has_no_working_action(browser, daemon, conn):
    job = pulsed.enqueue(conn, "noop", {}, queue="console-untouched", delay=3600)
    open_console(browser, daemon)
    browser.find_element(By.ID, "forget").click()
    wait_until(lambda: browser.find_element(By.ID, "who").text == "read-only: no token",
               timeout=WAIT_S, message="the token was not forgotten")
    buttons = browser.find_elements(By.CSS_SELECTOR, "button.act")
    assert buttons and all(not b.is_enabled() for b in buttons)
    # And the API itself refuses the action: the page cannot do it any other way.
    status = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch('/jobs/bulk/cancel', {method: 'POST', headers: {'Content-Type': 'application/json'},
              body: JSON.stringify({queue: 'console-untouched'})}).then(r => done(r.status));""")
    assert status == 401
    assert state_of(conn, job) == "scheduled"


def test_this_node_is_drained_and_resumed_from_the_console(daemon):
    def post(path: str, token: str | None) -> tuple[int, dict]:
        request = urllib.request.Request(f"{daemon.url}{path}", method="POST", data=b"")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                return reply.status, json.load(reply)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)
    assert post("/nodes/node-console/drain", None)[0] == 401
    assert post("/nodes/node-other/drain", TOKEN)[0] == 404  # not in the registry
    status, body = post("/nodes/node-console/drain", TOKEN)
    assert status == 200 and body["by"] == "ops"
    wait_until(lambda: daemon.status()["master"]["state"] in ("draining", "drained"),
               timeout=WAIT_S, message="the node never drained")
    assert post("/nodes/node-console/resume", TOKEN)[0] == 200
    wait_until(lambda: daemon.status()["master"]["state"] == "running", timeout=WAIT_S,
               message="the node never resumed")
