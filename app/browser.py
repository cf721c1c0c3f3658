"""Drive the viewer in a real browser: start the Streamlit server of ``sae-cafe view`` on a run, wait for its
health endpoint, open pages in headless Chromium and check them. Shared by the browser tests
(``tests/test_app_browser.py``, ``tests/test_foundation_e2e.py``, ``tests/test_export.py``) and
``benchmarks/bench_own_model_quick.py``.

It lives in ``app/`` (not ``tests/``) because benchmarks import it too and ``app`` is an installed package next
to the viewer it drives; it is not in ``sae_cafe`` because ``sae_cafe`` never imports ``app`` or the viewer's
dependencies (Streamlit, Selenium).

Only Debian's browser is used: ``/usr/bin/chromium`` with ``/usr/bin/chromedriver``
(``apt-get install chromium chromium-driver``), both passed to Selenium explicitly so that Selenium Manager
never looks for or downloads a browser or driver. :func:`unavailable` says what is missing;
:func:`require` turns that into a :class:`BrowserUnavailable` error.

Hand-written glue around ``subprocess`` and Selenium's WebDriver (no library does "start this Streamlit app
and wait for it" for an arbitrary command).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sae_cafe.errors import SaeCafeError

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
REPO = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run")
ERROR_BOXES = '[data-testid="stException"], [data-testid="stAlertContentError"]'


class BrowserUnavailable(SaeCafeError, RuntimeError):
    """Chromium, its driver, Selenium or Streamlit is not installed."""


class ViewerStartError(SaeCafeError, RuntimeError):
    """The viewer's server exited or did not answer its health endpoint in time."""


class PageCheckError(AssertionError):
    """A viewer page shows an exception, an error box or a traceback."""


def unavailable(streamlit: bool = True) -> str | None:
    """Why the browser checks cannot run here (what to install), or None when everything is there.
    ``streamlit=False``: a static page only (the HTML atlas), no server needed."""
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if not DRIVER.exists():
        missing.append(f"{DRIVER} (apt-get install chromium-driver)")
    if importlib.util.find_spec("selenium") is None:
        missing.append("selenium (pip install selenium, the [test] extra)")
    if streamlit and importlib.util.find_spec("streamlit") is None:
        missing.append("streamlit (pip install streamlit, the [app] extra)")
    if not missing:
        return None
    return ("needs Debian's Chromium and its driver driven through Selenium; missing: " + "; ".join(missing)
            + " — never a downloaded browser")


def require(streamlit: bool = True) -> None:
    """Raise :class:`BrowserUnavailable` naming what to install when :func:`unavailable` finds something missing."""
    why = unavailable(streamlit)
    if why:
        raise BrowserUnavailable(why)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----- the server ---------------------------------------------------------------------------------------------
@dataclass
class Server:
    """A running server: its base ``url`` (``http://127.0.0.1:<port>``), process and log file path."""

    url: str
    proc: subprocess.Popen
    log: Path


def viewer_command(path: str | Path, port: int, cli: bool = False) -> list[str]:
    """The command line that serves the viewer on ``path`` (artifact root or run directory): ``streamlit run``
    directly (``app.cli.command``) or, with ``cli=True``, ``python -m sae_cafe view PATH --headless`` (the user's
    command, which execs into the same server)."""
    if cli:
        return [sys.executable, "-m", "sae_cafe", "view", str(path), "--port", str(port), "--headless"]
    from .cli import command

    return command(path, port=port)


