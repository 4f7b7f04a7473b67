"""The line's window on the shared app, over HTTP and in headless Chromium (Debian's chromium and
chromium-driver, no browser download; one module, so the app is started once): band decisions in
answers, bands saved live and audited, refused bad bands, bands as false-reject rates, part records
into the review queue, verdicts, the export into a copy of the demo data, recent traffic; the page
shows the API's scores, re-decides cards when a threshold moves, saves a band the API then uses,
marks a REVIEW image normal, asks for an API key; /docs renders; no request leaves the deployment."""

from __future__ import annotations

import base64
import io
import shutil
from datetime import datetime
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from marionette_driver.by import By as MBy
from marionette_driver.errors import TimeoutException as MarionetteTimeout
from marionette_driver.keys import Keys as MKeys
from marionette_driver.wait import Wait
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from infra.fixtures import wait_for
from firefox_marionette import marionette_firefox
from plantad.cli import main as cli_main
from plantad.config import S3Config
from plantad.data.manifest import scan_dataset
from plantad.evaluation.drift import DriftReference
from plantad.models.checkpoint import load_model
from plantad.serving.bands import threshold_for_rate
from plantad.serving.records import SCHEMA, pixel_sha256, read_records
from plantad.storage import open_location

pytestmark = pytest.mark.e2e
SHOTS = Path(__file__).resolve().parents[2] / "outputs"  # screenshots (the README's is copied from here)


@pytest.fixture(scope="module")
def weave(demo_root, demo_manifest) -> dict[str, bytes]:
    """One normal and one defective weave test image."""
    rows = demo_manifest[(demo_manifest["category"] == "weave") & (demo_manifest["split"] == "test")]
    normal = rows[rows["label"] == 0].iloc[0]["path"]
    defective = rows[rows["label"] == 1].iloc[0]["path"]
    return {"normal": (demo_root / normal).read_bytes(), "defective": (demo_root / defective).read_bytes()}


def mirrored(png: bytes) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(png)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(out, format="PNG")
    return out.getvalue()


