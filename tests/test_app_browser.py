"""The whole app once in a real browser: ``clipdex app`` serves a copy of the tiny world's indexed corpus and
Debian's headless Chromium, driven by Selenium, searches, asks (uploading a file whose name is Markdown),
asks again from a second session while the first fires a burst of searches, opens the Collection page, and
searches a collection the app indexed from a folder holding links out of its index root. Screenshots of each
page go to ``artifacts/screenshots/``; timings, the two-session latency included, to
``artifacts/app-browser-timings.json``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "artifacts" / "screenshots"
INSTALL = "apt-get install -y chromium chromium-driver (Debian's packages; .ci/run installs them)"

pytestmark = pytest.mark.slow

# A file name that Markdown would turn into bold, red text, a formula, an emoji and two live links
MARKDOWN_NAME = "**bold** :red[red] $x^2$ :smile: [x](https:evil.example) <https:evil.example>.jpg"
BURST = 50  # searches the first session fires while the second one asks
TWO_SESSION_BOUND_S = 10.0  # the second session's answer, from its click (19 s or none in 120 s before the fix)


@pytest.fixture(scope="module")
def folders(app_db, tiny_world, tmp_path_factory) -> dict[str, Path]:
    """``db``: a copy of the app database plus collection ``links``, which the app's own index job (what the
    Collection page starts; tests/test_app.py drives that page) made from ``folder``, in ``root``, the app's
    only index root: two images (one under a Markdown name), a link to ``outside`` (an image elsewhere) and a
    link to /etc/passwd. Decoded in process (``workers=0``): no decoding processes to start."""
    from clipdex.app.jobs import IndexJobs
    from clipdex.indexer.runner import IndexSettings

    base = tmp_path_factory.mktemp("app-folders")
    db, root, outside = base / "db", base / "root", base / "elsewhere" / "photo.jpg"
    shutil.copytree(app_db, db)
    jpgs = sorted((tiny_world.parent / "images" / "test").rglob("*.jpg"))
    folder = root / "f"
    folder.mkdir(parents=True)
    outside.parent.mkdir()
    shutil.copy(jpgs[0], folder / MARKDOWN_NAME)
    shutil.copy(jpgs[1], folder / "plain.jpg")
    shutil.copy(jpgs[2], outside)
    (folder / "x.jpg").symlink_to(outside)
    (folder / "passwd.jpg").symlink_to("/etc/passwd")
    job = IndexJobs().start(IndexSettings(source=str(folder), db=str(db), collection="links", workers=0),
                            roots=(str(root),))
    deadline = time.monotonic() + 120
    while job.running and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job.summary and job.summary["counts"]["indexed"] == 2, job.error
    return {"db": db, "root": root, "folder": folder, "outside": outside, "base": base}


@pytest.fixture(scope="module")
def server(folders):
    """``clipdex app`` on a free local port; yields its URL and stops it (with its Streamlit child) after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (folders["base"] / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "clipdex", "app", "--db", str(folders["db"]), "--collection",
                             "world", "--port", str(port), "--index-root", str(folders["root"])],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read() == b"ok":
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"clipdex app did not start: {Path(log.name).read_text()}")
        time.sleep(0.3)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)  # the session holds clipdex app and the Streamlit server it started
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium under Selenium, with the system chromedriver (Selenium Manager never downloads)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install -e '.[dev]' for selenium")
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip(f"no chromium/chromedriver on PATH: {INSTALL}")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,2800"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    yield driver
    driver.quit()


def _main_text(d) -> str:
    from selenium.webdriver.common.by import By

    return d.find_element(By.CSS_SELECTOR, '[data-testid="stMain"]').text


def _loaded_images(d, *, inside: str = '[data-testid="stMain"]') -> int:
    """Images in the page's main area that the browser has fetched and decoded."""
    return d.execute_script("return [...document.querySelectorAll(arguments[0] + ' img')]"
                            ".filter(i => i.complete && i.naturalWidth > 0).length", inside)


def _idle(d) -> bool:
    """No script run in progress (Streamlit shows its status widget, "Running... Stop", while one is)."""
    from selenium.webdriver.common.by import By

    return not d.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]')


_BURST_JS = """
const [count, gap] = arguments;
const box = document.querySelector('input[aria-label="Describe the images you want"]');
const setValue = Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set;
window.burst = {fired: 0, started: Date.now(), ended: null};
const fire = () => {  // what typing a query and pressing Enter does, once every gap ms
  setValue.call(box, 'burst query ' + window.burst.fired + ': a small blue star');
  box.dispatchEvent(new Event('input', {bubbles: true}));
  box.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', code: 'Enter', keyCode: 13, bubbles: true}));
  window.burst.fired += 1;
  if (window.burst.fired < count) setTimeout(fire, gap); else window.burst.ended = Date.now();
};
fire();
"""


