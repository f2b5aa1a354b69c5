"""The operations page's site loop, in process (FastAPI's TestClient over a real database, SQLite
then PostgreSQL, filled by the functions the listener, the inference worker and the verdict API use,
and the shipped model's card and reference): the site's labelled sample with its figures and what it
still needs, the drift report, and the drift plot. Each figure on the page is compared with what
``worker.site_sample.site_sample`` and ``worker.drift.drift_report`` return for the same rows."""

from __future__ import annotations

import re
from dataclasses import replace

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from lxml import html

from db.drift import record_inputs
from db.models import InstanceState
from db.queries import set_state
from db.verdicts import labelled_scores, record_verdict
from model.artifact import DEFAULT_MODEL_DIR, read_card
from model.site import MIN_NORMALS, minimum_positives
from tests.helpers.records import answer, receive
from worker import runtime
from worker.api.app import create_app
from worker.drift import drift_report, reference_for
from worker.settings import Settings
from worker.site_sample import per_study, site_sample, target_sensitivity
from worker.web.operations import TimedCache

TOKEN = "3e1b5d7f9a2c4e6081a3c5e7f9b2d4a6"
UID = "1.2.826.0.1.3680043.10.31.4"
SENSITIVITY = 0.9  # 30 pneumonia and 20 normal studies carry its threshold
WINDOW = 40
CARD = read_card(DEFAULT_MODEL_DIR, verify=False)


@pytest.fixture
def database_url(any_database_url) -> str:
    """Every test here on SQLite and on PostgreSQL."""
    return any_database_url


def _client(tmp_path, database_url, **settings) -> TestClient:
    app = create_app(Settings(data_dir=tmp_path, database_url=database_url, api_token=TOKEN,
                              drift_window=WINDOW, **settings))
    client = TestClient(app, follow_redirects=False)
    client.__enter__()
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/web/login").text).group(1)
    signed = client.post("/web/login", data={"token": TOKEN, "csrf_token": csrf, "next": "/web/operations"})
    assert signed.status_code == 303, signed.text
    return client


@pytest.fixture
def page(tmp_path, database_url):
    """A signed-in client of the pages (sensitivity ``SENSITIVITY``) and the session factory."""
    client = _client(tmp_path, database_url, site_sensitivity=SENSITIVITY)
    try:
        yield client, runtime.sessions()
    finally:
        client.__exit__(None, None, None)


def _screen(sessions, n: int, first: int, *, pneumonia_share: float, seed: int, brightness: float) -> list[str]:
    """``n`` one-film studies screened by the shipped model, their input statistics recorded; pneumonia
    studies score high, normal ones low, with overlap. Returns each study's finding."""
    rng = np.random.default_rng(seed)
    findings = []
    with sessions.begin() as s:
        for k in range(first, first + n):
            instance_id, _ = receive(s, f"{UID}.{k}", f"{UID}.{k}.1.1", accession=f"A{k}")
            finding = "pneumonia" if rng.random() < pneumonia_share else "normal"
            probability = float(np.clip(rng.beta(5, 2) if finding == "pneumonia" else rng.beta(2, 5), 0.001, 0.999))
            answer(s, [(instance_id, probability)], card=CARD)
            set_state(s, instance_id=instance_id, state=InstanceState.PREDICTED)
            record_inputs(s, inputs={instance_id: {"rows": 2000, "columns": int(rng.integers(1500, 2600)),
                                                   "brightness": float(rng.normal(brightness, 8)),
                                                   "manufacturer": "ACME", "modality": "CR"}})
            findings.append(finding)
    return findings


def _label(sessions, findings: list[str], first: int) -> None:
    """Verdicts: every third study's from the RIS's final report, the others a radiologist's; the
    first study gets a report first and a radiologist's verdict after (the radiologist's counts)."""
    with sessions.begin() as s:
        for k, finding in enumerate(findings, start=first):
            source = "ris-report" if k % 3 == 0 else "radiologist"
            if k == first:
                record_verdict(s, study_instance_uid=f"{UID}.{k}", finding="normal" if finding == "pneumonia"
                               else "pneumonia", source="ris-report", actor="ris:RIS", reference="M1")
                source = "radiologist"
            record_verdict(s, study_instance_uid=f"{UID}.{k}", finding=finding, source=source,
                           actor="ris:RIS" if source == "ris-report" else "user:dr.ops")


def _text(node) -> str:
    return " ".join(node.text_content().split())


def _figures_row(tree, key: str) -> list[str]:
    [row] = tree.xpath(f'//table[@id="site-figures"]//tr[@data-figures="{key}"]')
    return [_text(td) for td in row.xpath("td")]


