"""Make docs/console.png: a daemon on a scratch database runs a mixed load
for a while, then headless chromium photographs its console.

    PULSE_TEST_DSN=postgresql://postgres@127.0.0.1:5432/test \\
        python bench/console_screenshot.py docs/console.png"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from selenium import webdriver
from selenium.webdriver.common.by import By

import pulsed
from pulsed.db.migrate import migrate
from tests.pg import create_database, drop_database, unique_name, wait_until
from tests.system.daemon import Daemon, free_port

LOAD_S = 75


def main(out: str) -> None:
    import os
    admin = os.environ["PULSE_TEST_DSN"]
    name = unique_name("pulse_shot")
    dsn = create_database(admin, name)
    port = free_port()
    daemon = Daemon(Path(tempfile.mkdtemp(prefix="pulse-shot-")), dsn, node_id="web-1",
                    workers=2, config={"api": {"enabled": True, "listen": f"127.0.0.1:{port}",
                                               "tokens": ["ops:demo"]},
                                       "worker": {"handlers": ["tests.system.jobs",
                                                               "tests.system.console_jobs"]}})
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn)
            daemon.start()
            daemon.wait_ready(timeout=30)
            end = time.monotonic() + LOAD_S
            while time.monotonic() < end:
                for _ in range(random.randint(5, 40)):
                    pulsed.enqueue(conn, "work", {"s": 0.01}, queue=random.choice(["default", "mail"]))
                if random.random() < 0.3:
                    pulsed.enqueue(conn, "fail_first", {}, max_attempts=random.choice([1, 2]))
                pulsed.enqueue(conn, "noop", {}, queue="reports", delay=3600)
                time.sleep(0.5)
            time.sleep(11)  # the last bucket ends and is rolled up
            options = webdriver.ChromeOptions()
            options.binary_location = "/usr/bin/chromium"
            for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                         "--window-size=1400,1250"):
                options.add_argument(flag)
            driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(
                executable_path="/usr/bin/chromedriver"))
            try:
                driver.get(f"http://127.0.0.1:{port}/console")
                wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, 'polyline[data-series="completed"]'),
                           timeout=30)
                time.sleep(1)
                driver.save_screenshot(out)
            finally:
                driver.quit()
    finally:
        daemon.kill_all()
        drop_database(admin, name)


if __name__ == "__main__":
    main(sys.argv[1])
