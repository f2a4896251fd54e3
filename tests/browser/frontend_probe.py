"""One in-page probe for "which node types did the frontend report missing", on any frontend.

ComfyUI frontends report a workflow's unknown node types through different mechanisms, so the
probe looks for each by capability (whichever exists), never by version string:

* ``app.showMissingNodesError(types)``: frontend 1.32 calls it from ``loadGraphData``; it opens
  the "missing nodes" dialog (``.comfy-missing-nodes``). 1.45 still has the method but only
  ``loadApiJson`` calls it. The probe wraps it (test instrumentation inside the page only).
* A Pinia store whose state has ``missingNodesError.nodeTypes`` (1.45's ``missingNodesError``
  store, behind the error overlay and the right-side "Errors" tab).
* ``pendingWarnings.missingNodeTypes`` of the active workflow (1.45's workflow store, reached
  through the public ``app.extensionManager.workflow``).
* UI: the ``.comfy-missing-nodes`` dialog (1.32), or the error overlay
  (``[data-testid="error-overlay"]``, 1.45) showing the frontend's own "missing nodes" message
  (its i18n ``errorOverlay.missingNodes``, so it is locale-independent).
* Nodes LiteGraph created as placeholders for unknown types carry ``has_errors = true`` (both;
  1.45 also flags nodes whose model or input file is missing, so only unregistered types count).

``LOAD_JS`` loads a workflow (``app.loadGraphData``), then samples all channels for a short
window and returns their union, so a report that a later frontend step clears is still seen.
"""

from __future__ import annotations

#: Installs ``window.__dmProbe`` once per page (idempotent); returns the channels that exist.
INSTALL_JS = """() => {
    if (!window.__dmProbe) {
        const app = window.app;
        const typeOf = (t) => (t && typeof t === 'object') ? String(t.type ?? t.class_type ?? '') : String(t);
        const calls = [];
        if (typeof app.showMissingNodesError === 'function') {
            const orig = app.showMissingNodesError;
            app.showMissingNodesError = function (types, ...rest) {
                calls.push(...(Array.isArray(types) ? types : []).map(typeOf));
                return orig.call(this, types, ...rest);
            };
        }
        const vueApp = () => app.vueApp ?? document.querySelector('#vue-app')?.__vue_app__;
        const stores = () => {
            const pinia = vueApp()?.config?.globalProperties?.$pinia;
            return pinia?._s ? [...pinia._s.values()] : [];
        };
        const missingStores = () => stores().filter(s => s && typeof s === 'object'
            && 'missingNodesError' in s);
        const t = (key) => {
            try { return vueApp()?.config?.globalProperties?.$t?.(key); } catch { return undefined; }
        };
        // the overlay's own message for missing nodes, in the page's locale (null: no such text)
        const overlayMessage = () => {
            const key = 'errorOverlay.missingNodes', m = t(key);
            return m && m !== key ? m : null;
        };
        const visible = (e) => !!(e && e.isConnected && e.getClientRects().length);
        window.__dmProbe = {
            channels() {
                return {
                    showMissingNodesError: typeof app.showMissingNodesError === 'function',
                    missingNodesStore: missingStores().length > 0,
                    pendingWarnings: !!app.extensionManager?.workflow,
                    errorOverlay: !!overlayMessage(),
                };
            },
            reset() { calls.length = 0; },
            sample() {
                const fromStore = missingStores()
                    .flatMap(s => s.missingNodesError?.nodeTypes ?? []).map(typeOf);
                const wf = app.extensionManager?.workflow?.activeWorkflow;
                const fromPending = (wf?.pendingWarnings?.missingNodeTypes ?? []).map(typeOf);
                const ui = [];
                if (document.querySelector('.comfy-missing-nodes')) ui.push('dialog:.comfy-missing-nodes');
                const msg = overlayMessage();
                for (const o of document.querySelectorAll('[data-testid="error-overlay"]')) {
                    if (visible(o) && msg && o.innerText.includes(msg)) {
                        ui.push('error-overlay:missing-nodes');
                    }
                }
                // placeholders of unknown types (1.45 also flags nodes whose model/media file is missing)
                const reg = window.LiteGraph.registered_node_types;
                const flagged = (app.graph?.nodes ?? [])
                    .filter(n => n.has_errors === true && !(n.type in reg)).map(n => n.type);
                return {calls: [...calls], store: fromStore, pending: fromPending, ui, flagged};
            },
            dismiss() {
                document.querySelectorAll('.p-toast-close-button, .p-dialog-close-button, '
                    + '[data-testid="error-overlay-dismiss"]').forEach(b => b.click());
            },
        };
    }
    return window.__dmProbe.channels();
}"""

