"""The drawing page `/ui/`, driven in a real headless Chromium against a real `mnist-mlops serve`.

The session's trained project (one epoch, a champion and its Bento) is served on a free
port; Selenium opens /ui/, draws a digit with mouse and touch strokes, chooses an image
file, presses Predict and reads the result from the page. The page must show what the
JSON API answers for the very same PNG (a drawing goes through the upload conversion),
a bar per digit, and the champion's registered version.

Chromium and chromedriver come from Debian (`apt-get install chromium chromium-driver`,
done by .ci/run); without them these tests fail, they are never skipped.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pytest

from helpers import Project, Server, blended_batch, serving

API_KEY = "ui-test-key-123"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


# ---- the service --------------------------------------------------------------------------

def champion_version(project: Project) -> str:
    return str(project.mlflow_client().get_model_version_by_alias("mnist-convnet", "champion").version)


@pytest.fixture(scope="module")
def server(served: Server) -> Server:
    """The service as it starts by default: no API key (shared by the session)."""
    return served


@pytest.fixture(scope="module")
def keyed_server(trained_project: Project, tmp_path_factory: pytest.TempPathFactory):
    """The service with $MNIST_MLOPS_API_KEY set: its APIs need the key, the page does not."""
    with serving(trained_project, tmp_path_factory.mktemp("ui-keyed-server"), API_KEY) as srv:
        yield srv


# ---- the browser (the `browser` fixture is in conftest.py) ------------------------------

def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def open_page(driver, server: Server) -> None:
    from selenium.webdriver.common.by import By

    page = httpx.get(f"{server.url}/ui/", timeout=30)
    assert page.status_code == 200 and "<canvas" in page.text, (
        f"GET /ui/ answered {page.status_code}: the page must be served to anyone (a browser cannot send "
        f"the API key when it opens a page; the key is typed into the page): {page.text[:300]}")
    driver.get(f"{server.url}/ui/")
    driver.execute_script("sessionStorage.clear()")
    driver.get_log("browser")  # only this page's console messages count
    driver.get(f"{server.url}/ui/")
    assert driver.title, "the page has no title"
    assert driver.find_element(By.ID, "canvas").is_displayed()


def draw_seven(driver, pointer: str) -> None:
    """A "7": a bar left to right, then a diagonal down-left, as one stroke."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions import interaction
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput
    from selenium.webdriver.common.by import By

    canvas = driver.find_element(By.ID, "canvas")
    if pointer == "mouse":
        chain = ActionChains(driver, duration=10)
        chain.move_to_element_with_offset(canvas, -70, -90).click_and_hold()
        for _ in range(7):
            chain.move_by_offset(20, 0)
        for _ in range(9):
            chain.move_by_offset(-8, 20)
        chain.release().perform()
        return
    # Touch: a finger (pointerType "touch") drawing the same stroke.
    rect = driver.execute_script("const r = arguments[0].getBoundingClientRect();"
                                 "return [r.left + r.width / 2, r.top + r.height / 2];", canvas)
    cx, cy = rect
    finger = PointerInput(interaction.POINTER_TOUCH, "finger")
    builder = ActionBuilder(driver, mouse=finger, duration=10)
    x, y = cx - 70, cy - 90
    builder.pointer_action.move_to_location(int(x), int(y)).pointer_down()
    for _ in range(7):
        x += 20
        builder.pointer_action.move_to_location(int(x), int(y))
    for _ in range(9):
        x, y = x - 8, y + 20
        builder.pointer_action.move_to_location(int(x), int(y))
    builder.pointer_action.pointer_up()
    builder.perform()


