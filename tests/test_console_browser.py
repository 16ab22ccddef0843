"""The console in a real browser: `medreid serve` with the console on, filled with generated
studies by C-STORE, driven in headless Chromium through Selenium. An administrator logs in,
filters the results to the mismatches, opens one, exports the audit CSV; the page views and the
export are in the audit trail; the unauthenticated are refused. On the alert worklist the
administrator, a viewer, is refused a decision; a reviewer dismisses one alert with a reason
and confirms another, each decision in the audit trail.

With MEDREID_SCREENSHOT_DIR set, the dashboard and a result page are saved there as PNG (the
documentation's pictures are made this way)."""

from __future__ import annotations

import csv
import http.client
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from storage.models import AuditEvent
from support.service import (
    RunningService,
    first_visit_gallery,
    free_port,
    generated_image_model_set,
    send_with_pynetdicom,
    service_env,
    wait_for_queue,
)
from synthetic.hospital import SynthOptions, generate
from tests.conftest import Database

# Generated hospitals are judged by the models trained on generated images.
MODELS = generated_image_model_set()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
PASSWORD = "the console's long password"
CLI = (sys.executable, "-m", "medreid.cli")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="Chromium and ChromeDriver are not installed (Debian: chromium chromium-driver)",
    ),
    pytest.mark.skipif(not (MODELS / "compa-v1").is_dir(), reason="the default models are absent"),
]


