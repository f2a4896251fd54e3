"""Browser tier: a user finds every pack node in the frontend's node search by its display name.

Users add nodes by double-clicking the empty canvas and typing a name. The frontend builds that
search index from ``/object_info`` (display name, category, description), so a node could load
and run and still be hard to find: a missing or wrong ``display_name``, a category outside
"DreamMatcher", or a name the fuzzy search ranks away. For every pack node, as ``/object_info``
lists it at test time (nodes added to the pack are covered without editing this file), the test
double-clicks an empty spot of the canvas, types the display name into the search box that opens,
and requires an entry in the result list whose text shows that display name and the node's
category, then closes the box with Escape. A screenshot of each result list goes to ``tmp_path``.

The search box differs between the tested frontends, so it is found by its ARIA roles, which
both give it: 1.32.9 shows a PrimeVue AutoComplete in a dialog with ``role="search"``, each
entry an ``li[role=option]`` with the display name on its first line and the category in
``.option-category``; 1.45.21 shows a new search panel (``role="search"`` inside a dialog) whose
entries are ``[role=option]`` rows in ``#results-list``, with name, source badge, category and
description on separate lines. On both, the text input is the ``input[role=combobox]`` whose
``aria-controls`` names the result list, and it has the focus when the box opens. (Only the
``input``: 1.45.21 also renders a live preview of the highlighted node inside the panel, and its
combo widgets are ``button[role=combobox]`` elements.)

The double-click is held like a human one. Playwright's plain ``dblclick`` sends both presses at
once, and both frontends' ``CanvasPointer`` counts a second press only if its event ``timeStamp``
is strictly later than the first one's (and within ``doubleClickTime``, 300 ms): here about one
instant double-click in 30 opened no box. Holding each press ``DBLCLICK_HOLD_MS`` keeps the two
presses apart (no miss in 80 tries).

The pack's icon is also fetched from the page (status, content type, PNG signature) and decoded
by the browser as an image. It is served from ``/extensions/<pack folder>/icon.png``: the
session server links the pack as ``dreammatcher``; ComfyUI-Manager's clone folder
``comfyui-dreammatcher`` is covered by ``tests/e2e/test_manager_install.py``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from frontend_probe import DISMISS_JS
from server_fixture import PACK_FOLDER, ComfyServer

if TYPE_CHECKING:
    from playwright.sync_api import Page

#: The text input of an open node search box (both frontends).
SEARCH_INPUT = "[role=search] input[role=combobox]"
#: Points (fractions of the viewport) for the double-click: the first one that shows the canvas.
CANVAS_SPOTS = ((0.5, 0.5), (0.42, 0.38), (0.58, 0.62))
#: Milliseconds each press of the double-click is held (so the two presses are ~2x this apart).
DBLCLICK_HOLD_MS = 30
OPEN_TIMEOUT_MS = 10_000
RESULT_TIMEOUT_MS = 15_000

#: The open search box: the combobox's value and the text lines of each entry of its result list.
RESULTS_JS = """() => {
    const boxes = [...document.querySelectorAll('$SEARCH_INPUT')]
        .filter(b => b.getClientRects().length);
    return boxes.map(b => {
        const list = document.getElementById(b.getAttribute('aria-controls') || '');
        const options = list ? [...list.querySelectorAll('[role=option]')] : [];
        return {
            value: b.value,
            focused: document.activeElement === b,
            options: options.map(o => o.innerText.split('\\n').map(s => s.trim()).filter(Boolean)),
        };
    });
}""".replace("$SEARCH_INPUT", SEARCH_INPUT)
#: True once the open box lists an entry with a line equal to the display name.
HAS_ENTRY_JS = """(name) => [...document.querySelectorAll('$SEARCH_INPUT')].some(b => {
    const list = document.getElementById(b.getAttribute('aria-controls') || '');
    return !!list && [...list.querySelectorAll('[role=option]')]
        .some(o => o.innerText.split('\\n').some(s => s.trim() === name));
})""".replace("$SEARCH_INPUT", SEARCH_INPUT)
#: True while no search box is open.
CLOSED_JS = f"() => !document.querySelector('{SEARCH_INPUT}')"
#: Is the element at client point ``[x, y]`` the graph canvas (not a node widget, panel or menu)?
IS_CANVAS_AT_JS = "([x, y]) => document.elementFromPoint(x, y) === window.app.canvas.canvas"
#: Fetch a URL from the page and decode it as an image.
FETCH_IMAGE_JS = """async (url) => {
    const r = await fetch(url, {cache: 'no-store'});
    const bytes = new Uint8Array(await r.arrayBuffer());
    let width = 0, height = 0, decodeError = null;
    try {
        const img = new Image();
        img.src = url;
        await img.decode();
        width = img.naturalWidth;
        height = img.naturalHeight;
    } catch (e) {
        decodeError = String(e);
    }
    return {status: r.status, contentType: r.headers.get('content-type'), size: bytes.length,
            head: [...bytes.slice(0, 8)], width, height, decodeError};
}"""
PNG_SIGNATURE = [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]


def pack_nodes(server: ComfyServer) -> dict[str, dict]:
    """``{node id: /object_info entry}`` of every node the server loaded from the pack's folder."""
    module = f"custom_nodes.{server.pack_link.name}"
    info = server.get_json("/object_info")
    return {k: v for k, v in sorted(info.items())
            if v.get("python_module") == module or str(v.get("python_module", "")).startswith(module + ".")}


