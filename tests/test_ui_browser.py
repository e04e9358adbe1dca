"""The latent explorer (/ui) in a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by selenium): the whole flow against ``bentoml serve`` on the shipped
model, the fallbacks (a bundle without directions, a vector model) against the service in-process.

Skipped, with the reason, where the browser is not installed (``scripts/setup.sh`` installs it when
it runs as root with apt-get). ``AEGAN_UI_SCREENSHOTS=docs/ui`` saves what the browser showed into
that folder (the pictures in README.md and docs/SERVING.md come from there); without it they go to
the test's temporary directory.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from service_helpers import answers_ready, bentoml_serve

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "models" / "fashion-mnist"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FMNIST = Path(os.environ.get("AEGAN_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
WAIT_S = 30  # longest wait for one thing to appear on the page (a 2-core machine under load)


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the dev extra: scripts/setup.sh)"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} not found: install Debian's {package} (scripts/setup.sh does, as root)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``bentoml serve`` on the shipped bundle, as a user starts it."""
    env = {**os.environ, "AEGAN_MODEL": str(SHIPPED), "AEGAN_DEVICE": "cpu"}
    log = tmp_path_factory.mktemp("ui") / "serve.log"
    try:
        with bentoml_serve(env=env, log=log) as (url, _):
            yield url
    finally:
        print(log.read_text(errors="replace")[-2000:])


@contextmanager
def in_process(bundle: Path, **env: str) -> Iterator[str]:
    """The service on ``bundle`` (and ``AEGAN_*`` settings ``env``) under uvicorn in a thread of
    this process (starts in about a second, where ``bentoml serve`` takes several)."""
    import uvicorn

    from aegan_serve.service import AEGAN

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BENTOML_CONFIG_OPTIONS", f"services.{AEGAN.name}.metrics.enabled=false")
        mp.setenv("AEGAN_MODEL", str(bundle))
        mp.setenv("AEGAN_DEVICE", "cpu")
        for key, value in env.items():
            mp.setenv(key, value)
        listener = socket.socket()  # bound here, before the server starts: no port to lose
        listener.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        server = uvicorn.Server(uvicorn.Config(AEGAN.to_asgi(), log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 60
            while not answers_ready(url):
                assert thread.is_alive(), "the in-process server stopped before it was ready"
                assert time.monotonic() < deadline, f"{url} was not ready within 60 s"
                time.sleep(0.2)
            yield url
        finally:
            server.should_exit = True
            thread.join(timeout=20)
            listener.close()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium look for drivers online
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="aegan-ui-chromium-")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1500",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("AEGAN_UI_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- helpers ------------------------------------------------------------------------------------


def wait_for(driver, condition, what: str):
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    # The page replaces elements as answers arrive (a new grid): look again rather than fail.
    ignored = (StaleElementReferenceException, IndexError)
    wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.05, ignored_exceptions=ignored)
    try:
        return wait.until(lambda d: condition(d))
    except TimeoutException:
        error = driver.find_element("id", "error").text
        raise AssertionError(f"timed out waiting for {what}; error banner: {error!r}") from None


def by_id(driver, element_id: str):
    return driver.find_element("id", element_id)


def shown(driver, element_id: str) -> bool:
    return by_id(driver, element_id).is_displayed()


def tile(driver, index: int, attribute: str) -> str:
    return driver.find_elements("css selector", "#grid .tile")[index].get_attribute(attribute)


def edited(driver, before: str) -> bool:
    """The image in Edit differs from ``before`` and its /decode time is shown."""
    image = driver.find_element("id", "selected-image").get_attribute("src")
    return image != before and "answered" in driver.find_element("id", "decode-time").text


