"""Browser tier: the real ComfyUI frontend loads this pack's workflows with no missing nodes.

Workflows come from ``/api/workflow_templates`` (the pack's ``example_workflows/``, exactly
as ComfyUI serves them); while the pack ships none, from ``tests/fixtures/*.json``. The tier
fails if nothing was loaded.

"No missing node types" is checked with one in-page probe (``frontend_probe.py``) that works on
every frontend by capability: every node type of the workflow is in
``LiteGraph.registered_node_types`` before loading; no report channel the frontend has
(``app.showMissingNodesError`` calls on 1.32, the ``missingNodesError`` store and the workflow's
``pendingWarnings`` on 1.45) names a type; no missing-nodes dialog (1.32) or error overlay (1.45)
is shown; and no loaded node is flagged ``has_errors``. A negative control loads a workflow with
an unknown node type and requires a report channel, the UI and the node flag to name it. Loading
must also raise no warning/error toast (such as the frontend's "Invalid workflow against zod
schema" alert for a malformed workflow file).
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

from frontend_probe import (
    BOGUS_WORKFLOW,
    DISMISS_JS,
    NO_MISSING_UI_JS,
    assert_missing_reported,
    assert_no_missing_nodes,
    load_workflow,
)
from server_fixture import PACK_FOLDER, pack_node_ids

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
REPO_EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows"

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

    # The frontend knows every node the pack declares (from /object_info).
    ids = sorted(pack_node_ids())
    unknown = page.evaluate("(ids) => ids.filter(t => !(t in window.LiteGraph.registered_node_types))", ids)
    assert unknown == [], f"pack nodes unknown to the frontend: {unknown}"

    for name, wf in workflows:
        result = load_workflow(page, wf)
        shot = tmp_path / f"{_safe(name)}.png"
        page.screenshot(path=str(shot))
        print(f"\n[browser] {name}: {result['nLoaded']} nodes; channels {result['channels']}; "
              f"screenshot {shot}")
        assert_no_missing_nodes(name, result)
        page.evaluate(DISMISS_JS)

    pack_errors = [e for e in errors if PACK_FOLDER in e]
    assert not pack_errors, f"page errors from the pack's web extension: {pack_errors}"


def test_missing_node_detection_works(comfy_server, frontend, tmp_path):
    """Negative control: an unknown node type is reported, shown and flagged by the frontend."""
    page, _ = frontend
    result = load_workflow(page, BOGUS_WORKFLOW)
    shot = tmp_path / "missing_node_control.png"
    page.screenshot(path=str(shot))
    print(f"\n[browser] negative control: {result}; screenshot {shot}")
    assert_missing_reported(result)
    page.evaluate(DISMISS_JS)
    page.wait_for_function(NO_MISSING_UI_JS, timeout=10_000)


#: The frontend's own UI -> API conversion of the graph on the canvas (what "Queue" posts).
TO_API_JS = """async () => {
    const {output} = await window.app.graphToPrompt();
    const out = {};
    for (const [id, node] of Object.entries(output))
        out[id] = {class_type: node.class_type, inputs: node.inputs};
    return out;
}"""


def test_examples_convert_to_their_api_twins(comfy_server, frontend):
    """Each served UI example, loaded and converted by the frontend, is exactly its API twin.

    The e2e tier runs the twins; this makes sure a user who opens the UI file queues that graph.
    """
    page, _ = frontend
    twins = REPO_EXAMPLES / "api"
    checked = 0
    for name, wf in _workflows(comfy_server):
        if not name.startswith("example:"):
            continue
        stem = name.split(":", 1)[1]
        twin = json.loads((twins / f"{stem}.json").read_text(encoding="utf-8"))
        load_workflow(page, wf)
        got = page.evaluate(TO_API_JS)
        page.evaluate(DISMISS_JS)
        assert set(got) == set(twin), (stem, sorted(got), sorted(twin))
        for nid, node in twin.items():
            assert got[nid]["class_type"] == node["class_type"], (stem, nid)
            assert got[nid]["inputs"] == node["inputs"], (stem, nid, got[nid]["inputs"], node["inputs"])
        checked += 1
        print(f"\n[browser] {stem}: {len(twin)} nodes convert to the API twin")
    assert checked == len(list(twins.glob("*.json"))), "some API twins have no served UI example"


def test_example_thumbnails_are_served(comfy_server, frontend):
    """The template browser asks ``/api/workflow_templates/<pack>/<name>.jpg`` for a custom-node
    template's thumbnail (both frontends); every served example has one there, a real JPEG."""
    page, _ = frontend
    names = comfy_server.get_json("/api/workflow_templates").get(PACK_FOLDER, [])
    assert names, "the server lists no example workflows for the pack"
    for name in names:
        url = f"/api/workflow_templates/{PACK_FOLDER}/{urllib.parse.quote(name)}.jpg"
        got = page.evaluate("""async (url) => {
            const r = await fetch(url);
            const img = new Image();
            const ok = await new Promise(res => {
                img.onload = () => res(true);
                img.onerror = () => res(false);
                img.src = url;
            });
            return {status: r.status, type: r.headers.get('content-type'), decoded: ok, w: img.naturalWidth};
        }""", url)
        print(f"\n[browser] thumbnail {name}: {got}")
        assert got["status"] == 200 and got["type"].startswith("image/jpeg"), got
        assert got["decoded"] and got["w"] >= 512, got
