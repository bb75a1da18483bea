"""Drive the review page in a real browser: `arseg view` started as a process on 127.0.0.1, Debian's headless
Chromium through selenium + chromedriver, the views' pixels read back. Testing/test_web.py and the speed
measurement (speed.py) share it. Needs selenium, chromium and chromedriver; imported only by those two.

Why selenium and not `chromium --headless --screenshot`: the views arrive over a websocket after the page has
loaded, and a one-shot screenshot captures only the loading splash.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
from selenium.webdriver.common.by import By

# a fresh profile and nothing that phones home: on a machine without internet those calls stall Chromium
CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,900")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Page:
    """The running server and one Chromium on it: start, drive, grab the views, stop (close() ends both)."""

    def __init__(self, tmp: Path, volume: Optional[Path], nodule: Sequence[float], extra_args: Sequence[str] = (),
                 env: Optional[Dict[str, str]] = None):
        self.tmp = Path(tmp)
        self.env = dict(env or {})  # on top of this process's environment, for the server
        # volume None: no VOLUME argument (the case comes from extra_args, e.g. --input NAME=PATH)
        self.volume, self.nodule = (Path(volume).resolve() if volume is not None else None), tuple(nodule)
        self.extra_args = list(extra_args)
        self.port = _free_port()
        self.log = self.tmp / "server.log"
        self.downloads = self.tmp / "downloads"
        self.downloads.mkdir(exist_ok=True)
        self.timings = {}
        self.keep_dir: Optional[Path] = None  # where save() and save_page() also put their pictures
        self.server = None
        self.driver = None

    def start_server(self, timeout_s: float = 180.0):
        t0 = time.perf_counter()
        with open(self.log, "wb") as log:
            volumes = [str(self.volume)] if self.volume is not None else []
            command = [sys.executable, "-m", "ARSegLib.cli", "view", *volumes, "--port", str(self.port),
                       *self.extra_args]
            self.server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp,
                                           env={**os.environ, **self.env})
        while "arseg view: serving" not in self.log.read_text(errors="replace"):
            if self.server.poll() is not None or time.perf_counter() - t0 > timeout_s:
                raise AssertionError(f"the server did not start:\n{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)
        self.timings["server_start_s"] = round(time.perf_counter() - t0, 2)

    def start_browser(self):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for flag in CHROME_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={tempfile.mkdtemp(dir=self.tmp, prefix='chromium-')}")
        options.add_experimental_option("prefs", {"download.default_directory": str(self.downloads),
                                                  "download.prompt_for_download": False,
                                                  "profile.default_content_setting_values.automatic_downloads": 1})
        self.driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        self.driver.set_page_load_timeout(60)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def open(self, timeout_s: float = 60.0) -> float:
        """Load the page; seconds until every view has drawn an image."""
        t0 = time.perf_counter()
        self.driver.get(self.url)
        self.wait(lambda: len(self.views()) >= 4 and all(self.driver.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth > 0", img) for img in self.views()),
            timeout_s, "the four views to draw")
        return time.perf_counter() - t0

    def worker_pids(self):
        """The inference worker processes the server started (its children running ARSegLib.worker)."""
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                cmdline = (stat.parent / "cmdline").read_bytes()
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
            if ppid == self.server.pid and b"ARSegLib.worker" in cmdline:
                pids.append(int(stat.parent.name))
        return pids

    def close(self):
        if self.driver is not None:
            self.driver.quit()
            self.driver = None
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(15)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait(15)

    # ------------------------------------------------------------------------------------------ driving

    def wait(self, condition, timeout_s: float, what: str):
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout_s:
            if condition():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; server log:\n"
                             f"{self.log.read_text(errors='replace')[-3000:]}")

    def by_id(self, element_id: str):
        return self.driver.find_element(By.ID, element_id)

    def text(self, element_id: str) -> str:
        return self.by_id(element_id).get_attribute("textContent").strip()

    def views(self):
        """The views' images, largest first: the axial view is the large one of the "Axial Primary" layout."""

        images = self.driver.find_elements(By.CSS_SELECTOR, "img")
        return sorted(images, key=lambda e: -e.size["width"] * e.size["height"])

    def axial(self) -> np.ndarray:
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(self.views()[0].screenshot_as_png)).convert("RGB")).astype(np.int16)

    def settled_axial(self, before: Optional[np.ndarray] = None, timeout_s: float = 20.0) -> np.ndarray:
        """The axial view once it differs from `before` (if given) and two grabs 0.4 s apart agree."""
        t0 = time.perf_counter()
        last = self.axial()
        while time.perf_counter() - t0 < timeout_s:
            time.sleep(0.4)
            now = self.axial()
            changed = before is None or now.shape != before.shape or np.abs(now - before).mean() > 0.05
            if changed and now.shape == last.shape and np.abs(now - last).max() == 0:
                return now
            last = now
        return last

    def nodules(self):
        return [e.text for e in self.driver.find_elements(By.CSS_SELECTOR, ".arseg-nodule")]

    def goto_nodule(self):
        field = self.by_id("arseg-goto")
        field.clear()
        field.send_keys(", ".join(f"{v}" for v in self.nodule))
        self.by_id("arseg-goto-button").click()

    def click_axial_centre(self):
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(self.driver).move_to_element(self.views()[0]).click().perform()

    def wait_run(self, timeout_s: float = 300.0) -> str:
        self.wait(lambda: self.text("arseg-run-state") in ("done", "failed", "cancelled"), timeout_s, "the run")
        return self.text("arseg-run-state")

    def save(self, picture: np.ndarray, name: str):
        from PIL import Image

        for folder in [self.tmp] + ([self.keep_dir] if self.keep_dir else []):
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(picture.astype(np.uint8)).save(folder / name)

    def save_page(self, name: str):
        if self.keep_dir:
            self.keep_dir.mkdir(parents=True, exist_ok=True)
            self.driver.save_screenshot(str(self.keep_dir / name))


def consensus_pixels(picture: np.ndarray, half: int = 80) -> int:
    """Pixels near the view's centre whose colour is the consensus amber (outline at full opacity, fill at half
    over grey CT): red and green well above blue, red above green, as no grey, heat or cyan point is."""
    h, w, _ = picture.shape
    window = picture[h // 2 - half:h // 2 + half, w // 2 - half:w // 2 + half]
    r, g, b = window[..., 0], window[..., 1], window[..., 2]
    return int(((r - b > 60) & (g - b > 30) & (r >= g) & (r - g < 90)).sum())
