"""Browser tier: every example workflow has a card, with its title and thumbnail, in the template browser.

ComfyUI serves a custom-node pack's ``example_workflows/*.json`` as templates: ``GET
/api/workflow_templates`` lists ``{<pack folder>: [names]}`` and the template browser fetches a
card's thumbnail from ``/api/workflow_templates/<pack folder>/<name>.jpg`` (the ``.jpg`` shipped
beside the ``.json``). ``test_frontend.py`` only fetches those pictures; a user sees them only if
the dialog groups the examples under the pack and renders each card from that URL, so a renamed
thumbnail, a name the frontend quotes differently, or a picture the browser cannot decode would go
unnoticed there. This test does what a user does and looks at the result.

The dialog is opened with the frontend command behind the sidebar's "Templates" button
(``Comfy.BrowseTemplates``). Both tested frontends (1.32.9 on ComfyUI 0.3.75, 1.45.21 on ComfyUI
0.28.2) render the same markup where it matters, so one set of selectors serves both:

* the left navigation is a ``<nav>`` in the dialog whose entries are ``[role=button]`` elements;
  custom-node templates get one entry per pack, labelled with the pack's folder name
  (``PACK_FOLDER``, the name the session server links the pack under);
* the cards sit in ``[data-testid=template-workflows-content]``, each one
  ``[data-testid="template-workflow-<name>"]`` with the title in an ``<h3>`` and the thumbnail an
  ``<img>``.

Neither frontend points the ``<img>`` at the ``.jpg`` URL: both fetch it through an in-memory media
cache and show a ``blob:`` URL of the downloaded bytes. So "loaded from the ``.jpg`` URL" is checked
as: the page requested ``/api/workflow_templates/<pack>/<name>.jpg`` and got 200, and the card has an
``<img>`` (its own URL or a ``blob:``) whose bytes, read back in the page, are exactly the example's
``.jpg`` on disk, which has finished loading (``complete``, ``naturalWidth > 0``) and is drawn at a
non-zero size. Matching bytes (not position) picks the thumbnail, so other pictures a card may carry
(1.45.21 can add model logos) are ignored, and a card showing another example's picture fails.

The examples come from the repository's ``example_workflows/`` (not from the server's list), so an
example the server does not list fails too; in the pack's category the cards must be exactly the
examples. Each card is scrolled into view before it is checked (the grid may load lazily). The dialog
is closed afterwards, even when the test fails, so later tests of the module get a clear page: with
Escape, which closes it on 1.45.21, else with its close button (1.32.9 ignores Escape there).
"""

from __future__ import annotations

import hashlib
import re
import time
import urllib.parse
from pathlib import Path

from server_fixture import PACK_FOLDER

EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows"
CONTENT = "[data-testid=template-workflows-content]"
CARD = "[data-testid^='template-workflow-']"
#: The dialog's close button: labelled on 1.45.21; on 1.32.9 an unlabelled button with a "times" icon.
CLOSE_BUTTON = "button[aria-label='Close dialog'], button:has(> i.pi-times)"
THUMB_PREFIX = f"/api/workflow_templates/{PACK_FOLDER}/"
OPEN_TIMEOUT_MS = 30_000
IMAGE_TIMEOUT_S = 20.0

OPEN_JS = "async () => { await window.app.extensionManager.command.execute('Comfy.BrowseTemplates'); }"

#: Every ``<img>`` of a card: its URL, load state, drawn size, and the SHA-256 of the bytes behind it
#: (read back with ``fetch``, which works for ``blob:`` URLs of the page and same-origin URLs).
CARD_IMAGES_JS = """async (card) => {
    const out = [];
    for (const img of card.querySelectorAll('img')) {
        const src = img.currentSrc || img.src || '';
        const r = img.getBoundingClientRect();
        let sha256 = null, error = null;
        try {
            const buf = await (await fetch(src)).arrayBuffer();
            sha256 = [...new Uint8Array(await crypto.subtle.digest('SHA-256', buf))]
                .map(b => b.toString(16).padStart(2, '0')).join('');
        } catch (e) { error = String(e); }
        out.push({src: src.slice(0, 200), complete: img.complete, width: img.naturalWidth,
                  shownW: Math.round(r.width), shownH: Math.round(r.height), sha256, error});
    }
    return out;
}"""


def _examples() -> list[str]:
    """The example names a user should see: ``example_workflows/*.json`` without ``.json``."""
    return sorted(p.stem for p in EXAMPLES.glob("*.json"))


def _url_path(url: str) -> str:
    """The decoded path of ``url`` (the frontend quotes the spaces of example names)."""
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path)


