"""Browser tier: the pack's node docs (``web/docs/<NodeId>.md``) reach the frontend's docs panel.

Both tested frontends ask the server for a custom node's help page at
``/extensions/<pack folder>/docs/<NodeId>/<locale>.md`` and, failing that, at
``/extensions/<pack folder>/docs/<NodeId>.md``: the pack folder is the node's ``python_module``
after ``custom_nodes.`` (the session server links the pack as ``dreammatcher``, the same prefix the
icon test uses). Relative pictures in the page are resolved against ``/extensions/<pack>/docs/``.
When the page cannot be fetched the panel silently falls back to the node's one-line description,
so the panel showing *something* proves nothing; the tests look for text only the Markdown file has.

1. For every pack node (as ``/object_info`` lists it), the page fetched from the browser is the file
   on disk, byte for byte, and its picture is served as a PNG the browser decodes.
2. One node is opened the way a user does: it is added to the canvas, selected with a click on its
   title, and the selection toolbox's info button (``[data-testid=info-button]``, an "i" icon; both
   frontends have it) is clicked. Frontend 1.32.9 (ComfyUI 0.3.75) then opens the node library
   sidebar on the node's help page; 1.45.21 (ComfyUI 0.28.2) opens the right-hand properties panel
   on its "Info" tab. Either way the page's rendered Markdown must show a message quoted only in the
   file's "Typical mistakes" section, its headings, and its picture, loaded (not a broken image).
"""

from __future__ import annotations

import re
from pathlib import Path

from frontend_probe import DISMISS_JS
from server_fixture import ComfyServer
from test_node_search_browser import FETCH_IMAGE_JS, PNG_SIGNATURE, pack_nodes

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "web" / "docs"
#: The toolbox (and with it the info button) shows on selection; make sure a user setting left by
#: another module does not hide it.
FRONTEND_SETTINGS = {"Comfy.Canvas.SelectionToolbox": True}
#: The node opened in the panel, and a phrase only its Markdown file has (an error message quoted in
#: "Typical mistakes"; the node's description and tooltips do not contain it).
PANEL_NODE = "DM_AMAPatch"
PANEL_PHRASE = "This MODEL already carries a DreamMatcher AMA patch"
INFO_BUTTON = "[data-testid=info-button]"

FETCH_TEXT_JS = """async (url) => {
    const r = await fetch(url, {cache: 'no-store'});
    return {status: r.status, contentType: r.headers.get('content-type'), text: await r.text()};
}"""

#: Put one node of ``type`` on an empty canvas at zoom 1; the client point of the middle of its title.
ADD_NODE_JS = """async (type) => {
    const app = window.app, c = app.canvas;
    app.graph.clear();
    const n = window.LiteGraph.createNode(type);
    n.pos = [320, 440];  // well below the top bar: the toolbox floats above the selection
    app.graph.add(n);
    c.ds.scale = 1;
    c.ds.offset = [0, 0];
    c.deselectAll?.();
    c.setDirty(true, true);
    await new Promise(r => setTimeout(r, 400));
    const rect = c.canvas.getBoundingClientRect();
    const titleH = window.LiteGraph.NODE_TITLE_HEIGHT || 30;
    const [x, y] = c.ds.convertOffsetToCanvas([n.pos[0] + Math.min(60, n.size[0] / 3),
                                               n.pos[1] - titleH / 2]);
    return {id: n.id, x: rect.left + x, y: rect.top + y};
}"""

#: The rendered help: the smallest visible element holding both the phrase and a heading of the page
#: (the Markdown's container), its headings, and the page's pictures in the document.
PANEL_JS = """([phrase, heading, picture]) => {
    const box = [...document.querySelectorAll('div, section, article')]
        .filter(el => el.getClientRects().length && el.innerText
                && el.innerText.includes(phrase) && el.innerText.includes(heading))
        .sort((a, b) => a.innerText.length - b.innerText.length)[0];
    const imgs = [...document.querySelectorAll('img')]
        .filter(i => (i.getAttribute('src') || '').includes(picture));
    return {
        found: !!box,
        headings: box ? [...box.querySelectorAll('h1, h2, h3')].map(h => h.innerText.trim()) : [],
        images: imgs.map(i => ({src: i.currentSrc || i.src, complete: i.complete, width: i.naturalWidth})),
    };
}"""
PANEL_FOUND_JS = f"(a) => ({PANEL_JS})(a).found"
PANEL_PICTURE_JS = f"(a) => ({PANEL_JS})(a).images.some(i => i.complete && i.width > 0)"


