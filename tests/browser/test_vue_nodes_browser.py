"""Browser tier: the pack under the frontend's "Nodes 2.0" (Vue nodes) renderer.

The module's page opens with the user setting ``Comfy.VueNodes.Enabled`` on (through the
server's settings API, see ``conftest.frontend``; put back afterwards). Under that renderer
every node is a DOM element (``[data-node-id]``) instead of being drawn on the canvas, and DOM
widgets are mounted inside it. The tests check that the example workflows load with no missing
nodes there, and that the pack's text panel and hover inspector are mounted in the nodes' Vue
elements and work. A frontend that does not offer the setting skips the module.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from frontend_probe import DISMISS_JS, assert_no_missing_nodes, load_workflow
from inspector_hover import assert_marker, hover_target
from test_frontend import _workflows
from test_inspector_browser import SHOT_ENV, _write_images, e2e_models  # noqa: F401  (fixture)
from test_inspector_browser import _graph as inspector_graph
from test_report_browser import SIZE, check_report
from test_report_browser import _graph as report_graph

VUE_SETTING = "Comfy.VueNodes.Enabled"
FRONTEND_SETTINGS = {VUE_SETTING: True}

#: Is the setting defined by this frontend (its settings registry), and what is its value?
SETTING_JS = """(id) => {
    const s = window.app.extensionManager.setting;
    const defs = s.settings ?? window.app.ui?.settings?.settingsLookup ?? {};
    return {offered: !!defs[id], value: s.get(id)};
}"""

#: The Vue element of the first node of a type, and whether ``selector`` is mounted inside it.
IN_VUE_NODE_JS = """([type, selector]) => {
    const n = window.app.graph.nodes.find(n => n.type === type);
    const el = n && document.querySelector(`[data-node-id="${n.id}"]`);
    const inner = el && el.querySelector(selector);
    return {node: !!n, vueElement: !!el, mounted: !!inner,
            visible: !!(inner && inner.getClientRects().length)};
}"""

#: Wait until the first node of a type has a widget named ``name`` (the pack adds its DOM widget
#: when the node's ``executed`` message arrives), then pan the canvas at zoom 1 to show the node:
#: the Vue renderer only mounts the nodes (and their DOM widgets) that are in view.
SHOW_NODE_JS = """async ([type, name]) => {
    const sleep = (ms) => new Promise(r => setTimeout(r, ms));
    const find = () => window.app.graph.nodes.find(n => n.type === type);
    for (let t = 0; t < 2400 && !(find()?.widgets || []).some(w => w.name === name); t++) await sleep(100);
    const n = find();
    if (!(n?.widgets || []).some(w => w.name === name)) return false;
    const c = window.app.canvas, ds = c.ds;
    const W = c.canvas.clientWidth, H = c.canvas.clientHeight;
    ds.scale = 1;
    const y = n.size[1] + 120 < H ? H / 2 - (n.pos[1] + n.size[1] / 2) : 100 - n.pos[1];
    ds.offset = [W / 2 - (n.pos[0] + n.size[0] / 2), y];
    c.setDirty(true, true);
    await sleep(500);
    return true;
}"""

#: Pan the canvas so that ``selector`` is centred in the viewport; its bounding rect after.
CENTRE_JS = """async (selector) => {
    const el = document.querySelector(selector);
    const ds = window.app.canvas.ds;
    for (let i = 0; i < 3; i++) {
        const r = el.getBoundingClientRect();
        const dx = innerWidth / 2 - (r.left + r.width / 2), dy = innerHeight / 2 - (r.top + r.height / 2);
        if (Math.abs(dx) < 2 && Math.abs(dy) < 2) break;
        ds.offset[0] += dx / ds.scale;
        ds.offset[1] += dy / ds.scale;
        window.app.canvas.setDirty(true, true);
        await new Promise(r => setTimeout(r, 300));
    }
    return el.getBoundingClientRect().toJSON();
}"""


@pytest.fixture(scope="module")
def vue_page(frontend):
    page, errors = frontend
    state = page.evaluate(SETTING_JS, VUE_SETTING)
    if not state["offered"]:
        pytest.skip(f"this frontend offers no {VUE_SETTING} setting (no Nodes 2.0 / Vue nodes renderer)")
    assert state["value"] is True, f"{VUE_SETTING} did not take effect: {state}"
    page.wait_for_function(
        "() => ['dreammatcher.report', 'dreammatcher.inspector'].every("
        "x => (window.app.extensions || []).some(e => e.name === x))", timeout=30_000)
    return page, errors


def _shot_dir(server) -> Path:
    d = Path(os.environ.get(SHOT_ENV) or server.base / "screenshots")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _queue_api_graph(page, graph: dict, name: str) -> None:
    """Open an API-format graph as a UI workflow and queue it from the page.

    The graph goes through ``loadApiJson`` and is then re-opened from its UI serialisation
    (``loadGraphData``), as a saved workflow is: frontend 1.32's Vue renderer does not show DOM
    widgets added later to nodes that ``loadApiJson`` created (1.45's does); nodes of a loaded
    workflow or added by the user are fine on both.
    """
    page.evaluate(DISMISS_JS)
    page.evaluate("""async ([g, n]) => {
        await window.app.loadApiJson(g, n);
        await window.app.loadGraphData(window.app.graph.serialize());
    }""", [graph, name])
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")


def test_example_workflows_render_as_vue_nodes_with_none_missing(comfy_server, vue_page):
    page, errors = vue_page
    workflows = [(n, wf) for n, wf in _workflows(comfy_server) if n.startswith("example:")]
    assert workflows, "the pack ships no example workflow"
    shots = _shot_dir(comfy_server)
    for name, wf in workflows:
        result = load_workflow(page, wf)
        assert_no_missing_nodes(name, result)
        # the Vue renderer is really on: every node is a DOM element
        page.wait_for_function("(n) => document.querySelectorAll('[data-node-id]').length === n",
                               arg=result["nLoaded"], timeout=15_000)
        page.screenshot(path=str(shots / f"vue_{name.split(':')[-1]}.png"))
        page.evaluate(DISMISS_JS)
    assert not [e for e in errors if "dreammatcher" in e.lower()], errors


def test_report_panel_in_vue_nodes(comfy_server, vue_page, e2e_models):  # noqa: F811
    from images import write_reference_png

    page, errors = vue_page
    write_reference_png(comfy_server.base / "input" / "dm_vue_ref.png", SIZE, box=(16, 48, 16, 48), seed=2)
    _queue_api_graph(page, report_graph(e2e_models.checkpoint, "dm_vue_ref.png"), "dm_vue_report.json")
    texts = {}
    for node_type in ("DM_InvertReference", "DM_AMADiagnostics"):
        assert page.evaluate(SHOW_NODE_JS, [node_type, "dm_report"]), f"{node_type}: no report panel"
        sel = f"pre.dm-report[data-node-type='{node_type}']"
        page.wait_for_selector(sel, state="visible", timeout=30_000)
        where = page.evaluate(IN_VUE_NODE_JS, [node_type, "pre.dm-report"])
        assert where == {"node": True, "vueElement": True, "mounted": True, "visible": True}, \
            (node_type, where)
        texts[node_type] = page.evaluate(f"() => document.querySelector(\"{sel}\").textContent")
    assert "reconstruction" in texts["DM_InvertReference"].lower(), texts
    rect = page.evaluate(CENTRE_JS, sel)
    page.wait_for_timeout(500)
    text = texts["DM_AMADiagnostics"]
    fits = page.evaluate(f"() => {{ const p = document.querySelector(\"{sel}\"); "
                         "return [p.clientHeight, p.scrollHeight]; }")
    page.screenshot(path=str(_shot_dir(comfy_server) / "vue_diagnostics_report.png"))
    check_report(text)
    assert rect["width"] > 50 and rect["height"] > 20, rect
    assert fits[0] > 0 and fits[1] <= fits[0] + 2, fits
    assert not [e for e in errors if "dreammatcher" in e.lower()], errors


def test_inspector_hover_in_vue_nodes(comfy_server, vue_page, e2e_models):  # noqa: F811
    page, errors = vue_page
    ref, tgt = _write_images(comfy_server.base / "input")
    _queue_api_graph(page, inspector_graph(e2e_models.checkpoint, ref, tgt), "dm_vue_inspector.json")
    assert page.evaluate(SHOW_NODE_JS, ["DM_SemanticMatch", "dm_inspector"]), "no inspector panel"
    page.wait_for_function("() => window.app.graph.nodes.find(n => n.type === 'DM_SemanticMatch')"
                           ".widgets.find(w => w.name === 'dm_inspector').element.dataset.ready === '1'",
                           timeout=30_000)
    page.wait_for_timeout(500)
    page.screenshot(path=str(_shot_dir(comfy_server) / "vue_inspector_ready.png"))
    where = page.evaluate(IN_VUE_NODE_JS, ["DM_SemanticMatch", ".dm-inspector"])
    if not where["mounted"]:
        # Frontend 1.32's Vue renderer mounts no DOM widget of this node at all, not even ComfyUI's
        # own multiline ``target_prompt`` textarea; 1.45's mounts them. The fallback is allowed only
        # then: the node still shows the composite preview from ui.images, and the extension raised
        # nothing.
        stock = page.evaluate("""() => {
            const n = window.app.graph.nodes.find(n => n.type === 'DM_SemanticMatch');
            const w = n.widgets.find(w => w.name === 'target_prompt');
            return !!(w && w.element && w.element.isConnected);
        }""")
        preview = page.evaluate(IN_VUE_NODE_JS, ["DM_SemanticMatch", "img"])
        print(f"\n[browser] Vue renderer did not mount the inspector panel: {where}; the frontend's own "
              f"multiline widget mounted: {stock}; preview {preview}")
        assert not stock, "the frontend mounts its own DOM widget on this node but not the pack's panel"
        assert where["vueElement"] and preview["mounted"] and preview["visible"], (where, preview)
        assert not [e for e in errors if "dreammatcher" in e.lower()], errors
        return
    assert where == {"node": True, "vueElement": True, "mounted": True, "visible": True}, where
    page.evaluate(CENTRE_JS, ".dm-inspector canvas.dm-tgt")
    state = hover_target(page)
    page.screenshot(path=str(_shot_dir(comfy_server) / "vue_inspector_hover.png"))
    # the target canvas itself receives the pointer (not a canvas overlay or the node's frame)
    assert state["hit"] == "dm-tgt", state["hit"]
    assert_marker(state, errors)
