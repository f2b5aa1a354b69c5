"""The web pages, against a running `pneumoscreen api` over a database that a real pipeline filled
(dcmtk's storescu -> `pneumoscreen run`): without a browser (every page's status, the sign-in
cookie's flags, CSRF refusals, the audit rows, the failed sign-in limit, no outside host in any
page or asset), and in a real one (Debian's chromium, headless, driven by Selenium): sign in,
filter, open a flagged study, see its heat map load, sign out, be sent back to sign in.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from sqlalchemy import create_engine, text

from model.artifact import read_card
from tests.helpers.dicom_factory import NORMAL_JPEG, PNEUMONIA_JPEG, write_chest_dicom
from tests.helpers.processes import (
    Process,
    cli_env,
    cli_json,
    free_port,
    start_run,
    storescu,
    wait_for_port,
    wait_until,
)
from worker.api.auth import token_fingerprint

pytestmark = pytest.mark.slow  # pneumoscreen processes, and a browser

TOKEN = "9c4e1f7a2b6d8e0f1a3c5e7b9d2f4a6c"
ACTOR = f"web:{token_fingerprint(TOKEN)}"
PAGES = ("/web/worklist", "/web/operations")
SCREENSHOTS = Path(os.environ.get("PNEUMOSCREEN_SCREENSHOTS", "")) if os.environ.get("PNEUMOSCREEN_SCREENSHOTS") \
    else None


AGE_UNKNOWN = "age unknown: not confirmed within the intended population (ages 1-5)"


class Site:
    def __init__(self, base: str, data_dir: Path, api: Process, flagged_study: str, skipped_study: str,
                 age_unknown_study: str) -> None:
        self.base = base
        self.data_dir = data_dir
        self.api = api
        self.flagged_study = flagged_study
        self.skipped_study = skipped_study
        self.age_unknown_study = age_unknown_study

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=60, follow_redirects=False, **kwargs)

    @contextmanager
    def signed_in(self) -> Iterator[httpx.Client]:
        with self.client() as client:
            form = client.get("/web/login")
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
            answer = client.post("/web/login", data={"token": TOKEN, "csrf_token": csrf, "next": "/web/worklist"})
            assert answer.status_code == 303, answer.text
            yield client

    def audit(self) -> list[tuple[str, str, int]]:
        engine = create_engine(f"sqlite:///{self.data_dir / 'pneumoscreen.db'}")
        try:
            with engine.connect() as c:
                return [tuple(r) for r in c.execute(text("SELECT actor, action, status FROM audit_log ORDER BY id"))]
        finally:
            engine.dispose()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web")
    data_dir = tmp / "data"
    processes: list[Process] = []
    try:
        port = free_port()
        env = cli_env(data_dir=data_dir, port=port, study_quiet_seconds=1)
        start_run(env, processes, tmp / "run.log")
        pneumonia = write_chest_dicom(tmp / "pneumonia.dcm", PNEUMONIA_JPEG, sop_class="CR", accession="PNEU1")
        normal = write_chest_dicom(tmp / "normal.dcm", NORMAL_JPEG, sop_class="CR", accession="NORM1")
        lateral = write_chest_dicom(tmp / "lateral.dcm", NORMAL_JPEG, sop_class="CR", accession="LAT1",
                                    view_position="LL")
        no_age = write_chest_dicom(tmp / "no_age.dcm", NORMAL_JPEG, sop_class="CR", accession="NOAGE1",
                                   birth_date=None)
        sent = storescu(port, *(tmp / f"{name}.dcm" for name in ("pneumonia", "normal", "lateral", "no_age")))
        assert sent.returncode == 0, sent.stderr
        terminal = {"PREDICTED", "SKIPPED", "FAILED"}
        wait_until(lambda: len([r for r in cli_json("instances", env=env) if r["state"] in terminal]) == 4,
                   timeout=120, what="four instances ended")
        states = {r["sop_instance_uid"]: r["state"] for r in cli_json("instances", env=env)}
        assert states == {pneumonia.SOPInstanceUID: "PREDICTED", normal.SOPInstanceUID: "PREDICTED",
                          lateral.SOPInstanceUID: "SKIPPED", no_age.SOPInstanceUID: "PREDICTED"}
        [flagged] = [r for r in cli_json("worklist", env=env) if r["flagged"]]
        assert flagged["study_instance_uid"] == pneumonia.StudyInstanceUID
        processes.pop().stop()

        api_port = free_port()
        api = Process(["api"], cli_env(data_dir=data_dir, api_token=TOKEN, api_port=api_port), tmp / "api.log")
        processes.append(api)
        wait_for_port(api_port, api.proc)
        yield Site(f"http://127.0.0.1:{api_port}", data_dir, api, pneumonia.StudyInstanceUID,
                   lateral.StudyInstanceUID, no_age.StudyInstanceUID)
    finally:
        for p in reversed(processes):
            p.stop()


def test_a_page_without_a_session_redirects_to_sign_in(site):
    with site.client() as client:
        for path in (*PAGES, f"/web/studies/{site.flagged_study}", "/web/plots/model.png"):
            answer = client.get(path)
            assert answer.status_code == 303, path
            assert answer.headers["location"] == f"/web/login?next={path}"
        assert client.get("/").headers["location"] == "/web/worklist"
        client.cookies.set("pneumoscreen_session", "eyJhIjoid2ViOngifQ.forged.signature")
        assert client.get("/web/worklist").status_code == 303


def test_sign_in_gives_an_http_only_strict_cookie_secure_behind_tls(site):
    with site.client() as client:
        form = client.get("/web/login")
        assert form.status_code == 200 and 'type="password"' in form.text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
        answer = client.post("/web/login", data={"token": TOKEN, "csrf_token": csrf, "next": "/web/operations"})
        assert answer.status_code == 303 and answer.headers["location"] == "/web/operations"
        cookie = next(c for c in answer.headers.get_list("set-cookie") if c.startswith("pneumoscreen_session="))
        flags = {part.strip().lower() for part in cookie.split(";")[1:]}
        assert {"httponly", "samesite=strict", "path=/"} <= flags and "secure" not in flags
        assert TOKEN not in cookie
    with site.client(headers={"X-Forwarded-Proto": "https"}) as client:  # behind a TLS proxy on this host
        form = client.get("/web/login")
        login_cookie = next(c for c in form.headers.get_list("set-cookie"))
        assert "secure" in login_cookie.lower()
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
        # a client keeps a Secure cookie for https; this one speaks http to the proxy's side, so it is handed on
        client.cookies.set("pneumoscreen_login_csrf", login_cookie.split(";")[0].split("=", 1)[1])
        answer = client.post("/web/login", data={"token": TOKEN, "csrf_token": csrf})
        assert answer.status_code == 303
        session_cookie = next(c for c in answer.headers.get_list("set-cookie") if c.startswith("pneumoscreen_session="))
        assert "secure" in session_cookie.lower()


def test_forms_without_their_csrf_token_are_refused(site):
    with site.client() as client:
        client.get("/web/login")  # the double-submit cookie, but the form below does not carry its value
        assert client.post("/web/login", data={"token": TOKEN, "csrf_token": "guessed"}).status_code == 403
        assert "pneumoscreen_session" not in client.cookies
    with site.signed_in() as client:
        assert client.post("/web/logout", data={"csrf_token": "guessed"}).status_code == 403
        assert client.get("/web/worklist").status_code == 200, "a refused sign-out must not sign out"
        page = client.get("/web/worklist").text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        out = client.post("/web/logout", data={"csrf_token": csrf})
        assert out.status_code == 303 and out.headers["location"] == "/web/login"
        assert client.get("/web/worklist").status_code == 303


def test_every_page_answers_and_is_audited_with_the_session_actor(site):
    before = len(site.audit())
    with site.signed_in() as client:
        worklist = client.get("/web/worklist")
        assert worklist.status_code == 200
        assert "PNEU1" in worklist.text and "NORM1" in worklist.text and "FLAGGED" in worklist.text
        assert "lateral" in worklist.text.lower(), "a skipped study shows its reason"
        badge = f'<span class="note" title="{AGE_UNKNOWN}">age unknown</span>'
        assert worklist.text.count(badge) == 1, "a study screened outside its known population is marked"
        noted = client.get(f"/web/studies/{site.age_unknown_study}").text
        assert noted.count(badge) == 2 and f'<p class="reason">{AGE_UNKNOWN}</p>' in noted  # the study, its image
        assert 'class="note"' not in client.get(f"/web/studies/{site.flagged_study}").text
        flagged = client.get("/web/worklist", params={"flagged_only": "true"}).text
        assert "PNEU1" in flagged and "NORM1" not in flagged
        assert client.get("/web/worklist", params={"state": "NOT_SCREENED"}).text.count("LAT1") == 1
        assert client.get("/web/worklist", params={"since": "2099-01-01"}).text.count("No study matches") == 1
        assert client.get("/web/worklist", params={"state": "DONE"}).status_code == 422
        study = client.get(f"/web/studies/{site.flagged_study}")
        assert study.status_code == 200 and "Grad-CAM" in study.text and "sha256" in study.text.lower()
        assert client.get("/web/studies/1.2.3.4").status_code == 404
        operations = client.get("/web/operations")
        assert operations.status_code == 200 and "Instances by state" in operations.text
        assert "Intended population" in operations.text and "films of other ages are skipped" in operations.text
        members = read_card().training.get("members")
        assert (f"an ensemble of {len(members)} networks" if members else "one network") in operations.text
        sop = re.search(r'/web/images/([0-9.]+)/film\.png', study.text).group(1)
        for kind in ("film", "gradcam"):
            image = client.get(f"/web/images/{sop}/{kind}.png")
            assert image.status_code == 200 and image.headers["content-type"] == "image/png"
            decoded = cv2.imdecode(np.frombuffer(image.content, np.uint8), cv2.IMREAD_UNCHANGED)
            assert decoded is not None and decoded.size > 0 and decoded.std() > 0
        plot = client.get("/web/plots/model.png")
        assert plot.status_code == 200 and cv2.imdecode(np.frombuffer(plot.content, np.uint8), 1) is not None
    entries = site.audit()[before:]
    actions = {(actor, action, status) for actor, action, status in entries}
    assert ("web:anonymous", "GET /web/login", 200) in actions
    assert (ACTOR, "POST /web/login", 303) in actions
    assert (ACTOR, "GET /web/worklist", 200) in actions
    assert (ACTOR, "GET /web/studies/{study_instance_uid}", 200) in actions
    assert (ACTOR, "GET /web/studies/{study_instance_uid}", 404) in actions
    assert (ACTOR, "GET /web/operations", 200) in actions
    assert (ACTOR, "GET /web/images/{sop_instance_uid}/{kind}.png", 200) in actions
    assert TOKEN not in site.api.log()


def test_no_page_or_asset_references_another_host(site):
    with site.signed_in() as client:
        documents = {path: client.get(path).text for path in (*PAGES, f"/web/studies/{site.flagged_study}",
                                                               "/docs", "/redoc")}
        documents["/web/static/pneumoscreen.css"] = client.get("/web/static/pneumoscreen.css").text
    with site.client() as client:
        documents["/web/login"] = client.get("/web/login").text
    for path, body in documents.items():
        assert body, path
        for reference in re.findall(r'(?:src|href|action)\s*=\s*["\']([^"\']+)["\']|url\(([^)]+)\)', body):
            target = next(r for r in reference if r)
            assert target.startswith(("/", "#", "data:", "./")) and not target.startswith("//"), (path, target)
        assert not re.search(r"https?://(?!127\.0\.0\.1)", re.sub(r"<!--.*?-->", "", body)), path
    with site.signed_in() as client:
        for asset in ("/static-offline-docs/swagger-ui-bundle.js", "/static-offline-docs/redoc.standalone.js"):
            assert client.get(asset).status_code == 200, asset


def _chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.fail("Debian's chromium and chromium-driver are needed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-quic", "--window-size=1280,800"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_in_a_real_browser_sign_in_filter_open_a_flagged_study_see_its_heat_map_and_sign_out(site, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    shots = SCREENSHOTS or tmp_path / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    browser = _chromium()
    wait = WebDriverWait(browser, 60)
    try:
        browser.get(f"{site.base}/web/worklist")
        wait.until(seen.url_contains("/web/login"))
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.CSS_SELECTOR, "form[action='/web/login'] button").click()
        wait.until(seen.presence_of_element_located((By.CSS_SELECTOR, "table.worklist")))
        assert browser.current_url.endswith("/web/worklist")
        browser.save_screenshot(str(shots / "worklist.png"))

        browser.find_element(By.NAME, "flagged_only").click()
        browser.find_element(By.CSS_SELECTOR, "form.filters button").click()
        wait.until(seen.url_contains("flagged_only=true"))
        wait.until(seen.presence_of_element_located((By.CSS_SELECTOR, "input[name=flagged_only]:checked")))
        links = browser.find_elements(By.CSS_SELECTOR, "a.study-link")
        assert [link.text for link in links] == ["PNEU1"]
        links[0].click()
        wait.until(seen.presence_of_element_located((By.CSS_SELECTOR, "img.heatmap")))
        loaded = ("const img = document.querySelector(arguments[0]);"
                  "return img.complete && img.naturalWidth > 0 ? [img.naturalWidth, img.naturalHeight] : null;")
        for selector in ("img.film", "img.heatmap"):
            size = WebDriverWait(browser, 120).until(lambda b: b.execute_script(loaded, selector))
            assert size[0] > 100 and size[1] > 100, selector
        browser.execute_script("document.querySelector('img.heatmap').scrollIntoView()")
        browser.save_screenshot(str(shots / "study.png"))

        browser.find_element(By.LINK_TEXT, "Operations").click()
        wait.until(seen.presence_of_element_located((By.CSS_SELECTOR, "figure.plot img")))
        WebDriverWait(browser, 60).until(lambda b: b.execute_script(loaded, "figure.plot img"))
        browser.save_screenshot(str(shots / "operations.png"))

        browser.find_element(By.CSS_SELECTOR, "form.signout button").click()
        wait.until(seen.url_contains("/web/login"))
        browser.get(f"{site.base}/web/operations")
        wait.until(seen.url_contains("/web/login?next=/web/operations"))
    finally:
        browser.quit()
    for name in ("worklist", "study", "operations"):
        assert (shots / f"{name}.png").stat().st_size > 10_000, name


def test_failed_sign_ins_are_limited_and_audited(site):
    """Last in this module: the address it locks out is the one every other test here signs in from."""
    with site.client() as client:
        statuses = []
        for _ in range(7):
            form = client.get("/web/login")
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
            statuses.append(client.post("/web/login", data={"token": "wrong" * 5, "csrf_token": csrf}).status_code)
    assert statuses[:5] == [401] * 5 and statuses[5:] == [429, 429]
    refused = [e for e in site.audit() if e[1] == "POST /web/login" and e[2] in (401, 429)]
    assert len(refused) >= 7 and all(actor == "web:anonymous" for actor, _, _ in refused)