_CLICK_MORE_LIKE_THIS_JS = """
const buttons = [...document.querySelectorAll('[data-testid="stMain"] button')]
  .filter(b => b.innerText.trim() === 'More like this');
for (const b of buttons) {  // the result card: the smallest block around the button holding one such button
  let card = b.parentElement;
  while (card.querySelectorAll('button').length < 2 && !card.innerText.includes('score')) card = card.parentElement;
  if (card.innerText.includes(arguments[0])) { b.click(); return; }
}
throw new Error('no result named ' + arguments[0]);
"""


def _upload(d, wait, image: Path, name: str) -> None:
    """On the Ask page: upload ``image`` and wait until the page shows it (checked, decoded, named)."""
    from selenium.webdriver.common.by import By

    upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, '[data-testid="stMain"] input[type="file"]'))
    upload.send_keys(str(image))
    wait.until(lambda d: name in _main_text(d) and _loaded_images(d) >= 1 and _idle(d))


def _ask(d, wait) -> tuple[float, int]:
    """On the Ask page, with an image: ask when it was built; returns the seconds from the click on Ask to the
    answer and its evidence images on screen, and the browser's clock (ms) at the click."""
    from selenium.webdriver.common.by import By

    question = d.find_element(By.CSS_SELECTOR, 'input[aria-label^="Your question"]')
    question.send_keys("when was it built?")
    clicked_at = d.execute_script("return Date.now()")
    t0 = time.perf_counter()
    d.find_element(By.XPATH, '//button[.//p[text()="Ask"]]').click()
    wait.until(lambda d: "Evidence" in _main_text(d))
    wait.until(lambda d: _loaded_images(d) >= 1 + 5 and _idle(d))  # the query image and 5 evidence images
    return time.perf_counter() - t0, clicked_at


def _no_markdown_rendered(d) -> None:
    """Nothing in the main area was rendered from MARKDOWN_NAME: no bold, formula, coloured text or link."""
    rendered = d.execute_script("""
        const main = document.querySelector('[data-testid="stMain"]');
        return [...main.querySelectorAll('.katex, a[href*="evil"], strong, b, span')]
          .filter(e => !['STRONG', 'B', 'SPAN'].includes(e.tagName) || ['bold', 'red'].includes(e.innerText.trim()))
          .map(e => e.outerHTML.slice(0, 200));""")
    assert not rendered, rendered


def test_search_ask_and_collection_in_a_real_browser(browser, server, tiny_world, folders):  # browser first: may skip
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    d, wait = browser, WebDriverWait(browser, 90, poll_frequency=0.05)
    SHOTS.mkdir(parents=True, exist_ok=True)
    timings = {}

    # Search: type a query, see the result thumbnails load
    t0 = time.perf_counter()
    d.get(server)
    box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, 'input[aria-label="Describe the images you want"]'))
    timings["first_page_s"] = time.perf_counter() - t0  # includes loading the model once for the process
    from clipdex.data_manifests.pairs import load_pairs

    own_caption = load_pairs(tiny_world, split="corpus").captions[0][0]  # last, for the screenshot
    for query in ("a big red circle", "a small blue star on a striped background", own_caption):
        box.send_keys(Keys.CONTROL, "a", Keys.DELETE, Keys.ENTER)  # back to the empty state: no stale results
        wait.until(lambda d: "Type a description" in _main_text(d) and _loaded_images(d) == 0)
        box.send_keys(query)
        t0 = time.perf_counter()  # from Enter: typing is not the app's time
        box.send_keys(Keys.ENTER)
        wait.until(lambda d: "12 results in" in _main_text(d) and _loaded_images(d) >= 12 and _idle(d))
        timings.setdefault("enter_to_12_images_loaded_s", []).append(round(time.perf_counter() - t0, 3))
        timings.setdefault("search_ms_shown", []).append(int(_main_text(d).split("12 results in ")[1].split(" ms")[0]))
    text = _main_text(d)
    assert "#1 · score" in text and "More like this" in text
    d.save_screenshot(str(SHOTS / "search.png"))

    # Ask: upload a new photo of a landmark under a Markdown file name, ask when it was built, see the answer
    # and the weighted evidence; the name shows as typed, under the image and inside the answer's caption
    image = folders["base"] / MARKDOWN_NAME
    shutil.copy(sorted((tiny_world.parent / "images" / "query").rglob("IMG_*"))[0], image)
    d.get(f"{server}/ask")
    _upload(d, wait, image, MARKDOWN_NAME)
    timings["ask_to_answer_and_evidence_loaded_s"] = _ask(d, wait)[0]
    text = _main_text(d)
    assert "Answer" in text and "when was it built?" in text and "Answered by builtin:" in text
    assert f"about {MARKDOWN_NAME}. Answered by" in text  # escaped inside the sentence, shown as written
    assert "Weight: how much the answer drew on the item" in text
    _no_markdown_rendered(d)
    d.save_screenshot(str(SHOTS / "ask.png"))

    timings["two_sessions"] = _two_sessions(d, wait, server, image)

    # Collection: counts, index type, the last run's report
    d.get(f"{server}/collection")
    wait.until(lambda d: "No file was skipped" in _main_text(d) and "Images\n64" in _main_text(d) and _idle(d))
    text = _main_text(d)
    assert "Images\n64\nCaptions\n320\nModel\nclipdex-world" in text and "Index a folder" in text  # tables are canvases
    d.find_element(By.XPATH, '//button[.//p[starts-with(text(), "Measure recall against")]]').click()
    wait.until(lambda d: "Measured recall on 64 images" in _main_text(d) and _idle(d))
    d.save_screenshot(str(SHOTS / "collection.png"))

    _links_collection(d, wait, folders)
    (REPO / "artifacts" / "app-browser-timings.json").write_text(json.dumps(timings, indent=1))
    print("app browser timings:", json.dumps(timings))
    assert max(timings["search_ms_shown"]) < 1000, timings


