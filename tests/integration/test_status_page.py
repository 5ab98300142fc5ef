"""The gateway's status page in a real headless Chromium (Debian's, driven by Playwright): it
shows the loaded model, and updates by itself when a second model loads. The screenshot is kept
in tests/artifacts/ (the README shows one)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail_on_ci

from .gateway_helpers import start_gateway  # noqa: F401

MODELS = """
[models.first]
backend = "fake"
tokens_per_second = 200

[models.second]
backend = "fake"
load_seconds = 0.5
memory_bytes = "64MiB"
"""
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    path = os.environ.get("STOKER_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        skip_or_fail_on_ci("no chromium to load the status page in (Debian: apt-get install chromium)")
    return path


def test_the_status_page_shows_the_loaded_model_and_updates_by_itself(start_supervisor, start_gateway):
    browser_path = chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_or_fail_on_ci("playwright is not installed (the dev extra has it)")
    sup = start_supervisor(models=MODELS, default_model="first")
    gw = start_gateway(sup)
    import httpx

    done = httpx.post(gw.url + "/v1/completions", json={"model": "first", "prompt": "warm", "max_tokens": 3},
                      timeout=30)
    assert done.status_code == 200
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            problems: list[str] = []  # the console's errors (a missing file, a script error)
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(gw.url + "/")
            page.wait_for_function("document.querySelector('#workers').innerText.includes('first')", timeout=15000)
            assert "idle" in page.inner_text("#workers")
            assert "second" not in page.inner_text("#workers")
            assert "openai" in page.inner_text("#recent") and "length" in page.inner_text("#recent")
            with sup.client() as c:
                c.load("second")
            # No reload: the page's own polling brings the new worker.
            page.wait_for_function("document.querySelector('#workers').innerText.includes('second')",
                                   timeout=15000)
            assert " of " in page.inner_text("#ram-text")  # the budget's bar
            assert page.eval_on_selector("#ram-bar", "e => parseFloat(e.style.width)") > 0
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "status-page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            assert problems == []
        finally:
            browser.close()
