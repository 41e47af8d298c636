"""The workbench page in a real browser (Debian chromium + chromedriver), with every host but loopback blocked."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from conftest import headless_chromium  # noqa: E402
from saliencylab.web.app import ServeConfig, create_app  # noqa: E402
from saliencylab.web.core import ModelEntry  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("SALIENCYLAB_TEST_ARTIFACTS", ROOT / "test-artifacts"))
pytestmark = [pytest.mark.slow, pytest.mark.embedded]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(lite0):
    """The workbench on 127.0.0.1 in a thread, sharing the session's embedded EfficientNet-Lite0."""
    app = create_app(ServeConfig(models=(ModelEntry("efficientnet_lite0"),), device="cpu"))
    app.state.cache.add(ModelEntry("efficientnet_lite0"), lite0)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        thread.join(0.05)
    assert srv.started, "the server did not start"
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    b = headless_chromium("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", performance_log=True)
    b.set_script_timeout(60)
    yield b
    b.quit()


def _wait(browser, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(condition)


def _shot(element) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(element.screenshot_as_png)).convert("RGB")).astype(float)


def _blocks(a: np.ndarray, k: int = 8) -> np.ndarray:
    """Means over k x k blocks: robust to the one-pixel offsets between two element screenshots."""
    h, w = (a.shape[0] // k) * k, (a.shape[1] // k) * k
    return a[:h, :w].reshape(h // k, k, w // k, k, -1).mean(axis=(1, 3))


def _requested(browser) -> list[str]:
    urls = []
    for entry in browser.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    return urls


def test_workbench_in_a_real_browser(server, browser, tmp_path):
    from pydicom.data import get_testdata_file
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    from saliencylab.data.images import load_image
    from saliencylab.render.maps import DEFAULT_ALPHA, to_uint8
    from saliencylab.web.core import png_bytes

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    photo = tmp_path / "chelsea.png"
    photo.write_bytes(png_bytes(to_uint8(load_image("sample:chelsea").pixels)))
    dicom = tmp_path / "ct.dcm"
    shutil.copy(get_testdata_file("CT_small.dcm"), dicom)
    find = browser.find_element

    # 1. a photo with Grad-CAM and SmoothGrad: the top class is a cat
    browser.get(server + "/")
    _wait(browser, lambda b: b.find_elements(By.ID, "m-smoothgrad"))
    find(By.ID, "file").send_keys(str(photo))
    _wait(browser, lambda b: (b.find_element(By.ID, "preview").get_attribute("src") or "").startswith("data:image/png"))
    find(By.ID, "m-smoothgrad").click()
    find(By.CSS_SELECTOR, "#options-panel summary").click()
    samples = find(By.ID, "opt-smoothgrad-n_samples")
    samples.clear()
    samples.send_keys("4")
    find(By.ID, "run").click()
    _wait(browser, lambda b: b.find_element(By.ID, "top5").is_displayed())
    rows = browser.find_elements(By.CSS_SELECTOR, "#top5 tbody tr")
    assert len(rows) == 5 and rows[0].find_elements(By.TAG_NAME, "td")[1].text == "Egyptian cat"
    assert "cat" in rows[1].text and "smoothgrad.n_samples=4" in find(By.ID, "cli").text
    _wait(browser, lambda b: b.execute_script(
        "return Array.from(document.querySelectorAll('.fig.method img')).every(i => i.complete && i.naturalWidth)"))
    find(By.CSS_SELECTOR, "#options-panel summary").click()
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(ARTIFACTS / "serve-explain.png"))

    # 2. the opacity slider, by keyboard: at 0 the overlays are the bare image, raising it changes them
    sg = find(By.CSS_SELECTOR, '.fig.method[data-method="smoothgrad"] .frame')
    cam = find(By.CSS_SELECTOR, '.fig.method[data-method="gradcam"] .frame')
    start = _shot(sg)
    slider = find(By.ID, "opacity")  # it starts at the CLI's --alpha default
    assert float(slider.get_attribute("value")) == DEFAULT_ALPHA
    assert find(By.ID, "opacity-value").text == f"{DEFAULT_ALPHA:.2f}"
    slider.send_keys(Keys.HOME)
    assert find(By.ID, "opacity-value").text == "0.00"
    zero_sg, zero_cam = _shot(sg), _shot(cam)
    assert browser.execute_script("return getComputedStyle(document.querySelector('img[data-heat]')).opacity") == "0"
    assert np.abs(_blocks(zero_sg) - _blocks(zero_cam)).mean() < 3.0  # nothing but the image shows in either
    for _ in range(20):
        slider.send_keys(Keys.ARROW_RIGHT)
    assert find(By.ID, "opacity-value").text == "1.00"
    full = _shot(sg)
    assert np.abs(full - zero_sg).mean() > 10 and np.abs(start - zero_sg).mean() > 3
    assert np.abs(full - zero_sg).mean() > np.abs(start - zero_sg).mean()

    # a colour map change redraws the overlays without recomputing
    before = find(By.CSS_SELECTOR, 'img[data-heat="gradcam"]').get_attribute("src")
    Select(find(By.ID, "cmap")).select_by_visible_text("gray")
    _wait(browser, lambda b: "cmap=gray" in b.find_element(By.CSS_SELECTOR, 'img[data-heat="gradcam"]')
          .get_attribute("src"))
    assert before != find(By.CSS_SELECTOR, 'img[data-heat="gradcam"]').get_attribute("src")

    # 3. a DICOM: window presets are rendered by the server
    find(By.ID, "file").send_keys(str(dicom))
    _wait(browser, lambda b: b.find_element(By.ID, "window-row").is_displayed())
    _wait(browser, lambda b: "DICOM" in b.find_element(By.ID, "status-text").text)
    own = find(By.ID, "preview").get_attribute("src")
    Select(find(By.ID, "window")).select_by_value("lung")
    _wait(browser, lambda b: b.find_element(By.ID, "preview").get_attribute("src") != own)
    assert "lung preset" in find(By.ID, "status-text").text
    find(By.ID, "m-smoothgrad").click()  # Grad-CAM only
    find(By.ID, "run").click()
    _wait(browser, lambda b: b.find_element(By.ID, "downloads").is_displayed()
          and "ct.dcm" in b.find_element(By.ID, "cli").text)
    assert not find(By.ID, "error").is_displayed()
    browser.save_screenshot(str(ARTIFACTS / "serve-dicom.png"))

    # 4. teaching mode on a phantom: mark, then see saliency, lungs and lesions with chance levels
    find(By.ID, "tab-teach").click()
    Select(find(By.ID, "exercise")).select_by_value("phantom-2")
    canvas = find(By.ID, "teach-canvas")
    _wait(browser, lambda b: b.find_element(By.ID, "teach-img").get_attribute("complete") == "true")
    ActionChains(browser).move_to_element_with_offset(canvas, -40, 20).click().perform()
    canvas.send_keys(Keys.SPACE)  # and one mark by keyboard, at the centre
    find(By.ID, "teach-go").click()
    _wait(browser, lambda b: b.find_element(By.ID, "teach-table").is_displayed())
    regions = [r.get_attribute("data-region") for r in browser.find_elements(By.CSS_SELECTOR, "#teach-table tbody tr")]
    assert regions == ["student", "lungs", "lesions", "marker", "border"]
    assert find(By.ID, "teach-lesions").is_displayed() and find(By.ID, "teach-lungs").is_displayed()
    reading = find(By.ID, "teach-reading").text
    assert "Your marks cover" in reading and "inside the lungs" in reading
    browser.save_screenshot(str(ARTIFACTS / "serve-teaching.png"))

    # ... and on the user's own image (the DICOM chosen in the Explain tab)
    Select(find(By.ID, "exercise")).select_by_value("own-image")
    _wait(browser, lambda b: b.find_element(By.ID, "teach-img").get_attribute("complete") == "true")
    ActionChains(browser).move_to_element_with_offset(canvas, 10, -10).click().perform()
    find(By.ID, "teach-go").click()
    _wait(browser, lambda b: b.find_element(By.ID, "teach-table").is_displayed()
          and len(b.find_elements(By.CSS_SELECTOR, "#teach-table tbody tr")) == 2)
    regions = [r.get_attribute("data-region") for r in browser.find_elements(By.CSS_SELECTOR, "#teach-table tbody tr")]
    assert regions == ["student", "border"] and not find(By.ID, "teach-lesions").is_displayed()

    # 5. the API docs page works offline (no Swagger UI from a CDN)
    browser.get(server + "/docs")
    _wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, ".endpoint")) >= 10)
    assert "/api/explain" in find(By.ID, "endpoints").text

    # nothing left the machine, and the page logged no error
    urls = _requested(browser)
    assert urls and all(u.startswith((server + "/", "data:", "blob:")) for u in urls), \
        [u for u in urls if not u.startswith((server, "data:", "blob:"))]
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