def _two_sessions(d, wait, server: str, image: Path) -> dict:
    """Window A fires BURST searches, one every 60 ms; window B (another session), with an image uploaded,
    asks as the burst starts. B's answer must come within TWO_SESSION_BOUND_S, and A must end on the results
    of its last query. Returns the measured latencies."""
    from selenium.webdriver.common.by import By

    d.get(server)
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, 'input[aria-label="Describe the images you want"]'))
    first = d.current_window_handle
    d.switch_to.new_window("window")
    d.get(f"{server}/ask")
    _upload(d, wait, image, image.name)
    second = d.current_window_handle
    d.switch_to.window(first)
    d.execute_script(_BURST_JS, BURST, 60)
    d.switch_to.window(second)
    ask_s, clicked_at = _ask(d, wait)
    answered_at = d.execute_script("return Date.now()")
    d.close()
    d.switch_to.window(first)
    wait.until(lambda d: d.execute_script("return window.burst.ended"))
    burst = d.execute_script("return window.burst")
    last = f"burst query {BURST - 1}: a small blue star"
    box = d.find_element(By.CSS_SELECTOR, 'input[aria-label="Describe the images you want"]')
    wait.until(lambda d: box.get_attribute("value") == last and "12 results in" in _main_text(d) and _idle(d))
    now = d.execute_script("return Date.now()")
    measured = {"second_session_click_to_answer_s": round(ask_s, 3),
                "burst_searches": burst["fired"], "burst_seconds": (burst["ended"] - burst["started"]) / 1000,
                "asked_while_burst_firing": burst["started"] < clicked_at < burst["ended"],
                "answered_while_burst_firing": answered_at < burst["ended"],
                "first_session_last_results_after_burst_s": (now - burst["ended"]) / 1000}
    print("two sessions:", json.dumps(measured))
    assert measured["asked_while_burst_firing"] and burst["fired"] == BURST, measured
    assert ask_s < TWO_SESSION_BOUND_S, measured
    return measured


def _links_collection(d, wait, folders: dict[str, Path]) -> None:
    """Collection ``links`` (its folder held two images and two links out of the root): its last run indexed
    the two images and skipped the links unopened; a search finds only the two, and the Markdown-named one
    shows as written, found and picked."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    picker = d.find_element(By.CSS_SELECTOR, '[data-testid="stSidebar"] input[aria-label="Collection"]')
    picker.click()
    picker.send_keys(Keys.CONTROL, "a")
    picker.send_keys(Keys.DELETE, "links")
    wait.until(lambda d: [o for o in d.find_elements(By.CSS_SELECTOR, '[role="option"]')
                          if o.text == "links"])[0].click()
    wait.until(lambda d: f"Last index run of {folders['folder']}:" in _main_text(d) and _idle(d))
    text = _main_text(d)
    assert f"Last index run of {folders['folder']}: 2 indexed" in text and "2 skipped" in text, text
    d.find_element(By.CSS_SELECTOR, '[data-testid="stSidebarNav"] a[href$="/"]').click()  # same session
    box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, 'input[aria-label="Describe the images you want"]'))
    box.send_keys("a red circle", Keys.ENTER)
    wait.until(lambda d: "2 results in" in _main_text(d) and _loaded_images(d) >= 2 and _idle(d))
    text = _main_text(d)
    assert MARKDOWN_NAME in text and "plain.jpg" in text and "photo.jpg" not in text  # nothing from outside
    _no_markdown_rendered(d)
    d.execute_script(_CLICK_MORE_LIKE_THIS_JS, MARKDOWN_NAME)
    picked = str(folders["folder"] / MARKDOWN_NAME)
    wait.until(lambda d: "image → image" in _main_text(d) and picked in _main_text(d) and _idle(d))
    _no_markdown_rendered(d)
    d.save_screenshot(str(SHOTS / "links.png"))
