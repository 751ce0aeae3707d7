"""notebooks/explorer.ipynb as a user gets it: served by Voila on a free local port, opened in headless Chromium
(Debian's ``chromium``, driven by Playwright), changed, run, pinned, broken on purpose.

Needs the ``chromium`` package (``.ci/run`` installs it as root: ``apt-get install -y chromium``) and the Python
packages ``voila`` and ``playwright`` (``make setup``); Playwright's own browser downloads are not used. Without a
browser the test is skipped, saying so. ``$JPMAP_CHROMIUM`` names another Chromium executable. The screenshot is
written to the test's temporary folder, and also to ``$JPMAP_EXPLORER_SCREENSHOT`` when that is set (how the
README's screenshot was made).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "explorer.ipynb"
# The page opens on JPMAP with tiny caps: a query string sets the first run (jpmap_core.explorer.settings_from_query)
QUERY = "n1=25&n2=25&n_max=30&adam_max_iters=50"  # about 1 s: encoder steps, then short descents
# Limits, not expected times (about 10 s to start, 15-25 s to the first result, 1-3 s per run on a 2-core CPU): a CPU
# shared with trainings can be many times slower.
STARTUP_S = 180
TIMEOUT_MS = 180_000  # per wait: the kernel starts and loads torch, the prior and MNIST

pytestmark = pytest.mark.browser


def chromium_executable() -> str:
    path = os.environ.get("JPMAP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip(
            "no Chromium found (PATH: chromium, chromium-browser; or $JPMAP_CHROMIUM): install Debian's package with "
            "`apt-get install -y chromium` (.ci/run does so as root)"
        )
    return path


@pytest.fixture(scope="module")
def voila_url(tmp_path_factory):
    """Voila serving the explorer notebook on 127.0.0.1, a free port; its URL."""
    pytest.importorskip("voila", reason="voila is not installed: `make setup` installs the project's dependencies")
    env = dict(os.environ, JPMAP_OFFLINE="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)  # this checkout
    if not env.get("JPMAP_DATA_DIR") and (ROOT / "data").is_dir():
        env["JPMAP_DATA_DIR"] = str(ROOT / "data")  # the kernel runs in notebooks/, where ./data is not found
    log = tmp_path_factory.mktemp("voila") / "voila.log"
    with socket.socket() as s:  # a free port (Voila moves to the next one if it is taken meanwhile: read its log)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "voila", str(NOTEBOOK), "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = None, time.monotonic() + STARTUP_S
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            m = re.search(r"(http://127\.0\.0\.1:\d+/)", log.read_text())
            url = m.group(1) if m else None
            time.sleep(0.2)
        assert url, f"Voila did not start within {STARTUP_S} s (exit code {proc.poll()}):\n{log.read_text()[-3000:]}"
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _picture(page):
    return page.locator(".jpmap-current .jpmap-picture").screenshot()


def _summary(page) -> str:
    return page.locator(".jpmap-current .jpmap-summary").inner_text()


def _psnr(summary: str) -> str:
    return re.search(r"PSNR (\d+\.\d+) dB", summary).group(1)


def _set(page, css: str, value: str) -> None:
    box = page.locator(f"{css} input")
    box.fill(value)
    box.press("Enter")


def _run_and_wait(page, before: str, expect_error: bool = False) -> None:
    page.locator(".jpmap-run").click()
    if expect_error:
        page.locator(".jpmap-error").filter(has_text="Invalid setting").wait_for(timeout=TIMEOUT_MS)
    else:
        page.wait_for_function(
            "(before) => { const s = document.querySelector('.jpmap-current .jpmap-summary');"
            " return s && s.innerText !== before; }",
            arg=before,
            timeout=TIMEOUT_MS,
        )


def test_explorer_page_changes_method_runs_pins_and_shows_errors(voila_url, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: `make setup`")
    executable = chromium_executable()
    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []  # root needs it
    t0 = time.perf_counter()
    errors: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=args, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.route(re.compile(r"^https?://(?!127\.0\.0\.1)"), lambda route: route.abort())  # offline page
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{voila_url}?{QUERY}", timeout=TIMEOUT_MS)

            # the widgets appear with a first result: JPMAP on an MNIST digit
            page.locator(".jpmap-current .jpmap-summary").wait_for(timeout=TIMEOUT_MS)
            shown = time.perf_counter() - t0
            first, first_picture = _summary(page), _picture(page)
            assert "JPMAP" in first and "seed 0" in first and re.search(r"PSNR \d+\.\d+ dB", first), first
            assert page.locator(".jpmap-error").inner_text().strip() == ""
            page.locator(".jpmap-pin").click()
            page.locator(".jpmap-pinned").wait_for(timeout=TIMEOUT_MS)

            # another method, one of its hyperparameters, another seed; run
            page.locator(".jpmap-method select").select_option(label="VBLE (latent posterior)")
            page.locator(".jpmap-opt-max_iters").wait_for(timeout=TIMEOUT_MS)
            _set(page, ".jpmap-opt-max_iters", "100")
            _set(page, ".jpmap-opt-n_posterior_samples", "20")
            _set(page, ".jpmap-seed", "3")
            _run_and_wait(page, first)
            second = _summary(page)
            assert "VBLE" in second and "seed 3" in second, second
            assert _psnr(second) != _psnr(first)
            assert _picture(page) != first_picture
            assert page.locator(".jpmap-error").inner_text().strip() == ""
            assert page.locator(".jpmap-pinned").count() == 1  # the JPMAP result stays on screen
            computed = time.perf_counter() - t0
            sample = page.locator(".jpmap-sample")  # a posterior method: new samples can be drawn
            assert sample.is_enabled()
            picture = _picture(page)
            sample.click()
            deadline = time.monotonic() + TIMEOUT_MS / 1000
            while _picture(page) == picture and time.monotonic() < deadline:  # the sample joins the picture
                time.sleep(0.2)
            assert _picture(page) != picture, "New sample did not change the picture"
            box = page.locator(".jpmap-explorer").bounding_box()  # the page down to the explorer's last result
            clip = {"x": 0, "y": 0, "width": 1500, "height": min(box["y"] + box["height"] + 16, 3000)}
            page.screenshot(path=str(tmp_path / "explorer.png"), clip=clip)

            # a bad value: the message in the page, no traceback
            _set(page, ".jpmap-opt-max_iters", "0")
            _run_and_wait(page, second, expect_error=True)
            message = page.locator(".jpmap-error").inner_text()
            assert "Invalid setting" in message and "max_iters must be an integer >= 1" in message, message
            assert "Traceback" not in page.content()
            assert not errors, f"JavaScript errors in the page: {errors}"
        finally:
            browser.close()
    if os.environ.get("JPMAP_EXPLORER_SCREENSHOT"):
        shutil.copyfile(tmp_path / "explorer.png", os.environ["JPMAP_EXPLORER_SCREENSHOT"])
    print(f"explorer page: widgets after {shown:.1f} s, second result after {computed:.1f} s")