def _pack_prefix(server: ComfyServer) -> str:
    return f"/extensions/{server.pack_link.name}/docs"


def test_every_node_page_and_picture_is_served(comfy_server: ComfyServer, frontend):
    page, _ = frontend
    nodes = pack_nodes(comfy_server)
    assert nodes, "no pack node in /object_info"
    prefix = _pack_prefix(comfy_server)
    for node_id in nodes:
        path = DOCS / f"{node_id}.md"
        assert path.is_file(), f"{node_id} has no {path.relative_to(REPO)}"
        res = page.evaluate(FETCH_TEXT_JS, f"{prefix}/{node_id}.md")
        assert res["status"] == 200, (node_id, res["status"])
        assert res["text"] == path.read_text(encoding="utf-8"), f"{node_id}: served page differs from disk"
        pictures = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", res["text"])
        assert pictures == [f"images/{node_id}.png"], pictures
        img = page.evaluate(FETCH_IMAGE_JS, f"{prefix}/{pictures[0]}")
        assert img["status"] == 200 and img["head"] == PNG_SIGNATURE, (node_id, img)
        assert img["decodeError"] is None and img["width"] > 0, (node_id, img)
    print(f"\n[browser] {len(nodes)} node docs pages and pictures served under {prefix}/")


def test_info_button_opens_the_packs_page(comfy_server: ComfyServer, frontend, tmp_path: Path):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page, errors = frontend
    text = (DOCS / f"{PANEL_NODE}.md").read_text(encoding="utf-8")
    assert PANEL_PHRASE in text
    description = pack_nodes(comfy_server)[PANEL_NODE].get("description", "")
    assert PANEL_PHRASE not in description  # else the fallback text would pass the test
    page.evaluate(DISMISS_JS)
    spot = page.evaluate(ADD_NODE_JS, PANEL_NODE)
    page.mouse.click(spot["x"], spot["y"])
    selected = page.evaluate("() => Object.keys(window.app.canvas.selected_nodes || {}).map(Number)")
    assert selected == [spot["id"]], f"clicking the title at {spot} selected {selected}"
    try:
        page.wait_for_selector(INFO_BUTTON, state="visible", timeout=10_000)
    except PlaywrightTimeout:
        page.screenshot(path=str(tmp_path / "no_info_button.png"))
        raise AssertionError(f"no selection toolbox info button ({INFO_BUTTON}) for the selected node") \
            from None
    page.locator(INFO_BUTTON).first.click(timeout=10_000)
    args = [PANEL_PHRASE, "Typical mistakes", f"docs/images/{PANEL_NODE}.png"]
    try:
        page.wait_for_function(PANEL_FOUND_JS, arg=args, timeout=20_000)
    except PlaywrightTimeout:
        page.screenshot(path=str(tmp_path / "panel.png"))
        raise AssertionError(f"the docs panel never showed {PANEL_PHRASE!r} from web/docs/{PANEL_NODE}.md "
                             f"(screenshot {tmp_path / 'panel.png'})") from None
    page.wait_for_function(PANEL_PICTURE_JS, arg=args, timeout=10_000)
    state = page.evaluate(PANEL_JS, args)
    page.screenshot(path=str(tmp_path / "panel.png"))
    print(f"\n[browser] docs panel for {PANEL_NODE}: headings {state['headings']}, "
          f"picture {state['images']}; screenshot {tmp_path / 'panel.png'}")
    assert "Typical mistakes" in state["headings"], state
    assert any(i["complete"] and i["width"] > 0 for i in state["images"]), state
    page.evaluate("() => { window.app.graph.clear(); window.app.graph.setDirtyCanvas(true, true); }")
    assert not [e for e in errors if "dreammatcher" in e.lower()], errors