def score(url: str, images: list[bytes], line: str, part_ids: str | None = None) -> dict:
    headers = {"X-Part-Id": part_ids} if part_ids else {}
    r = httpx.post(f"{url}/score", json={"images": [base64.b64encode(b).decode() for b in images], "line": line},
                   headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_bands_are_live_per_line_audited_and_bad_ones_refused(served, weave):
    before = score(served.url, [weave["normal"], weave["defective"]], "press-1", "A-1,A-2")
    calibrated = before["model"]["threshold"]
    for entry, part in zip(before["results"], ["A-1", "A-2"]):
        assert entry["band"]["source"] in ("calibrated", "default") and entry["part_id"] == part
        if entry["band"]["source"] == "calibrated":  # today's behaviour: the boolean and the band agree
            assert entry["decision"] == ("NG" if entry["is_anomalous"] else "OK")
    low, high = sorted(r["probability"] for r in before["results"])
    mid = (low + high) / 2
    saved = httpx.put(f"{served.url}/bands/press-1", json={"low": mid, "high": 1.0}, timeout=30)
    assert saved.status_code == 200, saved.text
    assert saved.json()["new"] == {"low": mid, "high": 1.0} and saved.json()["who"] == "open"

    def decided():  # every replica re-reads the store within serve.bands_poll_s
        answer = score(served.url, [weave["normal"], weave["defective"]], "press-1")
        return answer if all(r["band"]["source"] == "line" for r in answer["results"]) else None

    after = wait_for(decided, 15, "the saved band of press-1 in the answers")
    by_p = sorted(after["results"], key=lambda r: r["probability"])
    top = "NG" if by_p[1]["probability"] >= 1.0 else "REVIEW"  # at or above high (1.0) is NG: a saturated score
    assert [r["decision"] for r in by_p] == ["OK", top]
    v2 = httpx.post(f"{served.url}/v2/models/plantad-serve-test/infer", headers={"X-Part-Id": "V-1,V-2"}, json={
        "inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                    "data": [base64.b64encode(weave[k]).decode() for k in ("normal", "defective")]}],
        "parameters": {"line": "press-1"}}, timeout=60).json()  # the Open Inference answer carries the band too
    outputs = {o["name"]: o for o in v2["outputs"]}
    assert outputs["decision"] == {"name": "decision", "datatype": "BYTES", "shape": [2],
                                   "data": [r["decision"] for r in after["results"]]}
    band = after["results"][0]["band"]
    assert {k: v2["parameters"][f"band_{k}"] for k in ("low", "high", "source", "version")} == {
        k: band[k] for k in ("low", "high", "source", "version")}
    other = score(served.url, [weave["normal"]], "press-2")["results"][0]
    assert other["band"]["source"] != "line"  # a line's band is its own
    audit = httpx.get(f"{served.url}/bands/audit", params={"line": "press-1"}).json()["changes"][0]
    assert audit["new"] == {"low": mid, "high": 1.0} and audit["model_version"] == before["model"]["version"]
    assert audit["old"]["low"] <= audit["old"]["high"] and audit["at"] > 0 and calibrated > 0
    for body, status, message in [({"low": 0.9, "high": 0.1}, 400, "above high"),
                                  ({"low": 0.1, "high": 2}, 400, "not a probability"),
                                  ({"low": 0.1}, 400, "a band is")]:
        r = httpx.put(f"{served.url}/bands/press-1", json=body)
        assert (r.status_code, message in r.json()["error"]) == (status, True), r.text
    unknown = httpx.put(f"{served.url}/bands/press-9", json={"low": 0.1, "high": 0.2})
    assert unknown.status_code == 404 and "unknown line 'press-9'" in unknown.json()["error"]
    no_key = httpx.put(f"{served.strict_url}/bands/default", json={"low": 0.1, "high": 0.2})
    assert no_key.status_code == 401
    no_store = httpx.put(f"{served.strict_url}/bands/default", json={"low": 0.1, "high": 0.2},
                         headers={"Authorization": f"Bearer {served.api_key}"})
    assert no_store.status_code == 409 and "serve.store is not set" in no_store.json()["error"]


def test_a_band_as_false_reject_rates_holds_them_on_the_versions_normal_images(served, trained_tiny, weave):
    _, result = trained_tiny
    normal = DriftReference.from_dict(load_model(result.model_path)[1]["drift_reference"]).probabilities
    r = httpx.put(f"{served.url}/bands/press-1", json={"low_frr": 0.2, "high_frr": 0.05}, timeout=30)
    assert r.status_code == 200, r.text
    wait_for(lambda: httpx.get(f"{served.url}/bands").json()["lines"]["press-1"]["saved"].get("low_frr") == 0.2, 15,
             "the rate band of press-1 on /bands")
    line = httpx.get(f"{served.url}/bands").json()["lines"]["press-1"]
    for threshold, rate in ((line["low"], 0.2), (line["high"], 0.05)):
        assert threshold == pytest.approx(threshold_for_rate(normal, rate))
        assert rate - 1 / len(normal) < float((normal >= threshold).mean()) <= rate
    band = wait_for(lambda: (b := score(served.url, [weave["normal"]], "press-1")["results"][0]["band"]).get("rates")
                    and b, 15, "the rate band in the answers of press-1")
    assert band["rates"] == {"low_frr": 0.2, "high_frr": 0.05} and band["low"] == pytest.approx(line["low"])


def test_records_feed_the_review_queue_and_the_export_into_the_dataset(served, weave, demo_root, tmp_path):
    httpx.put(f"{served.url}/bands/press-3", json={"low": 0.0, "high": 1.0}, timeout=30)  # every part: REVIEW
    wait_for(lambda: score(served.url, [weave["normal"]], "press-3")["results"][0]["decision"] == "REVIEW", 15,
             "the all-REVIEW band of press-3")
    new = [mirrored(weave["normal"]), mirrored(weave["defective"])]  # parts the dataset does not hold yet
    answer = score(served.url, new, "press-3", "N-1,D-1")
    shas = [r["sha256"] for r in answer["results"]]
    assert shas[0] == pixel_sha256(Image.open(io.BytesIO(new[0])))

    def queued():
        items = httpx.get(f"{served.url}/review/queue", params={"line": "press-3"}, timeout=30).json()["items"]
        return items if set(shas) <= {i["sha256"] for i in items} else None

    old_part = served.store / "records" / "2026-01-01" / "0-older-plantad.parquet"  # no drift column
    old_part.parent.mkdir(parents=True, exist_ok=True)
    old_schema = pa.schema([f for f in SCHEMA if f.name != "drift"])
    pq.write_table(pa.Table.from_pylist([{"time": 1.0, "line": "press-3", "sha256": "0" * 64, "decision": "NG",
                                          "image_stored": False}], schema=old_schema), old_part)
    items = wait_for(queued, 20, "both press-3 images in the review queue")
    assert {i["part_id"] for i in items if i["sha256"] in shas} == {"N-1", "D-1"}
    dims = (httpx.get(f"{served.url}/model", timeout=30).json()["line_health"]["reference"] or {}).get("dims")
    recorded = {r["sha256"]: r["drift"] for r in read_records(open_location(str(served.store), S3Config()))}
    assert recorded["0" * 64] is None and {None if recorded[s] is None else len(recorded[s]) for s in shas} == {dims}
    png = httpx.get(f"{served.url}/review/images/{shas[1]}", timeout=30)
    assert png.headers["content-type"] == "image/png"
    assert pixel_sha256(Image.open(io.BytesIO(png.content))) == shas[1]
    for sha, verdict in [(shas[0], {"verdict": "normal"}), (shas[1], {"verdict": "defective", "defect": "snag"})]:
        r = httpx.post(f"{served.url}/review", json={"sha256": sha, **verdict}, timeout=30)
        assert r.status_code == 200, r.text
    bad = httpx.post(f"{served.url}/review", json={"sha256": shas[1], "verdict": "defective"})
    assert bad.status_code == 400 and "defect name" in bad.json()["error"]
    left = {i["sha256"] for i in httpx.get(f"{served.url}/review/queue", params={"line": "press-3"}).json()["items"]}
    assert not set(shas) & left
    verdicts = httpx.get(f"{served.url}/review/verdicts").json()["reviews"]
    assert {v["sha256"] for v in verdicts} >= set(shas)
    state = httpx.get(f"{served.url}/inspection").json()
    assert state["records_written"] >= 2 and state["records_dropped"] == 0 and state["records_error"] is None

    data = tmp_path / "data"
    shutil.copytree(demo_root / "weave", data / "weave")
    assert cli_main(["review", "export", "--data", str(tmp_path / "nope"), "--store", str(served.store),
                     "--set", "serve.line_categories={press-3: weave}"]) == 2
    args = ["review", "export", "--data", str(data), "--store", str(served.store), "--set",
            "serve.line_categories={press-1: weave, press-2: weave, press-3: weave}"]
    assert cli_main(args) == 0
    manifest = scan_dataset(data)
    exported = manifest[manifest["path"].str.contains("review-")]
    assert {(r.split, r.defect_type, r.label) for r in exported.itertuples()} == {("train", "good", 0),
                                                                                 ("test", "snag", 1)}
    assert cli_main(args) == 0  # again: nothing new, nothing written twice
    assert len(scan_dataset(data)) == len(manifest)


def test_recent_traffic_page_and_offline_docs(served, weave):
    score(served.url, [weave["defective"]], "press-2", "T-9")
    traffic = httpx.get(f"{served.url}/traffic", params={"line": "press-2"}).json()
    assert traffic["enabled"] and traffic["items"][0]["part_id"] == "T-9"
    assert sum(traffic["rates"].values()) == pytest.approx(1.0)
    assert httpx.get(f"{served.url}/traffic", params={"decision": "MAYBE"}).status_code == 400
    page = httpx.get(f"{served.url}/").text
    assert '<base href="/">' in page and "sessionStorage" in page and "http" not in page.split("<body>")[0]
    strict_page = httpx.get(f"{served.strict_url}/").text
    assert '<base href="/strict/">' in strict_page  # the page works under a route prefix
    docs = httpx.get(f"{served.url}/docs").text
    assert "cdn" not in docs.lower() and "/docs/assets/swagger-ui-bundle.js" in docs
    js = httpx.get(f"{served.url}/docs/assets/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000
    assert httpx.get(f"{served.url}/docs/assets/nope.js").status_code == 404


# --- the page in the browser ---

@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "Debian's chromium and chromium-driver are needed (scripts/test.sh installs them)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800",
                "--disable-gpu", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console lines for failure messages
    b = webdriver.Chrome(service=Service(driver), options=options)
    b.set_page_load_timeout(60)
    yield b
    b.quit()


def wait(browser, condition, timeout: float = 60):
    try:
        return WebDriverWait(browser, timeout, poll_frequency=0.2).until(lambda b: condition(b))
    except TimeoutException:  # what the page saw, for the failure message
        SHOTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(SHOTS / "inspection-failure.png"))
        raise AssertionError(f"page condition not met in {timeout} s; console: {browser.get_log('browser')}; "
                             f"status: {browser.find_element(By.TAG_NAME, 'body').text[:1500]}") from None


def resources_outside(browser, origin: str) -> list[str]:
    """Every URL the page loaded (documents, scripts, styles, fetches) that is not the deployment's."""
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    return [u for u in urls if not u.startswith((origin, "data:", "blob:"))]


def decisions(browser) -> list[str]:
    cards = browser.find_elements(By.CSS_SELECTOR, "#cards .card.scored")
    return [c.find_element(By.CSS_SELECTOR, "[data-role=decision]").text for c in cards]


def test_the_page_scores_redecides_saves_bands_and_reviews(served, browser, demo_root, demo_manifest, tmp_path):
    rows = demo_manifest[(demo_manifest["category"] == "weave") & (demo_manifest["split"] == "test")]
    files = [demo_root / rows[rows["label"] == 0].iloc[1]["path"], demo_root / rows[rows["label"] == 1].iloc[1]["path"]]
    browser.get(f"{served.url}/")
    wait(browser, lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    tags = served.registry.client.get_model_version("plantad-serve-test", served.registry.good[0]).tags
    shown_at = browser.find_element(By.ID, "promoted-at").get_attribute("datetime")  # the alias's tag, to the ms
    assert datetime.fromisoformat(shown_at.replace("Z", "+00:00")).timestamp() == pytest.approx(
        float(tags["alias_set_at.champion"]), abs=1e-3)
    line = browser.find_element(By.ID, "line")
    line.send_keys("press-2", Keys.TAB)  # change: the line's saved band is loaded
    browser.find_element(By.ID, "files").send_keys("\n".join(str(f) for f in files))
    wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, "#cards .card.scored")) == 2)
    cards = browser.find_elements(By.CSS_SELECTOR, "#cards .card.scored")
    shown = sorted(float(c.find_element(By.CSS_SELECTOR, ".probability").text) for c in cards)
    api = httpx.post(f"{served.url}/score", files=[("files", (f.name, f.read_bytes(), "image/png")) for f in files],
                     timeout=60).json()
    assert shown == pytest.approx(sorted(r["probability"] for r in api["results"]), abs=6e-5)  # 4 decimals shown
    assert len(browser.find_elements(By.CSS_SELECTOR, "#cards img.heat")) == 2
    unnamed = browser.execute_script(  # every control has an accessible name (a label, aria-label or text)
        "return [...document.querySelectorAll('input, select, button, textarea, canvas')].filter(e => "
        "!(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())"
        ".map(e => e.id || e.outerHTML.slice(0, 80))")
    assert unnamed == []
    SHOTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(SHOTS / "inspection-page.png"))

    low, high = browser.find_element(By.ID, "band-low"), browser.find_element(By.ID, "band-high")
    low.send_keys(Keys.HOME)  # keyboard-drag both thresholds to 0: every part NG
    high.send_keys(Keys.HOME)
    assert decisions(browser) == ["NG", "NG"]
    high.send_keys(Keys.END)  # high to 1: between them, REVIEW
    assert decisions(browser) == ["REVIEW", "REVIEW"]
    mid = (shown[0] + shown[1]) / 2
    browser.execute_script("const l = document.getElementById('band-low'); l.value = arguments[0];"
                           "l.dispatchEvent(new Event('input'));", mid)
    assert sorted(decisions(browser)) == ["OK", "REVIEW"]

    browser.find_element(By.ID, "band-save").click()
    wait(browser, lambda b: "saved for line press-2" in b.find_element(By.ID, "band-status").text)
    # read in one script: the page re-renders the audit table on its poll, so a found row can go stale
    wait(browser, lambda b: "press-2" in b.execute_script(
        "const r = document.querySelector('#audit tbody tr'); return r ? r.textContent : '';"))
    saved_low = float(browser.find_element(By.ID, "band-low").get_attribute("value"))

    def api_uses_band():
        body = {"images": [base64.b64encode(files[0].read_bytes()).decode()], "line": "press-2"}
        band = httpx.post(f"{served.url}/score", json=body, timeout=60).json()["results"][0]["band"]
        return band["source"] == "line" and band["low"] == pytest.approx(saved_low) and band["high"] == 1.0

    wait_for(api_uses_band, 15, "the band saved on the page in the API's answer for press-2")
    body = {"images": [base64.b64encode(files[1].read_bytes()).decode()], "line": "press-2"}
    assert httpx.post(f"{served.url}/score", json=body, timeout=60).json()["results"][0]["decision"] == "REVIEW"

    # the REVIEW part was recorded with its image: mark it normal in the queue
    browser.find_element(By.ID, "review-refresh").click()  # the queue is aria-busy until it has reloaded
    wait(browser, lambda b: b.find_element(By.ID, "queue").get_attribute("aria-busy") == "false"
         and len(b.find_elements(By.CSS_SELECTOR, "#queue .card.queued")) > 0, 30)
    browser.save_screenshot(str(SHOTS / "inspection-review.png"))
    card = browser.find_elements(By.CSS_SELECTOR, "#queue .card.queued")[0]
    sha = card.get_attribute("data-sha256")
    card.find_element(By.XPATH, ".//button[starts-with(., 'Normal')]").click()
    wait(browser, lambda b: f"marked {sha[:12]} as normal" in b.find_element(By.ID, "review-status").text)
    verdicts = httpx.get(f"{served.url}/review/verdicts").json()["reviews"]
    assert any(v["sha256"] == sha and v["verdict"] == "normal" for v in verdicts)
    assert not resources_outside(browser, served.url)
    browser.set_window_size(820, 1180)  # a tablet held upright: nothing wider than the screen
    try:
        wide = browser.execute_script(
            "return [...document.querySelectorAll('body *')].filter(e => !e.closest('table') && "  # tables scroll
            "e.getBoundingClientRect().right > window.innerWidth + 1).map(e => e.id || e.tagName + '.' + e.className)"
            ".slice(0, 10)")
        assert wide == []
    finally:
        browser.set_window_size(1280, 800)