def press_predict_and_read(driver, server: Server) -> dict:
    """Press Predict, wait for the answer (or fail with the page's error) and read it back."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.ID, "predict").click()
    WebDriverWait(driver, 60).until(
        lambda d: d.find_element(By.ID, "answer").is_displayed() or d.find_element(By.ID, "error").is_displayed())
    error = driver.find_element(By.ID, "error")
    assert not error.is_displayed(), f"the page showed an error: {error.text}\n--- service log\n{server.log_tail()}"
    bars = driver.find_elements(By.CSS_SELECTOR, "#bars li.bar")
    return {
        "digit": driver.find_element(By.ID, "digit").text.strip(),
        "model_version": driver.find_element(By.ID, "model-version").text.strip(),
        "confidence": driver.find_element(By.ID, "confidence").text.strip(),
        "bars": [(b.get_attribute("data-digit"), float(b.get_attribute("data-probability")),
                  b.find_element(By.CSS_SELECTOR, ".bar-fill").size["width"], "top" in b.get_attribute("class"))
                 for b in bars],
        "status": driver.find_element(By.ID, "status").text,
    }


def api_predict(server: Server, png: bytes, key: str | None = None) -> dict:
    resp = httpx.post(f"{server.url}/predict_image", files={"image": ("digit.png", png, "image/png")},
                      headers={"X-API-Key": key} if key else {}, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def canvas_png(driver) -> bytes:
    url = driver.execute_script("return document.getElementById('canvas').toDataURL('image/png')")
    assert url.startswith("data:image/png;base64,")
    return base64.b64decode(url.split(",", 1)[1])


def check_result(shown: dict, api: dict, champion: str) -> None:
    assert shown["digit"] in [str(d) for d in range(10)], shown
    assert shown["digit"] == str(api["digit"]), (shown, api)
    assert shown["model_version"] == champion == str(api["model_version"]), (shown, api, champion)
    assert [b[0] for b in shown["bars"]] == [str(d) for d in range(10)], "one bar per digit, 0 to 9"
    probs = np.array([b[1] for b in shown["bars"]])
    np.testing.assert_allclose(probs, api["probabilities"], atol=1e-4)
    assert abs(probs.sum() - 1) < 1e-3
    tops = [b[0] for b in shown["bars"] if b[3]]
    assert tops == [shown["digit"]], "the predicted digit's bar is highlighted"
    widths = {b[0]: b[2] for b in shown["bars"]}
    assert widths[shown["digit"]] == max(widths.values()) > 0, "the tallest bar is the predicted digit's"
    assert shown["confidence"].endswith("%")


def save_screenshot(driver, path: Path) -> None:
    assert driver.save_screenshot(str(path))
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n", f"bad screenshot {path}"


# ---- the tests ------------------------------------------------------------------------

@pytest.mark.parametrize("pointer", ["mouse", "touch"])
def test_draw_a_digit_and_predict(pointer: str, server: Server, browser, trained_project: Project,
                                  tmp_path: Path) -> None:
    from mnist_mlops.imaging import decode, to_mnist

    open_page(browser, server)
    assert console_errors(browser) == []
    draw_seven(browser, pointer)
    png = canvas_png(browser)

    # The drawing reads as MNIST does: white ink centred on black after the upload conversion.
    digit = to_mnist(decode(png))
    assert digit.max() == 255 and digit[0].max() == 0 and digit[:, 0].max() == 0 and digit[:, -1].max() == 0
    assert 0.05 < (digit > 127).mean() < 0.4, "dark strokes on white paper must become the digit's ink"

    shown = press_predict_and_read(browser, server)
    check_result(shown, api_predict(server, png), champion_version(trained_project))
    assert "drawing" in shown["status"]
    save_screenshot(browser, tmp_path / f"ui-{pointer}.png")
    assert console_errors(browser) == []


def test_choose_an_image_file_and_predict(server: Server, browser, trained_project: Project,
                                          tmp_path: Path) -> None:
    from PIL import Image, ImageDraw
    from selenium.webdriver.common.by import By

    # A photo-like upload: a dark "1" on light grey paper, bigger than the canvas.
    img = Image.new("RGB", (400, 300), (225, 225, 220))
    ImageDraw.Draw(img).line([(190, 40), (215, 30), (205, 260)], fill=(30, 30, 40), width=22)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    path = tmp_path / "one.png"
    path.write_bytes(buf.getvalue())

    open_page(browser, server)
    browser.find_element(By.ID, "file").send_keys(str(path))
    shown = press_predict_and_read(browser, server)
    check_result(shown, api_predict(server, path.read_bytes()), champion_version(trained_project))
    assert "chosen image" in shown["status"]
    save_screenshot(browser, tmp_path / "ui-file.png")
    assert console_errors(browser) == []


def test_api_key_field(keyed_server: Server, browser, trained_project: Project) -> None:
    """With a key configured the page still opens; Predict explains a 401, then works with the key."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    open_page(browser, keyed_server)
    draw_seven(browser, "mouse")
    browser.find_element(By.ID, "predict").click()
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, 60).until(lambda d: error.is_displayed())
    assert "API key" in error.text and "401" in error.text, error.text
    assert browser.find_element(By.ID, "key-box").get_attribute("open") is not None, "the key field is shown"
    assert not browser.find_element(By.ID, "answer").is_displayed()
    # The failed request is the only console error (Chromium logs the 401 response).
    assert all("401" in m for m in console_errors(browser))

    browser.find_element(By.ID, "api-key").send_keys(API_KEY)
    shown = press_predict_and_read(browser, keyed_server)
    check_result(shown, api_predict(keyed_server, canvas_png(browser), API_KEY), champion_version(trained_project))
    champion = champion_version(trained_project)
    WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.ID, "served-model").text.endswith(f"version {champion}"))
    assert click_feedback(browser, label=3) == "Thanks: recorded as 3."  # the label is sent with the key too
    assert console_errors(browser) == []


