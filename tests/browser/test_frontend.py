"""Browser tier: the real ComfyUI frontend loads this pack's workflows with no missing nodes.

Workflows come from ``/api/workflow_templates`` (the pack's ``example_workflows/``, exactly
as ComfyUI serves them); while the pack ships none, from ``tests/fixtures/*.json``. The tier
fails if nothing was loaded.

"No missing node types" is checked three ways: every node type of the workflow is in
``LiteGraph.registered_node_types`` before loading; the frontend's own missing-nodes report
(``app.showMissingNodesError``, which ``loadGraphData`` calls with the missing types) is not
called; and no ``.comfy-missing-nodes`` dialog is in the DOM. A negative control loads a
workflow with an unknown node type and requires all three checks to flag it. Loading must
also raise no warning/error toast (such as the frontend's "Invalid workflow against zod
schema" alert for a malformed workflow file).
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

from server_fixture import PACK_FOLDER, pack_node_ids

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

#: Wraps the app's missing-nodes report (test instrumentation inside the page only).
RECORDER_JS = """() => {
    if (window.__dmMissing) return;
    window.__dmMissing = [];
    const orig = window.app.showMissingNodesError.bind(window.app);
    window.app.showMissingNodesError = (types, ...rest) => {
        window.__dmMissing.push(...types.map(t => (typeof t === 'object' ? t.type : t)));
        return orig(types, ...rest);
    };
}"""

LOAD_JS = """async (wf) => {
    const registered = window.LiteGraph.registered_node_types;
    const defs = (wf.definitions && wf.definitions.subgraphs) || [];
    const wanted = [...(wf.nodes || []), ...defs.flatMap(s => s.nodes || [])].map(n => n.type);
    const unregistered = [...new Set(wanted.filter(t => !(t in registered)))];
    window.__dmMissing.length = 0;
    document.querySelectorAll('.p-toast-close-button, .p-dialog-close-button').forEach(b => b.click());
    await new Promise(r => setTimeout(r, 300));
    await window.app.loadGraphData(wf);
    await new Promise(r => setTimeout(r, 500));  // let dialogs and toasts mount
    const nodes = window.app.graph.nodes;
    return {
        unregistered,
        reported: [...window.__dmMissing],
        dialog: !!document.querySelector('.comfy-missing-nodes'),
        nWanted: (wf.nodes || []).length,
        nLoaded: nodes.length,
        loadedUnregistered: nodes.map(n => n.type).filter(t => !(t in registered)),
        // e.g. "Invalid workflow against zod schema" (the frontend's workflow validation)
        toasts: [...document.querySelectorAll('.p-toast-message-warn, .p-toast-message-error')]
            .map(e => e.innerText.slice(0, 1500)),
    };
}"""

CLOSE_DIALOGS_JS = """() => document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click())"""


def _workflows(server) -> list[tuple[str, dict]]:
    """The pack's example workflows as served by the server; the fixtures while there are none."""
    names = server.get_json("/api/workflow_templates").get(PACK_FOLDER, [])
    out = []
    for name in sorted(names):
        path = f"/api/workflow_templates/{PACK_FOLDER}/{urllib.parse.quote(name)}.json"
        out.append((f"example:{name}", server.get_json(path)))
    if not out:
        for path in sorted(FIXTURES.glob("*.json")):
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and "nodes" in data:  # UI format only
                out.append((f"fixture:{path.stem}", data))
    return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def test_workflows_load_without_missing_nodes(comfy_server, frontend, tmp_path):
    page, errors = frontend
    workflows = _workflows(comfy_server)
    assert workflows, "no workflow to load: neither example_workflows/ nor tests/fixtures/ has one"
    page.evaluate(RECORDER_JS)

    # The frontend knows every node the pack declares (from /object_info).
    ids = sorted(pack_node_ids())
    unknown = page.evaluate("(ids) => ids.filter(t => !(t in window.LiteGraph.registered_node_types))", ids)
    assert unknown == [], f"pack nodes unknown to the frontend: {unknown}"

    for name, wf in workflows:
        result = page.evaluate(LOAD_JS, wf)
        shot = tmp_path / f"{_safe(name)}.png"
        page.screenshot(path=str(shot))
        print(f"\n[browser] {name}: {result['nLoaded']} nodes; screenshot {shot}")
        assert result["unregistered"] == [], f"{name}: node types not registered: {result['unregistered']}"
        assert result["reported"] == [], f"{name}: frontend reported missing nodes {result['reported']}"
        assert not result["dialog"], f"{name}: a missing-nodes dialog is shown"
        assert result["loadedUnregistered"] == []
        assert result["nLoaded"] == result["nWanted"] > 0, result
        assert result["toasts"] == [], f"{name}: the frontend warned while loading it: {result['toasts']}"
        page.evaluate(CLOSE_DIALOGS_JS)

    pack_errors = [e for e in errors if PACK_FOLDER in e]
    assert not pack_errors, f"page errors from the pack's web extension: {pack_errors}"


def test_missing_node_detection_works(comfy_server, frontend, tmp_path):
    """Negative control: an unknown node type is flagged by all three checks."""
    page, _ = frontend
    page.evaluate(RECORDER_JS)
    bogus = {
        "last_node_id": 1, "last_link_id": 0, "links": [], "groups": [], "config": {}, "extra": {},
        "version": 0.4,
        "nodes": [{"id": 1, "type": "DM_NoSuchNodeForTests", "pos": [100, 100], "size": [200, 80],
                   "flags": {}, "order": 0, "mode": 0, "inputs": [], "outputs": [], "properties": {},
                   "widgets_values": []}],
    }
    result = page.evaluate(LOAD_JS, bogus)
    shot = tmp_path / "missing_node_control.png"
    page.screenshot(path=str(shot))
    print(f"\n[browser] negative control screenshot {shot}")
    assert result["unregistered"] == ["DM_NoSuchNodeForTests"], result
    assert result["reported"] == ["DM_NoSuchNodeForTests"], result
    assert result["dialog"], "the frontend showed no missing-nodes dialog for an unknown node type"
    page.evaluate(CLOSE_DIALOGS_JS)
    page.wait_for_function("() => !document.querySelector('.comfy-missing-nodes')", timeout=10_000)
