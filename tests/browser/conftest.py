"""Browser tier: Debian's headless Chromium, driven by Python Playwright, on the real server.

No browser is ever downloaded (never ``playwright install``): Playwright only drives the
system binary (``/usr/bin/chromium``, installed by ``scripts/setup_host.sh``; override with
``DM_CHROMIUM``). Every request that does not go to the loopback test server is aborted, so the
tier cannot touch the network.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("DM_CHROMIUM", "/usr/bin/chromium")
#: docs/host.md's flags. Playwright adds ``--headless`` and its own empty ``--user-data-dir``.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]
APP_READY_JS = """() => !!(window.app && window.app.graph && window.app.canvas && window.LiteGraph
    && window.app.extensionManager
    && Object.keys(window.LiteGraph.registered_node_types || {}).length > 100)"""
#: The start-up workflow (restored or default) is open: ``loadGraphData`` has got as far as
#: opening it in the workflow store (frontends without that store: at once).
STARTUP_LOADED_JS = """() => !window.app.extensionManager.workflow
    || !!window.app.extensionManager.workflow.activeWorkflow"""
#: Settings every page gets (a returning user: no first-run templates dialog over the canvas).
BASE_SETTINGS = {"Comfy.TutorialCompleted": True}


@pytest.fixture(scope="module")
def frontend(comfy_server, request):
    """A page with the ComfyUI frontend loaded and its app ready; yields ``(page, errors)``.

    Shared by the tests of a module (starting Chromium and the frontend costs ~10 s on two
    cores); tests close dialogs and toasts they leave behind. ``errors`` collects uncaught
    page errors. The first-run templates dialog is turned off through the server's settings
    API (as a returning user would have it). A module may set ``FRONTEND_SETTINGS`` (a dict)
    to open its page with more user settings; they are put back as they were afterwards (the
    server keeps settings for the whole session).
    """
    with open_frontend(comfy_server, dict(getattr(request.module, "FRONTEND_SETTINGS", {}))) as opened:
        yield opened


@contextlib.contextmanager
def open_frontend(server, extra: dict | None = None, path: str = "/",
                  viewport: tuple[int, int] = (1600, 1000)):
    """Chromium on ``server.url + path`` with the app ready (see :func:`frontend`), in a ``viewport``
    (width, height) window."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: run `make test` (it installs Debian's chromium) "
                    "or `apt-get install -y chromium`, or set DM_CHROMIUM")
    from playwright.sync_api import sync_playwright

    extra = dict(extra or {})
    before = server.get_json("/settings")
    server.post_json("/settings", {**BASE_SETTINGS, **extra})
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                                     timeout=60_000)
        try:
            context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
            context.route("**/*", lambda route: route.continue_()
                          if route.request.url.startswith(server.url) else route.abort())
            page = context.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server.url + path, wait_until="domcontentloaded", timeout=60_000)
            page.wait_for_function(APP_READY_JS, timeout=120_000)
            # let the start-up workflow load finish, or it races the tests' own loads (on 1.45
            # its late missing-nodes bookkeeping overwrote that of a graph loaded meanwhile)
            page.wait_for_function(STARTUP_LOADED_JS, timeout=60_000)
            page.wait_for_timeout(1500)
            yield page, errors
        finally:
            browser.close()
            if extra:
                # unset ones go back to the frontend's default (null: no stored value)
                server.post_json("/settings", {k: before.get(k) for k in extra})