@contextmanager
def serve(cmd: Sequence[str], url: str, log: str | Path, timeout: float = 120, cwd: str | Path = REPO,
          grace: float = 10) -> Iterator[Server]:
    """Start ``cmd`` (output to the file ``log``), wait until ``<url>/_stcore/health`` answers ``ok`` and yield a
    :class:`Server`; stopped (terminate, then kill after ``grace`` s) on exit. :class:`ViewerStartError` with
    the log's tail when the process exits first or ``timeout`` s pass."""
    log = Path(log)
    fd: IO[str] = open(log, "w+")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen(list(cmd), stdout=fd, stderr=subprocess.STDOUT, cwd=str(cwd),
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + timeout
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                fd.flush()
                state = f"exit {proc.poll()}" if proc.poll() is not None else f"no answer within {timeout:.0f} s"
                raise ViewerStartError(f"the viewer did not start ({state}): {' '.join(map(str, cmd))}\n"
                                       f"log {log}:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield Server(url, proc, log)
    finally:
        proc.terminate()  # `sae-cafe view` execs into the server: this stops it
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        fd.close()


@contextmanager
def viewer(path: str | Path, log: str | Path, cli: bool = False, timeout: float = 120, port: int | None = None,
           grace: float = 10) -> Iterator[Server]:
    """Serve the viewer on ``path`` on a free port of 127.0.0.1 (:func:`viewer_command`, :func:`serve`); needs
    Streamlit (:class:`BrowserUnavailable` otherwise)."""
    if importlib.util.find_spec("streamlit") is None:
        raise BrowserUnavailable("the viewer needs streamlit: pip install streamlit (the [app] extra)")
    port = port or free_port()
    with serve(viewer_command(path, port, cli), f"http://127.0.0.1:{port}", log, timeout, grace=grace) as s:
        yield s


# ----- the browser --------------------------------------------------------------------------------------------
def chromium(profile: str | Path, window: tuple[int, int] = (1400, 1800), page_load_timeout: float = 120,
             performance_log: bool = False) -> Any:
    """Headless Debian Chromium through Selenium (a ``selenium.webdriver.Chrome``) with its own profile folder;
    ``performance_log``: record the DevTools performance log (network requests). The caller quits it
    (or uses :func:`browser`)."""
    require(streamlit=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for a in (*CHROMIUM_ARGS, f"--window-size={window[0]},{window[1]}", f"--user-data-dir={profile}"):
        opts.add_argument(a)
    if performance_log:
        opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=opts)
    driver.set_page_load_timeout(page_load_timeout)
    return driver


@contextmanager
def browser(profile: str | Path, **kwargs: Any) -> Iterator[Any]:
    """:func:`chromium` as a context manager (quit on exit)."""
    driver = chromium(profile, **kwargs)
    try:
        yield driver
    finally:
        driver.quit()


def settle(driver: Any, timeout: float = 150) -> None:
    """Wait until the page's script run finished: no running indicator three polls (~2 s) in a row."""
    from selenium.webdriver.common.by import By

    deadline, quiet = time.time() + timeout, 0
    while time.time() < deadline and quiet < 3:
        running = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]')
        quiet = 0 if running else quiet + 1
        time.sleep(0.7)


def body_text(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def error_boxes(driver: Any) -> list[str]:
    """The texts (first 500 characters) of the page's exception and error boxes."""
    from selenium.webdriver.common.by import By

    return [e.text[:500] for e in driver.find_elements(By.CSS_SELECTOR, ERROR_BOXES)]


def wait_title(driver: Any, title: str, timeout: float = 150) -> None:
    """Wait until the page's ``h1`` shows ``title``."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, "h1"), title))


def button(driver: Any, prefix: str, timeout: float = 150) -> Any:
    """The first button whose text starts with ``prefix``, waited for: a page reached from another one can pass
    :func:`settle` while it is still rendering (its run indicator not shown yet), so never look it up once."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def find(d: Any) -> Any:
        return next((b for b in d.find_elements(By.TAG_NAME, "button") if b.text.startswith(prefix)), False)

    return WebDriverWait(driver, timeout).until(find, f"no button starting with {prefix!r} within {timeout:.0f} s")


def check_page(driver: Any, title: str, main: str | None = None, count: int = 1, timeout: float = 150) -> str:
    """Wait for the page title and its main element (``count`` matches of the CSS selector ``main``), then for
    the run to finish; raise :class:`PageCheckError` on an exception or error box or a traceback in the text,
    and return the page text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait_title(driver, title, timeout)
    if main:
        WebDriverWait(driver, timeout).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, main)) >= count)
    settle(driver, timeout)
    errors, body = error_boxes(driver), body_text(driver)
    if errors:
        raise PageCheckError(f"page {title!r} shows errors: {errors}")
    if "Traceback" in body or "Error:" in body:
        raise PageCheckError(f"page {title!r} shows an error in its text:\n{body[:2000]}")
    return body


__all__ = ["CHROMIUM", "DRIVER", "BrowserUnavailable", "PageCheckError", "Server", "ViewerStartError", "body_text",
           "browser", "button", "check_page", "chromium", "error_boxes", "free_port", "require", "serve", "settle",
           "unavailable", "viewer", "viewer_command", "wait_title"]