def _same_category(line: str, category: str) -> bool:
    """Does a line of an entry show ``category`` (a nested one with any path separator)?"""
    return re.sub(r"\s*[/>]\s*", "/", line) == category


def open_search(page: Page) -> tuple[int, int]:
    """Double-click an empty spot of the canvas and wait for the node search box; the spot used."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    vw, vh = page.viewport_size["width"], page.viewport_size["height"]
    spots = [(round(fx * vw), round(fy * vh)) for fx, fy in CANVAS_SPOTS]
    free = [s for s in spots if page.evaluate(IS_CANVAS_AT_JS, list(s))]
    if not free:
        pytest.fail(f"none of {spots} shows the empty canvas (a panel or node covers them)")
    x, y = free[0]
    page.mouse.move(x, y)
    page.mouse.dblclick(x, y, delay=DBLCLICK_HOLD_MS)
    try:
        page.wait_for_selector(SEARCH_INPUT, state="visible", timeout=OPEN_TIMEOUT_MS)
    except PlaywrightTimeout:
        pytest.fail(f"double-clicking the empty canvas at {(x, y)} opened no node search box "
                    f"({SEARCH_INPUT})")
    return x, y


def close_search(page: Page) -> None:
    """Close the open search box as a user would (Escape) and wait until it is gone."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.keyboard.press("Escape")
    try:
        page.wait_for_function(CLOSED_JS, timeout=5000)
    except PlaywrightTimeout:
        pytest.fail("Escape did not close the node search box")


def search_entries(page: Page, name: str) -> dict:
    """Type ``name`` into the open search box; its value and entries once one shows ``name``.

    Fails with what the box does list when no entry shows the name in time.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    if not page.evaluate(RESULTS_JS)[0]["focused"]:
        page.locator(SEARCH_INPUT).click()
    page.keyboard.type(name)
    try:
        page.wait_for_function(HAS_ENTRY_JS, arg=name, timeout=RESULT_TIMEOUT_MS)
    except PlaywrightTimeout:
        pytest.fail(f"searching {name!r} lists no entry named so: {page.evaluate(RESULTS_JS)}")
    (result,) = page.evaluate(RESULTS_JS)
    return result


def test_every_pack_node_is_found_by_its_display_name(comfy_server: ComfyServer, frontend,
                                                      tmp_path: Path):
    """Each pack node's display name, typed into the search box, lists it with its category."""
    page, errors = frontend
    nodes = pack_nodes(comfy_server)
    assert nodes, f"no node in /object_info comes from custom_nodes.{comfy_server.pack_link.name}"
    if comfy_server.pack_ids:  # the IDs the pack's sources declared when the server started
        assert set(nodes) == comfy_server.pack_ids, (sorted(nodes), sorted(comfy_server.pack_ids))
    page.evaluate(DISMISS_JS)
    page.evaluate("() => { window.app.graph.clear(); window.app.graph.setDirtyCanvas(true, true); }")
    page.wait_for_timeout(300)
    page.wait_for_function(CLOSED_JS, timeout=5000)

    for node_id, entry in nodes.items():
        name, category = entry["display_name"], entry["category"]
        assert name and name != node_id, f"{node_id} has no display name of its own: {name!r}"
        assert category.split("/")[0] == "DreamMatcher", f"{node_id} is in category {category!r}"
        open_search(page)
        try:
            result = search_entries(page, name)
        finally:
            page.screenshot(path=str(tmp_path / f"search_{node_id}.png"))
        assert result["value"] == name, result
        hits = [lines for lines in result["options"] if name in lines]
        assert hits, result
        assert any(_same_category(ln, category) for lines in hits for ln in lines if ln != name), (
            f"the entry for {name!r} does not show its category {category!r}: {hits}")
        close_search(page)
    print(f"\n[browser] {len(nodes)} pack nodes found by name in the node search: "
          f"{', '.join(nodes)}; screenshots in {tmp_path}")
    assert page.evaluate("() => window.app.graph.nodes.length") == 0  # searching added no node

    pack_errors = [e for e in errors if PACK_FOLDER in e]
    assert not pack_errors, f"page errors from the pack's web extension: {pack_errors}"


def test_pack_icon_loads_in_the_page(comfy_server: ComfyServer, frontend):
    """The icon is served to the page as a PNG the browser can decode."""
    page, _ = frontend
    url = f"/extensions/{comfy_server.pack_link.name}/icon.png"
    res = page.evaluate(FETCH_IMAGE_JS, url)
    assert res["status"] == 200, res
    assert (res["contentType"] or "").startswith("image/png"), res
    assert res["size"] > 0 and res["head"] == PNG_SIGNATURE, res
    assert res["decodeError"] is None and res["width"] > 0 and res["height"] > 0, res