def test_docs_render_without_a_cdn(served, browser):
    browser.get(f"{served.url}/docs")
    wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, ".opblock")) > 5)
    assert browser.find_elements(By.XPATH, "//*[contains(@class, 'opblock-summary-path') and "
                                           "contains(., '/bands/{line}')]")
    assert not resources_outside(browser, served.url)


def test_with_api_keys_the_page_asks_for_one_and_keeps_it_in_the_tab(served, browser):
    browser.get(f"{served.strict_url}/")
    wait(browser, lambda b: b.find_element(By.ID, "key-dialog").get_attribute("open") is not None)
    browser.find_element(By.ID, "key-input").send_keys(served.api_key, Keys.ENTER)
    wait(browser, lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    assert "plantad-serve-test" in browser.find_element(By.ID, "model-summary").text
    assert browser.execute_script("return sessionStorage.getItem('plantad.apiKey')") == served.api_key
    assert browser.execute_script("return localStorage.length") == 0


# --- the same page in Firefox (Debian's firefox-esr over Marionette: tests/serving/firefox_marionette.py) ---

@pytest.fixture(scope="module")
def firefox(tmp_path_factory):
    with marionette_firefox(tmp_path_factory.mktemp("firefox-profile")) as client:
        yield client


def until(client, condition, timeout: float = 60):
    try:
        return Wait(client, timeout=timeout, interval=0.2).until(lambda c: condition(c))
    except MarionetteTimeout:
        SHOTS.mkdir(exist_ok=True)
        (SHOTS / "inspection-firefox-failure.png").write_bytes(client.screenshot(format="binary"))
        raise AssertionError(f"page condition not met in {timeout} s in Firefox; page: "
                             f"{client.find_element(MBy.TAG_NAME, 'body').text[:1500]}") from None


def test_firefox_scores_redecides_and_saves_a_band(served, firefox, demo_root, demo_manifest):
    rows = demo_manifest[(demo_manifest["category"] == "weave") & (demo_manifest["split"] == "test")]
    files = [demo_root / rows[rows["label"] == 0].iloc[1]["path"], demo_root / rows[rows["label"] == 1].iloc[1]["path"]]
    firefox.navigate(f"{served.url}/")
    until(firefox, lambda c: c.find_element(MBy.TAG_NAME, "body").get_attribute("data-ready") == "true")
    assert firefox.session_capabilities["browserName"] == "firefox"
    firefox.find_element(MBy.ID, "line").send_keys("press-1" + MKeys.TAB)
    firefox.find_element(MBy.ID, "files").send_keys("\n".join(str(f) for f in files))
    until(firefox, lambda c: len(c.find_elements(MBy.CSS_SELECTOR, "#cards .card.scored")) == 2)
    cards = firefox.find_elements(MBy.CSS_SELECTOR, "#cards .card.scored")
    shown = sorted(float(c.find_element(MBy.CSS_SELECTOR, ".probability").text) for c in cards)
    api = httpx.post(f"{served.url}/score", files=[("files", (f.name, f.read_bytes(), "image/png")) for f in files],
                     timeout=60).json()
    assert shown == pytest.approx(sorted(r["probability"] for r in api["results"]), abs=6e-5)

    def shown_decisions() -> list[str]:
        return sorted(c.find_element(MBy.CSS_SELECTOR, "[data-role=decision]").text
                      for c in firefox.find_elements(MBy.CSS_SELECTOR, "#cards .card.scored"))

    low, high = firefox.find_element(MBy.ID, "band-low"), firefox.find_element(MBy.ID, "band-high")
    low.send_keys(MKeys.HOME)
    high.send_keys(MKeys.HOME)
    assert shown_decisions() == ["NG", "NG"]
    high.send_keys(MKeys.END)
    assert shown_decisions() == ["REVIEW", "REVIEW"]
    firefox.execute_script("const l = document.getElementById('band-low'); l.value = arguments[0];"
                           "l.dispatchEvent(new Event('input'));", script_args=[(shown[0] + shown[1]) / 2])
    assert shown_decisions() == ["OK", "REVIEW"]
    firefox.find_element(MBy.ID, "band-save").click()
    until(firefox, lambda c: "saved for line press-1" in c.find_element(MBy.ID, "band-status").text)
    saved_low = float(firefox.find_element(MBy.ID, "band-low").get_property("value"))
    assert "press-1" in firefox.find_element(MBy.CSS_SELECTOR, "#audit tbody tr").text
    change = httpx.get(f"{served.url}/bands/audit", params={"line": "press-1"}).json()["changes"][0]
    assert change["new"] == {"low": pytest.approx(saved_low), "high": 1.0}
