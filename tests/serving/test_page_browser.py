"""`diffbody serve` end to end in a real headless browser (Debian's chromium and chromium-driver, which .ci/run
installs, driven by selenium): the test starts the server on a free localhost port with its defaults (the shipped
zoo), uploads scikit-image's astronaut, restores it, downloads the PNG and checks that it decodes to the pixels
`diffbody restore` writes with the same settings, seed and a batch of one; then, in a new session, uploads a corrupt
file beside a good photo and sees the message and the good photo's restoration. The browser's console must show no
error and its network log no request off localhost; the first session's files must be gone once it ended. A
screenshot of the page after the restore is written (its path is printed; $DIFFBODY_SCREENSHOTS, if set, gets a
copy). The test stops the server itself and bounds its own time (DEADLINE_S)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from diffbody_jax.cli.main import main

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
DEADLINE_S = 600  # the whole test: server start (the zoo unpacked), two requests, the command-line restore
STEPS, GUIDANCE, SEED = 4, 0, 5  # a short restore: the comparison needs equal settings, not the paper's preset

pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the browser test ran past its {DEADLINE_S} s")
        return left


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`diffbody serve --port PORT` in a child process; its output collected line by line."""

    def __init__(self, port: int, deadline: Deadline):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "diffbody_jax.cli.main", "serve", "--port", str(port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()
        while not any("Running on local URL" in line for line in self.lines):
            if self.proc.poll() is not None or deadline.left() < 0:
                raise RuntimeError("diffbody serve did not start:\n" + "".join(self.lines[-40:]))
            time.sleep(0.5)

    @property
    def weights(self) -> str:
        return next(line.split("weights: ", 1)[1].strip() for line in self.lines if line.startswith("weights: "))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # Ctrl-C: the server deletes its folder on the way out
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def _browser(downloads: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1200",
                "--disable-background-networking", "--disable-component-update", "--no-first-run"):
        options.add_argument(arg)  # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    return driver


def _wait(deadline: Deadline, what: str, condition, poll: float = 0.5, limit: float = 60):
    """condition()'s first true value, polled for at most `limit` seconds and within the deadline."""
    end = time.monotonic() + limit
    while True:
        value = condition()
        if value:
            return value
        if deadline.left() < poll or time.monotonic() > end:
            raise TimeoutError(f"waited {limit:g} s for {what}")
        time.sleep(poll)


def _set_number(driver, elem_id: str, value) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def _restore(driver, deadline: Deadline, *uploads: Path) -> str:
    """Uploads files into a fresh page, presses Restore and returns the message box's text once it reports."""
    from selenium.webdriver.common.by import By

    driver.get(driver.current_url)
    _wait(deadline, "the page", lambda: driver.find_elements(By.CSS_SELECTOR, "#uploads input[type=file]"))
    driver.find_element(By.CSS_SELECTOR, "#uploads input[type=file]").send_keys("\n".join(map(str, uploads)))
    _wait(deadline, "the uploads", lambda: all(u.stem in driver.find_element(By.CSS_SELECTOR, "#uploads").text
                                              for u in uploads))
    _set_number(driver, "steps", STEPS)
    _set_number(driver, "guidance", GUIDANCE)
    _set_number(driver, "seed", SEED)
    driver.find_element(By.CSS_SELECTOR, "#restore").click()

    def reported():
        text = driver.find_element(By.CSS_SELECTOR, "#messages").text
        return text if text.startswith(("Restored", "Nothing restored", "Restore failed", "Settings")) else None

    return _wait(deadline, "the restore", reported, poll=1.0, limit=300)


def test_the_page_restores_in_a_browser_as_the_command_does(tmp_path):
    from selenium.webdriver.common.by import By
    from skimage import data

    deadline = Deadline(DEADLINE_S)
    astronaut, corrupt = tmp_path / "astronaut.png", tmp_path / "corrupt.png"
    Image.fromarray(data.astronaut()).save(astronaut)
    corrupt.write_bytes(astronaut.read_bytes()[:64] + b"\0" * 512)  # a PNG header, then nothing of the image
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    port = _free_port()
    server = Server(port, deadline)
    driver = None
    try:
        driver = _browser(downloads)
        driver.get(f"http://127.0.0.1:{port}/")
        text = _restore(driver, deadline, astronaut)
        assert text.startswith("Restored 1 photo (v1, ddpm 4 steps, CFG 1, guidance 0, seed 5, size 64"), text
        _wait(deadline, "the slider's images", lambda: len(driver.find_elements(By.CSS_SELECTOR, "#slider img")) >= 2)
        gallery = driver.find_elements(By.CSS_SELECTOR, "#intermediates img")
        assert len(gallery) >= 3, "I_reg, I_attn and the pose map in the gallery"
        screenshot = tmp_path / "serve_page.png"
        driver.save_screenshot(str(screenshot))
        print(f"screenshot: {screenshot}")
        if os.environ.get("DIFFBODY_SCREENSHOTS"):
            Path(os.environ["DIFFBODY_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
            shutil.copy(screenshot, Path(os.environ["DIFFBODY_SCREENSHOTS"]) / screenshot.name)
        driver.find_element(By.CSS_SELECTOR, "#download").click()
        downloaded = _wait(deadline, "the download", lambda: [p for p in downloads.glob("*.png")])[0]

        second = tmp_path / "second.png"
        Image.fromarray(data.astronaut()[::-1].copy()).save(second)
        text = _restore(driver, deadline, corrupt, second)  # two files, in a new session: the page was reloaded
        assert text.startswith("Restored 1 photo") and "corrupt.png: " in text and "truncated" in text, text
        view = driver.find_element(By.CSS_SELECTOR, "#view input").get_attribute("value")
        assert view == "second.png", view  # the photo shown: the good one
        assert str(tmp_path) not in text and "/tmp" not in text  # no server path on the page
        server_root = Path(server.weights).parents[1]  # ROOT/zoo/weights: uploads and results live under ROOT
        _wait(deadline, "the first session's files to go (its upload, results, intermediates)",
              lambda: not list(server_root.rglob("astronaut*")))

        console = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert console == [], console
        urls = {json.loads(e["message"])["message"]["params"].get("request", {}).get("url", "")
                for e in driver.get_log("performance")}
        off = sorted(u for u in urls if u and urlparse(u).scheme not in ("data", "blob")
                     and urlparse(u).hostname not in ("127.0.0.1", "localhost"))
        assert off == [], off
        print(f"{len(urls)} requests, all to localhost")
    finally:
        if driver is not None:
            driver.quit()
        weights = server.weights if any(line.startswith("weights: ") for line in server.lines) else None
        cli_weights = tmp_path / "weights"
        if weights:  # the server deletes its unpacked zoo when it stops
            shutil.copytree(weights, cli_weights)
        server.stop()
    assert server.proc.returncode == 0, "".join(server.lines[-30:])
    assert not Path(weights).exists(), "the server's folder (unpacked zoo, uploads, results) is gone"

    rc = main(["restore", str(astronaut), "--out", str(tmp_path / "cli"), "--weights", str(cli_weights),
               "--version", "v1", "--size", "64", "--steps", str(STEPS), "--guidance", str(GUIDANCE),
               "--seed", str(SEED), "--batch", "1", "--quiet"])
    assert rc == 0
    page = np.asarray(Image.open(downloaded))
    cli = np.asarray(Image.open(tmp_path / "cli" / "astronaut.png"))
    assert page.shape == cli.shape == (512, 512, 3)
    np.testing.assert_array_equal(page, cli)
