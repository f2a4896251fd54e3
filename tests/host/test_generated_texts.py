"""The texts generated from the node schema stay in step with it.

``locales/en/*.json`` (the frontend's English node texts) and the input/output tables of
``web/docs/<NodeId>.md`` (the node docs panel) are written from ``GET_NODE_INFO_V1`` by
``scripts/make_locales.py`` and ``scripts/make_node_docs.py``. The core tier checks their keys and
names against the schema snapshot; only a live host knows the tooltips, defaults and ranges, so this
tier checks the whole text: a changed tooltip or default without a rerun of the scripts fails here, with
the command that fixes it.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def infos(dm) -> dict[str, dict]:
    """``{node id: GET_NODE_INFO_V1()}`` of every node the pack registers, in menu order."""
    node_info = _script("make_locales").node_info
    out = {}
    for cls in dm("nodes.extension").node_classes():
        info = node_info(cls)
        out[info["name"]] = info
    return out


def _script(name: str):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "scripts"))


def test_english_locale_files_are_what_the_schema_says(infos):
    locales = _script("make_locales")
    stale = [name for name, content in locales.english(infos).items()
             if (locales.LOCALES / "en" / name).read_text(encoding="utf-8") != locales.dump(content)]
    assert not stale, (f"locales/en/{', '.join(stale)} differ from the node schema: run "
                       "`.venv/bin/python scripts/make_locales.py` and update the other languages")
    for lang in sorted(p for p in locales.LOCALES.iterdir() if p.is_dir() and p.name != "en"):
        missing, extra = locales.key_differences(locales.english(infos), lang)
        assert not missing and not extra, (lang.name, sorted(missing)[:5], sorted(extra)[:5])


def test_node_doc_tables_are_what_the_schema_says(infos):
    docs = _script("make_node_docs")
    stale = []
    for node_id, info in infos.items():
        path = docs.DOCS / f"{node_id}.md"
        text = path.read_text(encoding="utf-8")
        if docs.render_file(text, info) != text:
            stale.append(node_id)
    assert not stale, (f"the tables of web/docs/{{{', '.join(stale)}}}.md differ from the node schema: "
                       "run `.venv/bin/python scripts/make_node_docs.py`")
    # the check can fail: a changed default shows in the rendered table
    node_id, info = next(iter(infos.items()))
    changed = dict(info, description=info.get("description", "") + " (changed)")
    if "required" in info["input"] and info["input"]["required"]:
        name = info["input_order"]["required"][0]
        typ, *opts = info["input"]["required"][name]
        tip = dict(opts[0] if opts else {}, tooltip="a different tooltip")
        changed["input"] = dict(info["input"], required=dict(info["input"]["required"], **{name: [typ, tip]}))
    text = (docs.DOCS / f"{node_id}.md").read_text(encoding="utf-8")
    assert docs.render_file(text, changed) != text