#: Loads ``wf`` and reports what the frontend said about it (run ``INSTALL_JS`` first).
LOAD_JS = """async (wf) => {
    const probe = window.__dmProbe;
    const sleep = (ms) => new Promise(r => setTimeout(r, ms));
    const registered = window.LiteGraph.registered_node_types;
    const defs = (wf.definitions && wf.definitions.subgraphs) || [];
    const wanted = [...(wf.nodes || []), ...defs.flatMap(s => s.nodes || [])].map(n => n.type);
    const unregistered = [...new Set(wanted.filter(t => !(t in registered)))];
    probe.dismiss();
    await sleep(300);
    probe.reset();
    await window.app.loadGraphData(wf);
    // union of every channel over a window: dialogs and overlays mount, stores settle
    const seen = {calls: new Set(), store: new Set(), pending: new Set(), ui: new Set(), flagged: new Set()};
    for (let i = 0; i < 12; i++) {
        const s = probe.sample();
        for (const k of Object.keys(seen)) s[k].forEach(v => seen[k].add(v));
        await sleep(125);
    }
    const by = Object.fromEntries(Object.entries(seen).map(([k, v]) => [k, [...v].sort()]));
    const nodes = window.app.graph.nodes;
    return {
        unregistered,
        channels: probe.channels(),
        reportedBy: {calls: by.calls, store: by.store, pending: by.pending},
        reported: [...new Set([...by.calls, ...by.store, ...by.pending])].sort(),
        ui: by.ui,
        flagged: by.flagged,
        nWanted: (wf.nodes || []).length,
        nLoaded: nodes.length,
        loadedUnregistered: nodes.map(n => n.type).filter(t => !(t in registered)),
        // e.g. "Invalid workflow against zod schema" (the frontend's workflow validation)
        toasts: [...document.querySelectorAll('.p-toast-message-warn, .p-toast-message-error')]
            .map(e => e.innerText.slice(0, 1500)),
    };
}"""

#: Closes what a load left open (dialogs, toasts, the error overlay).
DISMISS_JS = "() => window.__dmProbe && window.__dmProbe.dismiss()"

#: True once no missing-nodes UI is shown any more.
NO_MISSING_UI_JS = "() => !window.__dmProbe || window.__dmProbe.sample().ui.length === 0"

BOGUS_TYPE = "DM_NoSuchNodeForTests"
#: A workflow with one node of an unknown type (the negative control).
BOGUS_WORKFLOW = {
    "last_node_id": 1, "last_link_id": 0, "links": [], "groups": [], "config": {}, "extra": {},
    "version": 0.4,
    "nodes": [{"id": 1, "type": BOGUS_TYPE, "pos": [100, 100], "size": [200, 80],
               "flags": {}, "order": 0, "mode": 0, "inputs": [], "outputs": [], "properties": {},
               "widgets_values": []}],
}


def load_workflow(page, wf: dict) -> dict:
    """Install the probe (once) and load ``wf``; the probe's result."""
    page.evaluate(INSTALL_JS)
    return page.evaluate(LOAD_JS, wf)


def assert_no_missing_nodes(name: str, result: dict) -> None:
    """Every channel of ``result`` is clean and every node of the workflow was loaded."""
    assert result["unregistered"] == [], f"{name}: node types not registered: {result['unregistered']}"
    assert result["reported"] == [], f"{name}: frontend reported missing nodes {result['reportedBy']}"
    assert result["ui"] == [], f"{name}: a missing-nodes dialog/overlay is shown: {result['ui']}"
    assert result["flagged"] == [], f"{name}: nodes flagged has_errors: {result['flagged']}"
    assert result["loadedUnregistered"] == [], result
    assert result["nLoaded"] == result["nWanted"] > 0, result
    assert result["toasts"] == [], f"{name}: the frontend warned while loading it: {result['toasts']}"


def assert_missing_reported(result: dict, missing_type: str = BOGUS_TYPE) -> None:
    """The frontend reported ``missing_type`` (and only it) as missing, and showed it to the user."""
    assert result["unregistered"] == [missing_type], result
    reporting = [k for k, v in result["reportedBy"].items() if v]
    assert reporting, f"no report channel saw it (channels present: {result['channels']}): {result}"
    assert result["reported"] == [missing_type], result
    assert result["ui"], f"the frontend showed no missing-nodes dialog/overlay for an unknown type: {result}"
    assert result["flagged"] == [missing_type], result
