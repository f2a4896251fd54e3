"""Browser tier: with the frontend's language set to Chinese, a pack node shows the pack's Chinese texts.

The core tier checks that ``locales/zh/*.json`` is complete; this checks the other half, that the
running host and frontend actually use it. The page is opened with the user setting ``Comfy.Locale``
set to ``zh`` through the server's settings API before the page loads (as a user who picked 中文 in
the settings has it); ``conftest.open_frontend`` puts the setting back afterwards, which the test
asserts, because the server (and its settings) is shared by the whole session.

How the frontend applies the pack's files (the same on 1.32 and 1.45): the server merges every
pack's ``locales/<lang>/main.json`` and ``nodeDefs.json`` into ``GET /i18n``; the frontend loads that
into its i18n messages and, when it registers the node definitions, translates ``display_name`` (the
registered type's ``title``, so ``LiteGraph.createNode`` gives a node titled in Chinese), each input
socket's ``localized_name`` and each widget's ``label`` from ``nodeDefs.<id>.inputs.<name>.name``.
LiteGraph draws a slot's ``label || localized_name || name`` (``renderingLabel``) and a widget's
``label || name``, so those are read here. The expected texts come from ``locales/zh/nodeDefs.json``,
not from this file, so a retranslation needs no edit here.

Frontend 1.32 (ComfyUI 0.3.75's) merges ``/i18n`` into its messages before it lazily loads its own
Chinese, and that load replaces the whole zh message set, so a pack's Chinese never reaches the page;
1.45 merges the pack's messages again after the load. The test detects the loss by what the page
holds (the frontend's own zh texts present, the pack's key absent), not by version, and then merges
what ``/i18n`` served into the page's i18n and refreshes the node definitions, as the frontend does
on a locale change, so the keys, their paths and the label/title plumbing are still checked there.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import open_frontend
from server_fixture import PACK_FOLDER, ComfyServer

REPO = Path(__file__).resolve().parents[2]
LOCALE_SETTING = "Comfy.Locale"
NODE_TYPE = "DM_AMAPatch"
SOCKET_INPUT = "model"  # a link-only input: drawn as a socket label
WIDGET_INPUT = "strength"  # a widget input: drawn as the widget's label
CJK = re.compile(r"[\u4e00-\u9fff]")
#: The frontend line (ComfyUI 0.3.75's) whose lazy load of its own Chinese replaces a pack's.
FRONTEND_DROPPING_PACK_ZH = "1.32."

#: What the page's i18n holds for a key: in the active locale, and whether the zh messages have it.
I18N_JS = """(key) => {
    const vue = window.app.vueApp ?? document.querySelector('#vue-app')?.__vue_app__;
    const g = vue?.config?.globalProperties;
    const i18n = g?.$i18n;
    const locale = i18n ? (typeof i18n.locale === 'object' ? i18n.locale.value : i18n.locale) : null;
    return {locale, text: g?.$t ? g.$t(key) : null, inZh: !!(g?.$te && g.$te(key, 'zh'))};
}"""
#: Merge the server's translations of one locale into the page's messages and re-register the node
#: definitions, as a frontend that keeps pack translations across its lazy locale load does itself.
#: The i18n instance is the one the frontend's Vue app provides (``$i18n`` exposes no merge).
REMERGE_JS = """async ([locale, messages]) => {
    const vue = window.app.vueApp ?? document.querySelector('#vue-app')?.__vue_app__;
    const provides = vue?._context?.provides ?? {};
    const i18n = [...Object.getOwnPropertySymbols(provides), ...Object.keys(provides)]
        .map(k => provides[k]).find(v => typeof v?.global?.mergeLocaleMessage === 'function');
    if (!i18n) return false;
    i18n.global.mergeLocaleMessage(locale, messages);
    await window.app.extensionManager.command.execute('Comfy.RefreshNodeDefinitions');
    return true;
}"""
#: Adds a node of a type to the graph, reads what the canvas would draw for it, removes it again.
NODE_TEXTS_JS = """([type, socket, widget]) => {
    const before = window.app.graph.nodes.length;
    const node = window.LiteGraph.createNode(type);
    window.app.graph.add(node);
    try {
        const slot = (node.inputs || []).find(i => i.name === socket);
        const w = (node.widgets || []).find(w => w.name === widget);
        return {
            locale: window.app.extensionManager.setting.get('Comfy.Locale'),
            registeredTitle: window.LiteGraph.registered_node_types[type]?.title ?? null,
            title: node.getTitle ? node.getTitle() : node.title,
            socket: slot ? (slot.renderingLabel ?? (slot.label || slot.localized_name || slot.name)) : null,
            widget: w ? (w.label || w.name) : null,
            nodesBefore: before,
        };
    } finally {
        window.app.graph.remove(node);
    }
}"""


def _texts(lang: str) -> dict:
    return json.loads((REPO / "locales" / lang / "nodeDefs.json").read_text(encoding="utf-8"))[NODE_TYPE]


def test_server_serves_the_chinese_translation(comfy_server: ComfyServer):
    """``GET /i18n`` carries the pack's zh files as they are on disk (the frontend's only source)."""
    served = comfy_server.get_json("/i18n").get("zh", {})
    want = json.loads((REPO / "locales/zh/nodeDefs.json").read_text(encoding="utf-8"))
    assert served.get("nodeDefs", {}).get(NODE_TYPE) == want[NODE_TYPE], sorted(served)
    assert served.get("nodeCategories", {}).get("DreamMatcher"), served.get("nodeCategories")


def test_node_title_and_input_labels_are_chinese(comfy_server: ComfyServer):
    """In a page set to zh, the node is titled and its socket and widget labelled from locales/zh."""
    zh, en = _texts("zh"), _texts("en")
    want = {"title": zh["display_name"], "socket": zh["inputs"][SOCKET_INPUT]["name"],
            "widget": zh["inputs"][WIDGET_INPUT]["name"]}
    for key, text in want.items():  # else the test could pass on an untranslated node
        assert CJK.search(text), (key, text)
    assert want["title"] != en["display_name"]

    before = comfy_server.get_json("/settings").get(LOCALE_SETTING)
    key = f"nodeDefs.{NODE_TYPE}.display_name"
    with open_frontend(comfy_server, {LOCALE_SETTING: "zh"}) as (page, errors):
        own = page.evaluate(I18N_JS, "nodeDefs.KSampler.display_name")
        assert own["locale"] == "zh" and own["inZh"] and CJK.search(own["text"] or ""), (
            f"the page did not switch to the frontend's own Chinese: {own}")
        ours = page.evaluate(I18N_JS, key)
        version = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || ''")
        # only the frontend known to drop a pack's Chinese may lack it; on any other, it is a failure
        assert ours["inZh"] or version.startswith(FRONTEND_DROPPING_PACK_ZH), (
            f"frontend {version!r} does not show the pack's Chinese: {ours}")
        if not ours["inZh"]:
            # The frontend merged /i18n into zh before lazily loading its own zh messages, which
            # replaced them (frontend 1.32): the pack cannot change that, so apply what /i18n served
            # (asserted above) the way newer frontends do, and check the rest of the path.
            assert page.evaluate(REMERGE_JS, ["zh", comfy_server.get_json("/i18n")["zh"]]), (
                "found no i18n instance in the page to merge the served translations into")
            print("\n[browser] this frontend dropped the pack's zh messages on its lazy locale load; "
                  "re-merged what /i18n serves")
        got = page.evaluate(NODE_TEXTS_JS, [NODE_TYPE, SOCKET_INPUT, WIDGET_INPUT])
        print(f"\n[browser] {NODE_TYPE} in zh: title {got['title']!r}, socket {SOCKET_INPUT} "
              f"{got['socket']!r}, widget {WIDGET_INPUT} {got['widget']!r} (natively: {ours['inZh']})")
        assert got["locale"] == "zh", got
        assert got["registeredTitle"] == want["title"], got
        assert {k: got[k] for k in want} == want, got
        assert page.evaluate("() => window.app.graph.nodes.length") == got["nodesBefore"], "probe node left"
        pack_errors = [e for e in errors if PACK_FOLDER in e]
        assert not pack_errors, f"page errors from the pack's web extension in the zh frontend: {pack_errors}"
    # the session's server is shared: the next page must open in the language it had before
    assert comfy_server.get_json("/settings").get(LOCALE_SETTING) == before