@pytest.fixture
def running(sqlite_database: Database, tmp_path: Path) -> Iterator[tuple[RunningService, int]]:
    hospital = tmp_path / "hospital"
    generate(
        SynthOptions(
            out=hospital,
            patients=6,
            visits=2,
            seed=11,
            slices=1,
            mislabel_modality=0.3,
            swap_patient=0.3,
        )
    )
    port, console_port = free_port(), free_port()
    service = RunningService(
        workdir=tmp_path,
        port=port,
        env=service_env(
            tmp_path,
            sqlite_database.url,
            port,
            MEDREID_MODELS_DIR=str(MODELS),
            MEDREID_ANALYSIS_SERIES_QUIET_S="1",
            MEDREID_CONSOLE_ENABLED="true",
            MEDREID_CONSOLE_PORT=str(console_port),
        ),
    )
    rows = list(csv.DictReader((hospital / "manifest.csv").open()))
    gallery = first_visit_gallery(hospital, rows, tmp_path / "gallery")
    assert "embeddings enrolled" in service.cli("enroll", str(gallery)).stdout
    for name, role in (("admin", "viewer"), ("qa", "reviewer")):
        added = subprocess.run(
            [*CLI, "users", "add", name, "--password-stdin", "--role", role],
            input=PASSWORD + "\n",
            cwd=tmp_path,
            env=service.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert added.returncode == 0, added.stderr
    service.start(timeout=180)
    for row in rows:
        if row["visit"] == "2":
            assert send_with_pynetdicom(hospital / row["path"], port, calling="CT_SCANNER") == 0
    wait_for_queue(sqlite_database.sessions, timeout=300)
    yield service, console_port
    service.stop()


def _status(port: int, path: str, headers: dict[str, str] | None = None) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", path, headers=headers or {})
    status = connection.getresponse().status
    connection.close()
    return status


def _wait_for_file(folder: Path, pattern: str, timeout: float = 30.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [p for p in folder.glob(pattern) if not p.name.endswith(".crdownload")]
        if done:
            return done[0]
        time.sleep(0.2)
    raise TimeoutError(f"nothing like {pattern} arrived in {folder}")


def test_an_administrator_audits_from_the_browser(
    running: tuple[RunningService, int], sqlite_database: Database, tmp_path: Path
) -> None:
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as loaded
    from selenium.webdriver.support.ui import Select, WebDriverWait

    _service, console_port = running
    base = f"http://127.0.0.1:{console_port}"
    shots = Path(os.environ.get("MEDREID_SCREENSHOT_DIR") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    downloads = tmp_path / "downloads"
    downloads.mkdir()

    # the unauthenticated get nothing
    assert _status(console_port, "/results?verdict=mismatch") == 303
    assert _status(console_port, "/api/v1/results") == 401
    assert _status(console_port, "/api/v1/audit.csv") == 401

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1360,1000",
        "--disable-gpu",
    ):
        options.add_argument(argument)
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)

    def shows(element_id: str, text: str) -> Callable[[webdriver.Chrome], bool]:
        """The element of the page a click loads shows the text. An element read while the
        old page is being replaced is read again: Chrome then answers an inspector error,
        not a stale element."""

        def check(browser: webdriver.Chrome) -> bool:
            try:
                return text in browser.find_element(By.ID, element_id).text
            except WebDriverException:
                return False

        return check

    driver.implicitly_wait(5)
    wait = WebDriverWait(driver, 20)
    try:
        driver.execute_cdp_cmd(
            "Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
        )
        # log in: the console sends the browser to the login page and back where it was going
        driver.get(base + "/")
        assert "/login" in driver.current_url
        driver.find_element(By.ID, "username").send_keys("admin")
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        driver.find_element(By.ID, "login-button").click()
        wait.until(loaded.title_contains("Dashboard"))
        assert driver.find_element(By.TAG_NAME, "h1").text == "Dashboard"
        received = int(driver.find_element(By.ID, "received-today").text)
        assert received >= 6
        driver.save_screenshot(str(shots / "console-dashboard.png"))

        # the results, filtered to the mismatches
        driver.find_element(By.LINK_TEXT, "Results").click()
        wait.until(loaded.title_contains("Results"))
        Select(driver.find_element(By.ID, "verdict")).select_by_value("mismatch")
        driver.find_element(By.ID, "apply-filters").click()
        wait.until(loaded.url_contains("verdict=mismatch"))
        rows = driver.find_elements(By.CSS_SELECTOR, "table#results tbody tr")
        assert rows and all("mismatch" in (row.get_attribute("class") or "") for row in rows)
        assert driver.find_element(By.ID, "result-count").text.startswith(f"{len(rows)} result")

        # one of them, with its image
        rows[0].find_element(By.CSS_SELECTOR, "a.open").click()
        wait.until(loaded.url_matches(r"/results/\d+$"))
        heading = driver.find_element(By.TAG_NAME, "h1").text
        assert "mismatch" in heading
        width = driver.execute_script("return document.getElementById('thumbnail').naturalWidth")
        assert width > 0
        result_id = int(driver.current_url.rsplit("/", 1)[1])
        driver.set_window_size(1360, 1700)  # the whole result page in one picture
        driver.save_screenshot(str(shots / "console-result.png"))
        driver.set_window_size(1360, 1000)

        # the audit trail, exported
        driver.find_element(By.LINK_TEXT, "Audit trail").click()
        wait.until(loaded.title_contains("Audit trail"))
        assert driver.find_elements(By.CSS_SELECTOR, "table#audit tbody tr")
        driver.find_element(By.ID, "export-csv").click()
        exported = _wait_for_file(downloads, "medreid-audit-*.csv")
        events = list(csv.DictReader(exported.open(encoding="utf-8")))

        # the worklist: a viewer looks, and is refused a decision
        driver.find_element(By.LINK_TEXT, "Alerts").click()
        wait.until(loaded.title_contains("Alerts"))
        open_before = int(driver.find_element(By.ID, "count-open").text)
        assert open_before >= 2  # the swaps and wrong tags of the generated visits
        links = driver.find_elements(By.CSS_SELECTOR, "table#alerts tbody tr td:first-child a")
        alert_ids = [int(link.text) for link in links]
        links[0].click()
        wait.until(loaded.url_matches(r"/alerts/\d+$"))
        assert driver.find_elements(By.ID, "viewer-note") and not driver.find_elements(
            By.ID, "review"
        )
        token = driver.find_element(By.CSS_SELECTOR, "form.logout input[name=csrf_token]")
        driver.execute_script(
            "const f = document.createElement('form'); f.method = 'post';"
            "f.action = arguments[0];"
            "for (const [k, v] of Object.entries(arguments[1])) {"
            "  const i = document.createElement('input'); i.type = 'hidden'; i.name = k;"
            "  i.value = v; f.appendChild(i); }"
            "document.body.appendChild(f); f.submit();",
            f"/alerts/{alert_ids[0]}/review",
            {"csrf_token": token.get_attribute("value"), "decision": "confirmed", "reason": ""},
        )
        wait.until(loaded.title_contains("Forbidden"))
        assert "reviewers decide alerts" in driver.find_element(By.TAG_NAME, "main").text

        # a reviewer dismisses one with a reason and confirms another
        driver.get(base + "/")
        driver.find_element(By.CSS_SELECTOR, "form.logout button").click()
        wait.until(loaded.url_contains("/login"))
        driver.find_element(By.ID, "username").send_keys("qa")
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        driver.find_element(By.ID, "login-button").click()
        wait.until(loaded.title_contains("Dashboard"))
        driver.get(f"{base}/alerts/{alert_ids[0]}")
        driver.find_element(By.ID, "reason").send_keys("the header is right: a known look-alike")
        driver.find_element(By.ID, "dismiss").click()
        wait.until(shows("alert-state", "dismissed by qa"))
        driver.get(f"{base}/alerts/{alert_ids[1]}")
        driver.find_element(By.ID, "confirm").click()
        wait.until(shows("alert-state", "confirmed by qa"))
        driver.get(base + "/alerts")
        assert int(driver.find_element(By.ID, "count-open").text) == open_before - 2
        driver.save_screenshot(str(shots / "console-alerts.png"))
    finally:
        driver.quit()

    by_admin = [e for e in events if e["actor_user"] == "admin"]
    assert {e["event_type"] for e in by_admin} >= {"Login", "Result Viewed"}
    assert any(e["event"] == "Query" and "mismatch" in e["detail"] for e in by_admin)

    with sqlite_database.sessions.begin() as session:
        trail = [
            (e.event, e.event_type, e.detail)
            for e in session.scalars(
                select(AuditEvent).where(AuditEvent.actor_user == "admin").order_by(AuditEvent.id)
            )
        ]
    pages = [detail.get("page") for _, _, detail in trail]
    assert trail[0][:2] == ("User Authentication", "Login")  # the login comes first
    assert {"dashboard", "results", "result", "audit"} <= set(pages)
    viewed = [d for _, kind, d in trail if kind == "Result Viewed"]
    assert [d["result_id"] for d in viewed] == [result_id]
    exports = [d for event, _, d in trail if event == "Audit Log Used" and d.get("export")]
    assert len(exports) == 1 and exports[0]["export"] == "csv"
    assert exports[0]["rows"] == len(events)
    with sqlite_database.sessions.begin() as session:
        decisions = [
            (e.actor_user, e.detail["alert_id"], e.detail["decision"], e.detail["interface"])
            for e in session.scalars(
                select(AuditEvent)
                .where(AuditEvent.event_type == "Alert Reviewed")
                .order_by(AuditEvent.id)
            )
        ]
    assert decisions == [
        ("qa", alert_ids[0], "dismissed", "console"),
        ("qa", alert_ids[1], "confirmed", "console"),
    ]
