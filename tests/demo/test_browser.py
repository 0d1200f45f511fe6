"""The demo page as a person uses it, in a real headless Chromium (Debian's chromium and
chromium-driver; .ci/run installs them): open the printed URL with its access token, pick a
user, see recommendations with titles, rate 5 movies as a new device, get recommendations, opt
out, forget. A screenshot of the device page goes to the test's tmp directory and, with
FEDREC_SCREENSHOT=PATH, to PATH (docs/personalization.md's picture: docs/demo.png).

Without the browser the test fails (CI must not go green without it); FEDREC_ALLOW_NO_BROWSER=1
turns that into a skip on a machine that cannot have one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import urllib.parse
from pathlib import Path

import pytest

from fedrec.experiments.serve_bench import Server, fedrec_command, model_dir
from fedrec.models.saved import load_catalogue
from fedrec.run.build import load_data
from fedrec.run.config import RunConfig

pytestmark = pytest.mark.engine  # a federated ML-100K run through Flower's engine, then the browser: ~1 min

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# Without the background-networking flags Chromium keeps calling home (updates, sync, QUIC probes).
CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,900")
ROUNDS = 4
RATED = 5
WAIT = 30  # seconds for a page to show what is asserted


def _require_browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if missing:
        reason = f"the browser test needs {', '.join(missing)}: apt-get install chromium chromium-driver (.ci/run does)"
        if os.environ.get("FEDREC_ALLOW_NO_BROWSER") == "1":
            pytest.skip(reason)
        pytest.fail(reason, pytrace=False)


@pytest.fixture
def finished_run(tmp_path, shared_data) -> Path:
    """The ML-100K demo run of docs/personalization.md, smaller: `fedrec compare` on ML-100K, the federation
    under central DP keeping checkpoints; every user takes part in every round, so the device page has an
    upload row per round, an epsilon, and curves against the central run to plot (that page's picture)."""
    run = tmp_path / "runs" / "demo"
    done = subprocess.run([*fedrec_command(), "compare", "--dataset", "ml-100k", "--data-dir", str(shared_data),
                           "--rounds", str(ROUNDS), "--epochs", "10", "--eval-every", "1", "--checkpoint-every", "1",
                           "--keep-checkpoints", "--dp", "central", "--noise-multiplier", "1.5",
                           "--clipping-norm", "0.5", "--out", str(run)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"fedrec compare failed: {done.stderr[-2000:]}"
    return run


@pytest.fixture
def served(finished_run):
    with Server(finished_run.relative_to(finished_run.parent.parent), cwd=finished_run.parent.parent) as server:
        # started where runs/ is, so the page (and the screenshot) shows `runs/demo`, as after the commands of
        # docs/personalization.md
        server.wait_for("/")
        yield server


@pytest.fixture
def browser(tmp_path):
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="fedrec-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)  # no Selenium Manager download
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(driver, css: str, text: str | None = None):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, WAIT)
    if text is None:
        return wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, css), text))
    return driver.find_element(By.CSS_SELECTOR, css)


def _recommended(driver, catalogue: set[str]) -> list[str]:
    """The titles in #recommended, checked: 10 items, each a title of the model's catalogue and a score."""
    from selenium.webdriver.common.by import By

    _wait(driver, "#recommended li.rec")
    items = driver.find_elements(By.CSS_SELECTOR, "#recommended li.rec")
    titles = [li.find_element(By.CSS_SELECTOR, ".title").text.strip() for li in items]
    scores = [li.find_element(By.CSS_SELECTOR, ".score").text.strip() for li in items]
    assert len(items) == 10, f"{len(items)} recommendations shown, not 10"
    assert all(titles) and set(titles) <= catalogue, titles
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", s) and 1.0 <= float(s) <= 5.0 for s in scores), scores
    return titles