def test_empty_canvas_asks_for_a_drawing(server: Server, browser) -> None:
    from selenium.webdriver.common.by import By

    open_page(browser, server)
    browser.find_element(By.ID, "clear").click()
    browser.find_element(By.ID, "predict").click()
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed() and "Draw a digit" in error.text
    assert console_errors(browser) == []


def test_a_blank_image_asks_to_draw_first(server: Server, browser, tmp_path: Path) -> None:
    """An image with no digit on it gets no answer to trust: the page says so, offers no feedback."""
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    path = tmp_path / "empty.png"
    Image.new("L", (300, 300), 250).save(path)
    open_page(browser, server)
    browser.find_element(By.ID, "file").send_keys(str(path))
    browser.find_element(By.ID, "predict").click()
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, 60).until(lambda d: error.is_displayed())
    assert "no digit: draw a digit first" in error.text, error.text
    assert not browser.find_element(By.ID, "answer").is_displayed()
    assert console_errors(browser) == []


def click_feedback(driver, button_id: str | None = None, label: int | None = None) -> str:
    """Press "Right" or a digit under "Wrong? Tap the right digit" and wait for the page's confirmation."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    css = f"#{button_id}" if button_id else f'#digits button[data-label="{label}"]'
    driver.find_element(By.CSS_SELECTOR, css).click()
    status = driver.find_element(By.ID, "feedback-status")
    WebDriverWait(driver, 60).until(lambda d: status.text.startswith(("Thanks", "Not recorded")))
    return status.text


def test_right_and_wrong_buttons_store_the_label(server: Server, browser) -> None:
    """After a prediction the page offers "Right" and ten digits; each tap is stored, the last label wins."""
    from selenium.webdriver.common.by import By

    from mnist_mlops.records import feedback

    store = server.log.parent / "feedback"  # `serving` keeps the shared project's stores untouched
    before = len(feedback.read_all(store))
    open_page(browser, server)
    draw_seven(browser, "mouse")
    shown = press_predict_and_read(browser, server)
    page = browser.find_element(By.ID, "answer").text
    assert "Right" in page and "Wrong? Tap the right digit" in page
    assert [b.text for b in browser.find_elements(By.CSS_SELECTOR, "#digits button")] == [str(d) for d in range(10)]

    digit = int(shown["digit"])
    assert click_feedback(browser, button_id="right") == f"Thanks: recorded as right ({digit})."
    wrong = (digit + 1) % 10
    assert click_feedback(browser, label=wrong) == f"Thanks: recorded as {wrong}."
    pressed = browser.find_elements(By.CSS_SELECTOR, '#feedback button[aria-pressed="true"]')
    assert [b.text for b in pressed] == [str(wrong)]

    records = feedback.read_all(store).records[before:]
    assert [r["label"] for r in records] == [digit, wrong]
    assert {r["predicted"] for r in records} == {digit} and {r["source"] for r in records} == {"feedback"}
    assert records[0]["prediction_id"] == records[1]["prediction_id"]
    assert feedback.accepted(store).labels[-1] == wrong  # relabelled: the newest label is the one kept
    assert console_errors(browser) == []


# ---- the labelling queue and the "Help label" view ----------------------------------------

def queue_ids(server: Server, n: int = 20) -> list[str]:
    resp = server.client.get("/feedback/queue", params={"n": n})
    assert resp.status_code == 200, resp.text
    return [q["prediction_id"] for q in resp.json()["items"]]


def test_the_served_queue_ranks_what_it_answered(keyed_server: Server, trained_project: Project) -> None:
    """GET /feedback/queue: the key guards it; its 20 are the served answers of smallest margin
    (from the probabilities /predict returned), each with a 28×28 PNG; a labelled id leaves.
    (That the blended digits lead a good reader's queue is test_queue's acceptance test: this
    one-epoch champion is unsure of nearly every digit.)"""
    from PIL import Image

    from mnist_mlops.records.queue import margins

    resp = keyed_server.predict(blended_batch(trained_project).tolist())
    assert resp.status_code == 200, resp.text
    answers = resp.json()
    gaps = margins(np.array([a["probabilities"] for a in answers]))
    smallest = {answers[i]["prediction_id"] for i in np.argsort(gaps)[:20]}

    for path, method in (("/feedback/queue?n=20", "GET"), ("/feedback", "POST")):
        assert httpx.request(method, keyed_server.url + path, timeout=30).status_code == 401, path
    resp = keyed_server.client.get("/feedback/queue", params={"n": 20})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["criterion"].startswith("margin"), body["criterion"]
    items = body["items"]
    top = [q["prediction_id"] for q in items]
    assert set(top) == smallest, f"{len(set(top) & smallest)} of the 20 smallest margins queued"
    assert [q["margin"] for q in items] == sorted(q["margin"] for q in items)
    head, data = items[0]["image"].split(",", 1)
    assert head == "data:image/png;base64"
    assert Image.open(io.BytesIO(base64.b64decode(data))).size == (28, 28)
    for bad in ("0", "101", "x", "-3"):
        resp = keyed_server.client.get("/feedback/queue", params={"n": bad})
        assert resp.status_code == 400 and "n must be" in resp.text, (bad, resp.text)

    labelled = keyed_server.client.post("/feedback", json={"prediction_id": top[0], "label": 4})
    assert labelled.status_code == 200, labelled.text
    after = queue_ids(keyed_server)
    assert top[0] not in after and after[0] == top[1], "the labelled id left the queue, the next one leads"


def test_help_label_shows_queued_digits_one_at_a_time(keyed_server: Server, trained_project: Project, browser,
                                                      tmp_path: Path) -> None:
    """"Help label": the queue's first digit is shown; a digit button stores its label and the next
    digit appears; "skip" stores nothing and moves on."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from mnist_mlops.records import feedback

    assert keyed_server.predict(blended_batch(trained_project).tolist()).status_code == 200  # questions to ask
    expected = queue_ids(keyed_server, 3)
    store = keyed_server.log.parent / "feedback"
    before = len(feedback.read_all(store))
    open_page(browser, keyed_server)
    browser.find_element(By.CSS_SELECTOR, "#key-box summary").click()
    browser.find_element(By.ID, "api-key").send_keys(API_KEY)
    browser.find_element(By.ID, "help-start").click()
    digit = browser.find_element(By.ID, "question-digit")
    shown = lambda: digit.get_attribute("data-prediction-id")  # noqa: E731
    WebDriverWait(browser, 60).until(lambda d: digit.is_displayed() and shown())
    assert shown() == expected[0]
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", digit) == 28
    buttons = [b.text for b in browser.find_elements(By.CSS_SELECTOR, "#question-digits button")]
    assert buttons == [*map(str, range(10)), "skip"]

    status = browser.find_element(By.ID, "help-status")
    browser.find_element(By.CSS_SELECTOR, '#question-digits button[data-label="5"]').click()
    WebDriverWait(browser, 60).until(lambda d: status.text == "Thank you: labelled 5." and shown() != expected[0])
    assert shown() == expected[1]
    assert [(r["prediction_id"], r["label"]) for r in feedback.read_all(store).records[before:]] == [(expected[0], 5)]

    browser.find_element(By.ID, "question-skip").click()
    WebDriverWait(browser, 60).until(lambda d: status.text == "Skipped." and shown() == expected[2])
    assert len(feedback.read_all(store)) == before + 1, "a skipped digit stores no label"
    assert expected[0] not in queue_ids(keyed_server)
    save_screenshot(browser, tmp_path / "ui-help-label.png")
    # The page asks GET /model before the key is typed: its 401 is the only console error.
    assert all("/model" in m and "401" in m for m in console_errors(browser)), console_errors(browser)