def test_the_page_shows_the_labelled_sample_its_figures_and_the_drift_report(page):
    client, sessions = page
    findings = _screen(sessions, 70, 0, pneumonia_share=0.55, seed=4, brightness=120)
    _label(sessions, findings, 0)
    with sessions.begin() as s:  # a labelled study the model has not screened
        receive(s, f"{UID}.999", f"{UID}.999.1.1")
        record_verdict(s, study_instance_uid=f"{UID}.999", finding="normal", source="radiologist", actor="user:x")
    answer_ = client.get("/web/operations")
    assert answer_.status_code == 200, answer_.text
    tree = html.fromstring(answer_.text)
    with sessions() as s:
        expected = site_sample(s, card=CARD, sensitivity=SENSITIVITY)
        report = drift_report(s, model_dir=DEFAULT_MODEL_DIR, card=CARD, window=WINDOW)

    counts = {row.get("data-source"): [_text(td) for td in row.xpath("td")]
              for row in tree.xpath('//table[@id="site-labelled"]//tr[@data-source]')}
    for source in ("radiologist", "ris-report", "all"):
        assert counts[source] == [str(expected["labelled"][source]["pneumonia"]),
                                  str(expected["labelled"][source]["normal"])]
    assert expected["labelled"]["all"]["pneumonia"] == findings.count("pneumonia")
    assert expected["labelled"]["all"]["normal"] == findings.count("normal") + 1
    assert expected["unscreened"] == 1 and expected["sample"]["studies"] == 70
    assert f"{expected['sample']['studies']} screened by this model" in _text(tree.get_element_by_id("site-screened"))
    assert expected["enough"] and expected["more_needed"] == {"pneumonia": 0, "normal": 0}
    assert "It has enough" in _text(tree.get_element_by_id("site-needed"))
    for key in ("at_card_threshold", "at_site_threshold"):
        r = expected[key]
        cells = _figures_row(tree, key)
        assert cells[1] == f"{r['threshold']:.4f}"
        for cell, name in ((cells[2], "sensitivity"), (cells[3], "specificity")):
            low, high = r["ci95"][name]
            assert cell == f"{r[name]:.3f} ({low:.3f}\u2013{high:.3f})"
            assert low <= r[name] <= high
        assert cells[4] == f"{r['fn']} of {r['tp'] + r['fn']}" and cells[5] == f"{r['fp']} of {r['tn'] + r['fp']}"
    assert expected["at_card_threshold"]["threshold"] == CARD.threshold
    assert f"{expected['at_card_threshold']['auc']:.3f}" in _text(tree.get_element_by_id("site-auc"))
    assert expected["at_site_threshold"]["sensitivity"] >= SENSITIVITY
    assert expected["site_threshold"] == expected["at_site_threshold"]["threshold"]

    verdict = _text(tree.get_element_by_id("drift-verdict"))
    assert report["drifted"] and verdict.startswith("Drifted")  # other proportions and sizes than the training films
    assert [_text(li) for li in tree.xpath('//ul[@id="drift-reasons"]/li')] == report["reasons"]
    rows = {row.get("data-statistic"): [_text(td) for td in row.xpath("td")]
            for row in tree.xpath('//table[@id="drift-statistics"]//tr[@data-statistic]')}
    fr = report["flag_rate"]
    assert rows["flag_rate"][1:5] == [f"{fr['window']:.3f}", f"{fr['reference']:.3f}",
                                      f"{abs(fr['window'] - fr['reference']):.3f}", f"{fr['p_value']:.2e}"]
    assert set(rows) == {"flag_rate", "scores", *report["inputs"]}
    for name, figures in (("scores", report["scores"]), *report["inputs"].items()):
        if "statistic" in figures:
            assert rows[name][1:5] == [f"{figures['window_median']:g}", f"{figures['reference_median']:g}",
                                       f"{figures['statistic']:.3f}", f"{figures['p_value']:.2e}"]
        assert rows[name][5] == ("yes" if figures["drifted"] else "no")
    assert f"The last {report['window']} films" in _text(tree.get_element_by_id("drift-window"))

    plot = client.get("/web/plots/drift.png")
    assert plot.status_code == 200 and plot.headers["content-type"] == "image/png"
    image = cv2.imdecode(np.frombuffer(plot.content, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[1] > 400
    assert tree.xpath('//img[@src="/web/plots/drift.png"]')


def test_films_like_the_reference_show_no_drift_on_the_page(page):
    """A window drawn from the model's own reference (held-out scores, training films' inputs)."""
    client, sessions = page
    reference = reference_for(DEFAULT_MODEL_DIR, CARD)
    rng = np.random.default_rng(7)
    with sessions.begin() as s:
        for k in range(WINDOW):
            instance_id, _ = receive(s, f"{UID}.{k}", f"{UID}.{k}.1.1")
            answer(s, [(instance_id, float(rng.choice(reference.scores)))], card=CARD)
            i = int(rng.integers(len(reference.inputs["aspect"])))
            aspect, megapixels = reference.inputs["aspect"][i], reference.inputs["megapixels"][i]
            rows = round((megapixels * 1e6 / aspect) ** 0.5)
            record_inputs(s, inputs={instance_id: {"rows": rows, "columns": round(rows * aspect),
                                                   "brightness": reference.inputs["brightness"][i]}})
    tree = html.fromstring(client.get("/web/operations").text)
    with sessions() as s:
        report = drift_report(s, model_dir=DEFAULT_MODEL_DIR, card=CARD, window=WINDOW)
    assert report["window"] == report["inputs_window"] == WINDOW
    assert not report["drifted"], report["reasons"]
    assert _text(tree.get_element_by_id("drift-verdict")).startswith("No drift")
    assert not tree.xpath('//ul[@id="drift-reasons"]')


def test_with_no_labels_the_page_says_how_many_studies_it_needs(page):
    client, sessions = page
    _screen(sessions, 10, 0, pneumonia_share=0.5, seed=5, brightness=120)
    tree = html.fromstring(client.get("/web/operations").text)
    needed = _text(tree.get_element_by_id("site-needed"))
    assert (f"at least {minimum_positives(SENSITIVITY)} pneumonia and {MIN_NORMALS} normal studies" in needed)
    assert f"It needs {minimum_positives(SENSITIVITY)} more pneumonia and {MIN_NORMALS} more normal" in needed
    assert "No figures yet" in _text(tree.get_element_by_id("site-figures"))
    assert "drift is judged on at least 30" in _text(tree.get_element_by_id("drift-verdict"))
    with TestClient(client.app, follow_redirects=False) as stranger:
        assert stranger.get("/web/plots/drift.png").status_code == 303  # to sign in


def test_a_small_sample_shows_its_figures_and_what_it_still_needs(page):
    client, sessions = page
    findings = _screen(sessions, 12, 0, pneumonia_share=0.5, seed=6, brightness=120)
    _label(sessions, findings, 0)
    tree = html.fromstring(client.get("/web/operations").text)
    with sessions() as s:
        expected = site_sample(s, card=CARD, sensitivity=SENSITIVITY)
    assert not expected["enough"] and "too small" in expected["refusal"]
    more = expected["more_needed"]
    assert more == {"pneumonia": minimum_positives(SENSITIVITY) - findings.count("pneumonia"),
                    "normal": MIN_NORMALS - findings.count("normal")}
    assert (f"It needs {more['pneumonia']} more pneumonia and {more['normal']} more normal"
            in _text(tree.get_element_by_id("site-needed")))
    assert _figures_row(tree, "at_card_threshold")[1] == f"{CARD.threshold:.4f}"
    assert "not yet one to serve" in _text(tree)


def test_the_sensitivity_asked_for_is_the_setting_else_the_card_s_else_0_95():
    assert target_sensitivity(CARD, 0.9) == 0.9
    assert target_sensitivity(CARD) == CARD.validation["operating_point"]["target_sensitivity"]
    assert target_sensitivity(replace(CARD, validation={}, training={})) == 0.95
    site_card = replace(CARD, site_calibration={"target_sensitivity": 0.93})
    assert target_sensitivity(site_card) == 0.93
    assert Settings(_env_file=None).site_sensitivity is None
    with pytest.raises(ValueError):
        Settings(_env_file=None, site_sensitivity=1.0)


def test_one_label_and_the_highest_score_per_study_and_studies_without_a_score_left_out(sessions):
    labels, scores = per_study([(1, [0.2, 0.9]), (0, []), (0, [0.3])])
    assert labels.tolist() == [1, 0] and scores.tolist() == [0.9, 0.3]
    with sessions.begin() as s:
        first, _ = receive(s, f"{UID}.1", f"{UID}.1.1.1")
        second, _ = receive(s, f"{UID}.1", f"{UID}.1.1.2")
        answer(s, [(first, 0.4), (second, 0.8)], card=CARD)
        answer(s, [(first, 0.99)])  # another model's answer does not count
        record_verdict(s, study_instance_uid=f"{UID}.1", finding="pneumonia", source="ris-report", actor="ris:R")
    with sessions() as s:
        assert labelled_scores(s, model_version=CARD.version) == [
            {"study_instance_uid": f"{UID}.1", "label": 1, "source": "ris-report", "probability": 0.8}]
        assert labelled_scores(s, model_version="none")[0]["probability"] is None


def test_a_computed_view_is_kept_for_a_minute_then_computed_again():
    now = [0.0]
    cache = TimedCache(seconds=60, clock=lambda: now[0])
    calls = []

    def compute():
        calls.append(now[0])
        return len(calls)

    assert cache.get_or_compute(("k",), compute) == 1
    now[0] = 59.0
    assert cache.get_or_compute(("k",), compute) == 1
    now[0] = 61.0
    assert cache.get_or_compute(("k",), compute) == 2 and calls == [0.0, 61.0]