def _screenshot(driver, path: Path) -> None:
    """The whole page, not the first screenful: the window is made as tall as the document."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, height)
    inner = driver.execute_script("return window.innerHeight")  # the window's frame takes some of its height
    driver.set_window_size(1280, min(2 * height - inner, 8000))
    assert driver.save_screenshot(str(path)) and path.stat().st_size > 10_000
    if os.environ.get("FEDREC_SCREENSHOT"):
        target = Path(os.environ["FEDREC_SCREENSHOT"])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    driver.set_window_size(1280, 900)


def test_pick_user_cold_start_opt_out_forget(browser, served, finished_run, tmp_path):  # browser first: fails fast
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    federated = model_dir(finished_run)  # compare/federated: the run the page serves
    item_ids, titles = load_catalogue(federated)
    assert titles is not None, "model.npz has no titles"
    title_of = {str(i): str(t) for i, t in zip(item_ids, titles)}
    catalogue = set(title_of.values())
    split = load_data(RunConfig.from_toml(federated / "config.toml"))
    user = str(split.user_ids[0])
    own = {title_of[str(split.item_ids[i])] for i in split.train.item[split.train.user == 0]}
    try:
        # The bare address shows one line of 403; the printed URL with its token opens a session, and the
        # server drops the token from the address by redirect.
        browser.get(served.url + "/")
        assert browser.find_element(By.TAG_NAME, "body").text.startswith("403 Forbidden: open this page with the URL")
        browser.get(served.login_url("/"))
        _wait(browser, "img#plot")
        assert browser.current_url == served.url + "/" and served.token not in browser.current_url
        # Index: the plot has loaded; pick a user by typing the id.
        plot = _wait(browser, "img#plot")
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", plot) > 0
        field = _wait(browser, "#pick-user #user-input")
        field.clear()
        field.send_keys(user)
        browser.find_element(By.CSS_SELECTOR, "#pick-button").click()
        _wait(browser, "#on-device")
        assert urllib.parse.unquote(browser.current_url).endswith(f"/device/{user}")

        # On this device: its own ratings, vector, bias, bytes; "never uploaded".
        on_device = browser.find_element(By.CSS_SELECTOR, "#on-device").text
        assert "never uploaded" in on_device
        table = browser.find_element(By.CSS_SELECTOR, "#ratings").text
        assert sum(t in table for t in own) >= min(len(own), 5), "the device's ratings are not in #ratings"
        assert len(re.findall(r"-?\d+\.\d+", browser.find_element(By.CSS_SELECTOR, "#vector").text)) >= 8
        assert re.search(r"-?\d", browser.find_element(By.CSS_SELECTOR, "#bias").text)
        assert re.search(r"\d", browser.find_element(By.CSS_SELECTOR, "#bytes-stored").text)
        # Recommended here: 10 titled items the device has not rated.
        picks = _recommended(browser, catalogue)
        assert not set(picks) & own, "a rated movie was recommended"
        # What left this device: one row per round it took part in (every user, every round), the noise that
        # applied, and the privacy budget spent so far.
        uploads = browser.find_elements(By.CSS_SELECTOR, "#uploads tr.upload")
        assert len(uploads) == ROUNDS, f"{len(uploads)} upload rows for a user in all {ROUNDS} rounds"
        assert all("item-emb" in row.text and "central" in row.text for row in uploads), uploads[0].text
        assert re.search(r"\d+\.\d+", browser.find_element(By.CSS_SELECTOR, "#epsilon").text)
        _screenshot(browser, tmp_path / "device.png")
        device_url = browser.current_url

        # A new device: rate 5 movies, get 10 recommendations, none of them the rated ones.
        browser.get(served.url + "/")
        _wait(browser, "#new-device").click()
        form = _wait(browser, "#cold-start-form")
        assert not browser.find_element(By.CSS_SELECTOR, "#opt-in").is_selected(), "opt-in is on by default"
        selects = form.find_elements(By.CSS_SELECTOR, "select.rating")
        assert len(selects) >= RATED
        rated = []
        for select, stars in zip(selects[:RATED], ("5", "4", "5", "1", "2")):
            rated.append(title_of[select.get_attribute("name").removeprefix("rating-")])
            Select(select).select_by_value(stars)
        browser.find_element(By.CSS_SELECTOR, "#fit-button").click()
        seconds = _wait(browser, "#fit-seconds").text
        assert re.search(r"\d+(\.\d+)?", seconds), f"#fit-seconds shows {seconds!r}"
        fresh = _recommended(browser, catalogue)
        assert not set(fresh) & set(rated), f"rated {rated}, recommended {fresh}"

        # Consent: opting out keeps the recommendations; forget erases the device.
        browser.get(device_url)
        _wait(browser, "#opt-out").click()
        assert "opted out" in _wait(browser, "#consent-status", "opted out").text
        _recommended(browser, catalogue)
        _wait(browser, "#forget-button").click()
        assert "erased" in _wait(browser, "#forget-status", "erased").text
        table = browser.find_element(By.CSS_SELECTOR, "#ratings").text if browser.find_elements(
            By.CSS_SELECTOR, "#ratings") else ""
        assert not any(t in table for t in own), "the erased device still lists its ratings"
    except BaseException:
        browser.save_screenshot(str(tmp_path / "failure.png"))
        print(f"failure screenshot: {tmp_path / 'failure.png'}; page: {browser.current_url}; "
              f"serve log: {served.output()[-2000:]}")
        raise

