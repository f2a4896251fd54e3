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