def _thumbnail(card, name: str) -> tuple[dict | None, list[dict]]:
    """The card's ``<img>`` showing ``<name>.jpg`` once loaded (or when time is up), and all its images.

    Polled: the picture appears only after the media cache has downloaded it.
    """
    want = hashlib.sha256((EXAMPLES / f"{name}.jpg").read_bytes()).hexdigest()
    url_path = THUMB_PREFIX + name + ".jpg"
    deadline = time.monotonic() + IMAGE_TIMEOUT_S
    while True:
        images = card.evaluate(CARD_IMAGES_JS)
        ours = [i for i in images if i["sha256"] == want
                and (i["src"].startswith("blob:") or _url_path(i["src"]) == url_path)]
        loaded = [i for i in ours if i["complete"] and i["width"] > 0]
        if loaded or time.monotonic() > deadline:
            return (loaded or ours or [None])[0], images
        time.sleep(0.25)


def _close_dialog(page) -> None:
    """Escape, then the close button if the dialog is still there; waits until it has gone."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    if not page.locator(CONTENT).count():
        return
    page.keyboard.press("Escape")
    try:
        page.locator(CONTENT).wait_for(state="detached", timeout=2_000)
        return
    except PlaywrightTimeout:  # 1.32.9 keeps this dialog open on Escape
        pass
    page.locator("[role=dialog]").filter(has=page.locator(CONTENT)).locator(CLOSE_BUTTON).first.click()
    page.locator(CONTENT).wait_for(state="detached", timeout=OPEN_TIMEOUT_MS)


def test_every_example_card_shows_title_and_thumbnail(comfy_server, frontend, tmp_path):
    """Templates -> the pack's category: one card per example, titled with its name, showing its jpg."""
    page, _ = frontend
    names = _examples()
    assert names, "the pack ships no example workflows"
    listed = comfy_server.get_json("/api/workflow_templates").get(PACK_FOLDER, [])
    assert sorted(listed) == names, f"server lists {sorted(listed)}, example_workflows/ has {names}"

    requested: dict[str, int] = {}  # thumbnail URL path -> HTTP status, as the page fetched it

    def on_response(response) -> None:
        path = _url_path(response.url)
        if path.startswith(THUMB_PREFIX):
            requested[path] = response.status

    page.on("response", on_response)
    try:
        page.evaluate(OPEN_JS)
        dialog = page.locator("[role=dialog]").filter(has=page.locator(CONTENT))
        dialog.wait_for(state="visible", timeout=OPEN_TIMEOUT_MS)
        entries = dialog.locator("nav [role=button]")
        category = entries.filter(has_text=re.compile(rf"^\s*{re.escape(PACK_FOLDER)}\s*$"))
        assert category.count() == 1, (f"no single {PACK_FOLDER!r} entry in the template browser's "
                                       f"navigation: {entries.all_inner_texts()}")
        category.click()

        cards = dialog.locator(f"{CONTENT} {CARD}")
        page.wait_for_function("([sel, n]) => document.querySelectorAll(sel).length === n",
                               arg=[f"{CONTENT} {CARD}", len(names)], timeout=OPEN_TIMEOUT_MS)
        shown = sorted((c.get_attribute("data-testid") or "").removeprefix("template-workflow-")
                       for c in cards.all())
        assert shown == names, f"cards in the {PACK_FOLDER!r} category: {shown}, expected {names}"

        for name in names:
            card = dialog.locator(CONTENT).get_by_test_id(f"template-workflow-{name}")
            card.scroll_into_view_if_needed()
            assert card.is_visible(), f"the card of {name!r} is not shown"
            title = card.locator("h3").inner_text().strip()
            assert title == name, f"the card of {name!r} is titled {title!r}"
            thumb, images = _thumbnail(card, name)
            print(f"\n[browser] card {name!r}: {thumb}")
            assert thumb, f"no <img> of the card of {name!r} shows {name}.jpg: {images}"
            assert thumb["complete"] and thumb["width"] > 0, f"thumbnail of {name!r} not loaded: {thumb}"
            assert thumb["shownW"] > 0 and thumb["shownH"] > 0, f"thumbnail of {name!r} not drawn: {thumb}"
            url_path = THUMB_PREFIX + name + ".jpg"
            assert requested.get(url_path) == 200, (
                f"the page did not get {url_path} (status {requested.get(url_path)}); got {requested}")
        shot = tmp_path / "template_cards.png"
        page.screenshot(path=str(shot))
        print(f"\n[browser] {len(names)} cards in {PACK_FOLDER!r}; screenshot {shot}")
    finally:
        page.remove_listener("response", on_response)
        if page.locator(CONTENT).count():
            page.screenshot(path=str(tmp_path / "template_dialog_last.png"))
        _close_dialog(page)
