"""Node IDs, input names, types, defaults and order are a public contract.

Saved workflows store widget values positionally, so any change here breaks users'
workflows. The snapshot must be updated on purpose:
``DM_UPDATE_SNAPSHOT=1 .venv/bin/python -m pytest tests/host/test_schema_snapshot.py``.
New inputs may only be appended at the end of a node's inputs, and should be optional: an API-format
prompt saved before an input existed carries no value for it, and a required one fails its validation
(``tests/host/test_inspect_nodes.py`` runs such a prompt for Feature Settings' ``pca_solver``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SNAPSHOT = Path(__file__).with_name("schema_snapshot.json")
REQUIRED_NODES = {
    "DM_InvertReference", "DM_ExtractFeatures", "DM_SemanticMatch", "DM_AMAPatch",
    "DM_MatchingGuidanceSampler",
}


def _pack_nodes(host) -> dict[str, type]:
    import nodes

    return {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items()
            if getattr(v, "RELATIVE_PYTHON_MODULE", "").endswith(".dreammatcher")}


def _contract(cls) -> dict:
    info = cls.GET_NODE_INFO_V1() if hasattr(cls, "GET_NODE_INFO_V1") else None
    assert info is not None, f"{cls} is not a V3 node"
    inputs = []
    for section in ("required", "optional"):
        spec = info["input"].get(section, {})
        for name in info["input_order"].get(section, []):
            typ, *opts = spec[name]
            opts = opts[0] if opts else {}
            inputs.append({
                "name": name,
                "section": section,
                # Combo options may come from the host (e.g. schedulers), so only the kind is locked.
                "type": typ if isinstance(typ, str) else "COMBO",
                "default": opts.get("default"),
            })
    return {
        "display_name": info["display_name"],
        "category": info["category"],
        "inputs": inputs,
        "outputs": list(info["output"]),
        "output_node": info["output_node"],
    }


def test_schema_matches_snapshot(host):
    current = {nid: _contract(cls) for nid, cls in sorted(_pack_nodes(host).items())}
    if os.environ.get("DM_UPDATE_SNAPSHOT"):
        SNAPSHOT.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    expected = json.loads(SNAPSHOT.read_text())
    assert set(current) == set(expected), "node IDs changed: update the snapshot on purpose"
    for nid, want in expected.items():
        got = current[nid]
        n = len(want["inputs"])
        assert got["inputs"][:n] == want["inputs"], f"{nid}: existing inputs changed or reordered"
        assert len(got["inputs"]) == n, f"{nid}: new inputs appended: update the snapshot on purpose"
        assert {k: v for k, v in got.items() if k != "inputs"} == {
            k: v for k, v in want.items() if k != "inputs"}, nid


def test_all_five_method_nodes_registered(host):
    assert REQUIRED_NODES <= set(_pack_nodes(host))


def test_every_input_has_a_tooltip(host):
    missing = []
    for nid, cls in _pack_nodes(host).items():
        info = cls.GET_NODE_INFO_V1()
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                opts = spec[1] if len(spec) > 1 else {}
                if not opts.get("tooltip"):
                    missing.append(f"{nid}.{name}")
    assert not missing, f"inputs without tooltip: {missing}"