def console_problems(driver, allowed: tuple[str, ...] = ()) -> list[str]:
    """Console messages of level WARNING or worse, except those matching ``allowed``."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] in ("WARNING", "SEVERE")
        and not any(re.search(pattern, entry["message"]) for pattern in allowed)
    ]


def screenshot(driver, path: Path) -> None:
    """The whole page, without empty space below it: the window is fitted to the content."""
    frame = driver.execute_script("return window.outerHeight - window.innerHeight")
    height = driver.execute_script(
        "return Math.ceil(document.body.getBoundingClientRect().bottom + window.scrollY) + 16"
    )
    driver.set_window_size(1280, height + frame)
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(path))


def fetch_bytes(driver, url: str) -> bytes:
    """The bytes behind a URL the page holds (a blob: link), read by the page itself."""
    encoded = driver.execute_async_script(
        """const [url, done] = arguments;
        fetch(url).then(r => r.arrayBuffer()).then(b => {
          let s = ""; new Uint8Array(b).forEach(x => s += String.fromCharCode(x)); done(btoa(s));
        });""",
        url,
    )
    return base64.b64decode(encoded)


def test_explorer_flow_on_the_shipped_model(served, browser, shots, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.keys import Keys

    started = time.monotonic()
    driver = browser
    driver.get(f"{served}/ui")
    assert driver.current_url.endswith("/ui/")

    # Sample: a grid of the default 16 tiles; "new seed" draws another grid.
    wait_for(driver, lambda d: len(d.find_elements("css selector", "#grid .tile")) == 16, "grid")
    assert "fashion-mnist" in by_id(driver, "model-line").text
    assert "PCA of 60000 training latents" in by_id(driver, "model-line").text
    first_grid = [t.get_attribute("src") for t in driver.find_elements("css selector", ".tile")]
    seed_before = by_id(driver, "seed").get_attribute("value")
    by_id(driver, "new-seed").click()
    wait_for(
        driver,
        lambda d: tile(d, 0, "src") != first_grid[0],
        "a new grid after 'New seed'",
    )
    assert by_id(driver, "seed").get_attribute("value") != seed_before
    seed = by_id(driver, "seed")  # back to seed 1, four tiles, lower truncation
    seed.clear()
    seed.send_keys("1")
    count = by_id(driver, "count")
    count.clear()
    count.send_keys("16")
    driver.execute_script(
        "const t = document.getElementById('truncation'); t.value = 0.8;"
        "t.dispatchEvent(new Event('input'));"
    )
    by_id(driver, "sample-button").click()
    wait_for(
        driver,
        lambda d: tile(d, 0, "alt") == "sample 1 of seed 1",
        "the grid of seed 1",
    )
    time.sleep(0.3)  # the grid is replaced in one go; let it settle before clicking

    # Select a tile: it opens in Edit.
    tiles = driver.find_elements("css selector", "#grid .tile")
    tiles[2].click()
    assert "selected" in tiles[2].get_attribute("class")
    wait_for(driver, lambda d: shown(d, "selected-image"), "the selection in Edit")
    assert by_id(driver, "selected-image").get_attribute("src") == tiles[2].get_attribute("src")
    assert by_id(driver, "selected-caption").text == "seed 1, sample 3"

    # Move a slider with the keyboard, as a person would: the image changes through /decode.
    before = by_id(driver, "selected-image").get_attribute("src")
    slider = by_id(driver, "direction-0")
    for _ in range(15):
        slider.send_keys(Keys.ARROW_RIGHT)
    wait_for(
        driver,
        lambda d: edited(d, before),
        "the edited image",
    )
    assert by_id(driver, "direction-0").get_attribute("value") == "1.5"
    print(f"slider move: {by_id(driver, 'decode-time').text}")
    by_id(driver, "use-a").click()
    assert shown(driver, "end-a")

    # Upload a real Fashion-MNIST test image: its reconstruction and PSNR; it becomes the selection.
    if FMNIST.is_dir():
        from training.data import load_fashion_mnist_arrays

        images, _ = load_fashion_mnist_arrays(FMNIST, "test")
        picture = Image.fromarray(images[0])
    else:  # a fresh machine without the dataset: a drawn shirt-like shape
        picture = Image.new("L", (28, 28), 0)
        picture.paste(200, (6, 4, 22, 26))
    upload = tmp_path / "ankle-boot.png"
    picture.resize((112, 112), Image.Resampling.NEAREST).save(upload)
    by_id(driver, "file-input").send_keys(str(upload))
    wait_for(driver, lambda d: "PSNR" in d.find_element("id", "psnr").text, "the reconstruction")
    psnr = float(re.search(r"PSNR ([\d.]+) dB", by_id(driver, "psnr").text).group(1))
    assert 10.0 < psnr < 60.0
    assert shown(driver, "upload-input") and shown(driver, "upload-recon")
    assert by_id(driver, "upload-recon").get_attribute("src").startswith("data:image/png;base64,")
    assert by_id(driver, "selected-caption").text == "reconstruction of ankle-boot.png"
    by_id(driver, "use-b").click()

    # Interpolate from A (the edited sample) to B (the upload); GIF and PNG to download.
    steps = by_id(driver, "steps")
    steps.clear()
    steps.send_keys("8")
    by_id(driver, "interpolate-button").click()
    wait_for(
        driver,
        lambda d: d.execute_script(
            "const a = document.getElementById('animation'), s = document.getElementById('strip');"
            "return !document.getElementById('interpolation').hidden && a.complete &&"
            " a.naturalWidth > 0 && s.complete && s.naturalWidth > 0;"
        ),
        "the interpolation",
    )
    strip_width = driver.execute_script("return document.getElementById('strip').naturalWidth")
    assert strip_width == 8 * 28 + 9 * 2  # eight 28-px frames with 2 px padding
    gif = fetch_bytes(driver, by_id(driver, "download-gif").get_attribute("href"))
    strip = fetch_bytes(driver, by_id(driver, "download-png").get_attribute("href"))
    assert gif[:6] == b"GIF89a" and strip[:8] == b"\x89PNG\r\n\x1a\n"
    assert by_id(driver, "download-gif").get_attribute("download") == "interpolation.gif"
    assert not shown(driver, "error")

    # The upload's latent is the selection: it can be edited too.
    before = by_id(driver, "selected-image").get_attribute("src")
    slider = by_id(driver, "direction-1")
    for _ in range(10):
        slider.send_keys(Keys.ARROW_LEFT)
    wait_for(
        driver,
        lambda d: edited(d, before),
        "the edited upload",
    )
    assert console_problems(driver) == []
    screenshot(driver, shots / "explorer.png")

    # A text file as an image: the service's reason, in words, on the page.
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not an image\n")
    by_id(driver, "file-input").send_keys(str(notes))
    wait_for(driver, lambda d: shown(d, "error"), "the error message")
    message = by_id(driver, "error-text").text
    assert "/reconstruct refused the request" in message
    assert "not a readable image" in message and "HTTP 400" in message
    assert by_id(driver, "psnr").text.startswith("notes.txt was not reconstructed: /reconstruct")
    screenshot(driver, shots / "error.png")
    # The refused upload is logged by Chromium as a failed request; nothing else may be.
    assert console_problems(driver, allowed=(r"/reconstruct - Failed to load resource.*400",)) == []
    print(f"explorer flow in the browser: {time.monotonic() - started:.1f} s")


@pytest.fixture(scope="module")
def plain_bundle(image_bundle: Path) -> Path:
    assert '"directions"' not in (image_bundle / "manifest.json").read_text()  # an older bundle
    return image_bundle


def drop_file(driver, name: str, data: bytes) -> None:
    """Drop a file on the upload box, as a drag from the desktop does."""
    driver.execute_script(
        """const [name, b64] = arguments;
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, { type: "image/png" }));
        const zone = document.getElementById("drop-zone");
        const init = { dataTransfer: dt, bubbles: true, cancelable: true };
        for (const type of ["dragenter", "dragover", "drop"]) {
          zone.dispatchEvent(new DragEvent(type, init));
        }""",
        name,
        base64.b64encode(data).decode(),
    )


def test_bundle_without_directions_gets_random_directions(plain_bundle, browser):
    """An older bundle: random orthonormal directions; an upload by drag and drop; a limit."""
    from PIL import Image

    driver = browser
    with in_process(plain_bundle) as url:
        driver.get(f"{url}/ui/")
        wait_for(driver, lambda d: len(d.find_elements("css selector", ".tile")) == 16, "grid")
        assert "random orthonormal directions" in by_id(driver, "directions-note").text
        assert "no gallery" in by_id(driver, "similar-note").text
        assert by_id(driver, "similar-file").get_attribute("disabled") is not None
        assert by_id(driver, "direction-0").find_element("xpath", "..").text.startswith("random 1")
        driver.find_elements("css selector", ".tile")[0].click()
        before = by_id(driver, "selected-image").get_attribute("src")
        driver.execute_script(
            "const s = document.getElementById('direction-0'); s.value = 2;"
            "s.dispatchEvent(new Event('input'));"
        )
        wait_for(
            driver,
            lambda d: d.find_element("id", "selected-image").get_attribute("src") != before,
            "the edited image",
        )
        buffer = io.BytesIO()
        Image.linear_gradient("L").resize((56, 56)).save(buffer, format="PNG")
        drop_file(driver, "dropped.png", buffer.getvalue())
        wait_for(driver, lambda d: "dropped.png: PSNR" in d.find_element("id", "psnr").text, "drop")
        assert by_id(driver, "selected-caption").text == "reconstruction of dropped.png"
        assert console_problems(driver) == []

        # A limit: more samples than AEGAN_MAX_N (the field's own check is skipped by "New seed").
        count = by_id(driver, "count")
        count.clear()
        count.send_keys("100")
        by_id(driver, "new-seed").click()
        wait_for(driver, lambda d: shown(d, "error"), "the error message")
        message = by_id(driver, "error-text").text
        assert message.startswith("/generate refused the request: n: Input should be less than")
        assert "HTTP 400" in message
        assert len(driver.find_elements("css selector", "#grid .tile")) == 16  # the old grid stays
        refused = r"/generate - Failed to load resource.*400"
        assert console_problems(driver, allowed=(refused,)) == []


def test_vector_model_is_shown_as_a_plot_and_a_table(vector_bundle, browser, shots):
    driver = browser
    with in_process(vector_bundle) as url:
        driver.get(f"{url}/ui/")
        wait_for(driver, lambda d: d.find_elements("css selector", "#vector-plot circle"), "plot")
        assert not shown(driver, "image-ui")
        assert "is a vector model" in by_id(driver, "vector-note").text
        assert len(driver.find_elements("css selector", "#vector-plot circle")) == 64
        assert len(driver.find_elements("css selector", "#vector-table tbody tr")) == 16
        assert console_problems(driver) == []
        screenshot(driver, shots / "vector.png")


def test_similar_panel_finds_the_neighbours_of_the_selection_and_of_an_upload(
    plain_bundle, browser, shots, tmp_path
):
    pytest.importorskip("pyarrow.parquet", reason="the 'batch' extra (pyarrow) is not installed")
    from test_gallery import PICTURES, encode_to, make_collection

    from aegan_batch.index import build_gallery
    from aegan_core.bundle import load_bundle

    pictures = make_collection(tmp_path / "pictures")
    gallery = encode_to(pictures, plain_bundle, tmp_path / "gallery")
    build_gallery(gallery, load_bundle(plain_bundle))
    driver = browser
    with in_process(plain_bundle, AEGAN_GALLERY=str(gallery)) as url:
        driver.get(f"{url}/ui/")
        wait_for(driver, lambda d: len(d.find_elements("css selector", ".tile")) == 16, "grid")
        assert f"Gallery: {PICTURES} images (exact search)" in by_id(driver, "similar-note").text
        assert by_id(driver, "similar-selection").get_attribute("disabled") is not None

        # The selection (a sample) -> its 8 nearest gallery images, nearest first.
        driver.find_elements("css selector", ".tile")[1].click()
        by_id(driver, "similar-selection").click()
        figures = "#similar-results figure"
        wait_for(driver, lambda d: len(d.find_elements("css selector", figures)) == 8, "results")
        captions = [f.text for f in driver.find_elements("css selector", figures)]
        distances = [float(c.rsplit(" · ", 1)[1]) for c in captions]
        assert distances == sorted(distances) and distances[0] > 0
        assert all(c.startswith("group-") for c in captions)
        wait_for(
            driver,
            lambda d: d.execute_script(
                "return [...document.querySelectorAll('#similar-results img')]"
                ".every(i => i.complete && i.naturalWidth === 28)"
            ),
            "the neighbours' pictures",
        )
        assert "nearest gallery images to seed" in by_id(driver, "similar-status").text

        # An upload of a gallery picture finds itself first, at distance 0.
        k = by_id(driver, "similar-k")
        k.clear()
        k.send_keys("3")
        by_id(driver, "similar-file").send_keys(str(pictures / "group-2" / "005.png"))
        wait_for(
            driver,
            lambda d: d.find_element("css selector", figures).text.startswith("group-2/005.png"),
            "the upload's neighbours",
        )
        assert len(driver.find_elements("css selector", figures)) == 3
        assert driver.find_element("css selector", figures).text.endswith(" · 0.000")
        assert console_problems(driver) == []
        screenshot(driver, shots / "similar.png")

        # Something that is not an image: the service's reason on the page.
        notes = tmp_path / "notes.txt"
        notes.write_text("not an image\n")
        by_id(driver, "similar-file").send_keys(str(notes))
        wait_for(driver, lambda d: shown(d, "error"), "the error message")
        assert "/similar refused the request" in by_id(driver, "error-text").text
        assert "not a readable image" in by_id(driver, "similar-status").text


def test_with_keys_on_the_page_asks_for_a_key_and_keeps_it_for_the_tab(
    image_bundle, browser, tmp_path
):
    from selenium.webdriver.support import expected_conditions

    from aegan_serve.apikeys import create_key

    keys = tmp_path / "keys.json"
    key = create_key(keys, "explorer", ["generate", "encode"])
    driver = browser
    with in_process(image_bundle, AEGAN_API_KEYS_FILE=str(keys)) as url:
        driver.get(f"{url}/ui/")
        prompt = wait_for(driver, expected_conditions.alert_is_present(), "the key prompt")
        assert "needs an API key" in prompt.text
        prompt.send_keys("aegan_wrong")
        prompt.accept()
        again = wait_for(driver, expected_conditions.alert_is_present(), "the second prompt")
        assert "refused" in again.text
        again.send_keys(key)
        again.accept()
        wait_for(driver, lambda d: len(d.find_elements("css selector", ".tile")) == 16, "grid")
        assert driver.execute_script("return sessionStorage.getItem('aegan-api-key')") == key
        assert driver.execute_script("return localStorage.length") == 0
        assert key not in driver.execute_script("return document.cookie")
        driver.execute_script("sessionStorage.clear()")
